"""The hostile test site answers as its docstrings and :func:`expectations` claim.

The crawler's politeness and robustness end-to-end tests trust this site to set each trap
and its request log to be the truth, so every trap is checked here with a plain aiohttp
client (no Kafka, no crawler): a trap that silently stopped working would let a broken
crawler pass.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import pytest
from charset_normalizer import from_bytes
from streamcrawl.crawl.local import free_port

from ..support.hostile import (
    BOMB_BLOCK,
    BOMB_BLOCKS,
    HUGE_BYTES,
    LONG_PATH,
    HostileSite,
    LoggedRequest,
    expectations,
    read_log,
)

UA = "streamcrawl-hostile-test/1.0"
HREF = re.compile(r'href="([^"]*)"')
LOC = re.compile(r"<loc>([^<]*)</loc>")
CODECS = {
    "/charset/latin1.html": "iso-8859-1",
    "/charset/sjis.html": "shift_jis",
    "/charset/cp1251.html": "cp1251",
}


def _start(directory: Path, **options: Any) -> HostileSite:
    return HostileSite(directory / "requests.jsonl", free_port(), free_port(), **options)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileSite]:
    """One site for the checks that do not depend on the site's counters."""
    with _start(tmp_path_factory.mktemp("hostile")) as running:
        yield running
    assert running.exit_code == 0


@pytest.fixture()
def fresh_site(tmp_path: Path) -> Iterator[HostileSite]:
    """A site of its own, for checks of first answers and of the whole log."""
    with _start(tmp_path) as running:
        yield running
    assert running.exit_code == 0


@asynccontextmanager
async def _client() -> AsyncIterator[aiohttp.ClientSession]:
    # No transparent decompression: the bomb must reach the test as the bytes sent.
    async with aiohttp.ClientSession(
        auto_decompress=False,
        headers={"User-Agent": UA},
        timeout=aiohttp.ClientTimeout(total=10),
    ) as http:
        yield http


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], bytes]:
    async with http.get(url, allow_redirects=False) as response:
        return response.status, dict(response.headers), await response.read()


def _links(body: bytes, base: str) -> list[str]:
    return [urljoin(base, href) for href in HREF.findall(body.decode("utf-8"))]


# -- robots.txt and the answers that change over time -----------------------------------


async def test_robots_and_first_answers(tmp_path: Path) -> None:
    with _start(tmp_path, crawl_delay_a=2.5, crawl_delay_b=0.25, retry_after=3) as site:
        async with _client() as http:
            status, headers, body = await _get(http, site.base_a + "/robots.txt")
            assert status == 200 and headers["Content-Type"].startswith("text/plain")
            assert body.decode() == (
                "User-agent: streamcrawl\n"
                "Disallow: /private/\n"
                "Allow: /private/open.html\n"
                "Crawl-delay: 2.5\n"
                f"Sitemap: {site.base_a}/sitemap.xml\n"
                "\n"
                "User-agent: *\n"
                "Disallow: /\n"
            )

            robots_b = [await _get(http, site.base_b + "/robots.txt") for _ in range(3)]
            assert [status for status, _, _ in robots_b] == [503, 200, 200]
            assert robots_b[1][2].decode() == (
                "User-agent: *\nDisallow: /b/secret/\nCrawl-delay: 0.25\n"
            )

            limited = [await _get(http, site.base_a + "/rate-limited.html") for _ in range(3)]
            assert [status for status, _, _ in limited] == [429, 200, 200]
            assert limited[0][1]["Retry-After"] == "3"
            assert "Retry-After" not in limited[1][1]

            burst = [await _get(http, site.base_a + "/burst-503.html") for _ in range(4)]
            assert [status for status, _, _ in burst] == [503, 503, 200, 200]
            assert burst[0][1]["Retry-After"] == "1"
            assert "Retry-After" not in burst[1][1]

            always = [await _get(http, site.base_a + "/always-503.html") for _ in range(5)]
            assert {status for status, _, _ in always} == {503}

        expected = site.expectations()
        assert expected.crawl_delays == {site.port_a: 2.5, site.port_b: 0.25}
        assert expected.retry_after[site.base_a + "/rate-limited.html"] == 3.0
    assert site.exit_code == 0


