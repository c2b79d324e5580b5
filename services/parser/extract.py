"""Page extraction, pure: bytes and headers in, title, text, links and signals out.

Nothing here does I/O and nothing raises on hostile input: the parser service feeds it
whatever the web returned, and one bad page must not stall a partition.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

from charset_normalizer import from_bytes
from selectolax.lexbor import LexborHTMLParser, LexborNode

MAX_TEXT_CHARS = 200_000
MAX_LINKS = 5000
# The frontier refuses longer URLs, so resolving them here would only be wasted work.
MAX_LINK_CHARS = 2048
# All links together: a page must fit crawl.pages (8 MiB), and 5000 links of 2048
# characters would not. 1M characters are at most 4 MiB of UTF-8.
MAX_LINKS_TOTAL_CHARS = 1_000_000
# Browsers cap tree depth around 512 too; deeper trees are attacks or broken generators.
MAX_NESTING = 512
_MAX_TITLE_CHARS = 1000
_META_SCAN_BYTES = 4096
_DETECT_SAMPLE_BYTES = 65_536
# Below this many '<' even a fully nested document parses in well under a second, so the
# nesting scan is skipped and ordinary pages pay nothing for it.
_NESTING_SCAN_MIN_TAGS = 10_000

_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.I)
# Matches both <meta charset=x> and <meta http-equiv=content-type content="...; charset=x">.
_META_CHARSET = re.compile(rb"<meta\s[^>]*?charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.I)
# WHATWG decodes these labels as windows-1252: real pages labelled latin-1 use its quotes.
_WINDOWS_1252_LABELS = frozenset(
    {
        "iso-8859-1",
        "iso8859-1",
        "latin1",
        "latin-1",
        "l1",
        "ascii",
        "us-ascii",
        "windows-1252",
        "cp1252",
        "x-cp1252",
    }
)
_C1_FALLBACK = "streamcrawl-c1-passthrough"

_INVISIBLE = "script, style, noscript, template"
# Text on either side of these renders on separate lines, so a space must separate it;
# inline elements (b, a, span...) must not split words.
_BLOCKS = (
    "address, article, aside, blockquote, br, dd, details, dialog, div, dl, dt, "
    "fieldset, figcaption, figure, footer, form, h1, h2, h3, h4, h5, h6, header, hr, "
    "legend, li, main, menu, nav, ol, p, pre, section, summary, table, td, th, tr, ul, "
    "caption, center, hgroup, option"
)
_BLOCK_TAGS = frozenset(name.strip() for name in _BLOCKS.split(","))
_SKIPPED_HREFS = ("javascript:", "mailto:", "tel:", "data:", "about:", "#")
_LONGEST_SKIPPED = max(map(len, _SKIPPED_HREFS))
_TAG_TOKEN = re.compile(r"<(/?[A-Za-z][A-Za-z0-9-]*)")
# Tag tokens seen so far and their nesting step; bounded, hostile pages invent names.
_NESTING_STEPS: dict[str, int] = {}
_NESTING_STEPS_MAX = 4096
# No URL has control characters (the frontier refuses them), and JSON would write each as six.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Void elements never stay open, and these are closed by their next sibling, so neither
# deepens the tree the parser keeps.
_NOT_NESTING = frozenset(
    {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
        "p",
        "li",
        "dt",
        "dd",
        "option",
        "optgroup",
        "tr",
        "td",
        "th",
        "thead",
        "tbody",
        "tfoot",
        "rb",
        "rt",
        "rp",
        "rtc",
        "param",
        "keygen",
    }
)
# Robots directives that carry a value after a colon, so the colon is no user-agent prefix.
_VALUED_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_OUR_AGENT = "streamcrawl"


def _c1_passthrough(error: UnicodeError) -> tuple[str, int]:
    # Python's cp1252 leaves five bytes undefined; WHATWG maps them to the C1 code points.
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return error.object[error.start : error.end].decode("latin-1"), error.end


codecs.register_error(_C1_FALLBACK, _c1_passthrough)


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
    """HTML by media type; with no header, by a doctype or <html> in the first 1 KB."""
    if content_type_header and content_type_header.strip():
        media = content_type_header.split(";", 1)[0].strip().lower()
        return media in ("text/html", "application/xhtml+xml")
    head = body_start[:1024].lower()
    return b"<!doctype html" in head or b"<html" in head


# --- decoding -------------------------------------------------------------------------


def decode_body(body: bytes, content_type_header: str | None) -> tuple[str, str | None]:
    """The text and the Python codec name used: BOM, then the Content-Type charset, then
    a <meta> declaration in the first 4 KB, then detection, then UTF-8 with replacement.

    A declaration that names an unknown codec or does not decode cleanly is skipped.
    """
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            return body[len(bom) :].decode(encoding, errors="replace"), encoding
    for label in (_header_charset(content_type_header), _meta_charset(body)):
        decoded = _strict_decode(body, label)
        if decoded is not None:
            return decoded
    return _undeclared_decode(body)


def _header_charset(header: str | None) -> str | None:
    match = _HEADER_CHARSET.search(header or "")
    return match.group(1).lower() if match else None


def _meta_charset(body: bytes) -> str | None:
    match = _META_CHARSET.search(body[:_META_SCAN_BYTES])
    if match is None:
        return None
    label = match.group(1).decode("ascii").lower()
    # A meta tag readable as ASCII cannot be UTF-16/32; WHATWG reads such pages as UTF-8.
    return "utf-8" if label.startswith(("utf-16", "utf-32")) else label


def _strict_decode(body: bytes, label: str | None) -> tuple[str, str] | None:
    if not label:
        return None
    if label in _WINDOWS_1252_LABELS:
        return body.decode("cp1252", errors=_C1_FALLBACK), "cp1252"
    try:
        name = codecs.lookup(label).name
        return body.decode(name), name
    except (LookupError, UnicodeDecodeError):
        return None  # a wrong or unknown declaration: the next source decides


def _undeclared_decode(body: bytes) -> tuple[str, str]:
    # Valid multi-byte UTF-8 almost never happens by accident, and checking is far cheaper
    # than statistical detection, which then only sees legacy encodings.
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    detected = _detect_charset(body[:_DETECT_SAMPLE_BYTES])
    if detected is not None:
        return body.decode(detected, errors="replace"), detected
    return body.decode("utf-8", errors="replace"), "utf-8"


def _detect_charset(sample: bytes) -> str | None:
    try:
        best = from_bytes(sample).best()
        return codecs.lookup(best.encoding).name if best is not None else None
    except Exception:  # a third-party heuristic must not take the parser down with it
        return None


# --- extraction -----------------------------------------------------------------------


def extract_page(
    body: bytes,
    url: str,
    content_type_header: str | None,
    robots_header: str | None = None,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_links: int = MAX_LINKS,
) -> ExtractedPage:
    """Title, visible text, followable links and robots signals of an HTML page.

    ``robots_header`` is the X-Robots-Tag response header. Link and text caps bound the
    output of hostile pages; ``nofollow_links`` counts links withheld by rel=nofollow or a
    page-wide nofollow.
    """
    text, charset = decode_body(body, content_type_header)
    tree = LexborHTMLParser(_cap_nesting(text))
    noindex, nofollow = _robots(tree, robots_header)
    base = _base_url(tree, url)
    links, withheld = _links(tree, base, nofollow, max_links)
    visible = _visible_text(tree, max_text_chars)
    return ExtractedPage(
        title=_title(tree),
        text=visible,
        links=links,
        nofollow_links=withheld,
        canonical=_canonical(tree, base),
        noindex=noindex,
        nofollow=nofollow,
        charset=charset,
        content_hash=hashlib.sha256(visible.encode("utf-8")).hexdigest(),
        language=_language(tree),
    )


def _cap_nesting(html: str, max_depth: int = MAX_NESTING) -> str:
    """The document cut where its tags nest deeper than ``max_depth``.

    Lexbor scans the open-element stack for many start tags, so parse time grows with
    depth times tags: 100k nested <div>s take tens of seconds. The depth estimate is
    rough (it also counts tags in scripts and comments), which is fine for a safety cap.
    """
    if html.count("<") < _NESTING_SCAN_MIN_TAGS:
        return html
    depth = 0
    # findall runs in C; the positions are only needed on the rare page that is cut.
    for index, token in enumerate(_TAG_TOKEN.findall(html)):
        step = _NESTING_STEPS.get(token)
        if step is None:
            step = _nesting_step(token)
        if step:
            depth = depth + step if depth + step > 0 else 0
            if depth > max_depth:
                return html[: _nth_tag_start(html, index)]
    return html


def _nesting_step(token: str) -> int:
    """+1 for a start tag that stays open, -1 for an end tag, 0 for the others."""
    closing = token.startswith("/")
    name = token[1:] if closing else token
    step = 0 if name.lower() in _NOT_NESTING else (-1 if closing else 1)
    if len(_NESTING_STEPS) < _NESTING_STEPS_MAX:
        _NESTING_STEPS[token] = step
    return step


def _nth_tag_start(html: str, index: int) -> int:
    for position, match in enumerate(_TAG_TOKEN.finditer(html)):
        if position == index:
            return match.start()
    return len(html)


def _attr(node: LexborNode, name: str) -> str:
    return (node.attrs.get(name) or "").strip()


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _title(tree: LexborHTMLParser) -> str | None:
    node = tree.css_first("head > title")
    if node is None:  # broken pages put the title in the body
        node = tree.css_first("title")
    if node is None:
        return None
    return _collapse(node.text(deep=True))[:_MAX_TITLE_CHARS] or None


def _language(tree: LexborHTMLParser) -> str | None:
    node = tree.css_first("html")
    if node is None:
        return None
    # BCP 47 tags are short; a long value is junk, not a language.
    return (_attr(node, "lang") or _attr(node, "xml:lang"))[:35] or None


def _visible_text(tree: LexborHTMLParser, max_chars: int) -> str:
    """Body text without scripts and styles, whitespace collapsed; mutates the tree."""
    body = tree.body
    if body is None:
        return ""
    for node in body.css(_INVISIBLE):
        node.decompose()
    # One walk with a set lookup finds the blocks in a third of the time a selector list
    # of 44 tag names takes (the list is matched against every element).
    blocks = [node for node in body.traverse() if node.tag in _BLOCK_TAGS]
    for node in blocks:
        node.insert_before(" ")
        node.insert_after(" ")
    return _collapse(body.text(deep=True))[:max_chars].rstrip()


def _robots(tree: LexborHTMLParser, header: str | None) -> tuple[bool, bool]:
    """(noindex, nofollow) from <meta name=robots|streamcrawl> and X-Robots-Tag."""
    directives = _header_directives(header or "")
    for node in tree.css("meta[name]"):
        if _attr(node, "name").lower() in ("robots", _OUR_AGENT):
            directives.update(_split_directives(_attr(node, "content")))
    none = "none" in directives
    return none or "noindex" in directives, none or "nofollow" in directives


def _split_directives(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def _header_directives(header: str) -> set[str]:
    # "googlebot: noindex, nofollow" scopes the directives that follow to that crawler.
    directives: set[str] = set()
    applies = True
    # Order matters: a "name:" token scopes the tokens after it, so no set here.
    tokens = [part.strip().lower() for part in header.split(",") if part.strip()]
    for token in tokens:
        prefix, colon, rest = token.partition(":")
        if colon and prefix.strip() not in _VALUED_DIRECTIVES:
            applies = prefix.strip() == _OUR_AGENT
            token = rest.strip()
        if applies and token:
            directives.add(token)
    return directives


def _base_url(tree: LexborHTMLParser, url: str) -> str:
    node = tree.css_first("base[href]")
    href = _attr(node, "href") if node is not None else ""
    return (_absolute(url, href) or url) if href else url


def _absolute(base: str, href: str) -> str | None:
    """``href`` resolved against ``base``, fragment dropped; None unless http(s)."""
    if len(href) > MAX_LINK_CHARS:
        return None
    try:
        parts = urlsplit(urljoin(base, href))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
    except ValueError:  # e.g. an unbalanced IPv6 bracket in the host
        return None
    absolute = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
    if len(absolute) > MAX_LINK_CHARS or _CONTROL_CHARS.search(absolute):
        return None
    return absolute


# A relative reference made only of these characters needs none of urljoin's special
# cases (schemes, authorities, params, stripped controls), so LinkResolver resolves it
# with plain string work: urljoin and urlsplit were most of the parser's time on
# link-heavy pages.
_PLAIN_REFERENCE = re.compile(r"[A-Za-z0-9._~!$&'()*+,=@%/?-]+")


# Resolved hrefs by (base directory, href), across pages: the pages of a site repeat their
# navigation links, and resolving was most of the link extraction's time. Bounded (cleared
# when full): hostile pages invent hrefs.
_RESOLVED: dict[tuple[str, str], str | None] = {}
_RESOLVED_MAX = 50_000
_MISSING = object()


# An http(s) URL with a non-empty authority and none of the characters urlsplit deletes
# (after which the authority could be empty, and the base's would be taken).
_WITH_AUTHORITY = re.compile(r"https?://[^/?#\t\r\n][^\t\r\n]*")


def _remembered(key: tuple[str, str], resolve: Callable[[], str | None]) -> str | None:
    found = _RESOLVED.get(key, _MISSING)
    if found is _MISSING:
        found = resolve()
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[key] = found
    return found  # type: ignore[return-value]


class LinkResolver:
    """Resolves a page's hrefs against its base URL exactly as ``_absolute`` does.

    The base is split once per page; hrefs that are plain relative references take a
    string-only path that follows Python's urljoin step by step (its dot-segment
    removal and its collapsing of empty segments), anything else goes through
    ``_absolute``. The property tests hold the two paths equal.
    """

    def __init__(self, base: str) -> None:
        self.base = base
        self._prefix: str | None = None
        self._directory: list[str] = []
        self._scheme: str | None = None
        try:
            parts = urlsplit(base)
            self._scheme = parts.scheme
            plain = (
                parts.scheme in ("http", "https")
                and parts.hostname is not None
                and ";" not in parts.path
                and _PLAIN_REFERENCE.fullmatch(parts.path or "/") is not None
                and _CONTROL_CHARS.search(base) is None
                and len(base) <= MAX_LINK_CHARS
            )
        except ValueError:
            plain = False
        if plain:
            self._prefix = f"{parts.scheme}://{parts.netloc}"
            self._directory = parts.path.split("/")
            if self._directory[-1] != "":
                del self._directory[-1]
        # What a plain reference resolves to depends only on the base's directory.
        self._cache_key = f"{self._prefix}{'/'.join(self._directory)}/" if plain else None

    def resolve(self, href: str) -> str | None:
        reference = href.partition("#")[0]
        if len(href) > MAX_LINK_CHARS:
            return None
        if self._scheme is not None and _WITH_AUTHORITY.fullmatch(reference):
            # An http(s) URL with a host resolves to itself, whatever the base's path: only
            # the base's scheme enters urljoin (an equal scheme round-trips the URL).
            return _remembered((self._scheme, reference), lambda: _absolute(self.base, reference))
        if self._cache_key is None:
            return _absolute(self.base, href)
        if (
            not reference
            or reference[0] == "?"
            or reference.startswith("//")
            or _PLAIN_REFERENCE.fullmatch(reference) is None
        ):
            return _absolute(self.base, href)  # depends on the whole base: not cached
        return _remembered((self._cache_key, reference), lambda: self._resolve_plain(reference))

    def _resolve_plain(self, reference: str) -> str | None:
        assert self._prefix is not None
        path, _, query = reference.partition("?")
        if path[:1] == "/":
            segments = path.split("/")
        else:
            segments = self._directory + path.split("/")
            segments[1:-1] = [segment for segment in segments[1:-1] if segment]
        resolved = "/".join(_without_dot_segments(segments)) or "/"
        if resolved[:1] != "/":
            resolved = "/" + resolved
        absolute = self._prefix + resolved + (f"?{query}" if query else "")
        return absolute if len(absolute) <= MAX_LINK_CHARS else None


def _without_dot_segments(segments: list[str]) -> list[str]:
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments[-1] in (".", ".."):
        kept.append("")
    return kept


def _links(
    tree: LexborHTMLParser, base: str, page_nofollow: bool, max_links: int
) -> tuple[list[str], int]:
    """Deduplicated absolute links in document order, and the count withheld by nofollow."""
    seen: dict[str, None] = {}  # an insertion-ordered set
    resolved: set[str] = set()  # urljoin dominates the cost and pages repeat their hrefs
    withheld = 0
    resolver = LinkResolver(base)
    room = MAX_LINKS_TOTAL_CHARS
    for node in tree.css("a[href], area[href]"):
        # One attribute dict per link, not a lookup object per attribute read.
        attributes = node.attributes
        href = (attributes.get("href") or "").strip()
        if not href or href[:_LONGEST_SKIPPED].lower().startswith(_SKIPPED_HREFS):
            continue
        if page_nofollow or "nofollow" in (attributes.get("rel") or "").lower().split():
            withheld += 1
        elif len(seen) < max_links and href not in resolved:
            resolved.add(href)
            absolute = resolver.resolve(href)
            if absolute is not None and absolute not in seen and len(absolute) <= room:
                seen[absolute] = None
                room -= len(absolute)
    return list(seen), withheld


def _canonical(tree: LexborHTMLParser, base: str) -> str | None:
    for node in tree.css("link[rel][href]"):
        if "canonical" in _attr(node, "rel").lower().split():
            return _absolute(base, _attr(node, "href"))
    return None
