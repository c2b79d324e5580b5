"""Parser throughput: streamcrawl's extract_page (selectolax lexbor) against lxml.html.

Run from the repository root: ``python bench/parser_bench.py``. It generates a
deterministic corpus of realistic pages, times every extractor side by side in this
process over several rounds (rotating their order so none always runs on a warm cache),
prints a Markdown table of median pages/s and writes it into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit, urlunsplit

import lxml.html
from lxml import etree
from streamcrawl.parser.extract import decode_body, extract_page

CONTENT_TYPE = "text/html; charset=utf-8"
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## Parser: selectolax vs lxml"
COMMAND = "python bench/parser_bench.py"


class Summary(NamedTuple):
    """What every extractor produces, field for field as ExtractedPage has it."""

    title: str | None
    text: str
    links: list[str]
    canonical: str | None
    noindex: bool
    nofollow: bool
    language: str | None
    content_hash: str


Extractor = Callable[[bytes, str], Summary]

# --- corpus ---------------------------------------------------------------------------

_WORDS = [
    "the",
    "crawler",
    "fetches",
    "pages",
    "from",
    "many",
    "hosts",
    "and",
    "parses",
    "links",
    "text",
    "titles",
    "while",
    "politeness",
    "rules",
    "limit",
    "each",
    "host",
    "queue",
    "partition",
    "offset",
    "commit",
    "broker",
    "consumer",
    "producer",
    "latency",
    "throughput",
    "bloom",
    "filter",
    "frontier",
    "sink",
    "document",
    "index",
    "café",
    "naïve",
    "über",
    "résumé",
    "—",
    "“quoted”",
    "data",
    "pipeline",
    "stream",
    "kafka",
    "mongo",
    "search",
    "engine",
    "archive",
    "national",
    "library",
    "research",
    "dataset",
    "snapshot",
    "robots",
    "sitemap",
    "canonical",
    "redirect",
]
_HOSTS = ("news.example.org", "cdn.example.net", "www.wikipedia.org", "docs.python.org")


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + rng.choice((".", ".", "!", "?", " &amp; more."))


def _href(rng: random.Random, page: int, n: int) -> tuple[str, str]:
    """An href in one of the shapes real pages use, and its rel attribute."""
    kind = rng.random()
    if kind < 0.35:
        href = f"/section-{rng.randint(1, 30)}/article-{page}-{n}.html"
    elif kind < 0.5:
        href = f"../related/{rng.randint(1, 9999)}?ref=p{page}&amp;utm_source=bench"
    elif kind < 0.62:
        href = f"https://{rng.choice(_HOSTS)}/wiki/Item_{rng.randint(1, 99999)}"
    elif kind < 0.7:
        href = f"//{rng.choice(_HOSTS)}/static/{n}"
    elif kind < 0.8:
        href = f"/tags/{rng.choice(_WORDS)}#section-{n}"
    elif kind < 0.85:
        href = rng.choice(("mailto:editor@example.com", "javascript:void(0)", "#top"))
    else:
        href = f"article-{page}-{n % 7}.html"  # duplicates, as on real pages
    rel = rng.choice(("nofollow", "nofollow noopener", "")) if rng.random() < 0.12 else ""
    return href, rel


def _anchor(rng: random.Random, page: int, n: int) -> str:
    href, rel = _href(rng, page, n)
    rel_attr = f' rel="{rel}"' if rel else ""
    return f'<a href="{href}"{rel_attr} class="link l{n % 5}">{_sentence(rng, 3)[:-1]}</a>'


def _head(rng: random.Random, page: int) -> str:
    css = "".join(
        f".c{i} {{ margin: {i}px; color: #{rng.randint(0, 0xFFFFFF):06x}; }}\n"
        for i in range(rng.randint(40, 120))
    )
    script = "".join(
        f"var v{i} = document.querySelector('.c{i}'); if (v{i}) {{ v{i}.dataset.n = {i}; }}\n"
        for i in range(rng.randint(30, 90))
    )
    links = "".join(f'<link rel="stylesheet" href="/css/site{i}.css">' for i in range(4))
    return (
        f'<head><meta charset="utf-8"><title>{_sentence(rng, 6)}</title>'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="description" content="{_sentence(rng, 20)}">{links}'
        f'<link rel="canonical" href="https://site.example/p/{page}.html">'
        f"<style>{css}</style><script>{script}</script></head>"
    )


def _paragraph(rng: random.Random, anchors: list[str]) -> str:
    parts = [_sentence(rng, rng.randint(8, 25)) for _ in range(rng.randint(2, 6))]
    for _ in range(min(len(anchors), rng.randint(0, 3))):
        parts.insert(rng.randint(0, len(parts)), anchors.pop())
    if rng.random() < 0.4:
        parts.insert(1, f"<strong>{_sentence(rng, 4)}</strong><em>{rng.choice(_WORDS)}</em>")
    return f'<p class="body-text">{" ".join(parts)}</p>'


def _section(rng: random.Random, anchors: list[str], index: int) -> str:
    blocks = [f'<h2 id="s{index}">{_sentence(rng, 5)}</h2>']
    blocks += [_paragraph(rng, anchors) for _ in range(rng.randint(2, 5))]
    if rng.random() < 0.3:
        items = "".join(f"<li>{_sentence(rng, 6)}</li>" for _ in range(rng.randint(3, 8)))
        blocks.append(f"<ul>{items}</ul>")
    if rng.random() < 0.2:
        rows = "".join(
            f"<tr><td>{rng.choice(_WORDS)}</td><td>{rng.randint(1, 9999)}</td></tr>"
            for _ in range(rng.randint(3, 10))
        )
        blocks.append(f'<table class="data"><tbody>{rows}</tbody></table>')
    if rng.random() < 0.3:
        blocks.append(f'<img src="/img/{index}.jpg" alt="{_sentence(rng, 4)}" width="640">')
    inner = "".join(blocks)
    for depth in range(rng.randint(2, 8)):  # the div soup of real templates
        inner = f'<div class="wrap-{depth} col-md-{rng.randint(1, 12)}">{inner}</div>'
    return f"<section>{inner}<!-- end section {index} --></section>"


def make_page(page: int, seed: int = 1) -> bytes:
    """One synthetic page of 20-60 KB with 50-150 anchors, the same for the same seed."""
    rng = random.Random(seed * 1_000_003 + page)
    target = rng.randint(20_000, 56_000)  # the last section overshoots by up to ~4 KB
    anchors = [_anchor(rng, page, n) for n in range(rng.randint(50, 150))]
    head = _head(rng, page)
    nav = "".join(f"<li>{anchors.pop()}</li>" for _ in range(12))
    footer = "".join(f"<li>{anchors.pop()}</li>" for _ in range(10))
    sections: list[str] = []
    # Unplaced anchors still count: they end up inline or in the related list.
    used = 600 + len(head) + len(nav) + len(footer)
    while used + sum(map(len, anchors)) + 9 * len(anchors) < target:
        sections.append(_section(rng, anchors, len(sections)))
        used += len(sections[-1])
    related = "".join(f"<li>{anchor}</li>" for anchor in anchors)
    html = (
        f'<!DOCTYPE html><html lang="en">{head}<body class="page">'
        f'<header><nav><ul class="menu">{nav}</ul></nav></header>'
        f"<main><article><h1>{_sentence(rng, 7)}</h1>{''.join(sections)}</article>"
        f'<aside><ul class="related">{related}</ul></aside></main>'
        f"<footer><ul>{footer}</ul><p>&copy; 2026 Example</p></footer>"
        '<script src="/js/app.js"></script><script>window.dataLayer = [];</script>'
        "</body></html>"
    )
    return html.encode()


def make_corpus(pages: int, seed: int) -> list[tuple[bytes, str]]:
    return [
        (make_page(i, seed), f"https://site.example/section-{i % 30}/p/{i}.html")
        for i in range(pages)
    ]


# --- extractors -----------------------------------------------------------------------


def extract_lexbor(body: bytes, url: str) -> Summary:
    page = extract_page(body, url, CONTENT_TYPE)
    return Summary(
        page.title,
        page.text,
        page.links,
        page.canonical,
        page.noindex,
        page.nofollow,
        page.language,
        page.content_hash,
    )


_INVISIBLE_TAGS = ("script", "style", "noscript", "template")
# The same block elements extract_page separates, so both produce the same text.
_BLOCK_TAGS = frozenset(
    [
        "address",
        "article",
        "aside",
        "blockquote",
        "br",
        "dd",
        "details",
        "dialog",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "legend",
        "li",
        "main",
        "menu",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "summary",
        "table",
        "td",
        "th",
        "tr",
        "ul",
        "caption",
        "center",
        "hgroup",
        "option",
    ]
)
_SKIPPED_HREFS = ("javascript:", "mailto:", "tel:", "data:", "about:", "#")


def _absolute(base: str, href: str) -> str | None:
    parts = urlsplit(urljoin(base, href))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))


def _lxml_robots(doc: Any) -> tuple[bool, bool]:
    directives: set[str] = set()
    for meta in doc.iterfind(".//meta[@name]"):
        if meta.get("name", "").strip().lower() in ("robots", "streamcrawl"):
            directives.update(p.strip().lower() for p in meta.get("content", "").split(","))
    none = "none" in directives
    return none or "noindex" in directives, none or "nofollow" in directives


def _lxml_links(doc: Any, base: str, page_nofollow: bool) -> tuple[list[str], int]:
    seen: dict[str, None] = {}
    resolved: set[str] = set()  # the same per-page href memo as extract_page
    withheld = 0
    for element, attribute, link, _ in doc.iterlinks():
        if attribute != "href" or element.tag not in ("a", "area"):
            continue
        href = link.strip()
        if not href or href.lower().startswith(_SKIPPED_HREFS):
            continue
        if page_nofollow or "nofollow" in element.get("rel", "").lower().split():
            withheld += 1
        elif href not in resolved:
            resolved.add(href)
            if (absolute := _absolute(base, href)) is not None:
                seen[absolute] = None
    return list(seen), withheld


def _lxml_text(doc: Any) -> str:
    body = doc.body
    etree.strip_elements(body, *_INVISIBLE_TAGS, with_tail=False)
    etree.strip_tags(body, etree.Comment)
    for element in body.iter():
        if element.tag in _BLOCK_TAGS:
            element.text = " " + (element.text or "")
            element.tail = " " + (element.tail or "")
    return " ".join("".join(body.itertext()).split())[:200_000]


def _lxml_canonical(doc: Any, base: str) -> str | None:
    for link in doc.iterfind(".//link[@rel][@href]"):
        if "canonical" in link.get("rel").lower().split():
            return _absolute(base, link.get("href").strip())
    return None


def extract_lxml(body: bytes, url: str) -> Summary:
    """What extract_page does, with lxml.html: itertext for text, iterlinks + urljoin."""
    text, _ = decode_body(body, CONTENT_TYPE)
    doc = lxml.html.document_fromstring(text)
    title = " ".join((doc.findtext(".//title") or "").split()) or None
    noindex, nofollow = _lxml_robots(doc)
    base_element = doc.find(".//base[@href]")
    base = url if base_element is None else _absolute(url, base_element.get("href")) or url
    links, _ = _lxml_links(doc, base, nofollow)
    canonical = _lxml_canonical(doc, base)
    language = (doc.get("lang") or "").strip()[:35] or None
    visible = _lxml_text(doc)
    return Summary(
        title,
        visible,
        links,
        canonical,
        noindex,
        nofollow,
        language,
        hashlib.sha256(visible.encode()).hexdigest(),
    )


def modest_extractor() -> tuple[Extractor | None, str]:
    """selectolax's older Modest parser, when this selectolax still ships it."""
    try:
        from selectolax.parser import HTMLParser  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:  # selectolax 1.0 removed it
        return None, str(exc).split(". ")[0]

    def extract_modest(body: bytes, url: str) -> Summary:
        text, _ = decode_body(body, CONTENT_TYPE)
        tree = HTMLParser(text)
        title_node = tree.css_first("title")
        title = " ".join(title_node.text().split()) if title_node is not None else None
        links = []
        for node in tree.css("a[href], area[href]"):
            href = (node.attributes.get("href") or "").strip()
            rel = (node.attributes.get("rel") or "").lower().split()
            if href and not href.lower().startswith(_SKIPPED_HREFS) and "nofollow" not in rel:
                links.append(_absolute(url, href))
        canonical_node = tree.css_first("link[rel=canonical][href]")
        canonical = (
            _absolute(url, canonical_node.attributes.get("href") or "")
            if (canonical_node is not None)
            else None
        )
        html_node = tree.css_first("html")
        language = (html_node.attributes.get("lang") or "") if html_node is not None else ""
        body_node = tree.body
        for node in body_node.css(", ".join(_INVISIBLE_TAGS)) if body_node else []:
            node.decompose()
        for node in body_node.css(", ".join(_BLOCK_TAGS)) if body_node else []:
            node.insert_before(" ")
            node.insert_after(" ")
        visible = " ".join((body_node.text() if body_node else "").split())[:200_000]
        return Summary(
            title or None,
            visible,
            [link for link in dict.fromkeys(links) if link],
            canonical,
            False,
            False,
            language or None,
            hashlib.sha256(visible.encode()).hexdigest(),
        )

    return extract_modest, ""


