"""The two sites of ``bench/compare``: a generated one and the Python 3.11 docs, and the list
of HTML page URLs each holds (what the ceiling loop and the fetcher-alone run fetch).

``streamcrawl.demo.site.generate_site`` fixes links (5-15) and page size (~1 KB), and mixes
404s, redirects and off-site links in on purpose; a throughput comparison wants a clean site
whose link count and page size are parameters, so this module writes its own.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser

DOCS_HTML = Path("/usr/share/doc/python3.11/html")
_WORDS = (
    "kafka",
    "stream",
    "crawl",
    "page",
    "frontier",
    "fetch",
    "parse",
    "store",
    "bloom",
    "filter",
    "topic",
    "partition",
    "offset",
    "commit",
    "broker",
    "lag",
    "replica",
    "host",
    "link",
    "anchor",
    "title",
    "text",
    "index",
    "section",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
)


@dataclass
class SiteInfo:
    name: str
    entry_url: str
    page_urls: list[str]  # every HTML page reachable from entry_url by same-host links
    max_depth: int
    html_bytes: int
    description: str


def page_path(number: int) -> str:
    return "/" if number == 0 else f"/p{number // 1000}/{number}.html"


def _fanout(pages: int, links: int, depth: int = 4) -> int:
    """Smallest tree fan-out that puts every page within ``depth`` links of the entry."""
    fanout = 2
    while sum(fanout**level for level in range(depth + 1)) < pages:
        fanout += 1
    return min(fanout, max(links, 2))


def generate(
    root: Path, port: int, pages: int, links: int, page_bytes: int, seed: int = 11
) -> SiteInfo:
    """``pages`` pages under ``root/www``, each with exactly ``links`` same-host links
    (root-relative hrefs: tree children first, so every page is reachable within depth 4,
    then random pages) and filler paragraphs up to about ``page_bytes`` of HTML."""
    rng = random.Random(seed)
    www = root / "www"
    fanout = _fanout(pages, links)
    graph: list[list[int]] = []
    for number in range(pages):
        children = [
            c for c in range(fanout * number + 1, fanout * number + fanout + 1) if c < pages
        ]
        targets = children[:links] + [rng.randrange(pages) for _ in range(links - len(children))]
        graph.append(targets)
    total = 0
    for number, targets in enumerate(graph):
        anchors = "\n".join(
            f'<li><a href="{page_path(t)}">page {t} link {i}</a></li>'
            for i, t in enumerate(targets)
        )
        head = (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Bench page {number}</title></head>\n<body><h1>Bench page {number}</h1>\n"
        )
        tail = f"<ul>\n{anchors}\n</ul>\n</body></html>\n"
        paragraphs: list[str] = []
        size = len(head) + len(tail)
        while size < page_bytes:
            words = " ".join(rng.choices(_WORDS, k=rng.randint(40, 120)))
            paragraphs.append(f"<p>{words}</p>\n")
            size += len(paragraphs[-1])
        text = head + "".join(paragraphs) + tail
        file = www / ("index.html" if number == 0 else page_path(number).lstrip("/"))
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text, encoding="utf-8")
        total += len(text)
    depth = _tree_depth(graph)
    origin = f"http://127.0.0.1:{port}"
    return SiteInfo(
        name="generated",
        entry_url=origin + "/",
        page_urls=[origin + page_path(n) for n in range(pages)],
        max_depth=depth,
        html_bytes=total,
        description=(
            f"{pages:,} generated pages, {links} same-host links each, "
            f"{total / pages / 1024:.1f} KiB of HTML on average"
        ),
    )


def _tree_depth(graph: list[list[int]]) -> int:
    depth = {0: 0}
    queue = deque([0])
    while queue:
        node = queue.popleft()
        for target in graph[node]:
            if target not in depth:
                depth[target] = depth[node] + 1
                queue.append(target)
    if len(depth) != len(graph):
        raise RuntimeError(f"generated site: only {len(depth)} of {len(graph)} pages reachable")
    return max(depth.values())


def docs(root: Path, port: int, source: Path = DOCS_HTML) -> SiteInfo:
    """The Debian python3.11-doc HTML, served as is (``root/www`` is a symlink to it)."""
    if not (source / "index.html").exists():
        raise SystemExit(f"{source} not found: apt-get install -y python3.11-doc")
    (root / "www").symlink_to(source)
    origin = f"http://127.0.0.1:{port}"
    urls, depth, size = _static_crawl(source, origin)
    return SiteInfo(
        name="docs",
        entry_url=origin + "/",
        page_urls=urls,
        max_depth=depth,
        html_bytes=size,
        description=(
            f"Python 3.11 docs (Debian python3.11-doc), {len(urls):,} HTML pages reachable from "
            f"/ by same-host links, {size / max(1, len(urls)) / 1024:.1f} KiB of HTML on average"
        ),
    )


def _html_file(www: Path, url: str) -> Path | None:
    """The file nginx answers ``url`` with when that is an HTML page (200), else None."""
    path = unquote(urlsplit(url).path)
    if ".." in path.split("/"):
        return None
    file = www / path.lstrip("/")
    if path.endswith("/"):
        file = file / "index.html"
    if file.suffix == ".html" and file.is_file():
        return file
    return None


def _static_crawl(www: Path, origin: str) -> tuple[list[str], int, int]:
    """Breadth-first over the files, with the bare loop's link rules (urljoin, no fragment,
    same host), keeping the URLs that are HTML pages; returns them, the max depth and the
    HTML bytes."""
    host = urlsplit(origin).netloc
    entry = origin + "/"
    depth = {entry: 0}
    queue = deque([entry])
    pages: list[str] = []
    size = 0
    while queue:
        url = queue.popleft()
        file = _html_file(www, url)
        if file is None:
            continue
        body = file.read_bytes()
        pages.append(url)
        size += len(body)
        for node in LexborHTMLParser(body).css("a[href]"):
            href = node.attributes.get("href")
            if not href:
                continue
            link = urldefrag(urljoin(url, href.strip())).url
            parts = urlsplit(link)
            if parts.scheme in ("http", "https") and parts.netloc == host and link not in depth:
                depth[link] = depth[url] + 1
                queue.append(link)
    return pages, max(depth[url] for url in pages), size


def is_html_path(request_uri: str) -> bool:
    """How a logged request is counted as a page: its path names an HTML file or a
    directory index (nginx's log has no content type)."""
    path = request_uri.split("?", 1)[0]
    return path.endswith((".html", "/"))