# -- redirects --------------------------------------------------------------------------


async def test_redirect_chain_loop_and_cross_host(site: HostileSite) -> None:
    a = site.base_a
    async with _client() as http:
        hops = []
        url = a + "/redirect/1"
        for _ in range(5):
            status, headers, _ = await _get(http, url)
            hops.append((url, status))
            if status not in (301, 302, 307):
                break
            url = urljoin(url, headers["Location"])
        assert hops == [
            (a + "/redirect/1", 301),
            (a + "/redirect/2", 302),
            (a + "/redirect/3", 307),
            (a + "/redirect/final.html", 200),
        ]

        status_a, headers_a, _ = await _get(http, a + "/loop/a")
        status_b, headers_b, _ = await _get(http, a + "/loop/b")
        assert (status_a, headers_a["Location"]) == (302, a + "/loop/b")
        assert (status_b, headers_b["Location"]) == (302, a + "/loop/a")

        status, headers, _ = await _get(http, a + "/cross-host")
        assert (status, headers["Location"]) == (302, site.base_b + "/landing.html")
        status, headers, _ = await _get(http, a + "/to-private")
        assert (status, headers["Location"]) == (302, "http://10.1.2.3/admin")


# -- bodies that never end, or end far too late ----------------------------------------


async def test_slow_drip_outlasts_a_read_timeout(site: HostileSite) -> None:
    url = site.base_a + "/slow-drip.html"
    received = 0
    async with (
        _client() as http,
        http.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=1.5)) as response,
    ):
        assert response.status == 200
        assert url in {entry.url for entry in site.requests()}  # logged before answering
        waiting = asyncio.timeout(2.0)
        with pytest.raises(TimeoutError):
            async with waiting:
                async for chunk in response.content.iter_any():
                    received += len(chunk)
        # Our 2 s deadline expired, not the 1.5 s read timeout: a byte a second keeps a
        # per-read timeout happy forever, only a total deadline cuts the page short.
        assert waiting.expired()
    assert 1 <= received <= 4


async def test_huge_page_is_over_fifty_megabytes(site: HostileSite) -> None:
    async with _client() as http, http.get(site.base_a + "/huge.html") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert int(response.headers["Content-Length"]) == HUGE_BYTES
        first = await response.content.read(64)
        assert first.startswith(b"<html><head><title>huge</title>")
        total = len(first)
        async for chunk in response.content.iter_chunked(1 << 20):
            total += len(chunk)
    assert total == HUGE_BYTES > 50_000_000


async def test_gzip_bomb_is_small_on_the_wire(site: HostileSite) -> None:
    async with _client() as http, http.get(site.base_a + "/bomb.html") as response:
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Type"] == "text/html"
        compressed = await response.read()
    assert len(compressed) < 5_000_000
    inflater = zlib.decompressobj(wbits=31)
    assert inflater.decompress(compressed, 64).startswith(b"<html><head><title>bomb</title>")
    # 64 MiB out and most of the input still unread: it goes on far past any body cap.
    inflated = inflater.decompress(inflater.unconsumed_tail, 64 << 20)
    assert len(inflated) == 64 << 20 and set(inflated) == {ord(" ")}
    assert len(inflater.unconsumed_tail) > len(compressed) // 2
    assert BOMB_BLOCK * BOMB_BLOCKS == 1 << 30


# -- charsets ---------------------------------------------------------------------------