# --- timing and report ----------------------------------------------------------------


def time_rounds(
    extractors: dict[str, Extractor], corpus: list[tuple[bytes, str]], rounds: int
) -> dict[str, list[float]]:
    """Pages/s of each extractor per round, after one untimed warm-up pass each."""
    names = list(extractors)
    for name in names:
        for body, url in corpus:
            extractors[name](body, url)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            for body, url in corpus:
                extractors[name](body, url)
            rates[name].append(len(corpus) / (time.perf_counter() - started))
    return rates


def agreement(reference: Extractor, other: Extractor, corpus: list[tuple[bytes, str]]) -> str:
    pairs = [(reference(body, url), other(body, url)) for body, url in corpus]
    differing = [
        field
        for index, field in enumerate(Summary._fields)
        if any(mine[index] != theirs[index] for mine, theirs in pairs)
    ]
    same = sum(mine == theirs for mine, theirs in pairs)
    return f"all fields identical on {same}/{len(corpus)} pages" + (
        f", differing in {', '.join(differing)}" if differing else ""
    )


def table(rates: dict[str, list[float]], megabytes: float, pages: int) -> str:
    lxml_median = statistics.median(rates["lxml.html"])
    rows = [
        "| extractor | median pages/s | min-max pages/s | MB/s | vs lxml |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in rates.items():
        median = statistics.median(values)
        rows.append(
            f"| {name} | {median:,.0f} | {min(values):,.0f}-{max(values):,.0f} "
            f"| {median * megabytes / pages:,.1f} | {median / lxml_median:.2f}x |"
        )
    return "\n".join(rows)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, selectolax {metadata.version('selectolax')}, "
        f"lxml {metadata.version('lxml')} (libxml2 "
        f"{'.'.join(map(str, etree.LIBXML_VERSION))})"
    )


