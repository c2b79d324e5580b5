"""Sitemaps end to end in pure code: parsing (XML, index, gzip, plain text, hostile input),
the parser's crawl.pages record for a sitemap, the frontier's candidates from one, and
the sink's canonical-keyed document id."""

from __future__ import annotations

import gzip
import time
import zlib
from dataclasses import replace
from typing import Any

import msgspec
import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import (
    Discovered,
    Fetched,
    M,
    Page,
    Scope,
    Timings,
    encode,
)
from streamcrawl.frontier.logic import candidates_from_page
from streamcrawl.parser.logic import decode_body, page_from_fetched
from streamcrawl.parser.sitemap import Sitemap, parse_sitemap
from streamcrawl.sink.logic import document_for, storage_id

SETTINGS = Settings()
NS = 'xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"'
SCOPE = Scope(allow_domains=["a.example"], max_depth=3, max_pages=0)


def roundtrip(message: M) -> M:
    """The message as the next stage reads it off its topic (validated by its type)."""
    back = msgspec.json.decode(encode(message), type=type(message))
    assert back == message
    return back


def urlset(*locs: str, extra: str = "") -> bytes:
    entries = "".join(f"<url><loc>{loc}</loc><lastmod>2026-01-01</lastmod></url>" for loc in locs)
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<urlset {NS}>{entries}{extra}</urlset>'.encode()
    )


# --- parse_sitemap ----------------------------------------------------------------------


def test_urlset_lists_page_urls_in_order_without_duplicates() -> None:
    body = urlset(
        "http://a.example/1",
        "  https://a.example/2\n",  # whitespace around a loc is no part of it
        "http://a.example/1",
        "http://a.example/3?x=1&amp;y=2",
        "<![CDATA[http://a.example/4?p=1&q=2]]>",
        "http://a.example/&#x35;",
    )
    assert parse_sitemap(body) == Sitemap(
        urls=(
            "http://a.example/1",
            "https://a.example/2",
            "http://a.example/3?x=1&y=2",
            "http://a.example/4?p=1&q=2",
            "http://a.example/5",
        )
    )


def test_sitemap_index_lists_nested_sitemaps() -> None:
    body = (
        f"<sitemapindex {NS}>"
        "<sitemap><loc>http://a.example/s1.xml</loc><lastmod>2026-01-01</lastmod></sitemap>"
        "<sitemap><loc>http://a.example/s2.xml.gz</loc></sitemap>"
        "</sitemapindex>"
    ).encode()
    assert parse_sitemap(body) == Sitemap(
        sitemaps=("http://a.example/s1.xml", "http://a.example/s2.xml.gz")
    )


def test_only_absolute_http_urls_are_kept() -> None:
    body = urlset(
        "/relative.html",
        "ftp://a.example/file",
        "javascript:alert(1)",
        "http://",
        "http://[::1/",
        "http://a.example/" + "x" * 3000,
        "",
        "http://a.example/ok",
    )
    assert parse_sitemap(body).urls == ("http://a.example/ok",)


def test_extension_locs_and_comments_are_not_pages() -> None:
    body = urlset(
        "http://a.example/page",
        extra=(
            "<!-- <url><loc>http://a.example/commented</loc></url> -->"
            '<url xmlns:image="http://www.google.com/schemas/sitemap-image/1.1">'
            "<loc>http://a.example/gallery</loc>"
            "<image:image><image:loc>http://a.example/photo.jpg</image:loc></image:image>"
            "</url>"
        ),
    )
    assert parse_sitemap(body).urls == ("http://a.example/page", "http://a.example/gallery")


def test_prefixed_namespace_is_followed() -> None:
    body = (
        b'<sm:urlset xmlns:sm="http://www.sitemaps.org/schemas/sitemap/0.9">'
        b"<sm:url><sm:loc>http://a.example/p</sm:loc></sm:url></sm:urlset>"
    )
    assert parse_sitemap(body).urls == ("http://a.example/p",)


def test_gzip_body_is_inflated() -> None:
    body = urlset("http://a.example/1", "http://a.example/2")
    assert parse_sitemap(gzip.compress(body)).urls == ("http://a.example/1", "http://a.example/2")


