"""The parser's step, pure: a crawl.fetched response in, a crawl.pages record out."""

from __future__ import annotations

import zlib
from urllib.parse import urljoin

from ..core.content import ContentDecodingError, decode_content
from ..core.errors import ReasonedError
from ..core.messages import Fetched, Page
from .extract import extract_page, is_html
from .sitemap import parse_sitemap

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class Unparseable(ReasonedError):
    """A response whose body cannot be read back; it goes to the DLQ."""


def decode_body(fetched: Fetched, limit: int) -> bytes:
    """The body as carried on crawl.fetched (its zlib transport undone), never past
    ``limit`` bytes; its Content-Encoding, if any, is still there (see :func:`read_body`)."""
    try:
        body = zlib.decompressobj().decompress(fetched.body, limit + 1)
    except (zlib.error, ValueError) as exc:
        raise Unparseable("corrupt_body", str(exc)) from exc
    if len(body) > limit:
        raise Unparseable("body_too_large", f"inflates past {limit} bytes")
    return body


def read_body(fetched: Fetched, limit: int) -> tuple[bytes, bool]:
    """The body to parse: as carried, then its Content-Encoding undone (at most ``limit``
    bytes; the flag says it was cut there). Only a success's body is read: the page of any
    other status keeps its metadata alone, so a broken body cannot cost a redirect."""
    carried = decode_body(fetched, limit)
    if not fetched.body_as_received or not 200 <= fetched.status < 300:
        return carried, False
    try:
        return decode_content(carried, fetched.headers.get("content-encoding"), limit)
    except ContentDecodingError as exc:
        raise Unparseable(exc.reason, f"{fetched.url}: {exc.detail}") from exc


def page_from_fetched(fetched: Fetched, body: bytes, cut: bool = False) -> Page:
    """The crawl.pages record: parsed HTML, or the metadata of any other response.
    ``cut``: the body was cut while it was inflated (the page is marked truncated).

    A response fetched as a sitemap (``kind`` "sitemap") is read as one whatever its
    content type: its page URLs become ``links`` and the sitemaps it lists ``sitemaps``.
    """
    page = Page(
        url=fetched.url,
        final_url=fetched.final_url,
        host=fetched.host,
        status=fetched.status,
        fetched_at=fetched.fetched_at,
        content_type=fetched.content_type,
        title=None,
        text="",
        links=[],
        canonical=None,
        content_hash=None,
        depth=fetched.depth,
        priority=fetched.priority,
        crawl_id=fetched.crawl_id,
        scope=fetched.scope,
        redirect_chain=fetched.redirect_chain,
        redirect_to=None,
        noindex=False,
        nofollow=False,
        body_bytes=len(body) if fetched.body_as_received else fetched.body_bytes,
        truncated=fetched.truncated or cut,
        meta=fetched.meta,
        kind=fetched.kind,  # before the redirect check: a sitemap's redirect leads to one
        etag=_validator(fetched.headers.get("etag"), 1024),
        last_modified=_validator(fetched.headers.get("last-modified"), 256),
        revisit=fetched.revisit,
    )
    status, headers = fetched.status, fetched.headers
    if status == 304 and fetched.revisit is not None:
        page.unchanged = True  # not modified since the stored version: nothing to parse
        return page
    location = headers.get("location")
    if status in REDIRECT_STATUSES and location:
        page.redirect_to = urljoin(fetched.final_url, location.strip())
        return page
    if not 200 <= status < 300:
        return page
    if fetched.kind == "sitemap":
        sitemap = parse_sitemap(body)
        page.links, page.sitemaps = list(sitemap.urls), list(sitemap.sitemaps)
        return page
    if is_html(fetched.content_type or None, body[:1024]):
        extracted = extract_page(
            body,
            fetched.final_url,
            fetched.content_type or None,
            robots_header=headers.get("x-robots-tag"),
        )
        page.title = extracted.title
        page.text = extracted.text
        page.links = list(extracted.links)
        page.canonical = extracted.canonical
        page.content_hash = extracted.content_hash
        page.noindex = extracted.noindex
        page.nofollow = extracted.nofollow
        page.charset = extracted.charset
    if unchanged_content(page):
        # The same content as stored (a new ETag over the same text): not re-linked.
        page.unchanged = True
        page.links = []
    return page


def unchanged_content(page: Page) -> bool:
    """A revisit's 200 whose content digest equals the stored one."""
    revisit = page.revisit
    return (
        revisit is not None
        and revisit.digest is not None
        and page.content_hash is not None
        and page.content_hash == revisit.digest
        and page.redirect_to is None
    )


def _validator(value: str | None, most: int) -> str | None:
    """A response's ETag or Last-Modified as stored (None when absent or too long to be
    sent back)."""
    if not value or len(value) > most:
        return None
    return value
