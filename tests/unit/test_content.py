"""Bodies travel as received (Content-Encoding intact); the parser and the robots reader
inflate them with a cap (services/core/content.py, services/parser/logic.py)."""

from __future__ import annotations

import gzip
import random
import zlib
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from streamcrawl.core.config import Settings
from streamcrawl.core.content import ContentDecodingError, content_codings, decode_content
from streamcrawl.core.messages import Discovered, Fetched, Scope, Timings, encode, fetch_from
from streamcrawl.fetcher.downloader import Downloader
from streamcrawl.fetcher.retry import fetched_from
from streamcrawl.parser.logic import Unparseable, page_from_fetched, read_body

HTML = b"<html><head><title>Caf\xc3\xa9</title></head><body><a href='/x'>x</a></body></html>"
LIMIT = 10_000


def test_codings_are_read_in_the_order_applied() -> None:
    assert content_codings(None) == []
    assert content_codings(" GZip , identity,") == ["gzip", "identity"]


@pytest.mark.parametrize(
    ("encoding", "encoded"),
    [
        (None, HTML),
        ("identity", HTML),
        ("gzip", gzip.compress(HTML)),
        ("x-gzip", gzip.compress(HTML)),
        ("deflate", zlib.compress(HTML)),
        ("deflate", zlib.compress(HTML, wbits=-15)),  # raw deflate, as some servers send
        ("deflate, gzip", gzip.compress(zlib.compress(HTML))),
    ],
)
def test_each_supported_coding_is_undone(encoding: str | None, encoded: bytes) -> None:
    assert decode_content(encoded, encoding, LIMIT) == (HTML, False)


def test_a_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b" " * 5_000_000)
    body, cut = decode_content(bomb, "gzip", LIMIT)
    assert (len(body), cut) == (LIMIT, True)
    assert decode_content(HTML, None, 10) == (HTML[:10], True)


def test_members_and_cut_streams() -> None:
    two = gzip.compress(b"one ") + gzip.compress(b"two")
    assert decode_content(two, "gzip", LIMIT) == (b"one two", False)
    text = random.Random(7).randbytes(3000).hex().encode()
    body, cut = decode_content(gzip.compress(text)[:2000], "gzip", LIMIT)
    assert not cut and 0 < len(body) < len(text) and text.startswith(body)
    # Trailing bytes after a complete member do not cost the member.
    assert decode_content(gzip.compress(HTML) + b"\0\0junk", "gzip", LIMIT) == (HTML, False)


@pytest.mark.parametrize(
    ("encoding", "body", "reason"),
    [
        ("br", b"\x1b\x00", "unsupported_content_coding"),
        ("gzip", b"not gzip at all", "corrupt_content"),
        ("deflate", b"\xff\xfe not deflate", "corrupt_content"),
    ],
)
def test_what_cannot_be_undone_says_why(encoding: str, body: bytes, reason: str) -> None:
    with pytest.raises(ContentDecodingError) as caught:
        decode_content(body, encoding, LIMIT)
    assert caught.value.reason == reason


def fetched(body: bytes, **changes: Any) -> Fetched:
    fields: dict[str, Any] = {
        "url": "http://a.example/p.html",
        "final_url": "http://a.example/p.html",
        "host": "a.example",
        "crawl_id": "c1",
        "depth": 1,
        "scope": Scope(allow_domains=["a.example"], max_depth=5),
        "status": 200,
        "headers": {"content-type": "text/html; charset=utf-8", "content-encoding": "gzip"},
        "content_type": "text/html; charset=utf-8",
        "body": zlib.compress(body),
        "body_bytes": len(body),
        "truncated": False,
        "fetched_at": 1.0,
        "timings": Timings(total_s=0.1),
        "body_as_received": True,
    }
    fields.update(changes)
    return Fetched(**fields)


def test_the_parser_inflates_a_body_as_received() -> None:
    record = fetched(gzip.compress(HTML))
    page = page_from_fetched(record, *read_body(record, LIMIT))
    assert (page.title, page.links, page.body_bytes) == ("Café", ["http://a.example/x"], len(HTML))
    assert not page.truncated


