"""A generated site made heavier and then revised between two visits: what a conditional
re-crawl is measured on (``tests/integration/test_recrawl.py``, ``bench/recrawl_rounds.py``).

nginx answers a conditional request with 304 while a file's ETag (its mtime and size) and
Last-Modified still match, so a revision gives the changed and touched files a later mtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .site import SiteManifest

FRESH_PATH = "/fresh-in-round-two.html"


def request_path(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def file_of(www: Path, path: str) -> Path:
    return www / ("index.html" if path == "/" else path.lstrip("/"))


def pad_pages(www: Path, kib: int) -> None:
    """Add ``kib`` KiB of paragraphs (distinct per page) to every page of the site: the
    generated pages weigh a few KiB, real HTML pages tens of KiB, and what a conditional
    revisit saves grows with them."""
    if kib <= 0:
        return
    for file in www.rglob("*.html"):
        words = " ".join(f"{file.stem}-{n}" for n in range(kib * 1024 // 12))
        paragraphs = "".join(f"<p>{words[i : i + 400]}</p>" for i in range(0, len(words), 400))
        text = file.read_text(encoding="utf-8")
        file.write_text(text.replace("</body>", paragraphs + "</body>"), encoding="utf-8")


@dataclass(frozen=True)
class Revision:
    """What :func:`revise_site` did: pages whose content changed, pages only touched (a new
    mtime, so a new ETag, over the same content), and the new page one changed page links."""

    changed: frozenset[str]
    touched: frozenset[str]
    fresh_url: str


def revise_site(
    www: Path, manifest: SiteManifest, changed: int, touched: int, mark: str, mtime: float
) -> Revision:
    """Change the first ``changed`` content pages (``mark`` and their URL added to their
    text; the first of them links a new page), touch the next ``touched`` ones, all with
    ``mtime`` (choose one a second or more after the site was written)."""
    content = sorted(manifest.pages - {manifest.entry_url})
    changing = content[:changed]
    touching = content[changed : changed + touched]
    fresh_url = manifest.base_url + FRESH_PATH.lstrip("/")
    file_of(www, FRESH_PATH).write_text(
        "<html><head><title>Fresh</title></head><body><p>new page</p></body></html>",
        encoding="utf-8",
    )
    for url in changing:
        file = file_of(www, request_path(url))
        extra = f"<p>{mark}: {url}</p>"
        if url == changing[0]:
            extra += f'<a href="{FRESH_PATH}">fresh</a>'
        text = file.read_text(encoding="utf-8")
        file.write_text(text.replace("</body>", extra + "</body>"), encoding="utf-8")
        os.utime(file, (mtime, mtime))
    for url in touching:
        os.utime(file_of(www, request_path(url)), (mtime, mtime))
    return Revision(frozenset(changing), frozenset(touching), fresh_url)