async def test_charset_pages_need_the_right_codec(site: HostileSite) -> None:
    expected = site.expectations()
    async with _client() as http:
        for path, codec in CODECS.items():
            url = site.base_a + path
            status, headers, body = await _get(http, url)
            assert status == 200
            title = expected.charset_titles[url]
            assert f"<title>{title}</title>" in body.decode(codec)
            with pytest.raises(UnicodeDecodeError):
                body.decode("utf-8")  # what the latin-1 page's header claims
            if path == "/charset/latin1.html":
                assert headers["Content-Type"] == "text/html; charset=utf-8"
            else:
                assert headers["Content-Type"] == "text/html"
            if path == "/charset/sjis.html":
                assert b'<meta charset="shift_jis">' in body
            else:
                # Nothing usable declared: detection must get the title right.
                assert b"charset" not in body.lower() and len(body) > 300
                best = from_bytes(body).best()
                assert best is not None and f"<title>{title}</title>" in str(best)


# -- infinite URL spaces ----------------------------------------------------------------


async def test_calendar_session_and_loopdir_never_end(site: HostileSite) -> None:
    a = site.base_a
    async with _client() as http:
        _, _, body = await _get(http, a + "/calendar/2026/12")
        assert _links(body, a + "/calendar/2026/12") == [
            a + "/calendar/2026/11",
            a + "/calendar/2027/1",
        ]
        status, _, body = await _get(http, a + "/calendar/9999/12")
        assert status == 200 and a + "/calendar/10000/1" in _links(body, a)
        status, _, _ = await _get(http, a + "/calendar/2026/13")
        assert status == 404

        pages = [await _get(http, a + "/session/page.html?sid=abc123") for _ in range(2)]
        first, second = (_links(body, a) for _, _, body in pages)
        assert first != second
        for links in (first, second):
            assert links[0].startswith(a + "/session/page.html?sid=")
            assert links[1].startswith(a + "/session/other.html;jsessionid=")
        status, _, body = await _get(http, first[1])
        assert status == 200
        assert any("/session/page.html?sid=" in link for link in _links(body, a))
        assert any(entry.path == urlsplit(first[1]).path for entry in site.requests())

        url = a + "/loopdir/x/"
        for depth in range(1, 5):
            status, _, body = await _get(http, url)
            assert status == 200
            (url,) = _links(body, url)
            assert url == a + "/loopdir/" + "x/" * (depth + 1)


# -- the request log --------------------------------------------------------------------


async def test_log_has_one_line_per_request_at_arrival(fresh_site: HostileSite) -> None:
    a, b = fresh_site.base_a, fresh_site.base_b
    sent = [
        ("GET", a + "/"),
        ("GET", b + "/robots.txt"),
        ("GET", a + "/session/other.html;jsessionid=ff00"),
        ("HEAD", a + "/missing.html"),
        ("GET", a + "/loop/a"),
        ("GET", b + "/landing.html"),
        ("GET", a + "/calendar/2026/11?view=week"),
    ]
    started = time.time()
    async with _client() as http:
        statuses = []
        for method, url in sent:
            async with http.request(method, url, allow_redirects=False) as response:
                await response.read()
                statuses.append(response.status)
    assert statuses == [200, 503, 200, 404, 302, 200, 200]
    logged = fresh_site.requests()
    assert logged == read_log(fresh_site.log_path)
    assert [(entry.method, entry.url) for entry in logged] == sent
    assert all(entry.user_agent == UA for entry in logged)
    assert all(entry.host == f"127.0.0.1:{entry.port}" for entry in logged)
    assert {entry.port for entry in logged} == {fresh_site.port_a, fresh_site.port_b}
    times = [entry.t for entry in logged]
    assert times == sorted(times) and started <= times[0] and times[-1] <= time.time()
    assert isinstance(logged[0], LoggedRequest)