def write_section(section: str, path: Path = RESULTS) -> None:
    """Add or replace this benchmark's section, leaving every other section as it is."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    start = current.find(SECTION)
    if start < 0:
        updated = current.rstrip("\n") + "\n\n" + section
    else:
        end = current.find("\n## ", start + len(SECTION))
        rest = current[end + 1 :] if end >= 0 else ""
        updated = current[:start] + section + ("\n" + rest if rest else "")
    path.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    corpus = make_corpus(args.pages, args.seed)
    megabytes = sum(len(body) for body, _ in corpus) / 1e6
    anchors = [body.count(b"<a ") for body, _ in corpus]
    extractors: dict[str, Extractor] = {
        "streamcrawl extract_page (selectolax lexbor)": extract_lexbor,
        "lxml.html": extract_lxml,
    }
    modest, missing = modest_extractor()
    if modest is not None:
        extractors["selectolax.parser (modest)"] = modest
    rates = time_rounds(extractors, corpus, args.rounds)

    sizes = sorted(len(body) for body, _ in corpus)
    notes = [
        f"Corpus: {len(corpus)} synthetic pages (seed {args.seed}), {megabytes:.1f} MB, "
        f"{sizes[0] / 1000:.0f}-{sizes[-1] / 1000:.0f} KB and {min(anchors)}-{max(anchors)} "
        f"anchors per page; {args.rounds} timed rounds after a warm-up, order rotated.",
        "Each extractor decodes the bytes with the same `decode_body`, then extracts title, "
        "visible text (no script/style/noscript/template, block-separated, whitespace "
        "collapsed), links (base, urljoin, no fragments, nofollow withheld, deduplicated), "
        "robots meta, canonical, lang and a sha256 of the text.",
        f"lxml vs extract_page: {agreement(extract_lexbor, extract_lxml, corpus)}.",
        "Absolute rates move from run to run on a shared machine (see min-max); the ratio, "
        "timed side by side in one process, is the figure to compare.",
    ]
    if modest is None:
        notes.append(f"selectolax.parser (modest) not run: {missing}.")
    section = (
        f"{SECTION}\n\nCommand: `{COMMAND}`\n\nDate: {date.today().isoformat()}\n\n"
        f"Machine: {machine()}\n\n{table(rates, megabytes, len(corpus))}\n\n"
        + "".join(f"- {note}\n" for note in notes)
    )
    print(section)
    if not args.no_write:
        write_section(section)


if __name__ == "__main__":
    main()