def test_gzip_bomb_is_cut_at_the_cap_and_what_came_before_is_kept() -> None:
    head = urlset("http://a.example/1").removesuffix(b"</urlset>")
    # 256 MiB of zeros deflate to about 250 KB; the 50 MB cap stops the inflation.
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    chunks = [deflater.compress(head), *(deflater.compress(zeros) for _ in range(256))]
    bomb = b"".join(chunks) + deflater.flush()
    assert len(bomb) < 300_000
    started = time.perf_counter()
    assert parse_sitemap(bomb).urls == ("http://a.example/1",)
    assert parse_sitemap(bomb, max_inflated=head.index(b"</loc>")) == Sitemap()
    assert time.perf_counter() - started < 5


def test_truncated_or_corrupt_gzip_keeps_what_inflated() -> None:
    body = gzip.compress(urlset(*(f"http://a.example/{n}" for n in range(100))))
    cut = parse_sitemap(body[: len(body) // 2]).urls
    assert 0 < len(cut) < 100
    assert cut == tuple(f"http://a.example/{n}" for n in range(len(cut)))
    assert parse_sitemap(b"\x1f\x8b" + b"\xff" * 100) == Sitemap()


def test_doctype_entities_are_never_expanded() -> None:
    laughs = "".join(
        f'<!ENTITY lol{n} "{f"&lol{n - 1};" * 10}">' for n in range(1, 10)
    )  # "billion laughs": &lol9; would expand to 10^9 characters
    body = (
        '<?xml version="1.0"?>\n'
        f'<!DOCTYPE urlset [<!ENTITY lol0 "lol">{laughs}'
        '<!ENTITY inject "<url><loc>http://evil.example/</loc></url>">'
        '<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        f"<urlset {NS}>"
        "<url><loc>http://a.example/&lol9;</loc></url>"
        "<url><loc>http://a.example/&xxe;</loc></url>"
        "&inject;"
        "<url><loc>http://a.example/plain</loc></url>"
        "</urlset>"
    ).encode()
    started = time.perf_counter()
    assert parse_sitemap(body) == Sitemap(urls=("http://a.example/plain",))
    assert time.perf_counter() - started < 1


def test_url_count_and_size_are_capped() -> None:
    body = urlset(*(f"http://a.example/{n}" for n in range(100)))
    assert parse_sitemap(body, max_urls=10).urls == tuple(
        f"http://a.example/{n}" for n in range(10)
    )
    # 18 bytes each: a 40-byte budget holds two.
    assert len(parse_sitemap(body, max_total_bytes=40).urls) == 2


def test_default_cap_is_the_protocol_limit() -> None:
    body = urlset(*(f"http://a.example/{n}" for n in range(50_010)))
    assert len(parse_sitemap(body).urls) == 50_000


def test_plain_text_sitemap_one_url_per_line() -> None:
    body = b"\xef\xbb\xbfhttp://a.example/1\r\n\r\n  https://a.example/2  \nnot a url\n/rel\nhttp://a.example/3"
    assert parse_sitemap(body).urls == (
        "http://a.example/1",
        "https://a.example/2",
        "http://a.example/3",
    )
    assert parse_sitemap(gzip.compress(body)).urls == parse_sitemap(body).urls


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   \n",
        bytes(range(256)) * 64,
        b"<!doctype html><html><body><a href='http://a.example/'>x</a></body></html>",
        b'{"urls": ["http://a.example/"]}',
        b"<urlset",
        b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>",
        b"<urlset><url><loc>http://a.example/unclosed",
        b"<rss><channel><item><loc>http://a.example/</loc></item></channel></rss>",
    ],
)
def test_garbage_gives_an_empty_sitemap(body: bytes) -> None:
    assert parse_sitemap(body) == Sitemap()


@pytest.mark.parametrize(
    "body",
    [
        b"<urlset>" + b"<" * 2_000_000,
        b"<urlset>" + b"<loc>" * 1_000_000,
        b"<urlset>" + b"<loc><![CDATA[" * 500_000,
        b"<urlset><loc>" + b"&amp;" * 1_000_000 + b"</loc></urlset>",
        b"<urlset>" + b"<!--" * 1_000_000,
        b"<!DOCTYPE x [" + b"<!--" * 1_000_000,
        b"x\n" * 2_000_000,
        b"http://a.example/\n" * 1_000_000,
    ],
)
def test_hostile_bodies_scan_in_linear_time(body: bytes) -> None:
    started = time.perf_counter()
    parse_sitemap(body)
    assert time.perf_counter() - started < 2


# --- parser: page_from_fetched ------------------------------------------------------------


