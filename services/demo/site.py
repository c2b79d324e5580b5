"""A deterministic test site for crawl tests and ``crawl --demo``.

Content pages ``/s{section}/p{n}.html`` hang off the entry page ``/`` as one shallow
tree per section (so every page is at depth <= 4), with seeded random links on top.
Links mix relative, root-relative and absolute hrefs, several spellings of one page,
off-site links, 404s, nginx redirects (one chained) and links a crawler must ignore.
The manifest is computed from the link graph itself, never by re-parsing the HTML.
"""

from __future__ import annotations

import html
import json
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

SECTIONS = 20
REDIRECTS = 20
CHAIN = "/r/chain"  # redirects to /r/0, itself a redirect: a two-hop chain
# Tree levels below a section root (itself at depth 1): content pages sit at depth <= 3,
# so the 404 and redirect links they carry are still within depth 4.
_MAX_TREE_DEPTH = 2
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
)


@dataclass
class SiteManifest:
    """What a complete crawl from ``entry_url`` must find, in canonical URL form."""

    base_url: str
    entry_url: str
    pages: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    redirects: dict[str, str] = field(default_factory=dict)
    offsite: set[str] = field(default_factory=set)
    max_depth: int = 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "base_url": self.base_url,
                "entry_url": self.entry_url,
                "pages": sorted(self.pages),
                "missing": sorted(self.missing),
                "redirects": dict(sorted(self.redirects.items())),
                "offsite": sorted(self.offsite),
                "max_depth": self.max_depth,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> SiteManifest:
        raw = json.loads(text)
        return cls(
            base_url=raw["base_url"],
            entry_url=raw["entry_url"],
            pages=set(raw["pages"]),
            missing=set(raw["missing"]),
            redirects=dict(raw["redirects"]),
            offsite=set(raw["offsite"]),
            max_depth=int(raw["max_depth"]),
        )


class _Link(NamedTuple):
    href: str  # exactly as written in the HTML
    target: str | None  # canonical on-site path, or canonical off-site URL; None: ignored
    onsite: bool


@dataclass
class _Graph:
    links: dict[str, list[_Link]] = field(default_factory=dict)  # page path -> its links
    redirects: dict[str, str] = field(default_factory=dict)  # /r/... -> path it points to
    missing: set[str] = field(default_factory=set)


def content_path(number: int) -> str:
    return f"/s{number % SECTIONS}/p{number}.html"


