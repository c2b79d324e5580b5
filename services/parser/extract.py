"""Page extraction, pure: bytes and headers in, title, text, links and signals out."""

from __future__ import annotations

import codecs
import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

from charset_normalizer import from_bytes
from selectolax.lexbor import LexborHTMLParser, LexborNode

MAX_TEXT_CHARS = 200_000
MAX_LINKS = 5000
_INVISIBLE = ("script", "style", "noscript", "template", "head")
_SPACES = re.compile(r"\s+")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", re.I)
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_SKIPPED_SCHEMES = ("javascript:", "mailto:", "tel:", "data:", "about:", "#")


@dataclass(frozen=True)
class ExtractedPage:
    title: str | None
    text: str
    links: list[str]
    nofollow_links: int
    canonical: str | None
    noindex: bool
    nofollow: bool
    charset: str | None
    content_hash: str
    language: str | None


def is_html(content_type_header: str | None, body_start: bytes) -> bool:
    if content_type_header:
        media = content_type_header.split(";", 1)[0].strip().lower()
        return media in ("text/html", "application/xhtml+xml")
    head = body_start[:1024].lstrip().lower()
    return head.startswith(b"<!doctype html") or b"<html" in head


def decode_body(body: bytes, content_type_header: str | None) -> tuple[str, str | None]:
    """Text and the charset used: BOM, then the header, then <meta>, then detection."""
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            return body.decode(encoding, errors="replace"), encoding.replace("-sig", "")
    declared = [_header_charset(content_type_header), _meta_charset(body[:4096])]
    for charset in declared:
        text = _strict_decode(body, charset)
        if text is not None:
            return text, charset
    best = from_bytes(body[:200_000]).best()
    if best is not None and best.encoding:
        return body.decode(best.encoding, errors="replace"), best.encoding
    return body.decode("utf-8", errors="replace"), "utf-8"


def _header_charset(header: str | None) -> str | None:
    match = _HEADER_CHARSET.search(header or "")
    return match.group(1).lower() if match else None


def _meta_charset(head: bytes) -> str | None:
    match = _META_CHARSET.search(head)
    return match.group(1).decode("ascii", "ignore").lower() if match else None


def _strict_decode(body: bytes, charset: str | None) -> str | None:
    if not charset:
        return None
    try:
        codecs.lookup(charset)
        return body.decode(charset)
    except (LookupError, UnicodeDecodeError):
        return None  # a wrong or unknown declaration: fall through to the next source


def extract_page(
    body: bytes,
    url: str,
    content_type_header: str | None,
    robots_header: str | None = None,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_links: int = MAX_LINKS,
) -> ExtractedPage:
    text, charset = decode_body(body, content_type_header)
    tree = LexborHTMLParser(text)
    robots = _robots_directives(tree, robots_header)
    base = _base_url(tree, url)
    links, nofollow_count = _links(tree, base, "nofollow" in robots, max_links)
    visible = _visible_text(tree)[:max_text_chars]
    return ExtractedPage(
        title=_title(tree),
        text=visible,
        links=links,
        nofollow_links=nofollow_count,
        canonical=_canonical(tree, base),
        noindex="noindex" in robots or "none" in robots,
        nofollow="nofollow" in robots or "none" in robots,
        charset=charset,
        content_hash=hashlib.sha256(visible.encode("utf-8")).hexdigest(),
        language=_language(tree),
    )


def _title(tree: LexborHTMLParser) -> str | None:
    node = tree.css_first("title")
    if node is None:
        return None
    title = _SPACES.sub(" ", node.text(deep=True)).strip()
    return title[:1000] or None


def _visible_text(tree: LexborHTMLParser) -> str:
    body = tree.body
    if body is None:
        return ""
    for node in body.css(",".join(_INVISIBLE)):
        node.decompose()
    return _SPACES.sub(" ", body.text(separator=" ", deep=True)).strip()


def _robots_directives(tree: LexborHTMLParser, header: str | None) -> set[str]:
    values = [header or ""]
    for node in tree.css("meta[name]"):
        if (node.attributes.get("name") or "").strip().lower() in ("robots", "streamcrawl"):
            values.append(node.attributes.get("content") or "")
    return {part.strip().lower() for value in values for part in value.split(",") if part.strip()}


def _base_url(tree: LexborHTMLParser, url: str) -> str:
    node = tree.css_first("base[href]")
    href = (node.attributes.get("href") or "").strip() if node is not None else ""
    return _absolute(url, href) or url if href else url


def _absolute(base: str, href: str) -> str | None:
    try:
        joined = urljoin(base, href.strip())
        parts = urlsplit(joined)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))


def _links(
    tree: LexborHTMLParser, base: str, page_nofollow: bool, max_links: int
) -> tuple[list[str], int]:
    seen: dict[str, None] = {}
    nofollow = 0
    for node in tree.css("a[href], area[href]"):
        href = (node.attributes.get("href") or "").strip()
        if not href or href.lower().startswith(_SKIPPED_SCHEMES):
            continue
        if page_nofollow or _has_nofollow(node):
            nofollow += 1
            continue
        absolute = _absolute(base, href)
        if absolute is not None and len(seen) < max_links:
            seen.setdefault(absolute, None)
    return list(seen), nofollow


def _has_nofollow(node: LexborNode) -> bool:
    return "nofollow" in (node.attributes.get("rel") or "").lower().split()


def _canonical(tree: LexborHTMLParser, base: str) -> str | None:
    for node in tree.css("link[rel][href]"):
        if "canonical" in (node.attributes.get("rel") or "").lower().split():
            return _absolute(base, node.attributes.get("href") or "")
    return None


def _language(tree: LexborHTMLParser) -> str | None:
    node = tree.css_first("html")
    lang = (node.attributes.get("lang") or "").strip() if node is not None else ""
    return lang[:35] or None