def fetched(body: bytes, **changes: Any) -> Fetched:
    fields: dict[str, Any] = {
        "url": "http://a.example/sitemap.xml",
        "final_url": "http://a.example/sitemap.xml",
        "host": "a.example",
        "crawl_id": "c1",
        "depth": 0,
        "priority": 5,
        "scope": SCOPE,
        "redirect_chain": [],
        "status": 200,
        "headers": {"content-type": "application/xml"},
        "content_type": "application/xml",
        "body": zlib.compress(body, 1),
        "body_bytes": len(body),
        "truncated": False,
        "fetched_at": 1.0,
        "timings": Timings(total_s=0.01),
        "kind": "sitemap",
    }
    fields.update(changes)
    return roundtrip(Fetched(**fields))


def parsed(record: Fetched) -> Page:
    page = page_from_fetched(record, decode_body(record, SETTINGS.max_body_bytes))
    return roundtrip(page)


def test_a_fetched_sitemap_becomes_a_page_of_links() -> None:
    page = parsed(fetched(urlset("http://a.example/1", "http://a.example/2")))
    assert page.kind == "sitemap"
    assert page.links == ["http://a.example/1", "http://a.example/2"]
    assert page.sitemaps == []
    assert (page.title, page.text, page.content_hash) == (None, "", None)


def test_a_fetched_sitemap_index_lists_its_sitemaps() -> None:
    body = (
        f"<sitemapindex {NS}><sitemap><loc>http://a.example/s1.xml</loc></sitemap></sitemapindex>"
    )
    page = parsed(fetched(body.encode()))
    assert (page.links, page.sitemaps) == ([], ["http://a.example/s1.xml"])


def test_a_gzipped_sitemap_of_any_content_type_is_read() -> None:
    body = gzip.compress(urlset("http://a.example/1"))
    page = parsed(fetched(body, content_type="application/octet-stream", headers={}))
    assert page.links == ["http://a.example/1"]


def test_only_kind_sitemap_is_read_as_a_sitemap() -> None:
    xml = urlset("http://a.example/1")
    page = parsed(fetched(xml, kind="page"))
    assert page.kind == "page"
    assert (page.links, page.sitemaps) == ([], [])
    # A crawl.fetched record written without "kind" (older producers) is a page.
    wire = msgspec.json.decode(encode(fetched(xml)))
    del wire["kind"]
    untyped = msgspec.json.decode(msgspec.json.encode(wire), type=Fetched)
    page = parsed(untyped)
    assert (page.kind, page.links, page.sitemaps) == ("page", [], [])


def test_html_pages_carry_their_kind_through() -> None:
    html = b"<html><head><title>T</title></head><body><a href='/x'>x</a></body></html>"
    page = parsed(fetched(html, kind="page", content_type="text/html", headers={}))
    assert (page.kind, page.title, page.links) == ("page", "T", ["http://a.example/x"])


def test_a_failed_or_redirected_sitemap_stays_a_sitemap_without_links() -> None:
    page = parsed(fetched(b"not found", status=404))
    assert (page.kind, page.links, page.sitemaps) == ("sitemap", [], [])
    moved = parsed(fetched(b"", status=301, headers={"location": "https://a.example/sm.xml"}))
    assert (moved.kind, moved.redirect_to) == ("sitemap", "https://a.example/sm.xml")


# --- frontier: candidates from a sitemap ----------------------------------------------------


def sitemap_page(**changes: Any) -> Page:
    page = parsed(
        fetched(
            urlset(
                "http://a.example/p1.html",
                "http://www.a.example/p2.html",
                "http://elsewhere.example/p3.html",
            )
        )
    )
    return msgspec.structs.replace(page, **changes)


def test_sitemap_links_are_pages_one_level_deeper_and_sitemaps_keep_the_depth() -> None:
    page = sitemap_page(
        depth=1,
        sitemaps=["http://a.example/more.xml", "http://elsewhere.example/s.xml"],
    )
    roundtrip(page)
    kept, drops = candidates_from_page(page, SETTINGS, now=1.0)
    for candidate in kept:
        roundtrip(candidate)
    assert [(c.url, c.depth, c.kind) for c in kept] == [
        ("http://a.example/p1.html", 2, "page"),
        ("http://www.a.example/p2.html", 2, "page"),
        ("http://a.example/more.xml", 1, "sitemap"),
    ]
    # A page candidate leaves "kind" off the wire (its default); a sitemap names it.
    assert [b'"kind"' in encode(c) for c in kept] == [False, False, True]
    assert {c.source for c in kept} == {"http://a.example/sitemap.xml"}
    assert [d.reason for d in drops] == ["out_of_scope", "out_of_scope"]