def _fanout(pages: int) -> int:
    """Smallest tree fan-out that fits the biggest section within the depth budget."""
    members = -(-pages // SECTIONS)
    fanout = 2
    while sum(fanout**level for level in range(_MAX_TREE_DEPTH + 1)) < members:
        fanout += 1
    return fanout


def _tree_children(number: int, pages: int, fanout: int) -> list[int]:
    """Heap-style children within the page's section: member i has f*i+1 .. f*i+f."""
    section, member = number % SECTIONS, number // SECTIONS
    children = (fanout * member + k for k in range(1, fanout + 1))
    return [section + SECTIONS * child for child in children if section + SECTIONS * child < pages]


def _spelling(target: str, source: str, origin: str, rng: random.Random) -> str:
    """One of several hrefs that all canonicalise to ``target`` when found on ``source``.

    No ``?`` with an empty query: canonicalisers disagree on whether it is kept.
    """
    source_dir = source.rsplit("/", 1)[0]
    target_dir, name = target.rsplit("/", 1)
    relative = name if source_dir == target_dir else f"..{target}"
    choices = (
        relative,
        f"./{relative}",
        target,
        origin + target,
        origin.replace("http://", "HTTP://") + target,
        f"{relative}#part-{rng.randint(1, 9)}",
        f"{target_dir}/./{name}",
        f"{source_dir}/..{target}",
    )
    return rng.choice(choices)


def _extras(number: int, redirects: list[str], graph: _Graph) -> list[_Link]:
    """Off-site, redirect, 404 and must-ignore links, each on a fixed share of pages."""
    extras: list[_Link] = []
    if number % 10 == 3:
        offsite = f"http://offsite.example/from/{number}"
        extras.append(_Link(offsite, offsite, onsite=False))
    if number % 20 == 5:
        extras.append(_Link("https://example.org/", "https://example.org/", onsite=False))
    if number % 25 == 12:
        redirect = redirects[(number // 25) % len(redirects)]
        extras.append(_Link(redirect, redirect, onsite=True))
    if number % 10 == 7:  # with ~10 links a page, about 1% of all links are 404s
        missing = f"/missing/{number // 10}.html"
        graph.missing.add(missing)
        extras.append(_Link(missing, missing, onsite=True))
    if number % 50 == 9:
        extras.append(_Link("mailto:webmaster@example.org", None, onsite=False))
        extras.append(_Link("javascript:void(0)", None, onsite=False))
    return extras


def _content_links(
    number: int, pages: int, fanout: int, extras: list[_Link], origin: str, rng: random.Random
) -> list[_Link]:
    source = content_path(number)
    targets = [content_path(child) for child in _tree_children(number, pages, fanout)]
    wanted = rng.randint(5, 15) - len(extras)
    targets += [content_path(rng.randrange(pages)) for _ in range(wanted - len(targets))]
    links = [_Link(_spelling(target, source, origin, rng), target, True) for target in targets]
    links += extras
    rng.shuffle(links)
    return links


def _build_graph(pages: int, origin: str, rng: random.Random) -> _Graph:
    graph = _Graph()
    roots = [content_path(section) for section in range(min(SECTIONS, pages))]
    graph.links["/"] = [
        _Link(path if n % 2 else path.lstrip("/"), path, True) for n, path in enumerate(roots)
    ]
    for r in range(REDIRECTS):
        graph.redirects[f"/r/{r}"] = content_path(rng.randrange(pages))
    graph.redirects[CHAIN] = "/r/0"
    redirects = sorted(graph.redirects)
    fanout = _fanout(pages)
    for number in range(pages):
        extras = _extras(number, redirects, graph)
        graph.links[content_path(number)] = _content_links(
            number, pages, fanout, extras, origin, rng
        )
    return graph


def _depths(graph: _Graph) -> dict[str, int]:
    """BFS depth of every reachable on-site path; a redirect's target gets its depth."""
    depth = {"/": 0}
    queue = deque(["/"])
    while queue:
        path = queue.popleft()
        for link in graph.links.get(path, []):
            if link.onsite and link.target is not None:
                _visit(link.target, depth[path] + 1, depth, queue, graph.redirects)
    return depth


def _visit(
    path: str, level: int, depth: dict[str, int], queue: deque[str], redirects: dict[str, str]
) -> None:
    # Follow a redirect chain at once: the targets cost no depth, and queueing them now
    # keeps the queue ordered by depth (a plain BFS would give them one level too many
    # when another page at the redirect's level links to them first).
    while path not in depth:
        depth[path] = level
        queue.append(path)
        if path not in redirects:
            return
        path = redirects[path]


def _page_html(title: str, links: list[_Link], rng: random.Random) -> str:
    paragraphs = "\n".join(
        "<p>" + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 60))) + "</p>"
        for _ in range(rng.randint(2, 4))
    )
    anchors = "\n".join(
        f'<li><a href="{html.escape(link.href)}">link {i}</a></li>' for i, link in enumerate(links)
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>p{{margin:0}}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{paragraphs}\n<ul>\n{anchors}\n</ul>\n"
        "<script>var ignored = 'not text';</script></body></html>\n"
    )


def _write_pages(www: Path, graph: _Graph, rng: random.Random) -> None:
    for path, links in graph.links.items():
        file = www / ("index.html" if path == "/" else path.lstrip("/"))
        file.parent.mkdir(parents=True, exist_ok=True)
        title = "Demo site" if path == "/" else f"Demo page {path}"
        file.write_text(_page_html(title, links, rng), encoding="utf-8")


def _write_redirects(conf: Path, graph: _Graph, origin: str) -> None:
    # Absolute Location headers, so a redirect's target is unambiguous on the wire.
    conf.write_text(
        "".join(
            f"location = {source} {{ return 301 {origin}{target}; }}\n"
            for source, target in sorted(graph.redirects.items())
        ),
        encoding="utf-8",
    )


def _manifest(graph: _Graph, origin: str) -> SiteManifest:
    depth = _depths(graph)
    manifest = SiteManifest(
        base_url=origin + "/", entry_url=origin + "/", max_depth=max(depth.values())
    )
    for path in depth:
        if path in graph.redirects:
            manifest.redirects[origin + path] = origin + graph.redirects[path]
        elif path in graph.missing:
            manifest.missing.add(origin + path)
        else:
            manifest.pages.add(origin + path)
    manifest.offsite = {
        link.target
        for path in depth
        for link in graph.links.get(path, [])
        if not link.onsite and link.target is not None
    }
    return manifest


def generate_site(root: Path, pages: int = 2000, seed: int = 7, *, port: int) -> SiteManifest:
    """Write the site under ``root/www`` and its redirects to ``root/redirects.conf``."""
    if pages < 1:
        raise ValueError(f"a demo site needs at least one page, not {pages}")
    origin = f"http://127.0.0.1:{port}"
    rng = random.Random(seed)
    graph = _build_graph(pages, origin, rng)
    _write_pages(root / "www", graph, rng)
    _write_redirects(root / "redirects.conf", graph, origin)
    return _manifest(graph, origin)
