"""The parser service: crawl.fetched in, crawl.pages out."""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urljoin

from ..core.stage import BatchStage, DeadLetter, Output, Record, decode_json
from ..core.topics import FETCHED, PAGES, PARSER_GROUP
from .extract import extract_page, is_html
from .sitemap import parse_sitemap

_REDIRECT_STATUSES = {301, 302, 303, 307, 308}


def decode_body(fetched: dict[str, Any], limit: int) -> bytes:
    try:
        compressed = base64.b64decode(fetched["body"], validate=True)
        inflater = zlib.decompressobj()
        body = inflater.decompress(compressed, limit + 1)
    except (binascii.Error, zlib.error, ValueError) as exc:
        raise DeadLetter("corrupt_body", str(exc)) from exc
    if len(body) > limit:
        raise DeadLetter("body_too_large", f"inflates past {limit} bytes")
    return body


def page_from_fetched(fetched: dict[str, Any], body: bytes) -> dict[str, Any]:
    """The crawl.pages record: parsed HTML, or the metadata of any other response.

    A response fetched as a sitemap (``kind`` "sitemap") is read as one whatever its
    content type: its page URLs become ``links`` and the sitemaps it lists ``sitemaps``.
    """
    status = fetched["status"]
    headers = fetched["headers"]
    page: dict[str, Any] = {
        "url": fetched["url"],
        "final_url": fetched["final_url"],
        "host": fetched["host"],
        "status": status,
        "fetched_at": fetched["fetched_at"],
        "content_type": fetched["content_type"],
        "title": None,
        "text": "",
        "links": [],
        "canonical": None,
        "content_hash": None,
        "depth": fetched["depth"],
        "priority": fetched.get("priority", 0),
        "crawl_id": fetched["crawl_id"],
        "scope": fetched["scope"],
        "redirect_chain": fetched.get("redirect_chain", []),
        "redirect_to": None,
        "noindex": False,
        "nofollow": False,
        "charset": None,
        "body_bytes": fetched["body_bytes"],
        "truncated": fetched["truncated"],
    }
    kind = fetched.get("kind")
    if kind is not None:
        page["kind"] = kind  # before the redirect check: a sitemap's redirect leads to one
    if kind == "sitemap":
        page["sitemaps"] = []
    location = headers.get("location")
    if status in _REDIRECT_STATUSES and location:
        page["redirect_to"] = urljoin(fetched["final_url"], location.strip())
        return page
    if kind == "sitemap":
        if 200 <= status < 300:
            sitemap = parse_sitemap(body)
            page.update(links=list(sitemap.urls), sitemaps=list(sitemap.sitemaps))
        return page
    if 200 <= status < 300 and is_html(fetched["content_type"] or None, body[:1024]):
        extracted = extract_page(
            body,
            fetched["final_url"],
            fetched["content_type"] or None,
            robots_header=headers.get("x-robots-tag"),
        )
        page.update(
            title=extracted.title,
            text=extracted.text,
            links=list(extracted.links),
            canonical=extracted.canonical,
            content_hash=extracted.content_hash,
            noindex=extracted.noindex,
            nofollow=extracted.nofollow,
            charset=extracted.charset,
        )
    return page


class ParserStage(BatchStage):
    name = "parser"
    group = PARSER_GROUP

    def input_topics(self) -> tuple[str, ...]:
        return (self.topic(FETCHED),)

    async def process(self, records: Sequence[Record]) -> list[Output]:
        outputs = []
        pages_topic = self.topic(PAGES)
        for record in records:
            try:
                fetched = decode_json(record, "fetched")
                page = page_from_fetched(
                    fetched, decode_body(fetched, self.settings.max_body_bytes)
                )
            except DeadLetter as exc:
                outputs.append(self.dead_letter(record, exc.reason, exc.detail))
                continue
            outputs.append(Output(pages_topic, page, key=page["url"].encode()))
        return outputs