def test_a_site_that_cannot_start_says_why(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        site = HostileSite(tmp_path / "log.jsonl", taken, free_port())
        with pytest.raises(RuntimeError, match="exited with status"):
            site.__enter__()
        assert site.exit_code not in (None, 0)


# -- what the site promises a crawl -----------------------------------------------------


async def test_expectations_hold(fresh_site: HostileSite) -> None:
    a = fresh_site.base_a
    expected = expectations(fresh_site.port_a, fresh_site.port_b)
    assert expected == fresh_site.expectations()  # default delays and Retry-After
    async with _client() as http:
        # must_fetch: a 200, after exactly the announced number of errors where there are.
        for url in sorted(expected.must_fetch):
            statuses: list[int] = []
            while not statuses or statuses[-1] != 200:
                assert len(statuses) <= expected.retry_first.get(url, 0), (url, statuses)
                async with http.get(url, allow_redirects=False) as response:
                    statuses.append(response.status)
                    if len(statuses) == 1 and url in expected.retry_after:
                        retry_after = float(response.headers["Retry-After"])
                        assert retry_after == expected.retry_after[url]
            errors = statuses[:-1]
            assert len(errors) == expected.retry_first.get(url, 0), (url, statuses)
            assert set(errors) <= {429, 503}, (url, statuses)
        assert set(expected.retry_first) <= expected.must_fetch
        for port in expected.robots_unavailable_first:
            assert f"http://127.0.0.1:{port}/robots.txt" in expected.retry_first

        # never_request: they exist, so a crawler's mistake shows as a served request.
        for url in expected.never_request:
            status, _, _ = await _get(http, url)
            assert status == 200, url
        assert a + LONG_PATH in expected.never_request and len(a + LONG_PATH) > 3000

        for url, reason in expected.dlq_urls.items():
            host = urlsplit(url).hostname or ""
            if reason == "forbidden_address":
                address = ipaddress.ip_address(host)
                assert address.is_private or address.is_link_local, url
            elif reason == "http_503":
                assert [(await _get(http, url))[0] for _ in range(3)] == [503] * 3
            elif reason == "redirect_loop":
                status, headers, _ = await _get(http, url)
                status_next, headers_next, _ = await _get(http, headers["Location"])
                assert status == status_next == 302 and headers_next["Location"] == url
            else:
                assert reason == "timeout"
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(1.5), http.get(url) as response:
                        await response.read()

        for url, (status, location) in expected.redirects.items():
            got_status, headers, _ = await _get(http, url)
            assert (got_status, headers["Location"]) == (status, location), url
        for url in expected.not_found:
            assert (await _get(http, url))[0] == 404
        for url in expected.non_html:
            status, headers, _ = await _get(http, url)
            assert status == 200 and not headers["Content-Type"].startswith("text/html")
        for url in expected.oversized:
            async with http.get(url) as response:
                assert response.status == 200, url
                if response.headers.get("Content-Encoding") == "gzip":
                    assert int(response.headers["Content-Length"]) < 5_000_000  # the bomb
                else:
                    assert int(response.headers["Content-Length"]) > 50_000_000
        for url, title in expected.charset_titles.items():
            path = urlsplit(url).path
            assert title.encode(CODECS[path]) in (await _get(http, url))[2]
        for url in expected.traps:
            # Each page leads to another URL of the same space (/calendar/, /session/...).
            status, _, body = await _get(http, url)
            space = a + "/" + urlsplit(url).path.split("/")[1] + "/"
            assert status == 200, url
            assert any(link != url and link.startswith(space) for link in _links(body, url))

        # Where the traps hang: the index and the sitemap link what the lists claim.
        _, _, index = await _get(http, a + "/")
        linked = set(_links(index, a + "/"))
        assert expected.sitemap_only.isdisjoint(linked)
        assert {
            a + "/private/secret.html",
            a + "/nofollow-target.html",
            a + LONG_PATH,
            *expected.dlq_urls,
            *expected.traps,
            *expected.not_found,
            *expected.non_html,
            *expected.oversized,
            *expected.charset_titles,
        } - {"http://10.1.2.3/admin"} <= linked
        assert b'rel="nofollow" href="/nofollow-target.html"' in index
        _, _, sitemap = await _get(http, a + "/sitemap.xml")
        assert set(LOC.findall(sitemap.decode())) == expected.sitemap_only | expected.out_of_scope
        _, _, landing = await _get(http, fresh_site.base_b + "/landing.html")
        assert set(_links(landing, fresh_site.base_b + "/")) >= expected.never_request - {
            url for url in expected.never_request if urlsplit(url).port == fresh_site.port_a
        }
