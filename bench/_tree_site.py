"""The site of ``bench/million``: N small pages written as files for nginx, laid out as a
tree one level shallower than the crawl's default ``max_depth`` (so every page is reachable,
the count the crawl must store is exactly N, and the deepest pages' links are still in
scope: every link goes through the frontier and dedup).

Why not ``_site.generate``: its extra links go to random pages, and in a pipelined crawl a
page can then be admitted first by a long path (depth 5) rather than its short one; its own
children are then past ``max_depth`` and never crawled. Here the extra links of a page only
point at pages that are certain to be admitted before the page itself is fetched: its
ancestors and the earlier siblings of itself and of each ancestor (the parent lists its
children in order and dedup reads them in that order, all on one host's partition). So
every page is admitted at its tree depth, whatever the timing, and the extra links are the
navigation links a real site repeats on every page: they go through the frontier and dedup
and must come out as nothing new.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from _site import _WORDS, page_path


@dataclass(frozen=True)
class TreeSite:
    entry_url: str
    pages: int
    fanout: int
    depth: int  # deepest page's depth from the entry
    links_per_page: float  # average
    html_bytes: int

    @property
    def description(self) -> str:
        return (
            f"{self.pages:,} generated pages, a tree of fan-out {self.fanout} and depth "
            f"{self.depth}, {self.links_per_page:.1f} same-host links per page on average, "
            f"{self.html_bytes / self.pages / 1024:.1f} KiB of HTML on average"
        )


def fanout_for(pages: int, max_depth: int) -> int:
    """Smallest fan-out that puts ``pages`` pages within ``max_depth`` links of the entry."""
    fanout = 2
    while sum(fanout**level for level in range(max_depth + 1)) < pages:
        fanout += 1
    return fanout


def children(number: int, fanout: int, pages: int) -> range:
    first = fanout * number + 1
    return range(first, min(first + fanout, pages))


def parent(number: int, fanout: int) -> int:
    return (number - 1) // fanout


def navigation_targets(number: int, fanout: int) -> list[int]:
    """Pages certainly admitted before ``number`` is fetched: its ancestors and the earlier
    siblings of itself and of every ancestor."""
    targets: list[int] = []
    node = number
    while node:
        up = parent(node, fanout)
        targets.extend(range(fanout * up + 1, node))  # earlier siblings of node
        targets.append(up)
        node = up
    return targets


def depth_of(number: int, fanout: int) -> int:
    depth = 0
    while number:
        number = parent(number, fanout)
        depth += 1
    return depth


def _fillers(page_bytes: int, seed: int) -> list[str]:
    """A pool of filler paragraph blocks, each about ``page_bytes`` minus the markup."""
    rng = random.Random(seed)
    pool = []
    for _ in range(64):
        block: list[str] = []
        size = 0
        while size < page_bytes:
            words = " ".join(rng.choices(_WORDS, k=rng.randint(40, 90)))
            block.append(f"<p>{words}</p>\n")
            size += len(block[-1])
        pool.append("".join(block))
    return pool


def generate(
    root: Path, port: int, pages: int, links: int, page_bytes: int, max_depth: int, seed: int = 7
) -> TreeSite:
    """Write ``pages`` pages under ``root/www``. Each page links its tree children (all of
    them: the fan-out may exceed ``links``), then navigation links up to ``links``."""
    rng = random.Random(seed)
    # One level short of max_depth: the deepest pages' links are then still in scope, so
    # every page's links go through the frontier and dedup (and are found already seen).
    fanout = fanout_for(pages, max_depth - 1)
    www = root / "www"
    for directory in range(0, (pages - 1) // 1000 + 1):
        (www / f"p{directory}").mkdir(parents=True, exist_ok=True)
    # Fillers are sized to leave room for the links (~45 bytes each) and the head.
    fillers = _fillers(max(0, page_bytes - 200 - 45 * max(links, fanout)), seed)
    total = 0
    link_count = 0
    deepest = 0
    for number in range(pages):
        own = list(children(number, fanout, pages))
        targets = own[:]
        if len(targets) < links and number:
            nav = navigation_targets(number, fanout)
            targets += [nav[rng.randrange(len(nav))] for _ in range(links - len(targets))]
        anchors = "".join(f'<li><a href="{page_path(t)}">page {t}</a></li>\n' for t in targets)
        text = (
            '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Million page {number}</title></head>\n<body><h1>Page {number}</h1>\n"
            f"{fillers[number % len(fillers)]}<ul>\n{anchors}</ul>\n</body></html>\n"
        ).encode()
        name = www / ("index.html" if number == 0 else page_path(number).lstrip("/"))
        descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(descriptor, text)
        finally:
            os.close(descriptor)
        total += len(text)
        link_count += len(targets)
    deepest = depth_of(pages - 1, fanout)
    if deepest >= max_depth:
        raise RuntimeError(f"tree depth {deepest} leaves no room under max_depth {max_depth}")
    return TreeSite(
        entry_url=f"http://127.0.0.1:{port}/",
        pages=pages,
        fanout=fanout,
        depth=deepest,
        links_per_page=link_count / pages,
        html_bytes=total,
    )


def page_number(path: str) -> int | None:
    """The page a logged request path names (``/`` is 0), or None for anything else."""
    if path == "/" or path == "/index.html":
        return 0
    if path.startswith("/p") and path.endswith(".html"):
        name = path.rsplit("/", 1)[-1][: -len(".html")]
        if name.isdigit():
            return int(name)
    return None
