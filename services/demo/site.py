"""A deterministic test site for crawl tests and ``crawl --demo``.

The link graph mixes relative and absolute links, several spellings of one page,
off-site links, 404s, redirects (one chained) and links a crawler must ignore.
The manifest is computed from the graph itself, never by re-parsing the HTML.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

SECTIONS = 20
_WORDS = [
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
]


@dataclass
class SiteManifest:
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
                "redirects": self.redirects,
                "offsite": sorted(self.offsite),
                "max_depth": self.max_depth,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SiteManifest:
        raw = json.loads(text)
        return cls(
            raw["base_url"],
            raw["entry_url"],
            set(raw["pages"]),
            set(raw["missing"]),
            dict(raw["redirects"]),
            set(raw["offsite"]),
            raw["max_depth"],
        )


@dataclass
class _Graph:
    """Paths (root-relative, canonical) and the hrefs each page links with."""

    links: dict[str, list[tuple[str | None, str | None]]] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)


def content_path(number: int) -> str:
    return f"/s{number % SECTIONS}/p{number}.html"


def _spellings(target: str, source: str, origin: str, rng: random.Random) -> str:
    """One of several hrefs that all canonicalise to ``target``."""
    source_dir = source.rsplit("/", 1)[0]
    target_dir, name = target.rsplit("/", 1)
    choices = [
        target,
        origin + target,
        origin.replace("http://", "HTTP://") + target,
        target + "#part-" + str(rng.randint(1, 9)),
        f"{target_dir}/./{name}",
        f"{source_dir}/../{target_dir.lstrip('/')}/{name}",
        name if source_dir == target_dir else f"..{target}",
    ]
    return rng.choice(choices)


def _build_graph(pages: int, rng: random.Random, origin: str) -> _Graph:
    graph = _Graph()
    sections = [f"/s{k}/" for k in range(SECTIONS)]
    graph.links["/"] = [(section, section) for section in sections]
    for k, section in enumerate(sections):
        members = [content_path(n) for n in range(k, pages, SECTIONS)]
        graph.links[section] = [(path, path.rsplit("/", 1)[1]) for path in members]
    redirect_count = max(2, pages // 100)
    for r in range(redirect_count):
        graph.redirects[f"/r/{r}"] = content_path(rng.randrange(pages))
    graph.redirects["/r/chain"] = "/r/0"  # a two-hop chain
    for n in range(pages):
        source = content_path(n)
        hrefs: list[tuple[str | None, str | None]] = []
        for _ in range(rng.randint(5, 12)):
            target = content_path(rng.randrange(pages))
            hrefs.append((target, _spellings(target, source, origin, rng)))
        if n % 10 == 0:
            hrefs.append((None, f"http://offsite.example/from/{n}"))
            hrefs.append((None, "https://example.org/"))
        if n % 25 == 0:
            redirect = rng.choice(sorted(graph.redirects))
            hrefs.append((redirect, redirect))
        if n % 40 == 0:
            missing = f"/missing/{n // 40}.html"
            graph.missing.add(missing)
            hrefs.append((missing, missing))
        if n % 50 == 0:
            hrefs.append((None, "mailto:webmaster@example.org"))
            hrefs.append((None, "javascript:void(0)"))
        graph.links[source] = hrefs
    return graph


def _page_html(path: str, hrefs: list[tuple[str | None, str | None]], rng: random.Random) -> str:
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(40, 120)))
    anchors = "\n".join(
        f'<li><a href="{href}">link {i}</a></li>'
        for i, (_, href) in enumerate(hrefs)
        if href is not None
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Page {path}</title><style>p{{margin:0}}</style></head>\n"
        f"<body><h1>{path}</h1><p>{words}</p>\n<ul>\n{anchors}\n</ul>"
        f"<script>var ignored = 'not text';</script></body></html>\n"
    )


def _reachable(graph: _Graph) -> tuple[dict[str, int], int]:
    """BFS depth of every reachable path; a redirect target has its redirect's depth."""
    depth = {"/": 0}
    queue = deque(["/"])
    while queue:
        path = queue.popleft()
        if path in graph.redirects:
            nexts = [(graph.redirects[path], depth[path])]
        else:
            nexts = [
                (target, depth[path] + 1)
                for target, _ in graph.links.get(path, [])
                if target is not None
            ]
        for target, level in nexts:
            if target not in depth:
                depth[target] = level
                queue.append(target)
    return depth, max(depth.values())


def generate_site(root: Path, pages: int = 2000, seed: int = 7, *, port: int) -> SiteManifest:
    """Write the site under ``root/www`` and nginx redirects to ``root/redirects.conf``."""
    origin = f"http://127.0.0.1:{port}"
    rng = random.Random(seed)
    graph = _build_graph(pages, rng, origin)
    www = root / "www"
    for path, hrefs in graph.links.items():
        file = www / (path.lstrip("/") + "index.html" if path.endswith("/") else path.lstrip("/"))
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(_page_html(path, hrefs, rng), encoding="utf-8")
    (root / "redirects.conf").write_text(
        "".join(
            f"location = {source} {{ return 301 {target}; }}\n"
            for source, target in sorted(graph.redirects.items())
        )
    )
    depth, max_depth = _reachable(graph)
    manifest = SiteManifest(base_url=origin + "/", entry_url=origin + "/", max_depth=max_depth)
    for path in depth:
        url = origin + path
        if path in graph.redirects:
            manifest.redirects[url] = origin + graph.redirects[path]
        elif path in graph.missing:
            manifest.missing.add(url)
        else:
            manifest.pages.add(url)
    manifest.offsite = {
        href
        for hrefs in graph.links.values()
        for target, href in hrefs
        if target is None and href is not None and href.startswith("http")
    }
    return manifest