def test_the_parser_marks_a_bomb_truncated_and_parses_its_start() -> None:
    record = fetched(gzip.compress(HTML + b" " * 3_000_000))
    page = page_from_fetched(record, *read_body(record, LIMIT))
    assert page.truncated and page.title == "Café" and page.body_bytes == LIMIT


def test_an_older_record_is_not_inflated_twice() -> None:
    record = fetched(HTML, body_as_received=False)  # inflated by an older fetcher
    assert read_body(record, LIMIT) == (HTML, False)


def test_a_broken_success_is_a_dead_letter_but_a_broken_redirect_is_kept() -> None:
    with pytest.raises(Unparseable) as caught:
        read_body(fetched(b"garbage"), LIMIT)
    assert caught.value.reason == "corrupt_content"
    moved = fetched(
        b"garbage", status=301, headers={"content-encoding": "gzip", "location": "/new"}
    )
    page = page_from_fetched(moved, *read_body(moved, LIMIT))
    assert page.redirect_to == "http://a.example/new"


# -- the fetcher keeps the response as received -------------------------------------------


async def _served(handler: Any) -> tuple[TestServer, Downloader]:
    app = web.Application()
    app.router.add_get("/{name}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    downloader = Downloader(Settings(allow_networks=("127.0.0.1/32",), user_agent="ua-test/1"))
    await downloader.start()
    return server, downloader


async def test_the_downloader_keeps_status_line_headers_and_body_as_received() -> None:
    encoded = gzip.compress(HTML)

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.headers["Accept-Encoding"] == "gzip, deflate"
        response = web.Response(body=encoded, status=203, reason="Fine Thanks")
        response.headers["Content-Type"] = "text/html"
        response.headers["Content-Encoding"] = "gzip"
        response.headers.add("x-Mixed-CASE", "one")
        response.headers.add("X-Mixed-Case", "two")
        return response

    server, downloader = await _served(handler)
    try:
        base = f"http://127.0.0.1:{server.port}"
        result = await downloader.page(f"{base}/p.html", f"127.0.0.1:{server.port}")
        robots = await downloader.robots(f"{base}/robots.txt", f"127.0.0.1:{server.port}")
    finally:
        await downloader.close()
        await server.close()
    assert (result.protocol, result.status, result.reason) == ("HTTP/1.1", 203, "Fine Thanks")
    assert result.body == encoded and not result.truncated  # still gzip: as received
    names = [name for name, _ in result.raw_headers]
    assert ("x-Mixed-CASE", "one") in result.raw_headers
    assert names.index("x-Mixed-CASE") + 1 == names.index("X-Mixed-Case")  # order and repeats
    assert result.headers["x-mixed-case"] == "one, two"
    sent = dict(result.request_headers)
    assert sent["User-Agent"] == "ua-test/1" and sent["Accept-Encoding"] == "gzip, deflate"
    assert robots.body == HTML  # the robots reader gets it inflated


async def test_a_hostile_header_still_fits_crawl_fetched() -> None:
    long_name, long_reason = "X-" + "n" * 3000, "r" * 400

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", reason=long_reason, headers={long_name: "v" * 5000})

    server, downloader = await _served(handler)
    try:
        result = await downloader.page(f"http://127.0.0.1:{server.port}/p", "h")
    finally:
        await downloader.close()
        await server.close()
    request = fetch_from(
        Discovered(
            url="http://a.example/p",
            host="a.example",
            crawl_id="c1",
            depth=0,
            priority=5,
            scope=Scope(allow_domains=["a.example"], max_depth=5),
            discovered_at=1.0,
        ),
        2.0,
    )
    record = fetched_from(request, result, 3.0)
    decoded = msgspec.json.decode(encode(record), type=Fetched)  # validated as the edge does
    (name, value) = next(item for item in decoded.raw_headers if item[0].startswith("X-"))
    assert (len(name), value, len(decoded.reason)) == (1024, "v" * 5000, 256)