def test_max_depth_applies_to_sitemap_links_and_sitemaps_separately() -> None:
    page = sitemap_page(depth=3, sitemaps=["http://a.example/more.xml"])
    kept, drops = candidates_from_page(page, SETTINGS, now=1.0)
    assert [(c.url, c.depth, c.kind) for c in kept] == [("http://a.example/more.xml", 3, "sitemap")]
    assert [d.reason for d in drops] == ["max_depth"] * 3


def test_a_sitemap_redirect_leads_to_a_sitemap() -> None:
    page = parsed(fetched(b"", status=301, headers={"location": "https://a.example/sm.xml"}))
    (candidate,), _ = candidates_from_page(page, SETTINGS, now=1.0)
    assert msgspec.json.decode(encode(candidate), type=Discovered) == candidate
    assert (candidate.url, candidate.depth, candidate.kind) == (
        "https://a.example/sm.xml",
        0,
        "sitemap",
    )


def test_ordinary_page_candidates_carry_no_kind() -> None:
    html = b"<html><body><a href='/x'>x</a></body></html>"
    page = parsed(fetched(html, kind="page", content_type="text/html", headers={}))
    (candidate,), _ = candidates_from_page(page, SETTINGS, now=1.0)
    assert candidate.kind == "page" and candidate.depth == 1
    assert b'"kind"' not in encode(candidate)


# --- sink: the document id ------------------------------------------------------------------


def stored(url: str, canonical: str | None, **changes: Any) -> Page:
    fields: dict[str, Any] = {
        "url": url,
        "final_url": url,
        "host": "a.example",
        "status": 200,
        "fetched_at": 1.0,
        "content_type": "text/html",
        "title": None,
        "text": "",
        "links": [],
        "canonical": canonical,
        "content_hash": None,
        "depth": 0,
        "crawl_id": "c1",
        "scope": SCOPE,
        "redirect_chain": [],
        "redirect_to": None,
        "noindex": False,
        "nofollow": False,
    }
    fields.update(changes)
    return Page(**fields)


def test_spellings_declaring_one_canonical_share_a_document() -> None:
    pages = [
        stored("http://a.example/a?x=1", "http://a.example/a"),
        stored("http://a.example/a", "http://a.example/a"),
        stored("http://a.example/a?utm=2", "/relative"),
    ]
    assert [storage_id(p, SETTINGS) for p in pages[:2]] == ["http://a.example/a"] * 2
    assert storage_id(pages[2], SETTINGS) == "http://a.example/a?utm=2"
    document = document_for(pages[0], 1.0, SETTINGS)
    assert (document["_id"], document["url"]) == ("http://a.example/a", "http://a.example/a?x=1")
    assert document["stored_at"] == 1.0 and document["scope"]["allow_domains"] == ["a.example"]


def test_the_canonical_is_read_under_the_frontiers_settings() -> None:
    page = stored("http://a.example/a?token=9", "http://a.example/a?token=1&sid=2")
    # By default "sid" is a session id and "token" is kept.
    assert storage_id(page, SETTINGS) == "http://a.example/a?token=1"
    custom = replace(SETTINGS, session_params=("token",))
    assert storage_id(page, custom) == "http://a.example/a?sid=2"


def test_the_declared_canonical_is_put_in_canonical_form() -> None:
    page = stored("http://a.example/a?x=1", "HTTP://A.example:80/a#top")
    assert storage_id(page, SETTINGS) == "http://a.example/a"


@pytest.mark.parametrize(
    "page",
    [
        stored("http://a.example/a", None),
        stored("http://a.example/a", ""),
        stored("http://a.example/a", "http://b.example/a"),  # another host
        stored("http://a.example/a", "http://a.example:8080/a"),  # another port
        stored("http://a.example/a", "http://www.a.example/a"),  # even a subdomain
        stored("http://a.example/a", "ftp://a.example/a"),
        stored("http://a.example/a", "http://a.example/b", status=301, redirect_to="/b"),
        stored("http://a.example/a", "http://a.example/b", status=404),
    ],
)
def test_otherwise_a_page_is_stored_under_its_own_url(page: Page) -> None:
    assert storage_id(page, SETTINGS) == "http://a.example/a"
