"""Sitemap parsing, pure: a sitemap body in, the page URLs and nested sitemaps it lists out.

Implements the sitemaps.org protocol: ``<urlset>`` lists pages (``<url><loc>``),
``<sitemapindex>`` lists further sitemaps (``<sitemap><loc>``); either may be gzipped;
a body that is not XML is read as a plain-text sitemap, one URL per line.

The XML is scanned, never parsed by an XML library: a DOCTYPE and its entities are skipped,
never expanded, so entity bombs and external entities cost nothing. Only the predefined
XML entities and character references are decoded in a ``<loc>``; a ``<loc>`` that uses
any other entity is dropped. Every scan is linear in the body, every output is capped, and
nothing raises on hostile input.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from .extract import MAX_LINK_CHARS

# The protocol's limits: 50,000 URLs and 50 MB (uncompressed) per sitemap.
MAX_URLS = 50_000
MAX_INFLATED_BYTES = 50 * 1024 * 1024
# The URLs travel as one crawl.pages record (8 MiB topic limit) and one MongoDB document
# (16 MiB), so their total size is capped too: 50,000 URLs of 80 bytes fit.
MAX_TOTAL_URL_BYTES = 4 * 1024 * 1024

_GZIP_MAGIC = b"\x1f\x8b"
_NON_SPACE = re.compile(r"\S")
# A line of a plain-text sitemap that can be a URL; others are skipped without a look.
_URL_LINE = re.compile(r"^[ \t]*+(https?://\S++)[ \t\r]*+$", re.MULTILINE | re.IGNORECASE)
# The root element's start tag; [^<>] stops at the next tag, so a scan stays linear.
_ROOT = re.compile(r"<([A-Za-z_][\w.:-]*+)(?:\s[^<>]*+)?>")
_REFERENCE = re.compile(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][\w.-]*);")
_PREDEFINED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
_CDATA_START, _CDATA_END = "<![CDATA[", "]]>"
# A CDATA section without '<' (no URL has one): every scan for its end stops at the next tag.
_CDATA = r"<!\[CDATA\[(?:[^\]<]++|\](?!\]>))*+\]\]>"
_ROOTS = {"urlset": "page", "sitemapindex": "sitemap"}
# The longest reference (&#x10FFFF;) is 10 characters for one.
_MAX_LOC_CHARS = 10 * MAX_LINK_CHARS


@dataclass(frozen=True)
class Sitemap:
    urls: tuple[str, ...] = ()
    """Page URLs (``<urlset>`` or a plain-text sitemap), in document order, deduplicated."""
    sitemaps: tuple[str, ...] = ()
    """Nested sitemap URLs (``<sitemapindex>``), in document order, deduplicated."""


def parse_sitemap(
    body: bytes,
    max_urls: int = MAX_URLS,
    max_inflated: int = MAX_INFLATED_BYTES,
    max_total_bytes: int = MAX_TOTAL_URL_BYTES,
) -> Sitemap:
    """The absolute http(s) URLs a sitemap lists; an empty Sitemap for anything else.

    A gzip body is inflated up to ``max_inflated`` bytes and the rest is cut, as is a plain
    body past that size; what was kept is still read. At most ``max_urls`` URLs, of at most
    ``max_total_bytes`` (UTF-8) together, are returned.
    """
    data = _inflate(body, max_inflated) if body.startswith(_GZIP_MAGIC) else body[:max_inflated]
    text = _decode(data)
    first = _NON_SPACE.search(text)
    start = first.start() if first else len(text)
    collector = _Collector(max_urls, max_total_bytes)
    if text.startswith("<", start):
        kind = _scan_xml(text, start, collector)
        if kind == "sitemap":
            return Sitemap(sitemaps=tuple(collector.found))
    else:
        _scan_lines(text, collector)
    return Sitemap(urls=tuple(collector.found))


def _inflate(body: bytes, limit: int) -> bytes:
    """Gzip members inflated up to ``limit`` bytes; corrupt or truncated input ends early."""
    out = bytearray()
    data = body
    try:
        while data and len(out) < limit:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += inflater.decompress(data, limit - len(out))
            if not inflater.eof:
                break  # cut at the limit, or the body itself was cut
            data = inflater.unused_data  # a further gzip member
    except zlib.error:
        pass  # keep what inflated cleanly
    return bytes(out[:limit])


def _decode(data: bytes) -> str:
    # The protocol mandates UTF-8; honour a UTF-16 BOM, never raise on bad bytes.
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="replace")


class _Collector:
    """Deduplicated, capped, valid URLs in the order found.

    At most twice ``max_urls`` entries are looked at: a sitemap that repeats itself or
    lists junk past that is not worth the time its entries cost.
    """

    def __init__(self, max_urls: int, max_total_bytes: int) -> None:
        self.found: dict[str, None] = {}  # an insertion-ordered set
        self.max_urls = max_urls
        self.entries_left = 2 * max_urls
        self.bytes_left = max_total_bytes

    @property
    def full(self) -> bool:
        return len(self.found) >= self.max_urls or self.entries_left <= 0 or self.bytes_left <= 0

    def add(self, candidate: str) -> None:
        if self.full:
            return
        self.entries_left -= 1
        url = _valid_url(candidate)
        if url is None or url in self.found:
            return
        size = len(url.encode("utf-8", errors="replace"))
        if size > self.bytes_left:
            self.bytes_left = 0  # the byte budget is spent: stop here, keep order
            return
        self.bytes_left -= size
        self.found[url] = None


def _valid_url(candidate: str) -> str | None:
    url = candidate.strip()
    if not url or len(url) > MAX_LINK_CHARS or any(ord(char) < 32 for char in url):
        return None
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            return None
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return None
    return url


# --- plain text -------------------------------------------------------------------------


def _scan_lines(text: str, collector: _Collector) -> None:
    for match in _URL_LINE.finditer(text):
        collector.add(match.group(1))
        if collector.full:
            return


# --- XML --------------------------------------------------------------------------------


def _skip_prolog(text: str, position: int) -> int:
    """The position of the root element: past the XML declaration, processing
    instructions, comments and a DOCTYPE (internal subset included, never read)."""
    length = len(text)
    while True:
        while position < length and text[position].isspace():
            position += 1
        if text.startswith("<?", position):
            end = _after(text, "?>", position + 2)
        elif text.startswith("<!--", position):
            end = _after(text, "-->", position + 4)
        elif text.startswith("<!", position):
            end = _doctype_end(text, position)
        else:
            return position
        if end < 0:
            return length
        position = end


def _after(text: str, terminator: str, position: int) -> int:
    found = text.find(terminator, position)
    return -1 if found < 0 else found + len(terminator)


def _doctype_end(text: str, position: int) -> int:
    """The position just past a ``<!DOCTYPE ...>``, or -1."""
    close = text.find(">", position)
    subset = text.find("[", position)
    if subset < 0 or 0 <= close < subset:
        return -1 if close < 0 else close + 1
    end = text.find("]", subset)  # entity values may hold '>', rarely ']'
    return -1 if end < 0 else _after(text, ">", end)


def _scan_xml(text: str, start: int, collector: _Collector) -> str | None:
    """Collect the ``<loc>`` URLs of a urlset ("page") or a sitemap index ("sitemap").

    Only ``<loc>`` elements in the root's namespace prefix count, so the image and
    video extensions' own ``image:loc`` and the like are not taken for pages.
    """
    position = _skip_prolog(text, start)
    root = _ROOT.match(text, position)
    if root is None:
        return None
    prefix, _, local = root.group(1).rpartition(":")
    if local not in _ROOTS:
        return None
    for match in _loc_pattern(prefix).finditer(_strip_comments(text, root.end())):
        collector.add(_loc_text(match.group(1)))
        if collector.full:
            break
    return _ROOTS[local]


@functools.lru_cache(maxsize=16)
def _loc_pattern(prefix: str) -> re.Pattern[str]:
    # Possessive quantifiers never give back what they matched, and no part scans past
    # the next '<', so a failed attempt costs little and the scan stays linear.
    loc = re.escape(f"{prefix}:loc" if prefix else "loc")
    return re.compile(rf"<{loc}(?:\s[^<>]*+)?>((?:[^<]++|{_CDATA})*+)</{loc}\s*+>")


def _strip_comments(text: str, start: int) -> str:
    """``text`` from ``start`` without comments (an unclosed one runs to the end)."""
    parts = []
    position = start
    while True:
        comment = text.find("<!--", position)
        if comment < 0:
            parts.append(text[position:])
            return "".join(parts)
        parts.append(text[position:comment])
        end = text.find("-->", comment + 4)
        if end < 0:
            return "".join(parts)
        position = end + 3


def _loc_text(raw: str) -> str:
    """The character data of a ``<loc>``: CDATA unwrapped, references decoded; "" when
    it uses an entity XML does not predefine (a DOCTYPE's entities are never expanded)."""
    raw = raw.strip()
    if len(raw) > _MAX_LOC_CHARS:
        return ""  # too long to be a URL we keep, even if every character is a reference
    if raw.startswith(_CDATA_START) and raw.endswith(_CDATA_END):
        return raw[len(_CDATA_START) : -len(_CDATA_END)]
    undefined = False

    def replace(match: re.Match[str]) -> str:
        nonlocal undefined
        name = match.group(1)
        if name[0] != "#":
            if name not in _PREDEFINED:
                undefined = True
            return _PREDEFINED.get(name, "")
        code = int(name[2:], 16) if name[1] in "xX" else int(name[1:])
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            undefined = True
            return ""
        return chr(code)

    decoded = _REFERENCE.sub(replace, raw)
    return "" if undefined else decoded
