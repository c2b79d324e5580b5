"""A hostile test web site for the crawler's politeness and robustness end-to-end tests.

Two aiohttp servers on 127.0.0.1 run in one process: host A (the main site) and host B
(a second host reached through a cross-host redirect). Between them they serve what a
careless crawler trips over: robots.txt groups that only a crawler picking the right
user agent obeys, a robots.txt that answers 503 first, rate limits with Retry-After,
redirect chains and loops, links to private addresses, a drip-fed page, a 50 MB page, a
gzip bomb, mis-declared charsets, and infinite URL spaces (a calendar, session ids,
repeated path segments).

Every request is appended to a JSON-lines log *when it arrives*, so a test can check
afterwards what the crawler asked for, in what order and how far apart: the log is the
ground truth for politeness (robots, Crawl-delay, Retry-After), whatever the crawler
reports about itself.

Run it as ``python tests/support/hostile.py --port-a N --port-b M --log FILE``; it
prints ``ready`` once both servers listen and stops cleanly on SIGTERM or SIGINT. Tests
use :class:`HostileSite`, which does exactly that in a subprocess (a crawler under test
must not share an event loop, or a GIL, with the site it is timed against), and
:func:`expectations`, which says what a correct, polite crawl of the site must do.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import secrets
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

HOST = "127.0.0.1"
USER_AGENT_TOKEN = "streamcrawl"

# 50 MiB: past any sane body cap, streamed from one repeated block so the site never
# holds it in memory.
HUGE_BYTES = 50 * 1024 * 1024
# The gzip bomb inflates to 1 GiB of spaces after a short HTML prefix (about 1 MB sent).
BOMB_BLOCK = 1024 * 1024
BOMB_BLOCKS = 1024
BOMB_PREFIX = b"<html><head><title>bomb</title></head><body>"
# The drip-fed page: headers at once, then one byte a second for this many seconds.
DRIP_SECONDS = 300
# Longer than any sane URL-length cap (2048 by default in streamcrawl).
LONG_PATH = "/long/" + "x" * 3000
# Private addresses linked from the index: fetching them would be an SSRF.
METADATA_URL = "http://169.254.169.254/latest/meta-data/"
INTERNAL_URL = "http://10.1.2.3/internal.html"
PRIVATE_REDIRECT_TARGET = "http://10.1.2.3/admin"
OUTSIDE_URL = "http://example.com/outside.html"

CHARSET_TITLES = {
    "/charset/latin1.html": "Café crème",
    "/charset/sjis.html": "日本語のページ",
    "/charset/cp1251.html": "Привет мир",
}

_LATIN1_TEXT = (
    "Le café crème est servi très chaud à la terrasse. Où est la crêperie? "
    "Elle est derrière l'église, près du marché où l'on achète des pâtés, du fromage "
    "affiné et des gâteaux à la crème fraîche. Voilà une journée agréable! "
    "Les élèves étudient la géographie et l'histoire de la région. Ils préfèrent les "
    "récréations où ils jouent dehors. Le médecin a conseillé du repos, une alimentation "
    "équilibrée et des promenades régulières. À côté de la forêt, un château élégant "
    "domine la vallée; ses fenêtres reflètent la lumière dorée de l'été. Nous espérons "
    "déjeuner là-bas après la fête du village."
)
# Long enough for detection: with fewer sentences charset-normalizer guesses cp1250
# and reads "è" as "č"; now it picks cp1252, which agrees with latin-1 on all of it.
_SJIS_TEXT = (
    "これは日本語のページです。文字コードはシフトJISで、ヘッダーには文字コードがありません。"
    "クローラーはメタタグを読んで正しく解読しなければなりません。"
)
_CP1251_TEXT = (
    "Это страница на русском языке, записанная в кодировке Windows-1251 без всякого "
    "указания кодировки: ни в заголовке ответа, ни в метатеге. Поисковый робот должен "
    "сам определить кодировку по содержимому страницы. Москва — столица России, тогда как "
    "Санкт-Петербург называют северной столицей. Летом в городе белые ночи, и люди "
    "гуляют по набережным до самого утра. Зимой здесь холодно, идёт снег, и реки "
    "покрываются толстым льдом."
)


# -- the request log --------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the site saw it arrive (``path`` is the raw request target)."""

    t: float
    port: int
    host: str
    method: str
    path: str
    user_agent: str

    @property
    def url(self) -> str:
        """The URL requested, spelt like the URLs of :class:`Expectations`."""
        return f"http://{HOST}:{self.port}{self.path}"


def read_log(path: Path) -> list[LoggedRequest]:
    """Every request logged so far, in arrival order (a missing log means none yet)."""
    if not path.exists():
        return []
    entries: list[LoggedRequest] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        entries.append(
            LoggedRequest(
                t=float(row["t"]),
                port=int(row["port"]),
                host=str(row["host"]),
                method=str(row["method"]),
                path=str(row["path"]),
                user_agent=str(row["user_agent"]),
            )
        )
    return entries


# -- what a correct crawl does ----------------------------------------------------------


@dataclass(frozen=True)
class Expectations:
    """What a correct, polite crawl seeded with ``base_a + "/"`` must (not) do.

    URLs are full ``http://127.0.0.1:PORT/path`` strings, spelt as the site links them
    (and as :attr:`LoggedRequest.url` spells a logged request). They assume a crawl
    whose scope allows 127.0.0.1, whose max depth is at least 2 and whose user agent
    contains ``streamcrawl``.
    """

    must_fetch: frozenset[str]
    """Requested at least once with a 200 answer. Those in ``retry_first`` answer an
    error first, so the crawler gets its 200 only if it tries again."""
    never_request: frozenset[str]
    """Never requested: disallowed by robots.txt, nofollow targets, the too-long link.
    Each of them exists (answers 200), so a violation is a visible request, no 404."""
    dlq_urls: dict[str, str]
    """URL -> the reason family it should be dead-lettered with. The private addresses
    give ``forbidden_address`` only when the crawl scope lets them in at all (otherwise
    they are dropped as out of scope, never requested either way). The redirect loop is
    keyed by its entry URL; a crawler may record it against either hop."""
    retry_first: dict[str, int]
    """must_fetch URL -> how many error answers (429/503) come before the first 200."""
    retry_after: dict[str, float]
    """URL -> the Retry-After (seconds) its first error answer carries: the next request
    for it must come no sooner."""
    crawl_delays: dict[int, float]
    """Port -> the Crawl-delay its robots.txt gives ``streamcrawl`` (seconds between two
    requests to that host)."""
    robots_unavailable_first: frozenset[int]
    """Ports whose robots.txt answers 503 to the first request: nothing else may be
    requested from that host before a later robots.txt request answers 200."""
    charset_titles: dict[str, str]
    """URL -> its title, correctly decoded (each page declares its charset wrongly or
    not at all in the Content-Type header)."""
    sitemap_only: frozenset[str]
    """Pages linked from nowhere but the sitemap that robots.txt announces."""
    redirects: dict[str, tuple[int, str]]
    """URL -> (status, absolute Location) for every redirect the site serves."""
    not_found: frozenset[str]
    """Linked URLs that answer 404."""
    oversized: frozenset[str]
    """200 answers whose body is past any sane cap (50 MB plain, 1 GiB gzip-inflated):
    a crawler must stop reading and keep at most its cap."""
    non_html: frozenset[str]
    """Linked URLs that answer 200 with a body that is not HTML."""
    traps: dict[str, str]
    """Entry URL -> kind of an infinite URL space ("calendar", "session_ids",
    "repeated_segments"): a crawler must fetch only a bounded number of URLs below it."""
    out_of_scope: frozenset[str]
    """Listed by the site (the sitemap) but outside 127.0.0.1: never requested."""


def expectations(port_a: int, port_b: int) -> Expectations:
    """What the site makes true for a crawl of ``http://127.0.0.1:<port_a>/``."""

    def a(path: str) -> str:
        return f"http://{HOST}:{port_a}{path}"

    def b(path: str) -> str:
        return f"http://{HOST}:{port_b}{path}"

    defaults = SiteConfig(port_a, port_b)
    must_fetch = {
        a("/robots.txt"),
        a("/"),
        a("/sitemap.xml"),
        a("/private/open.html"),
        a("/meta-nofollow.html"),
        a("/from-sitemap/1.html"),
        a("/from-sitemap/2.html"),
        a("/rate-limited.html"),
        a("/burst-503.html"),
        a("/redirect/final.html"),
        a("/calendar/2026/11"),
        a("/loopdir/x/"),
        a("/huge.html"),
        a("/bomb.html"),
        b("/robots.txt"),
        b("/landing.html"),
        *(b(f"/b/{n}.html") for n in range(1, 6)),
        *(a(path) for path in CHARSET_TITLES),
    }
    return Expectations(
        must_fetch=frozenset(must_fetch),
        never_request=frozenset(
            {
                a("/private/secret.html"),
                a("/nofollow-target.html"),
                a("/meta-nofollow-target.html"),
                a(LONG_PATH),
                b("/b/secret/x.html"),
            }
        ),
        dlq_urls={
            METADATA_URL: "forbidden_address",
            INTERNAL_URL: "forbidden_address",
            PRIVATE_REDIRECT_TARGET: "forbidden_address",
            a("/always-503.html"): "http_503",
            a("/slow-drip.html"): "timeout",
            a("/loop/a"): "redirect_loop",
        },
        retry_first={a("/rate-limited.html"): 1, a("/burst-503.html"): 2, b("/robots.txt"): 1},
        retry_after={
            a("/rate-limited.html"): float(defaults.retry_after),
            a("/burst-503.html"): 1.0,
        },
        crawl_delays={port_a: defaults.crawl_delay_a, port_b: defaults.crawl_delay_b},
        robots_unavailable_first=frozenset({port_b}),
        charset_titles={a(path): title for path, title in CHARSET_TITLES.items()},
        sitemap_only=frozenset({a("/from-sitemap/1.html"), a("/from-sitemap/2.html")}),
        redirects={
            a("/to-private"): (302, PRIVATE_REDIRECT_TARGET),
            a("/redirect/1"): (301, a("/redirect/2")),
            a("/redirect/2"): (302, a("/redirect/3")),
            a("/redirect/3"): (307, a("/redirect/final.html")),
            a("/loop/a"): (302, a("/loop/b")),
            a("/loop/b"): (302, a("/loop/a")),
            a("/cross-host"): (302, b("/landing.html")),
        },
        not_found=frozenset({a("/missing.html")}),
        oversized=frozenset({a("/huge.html"), a("/bomb.html")}),
        non_html=frozenset({a("/doc.pdf")}),
        traps={
            a("/calendar/2026/11"): "calendar",
            a("/session/page.html?sid=abc123"): "session_ids",
            a("/loopdir/x/"): "repeated_segments",
        },
        out_of_scope=frozenset({OUTSIDE_URL}),
    )


# -- the site ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteConfig:
    port_a: int
    port_b: int
    crawl_delay_a: float = 1.5
    crawl_delay_b: float = 0.5
    retry_after: int = 2

    @property
    def base_a(self) -> str:
        return f"http://{HOST}:{self.port_a}"

    @property
    def base_b(self) -> str:
        return f"http://{HOST}:{self.port_b}"


def _html_page(title: str, links: Sequence[str] = (), head: str = "", body: str = "") -> str:
    items = "\n".join(
        f'<li><a href="{html.escape(href)}">{html.escape(href)}</a></li>' for href in links
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"{head}</head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n<ul>\n{items}\n</ul>\n"
        "</body></html>\n"
    )


def _html(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=text.encode("utf-8"),
        status=status,
        headers={"Content-Type": "text/html; charset=utf-8", **(headers or {})},
    )


def _redirect(status: int, location: str) -> web.Response:
    page = _html_page(f"{status} redirect", [location])
    return _html(page, status=status, headers={"Location": location})


def _charset_page(title: str, text: str, head: str = "") -> str:
    return (
        f"<!DOCTYPE html>\n<html><head>{head}<title>{title}</title></head>\n"
        f"<body><h1>{title}</h1>\n<p>{text}</p>\n</body></html>\n"
    )


def build_bomb() -> bytes:
    """A gzip member that inflates to ``BOMB_PREFIX`` plus 1 GiB of spaces.

    Compressing 1 GiB takes seconds, so one 1 MiB block is deflated once after a full
    flush (which drops the history, making every later copy of the block compress to
    the very same bytes) and that segment is repeated; the gzip header and trailer
    (CRC-32 and length of the whole inflated stream) are written by hand.
    """
    block = b" " * BOMB_BLOCK
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(BOMB_PREFIX) + deflate.flush(zlib.Z_FULL_FLUSH)
    segment = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.flush()
    crc = zlib.crc32(BOMB_PREFIX)
    for _ in range(BOMB_BLOCKS):
        crc = zlib.crc32(block, crc)
    size = len(BOMB_PREFIX) + BOMB_BLOCKS * BOMB_BLOCK
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, no mtime
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)
    return header + head + segment * BOMB_BLOCKS + tail + trailer


class _Pages:
    """Both hosts' handlers, with the per-process counters behind the answers that
    change over time (the first robots.txt of B, the 429 and 503 pages)."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.hits: Counter[str] = Counter()
        self.bomb = build_bomb()
        self.charset_bodies = {
            "/charset/latin1.html": _charset_page(
                CHARSET_TITLES["/charset/latin1.html"], _LATIN1_TEXT
            ).encode("iso-8859-1"),
            "/charset/sjis.html": _charset_page(
                CHARSET_TITLES["/charset/sjis.html"], _SJIS_TEXT, '<meta charset="shift_jis">'
            ).encode("shift_jis"),
            "/charset/cp1251.html": _charset_page(
                CHARSET_TITLES["/charset/cp1251.html"], _CP1251_TEXT
            ).encode("cp1251"),
        }
        block = "".join(f"<p>filler paragraph {n:04d} of the huge page.</p>\n" for n in range(1600))
        self.huge_block = block.encode("ascii")

    # -- host A --------------------------------------------------------------------------

    def routes_a(self) -> list[web.RouteDef]:
        return [
            web.get("/robots.txt", self.robots_a),
            web.get("/", self.index),
            web.get("/sitemap.xml", self.sitemap),
            web.get("/rate-limited.html", self.rate_limited),
            web.get("/burst-503.html", self.burst_503),
            web.get("/always-503.html", self.always_503),
            web.get("/redirect/1", self.redirect_step),
            web.get("/redirect/2", self.redirect_step),
            web.get("/redirect/3", self.redirect_step),
            web.get("/loop/a", self.loop),
            web.get("/loop/b", self.loop),
            web.get("/cross-host", self.cross_host),
            web.get("/to-private", self.to_private),
            web.get("/slow-drip.html", self.slow_drip),
            web.get("/huge.html", self.huge),
            web.get("/bomb.html", self.bomb_page),
            web.get("/doc.pdf", self.pdf),
            web.get("/charset/{name}", self.charset),
            web.get(r"/calendar/{year:\d{1,9}}/{month:\d{1,2}}", self.calendar),
            web.get("/session/{name}", self.session),
            web.get(r"/loopdir/{rest:(x/)+}", self.loopdir),
            web.get("/meta-nofollow.html", self.meta_nofollow),
            web.get(r"/long/{tail:x+}", self.plain),
            *(
                web.get(path, self.plain)
                for path in (
                    "/redirect/final.html",
                    "/private/secret.html",
                    "/private/open.html",
                    "/nofollow-target.html",
                    "/meta-nofollow-target.html",
                    "/from-sitemap/1.html",
                    "/from-sitemap/2.html",
                )
            ),
        ]

    async def robots_a(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        text = (
            f"User-agent: {USER_AGENT_TOKEN}\n"
            "Disallow: /private/\n"
            "Allow: /private/open.html\n"
            f"Crawl-delay: {config.crawl_delay_a:g}\n"
            f"Sitemap: {config.base_a}/sitemap.xml\n"
            "\n"
            "User-agent: *\n"
            "Disallow: /\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def index(self, request: web.Request) -> web.StreamResponse:
        # The rel=nofollow link is written by hand; everything else is a plain link.
        links = [
            "/private/secret.html",
            "/private/open.html",
            "/meta-nofollow.html",
            METADATA_URL,
            INTERNAL_URL,
            "/to-private",
            LONG_PATH,
            "/doc.pdf",
            "/rate-limited.html",
            "/burst-503.html",
            "/always-503.html",
            "/redirect/1",
            "/loop/a",
            "/cross-host",
            "/slow-drip.html",
            "/huge.html",
            "/bomb.html",
            *CHARSET_TITLES,
            "/calendar/2026/11",
            "/session/page.html?sid=abc123",
            "/loopdir/x/",
            "/missing.html",
        ]
        nofollow = '<p><a rel="nofollow" href="/nofollow-target.html">not to be followed</a></p>'
        return _html(_html_page("hostile index", links, body=nofollow))

    async def sitemap(self, request: web.Request) -> web.StreamResponse:
        urls = [
            f"{self.config.base_a}/from-sitemap/1.html",
            f"{self.config.base_a}/from-sitemap/2.html",
            OUTSIDE_URL,
        ]
        entries = "".join(f"  <url><loc>{html.escape(url)}</loc></url>\n" for url in urls)
        text = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            '<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">\n'
            f"{entries}</urlset>\n"
        )
        return web.Response(body=text.encode("utf-8"), headers={"Content-Type": "application/xml"})

    def _count(self, key: str) -> int:
        self.hits[key] += 1
        return self.hits[key]

    async def rate_limited(self, request: web.Request) -> web.StreamResponse:
        if self._count("rate-limited") == 1:
            retry_after = str(self.config.retry_after)
            return _html(_html_page("429 too many requests"), 429, {"Retry-After": retry_after})
        return _html(_html_page("rate limited, now served"))

    async def burst_503(self, request: web.Request) -> web.StreamResponse:
        hit = self._count("burst-503")
        if hit == 1:
            return _html(_html_page("503 busy"), 503, {"Retry-After": "1"})
        if hit == 2:
            return _html(_html_page("503 still busy"), 503)
        return _html(_html_page("burst over, now served"))

    async def always_503(self, request: web.Request) -> web.StreamResponse:
        return _html(_html_page("503 forever"), 503)

    async def redirect_step(self, request: web.Request) -> web.StreamResponse:
        step = {
            "/redirect/1": (301, "/redirect/2"),
            "/redirect/2": (302, "/redirect/3"),
            "/redirect/3": (307, "/redirect/final.html"),
        }
        status, location = step[request.path]
        return _redirect(status, self.config.base_a + location)

    async def loop(self, request: web.Request) -> web.StreamResponse:
        other = "/loop/b" if request.path == "/loop/a" else "/loop/a"
        return _redirect(302, self.config.base_a + other)

    async def cross_host(self, request: web.Request) -> web.StreamResponse:
        return _redirect(302, f"{self.config.base_b}/landing.html")

    async def to_private(self, request: web.Request) -> web.StreamResponse:
        return _redirect(302, PRIVATE_REDIRECT_TARGET)

    async def slow_drip(self, request: web.Request) -> web.StreamResponse:
        text = "<html><head><title>slow drip</title></head><body>"
        body = (text + " " * DRIP_SECONDS)[: DRIP_SECONDS - len("</body></html>")]
        payload = (body + "</body></html>").encode("ascii")
        response = web.StreamResponse(headers={"Content-Type": "text/html; charset=utf-8"})
        response.content_length = len(payload)
        await response.prepare(request)
        try:
            for index in range(len(payload)):
                await response.write(payload[index : index + 1])
                await asyncio.sleep(1.0)
            await response.write_eof()
        except ConnectionError:
            pass  # the crawler gave up, as it should
        return response

    async def huge(self, request: web.Request) -> web.StreamResponse:
        prefix = b"<html><head><title>huge</title></head><body>\n"
        suffix = b"</body></html>\n"
        response = web.StreamResponse(headers={"Content-Type": "text/html; charset=utf-8"})
        response.content_length = HUGE_BYTES
        await response.prepare(request)
        try:
            await response.write(prefix)
            left = HUGE_BYTES - len(prefix) - len(suffix)
            while left > 0:
                chunk = self.huge_block[:left]
                await response.write(chunk)
                left -= len(chunk)
            await response.write(suffix)
            await response.write_eof()
        except ConnectionError:
            pass  # the crawler stopped reading at its cap
        return response

    async def bomb_page(self, request: web.Request) -> web.StreamResponse:
        # The body is sent as is: aiohttp compresses only when asked to, and the
        # Content-Encoding header set here tells the client it is gzip.
        return web.Response(
            body=self.bomb,
            headers={"Content-Type": "text/html", "Content-Encoding": "gzip"},
        )

    async def pdf(self, request: web.Request) -> web.StreamResponse:
        body = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
        return web.Response(body=body, headers={"Content-Type": "application/pdf"})

    async def charset(self, request: web.Request) -> web.StreamResponse:
        body = self.charset_bodies.get(request.path)
        if body is None:
            raise web.HTTPNotFound()
        # latin-1 bytes under a header that claims UTF-8; the others declare nothing
        # in the header (Shift_JIS only in a <meta>, windows-1251 nowhere at all).
        header = "text/html; charset=utf-8" if request.path.endswith("latin1.html") else "text/html"
        return web.Response(body=body, headers={"Content-Type": header})

    async def calendar(self, request: web.Request) -> web.StreamResponse:
        year, month = int(request.match_info["year"]), int(request.match_info["month"])
        if not 1 <= month <= 12 or year < 1:
            raise web.HTTPNotFound()
        prev_year, prev_month = (year - 1, 12) if month == 1 else (year, month - 1)
        next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
        links = [f"/calendar/{next_year}/{next_month}"]
        if prev_year >= 1:
            links.insert(0, f"/calendar/{prev_year}/{prev_month}")
        return _html(_html_page(f"calendar {year}-{month:02d}", links))

    async def session(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name != "page.html" and name.split(";", 1)[0] != "other.html":
            raise web.HTTPNotFound()
        links = [
            f"/session/page.html?sid={secrets.token_hex(8)}",
            f"/session/other.html;jsessionid={secrets.token_hex(16)}",
        ]
        return _html(_html_page(f"session {name.split(';', 1)[0]}", links))

    async def loopdir(self, request: web.Request) -> web.StreamResponse:
        depth = request.path.count("x/")
        return _html(_html_page(f"loopdir depth {depth}", ["x/"]))

    async def meta_nofollow(self, request: web.Request) -> web.StreamResponse:
        head = '<meta name="robots" content="nofollow">'
        return _html(_html_page("meta nofollow", ["/meta-nofollow-target.html"], head=head))

    async def plain(self, request: web.Request) -> web.StreamResponse:
        title = request.path if len(request.path) < 100 else request.path[:100] + "..."
        return _html(_html_page(f"page {title}", ["/"]))

    # -- host B --------------------------------------------------------------------------

    def routes_b(self) -> list[web.RouteDef]:
        return [
            web.get("/robots.txt", self.robots_b),
            web.get("/landing.html", self.landing),
            *(web.get(f"/b/{n}.html", self.plain) for n in range(1, 6)),
            web.get("/b/secret/x.html", self.plain),
        ]

    async def robots_b(self, request: web.Request) -> web.StreamResponse:
        if self._count("robots-b") == 1:
            return web.Response(status=503, text="busy, try later\n", content_type="text/plain")
        text = f"User-agent: *\nDisallow: /b/secret/\nCrawl-delay: {self.config.crawl_delay_b:g}\n"
        return web.Response(text=text, content_type="text/plain")

    async def landing(self, request: web.Request) -> web.StreamResponse:
        links = [f"/b/{n}.html" for n in range(1, 6)] + ["/b/secret/x.html"]
        return _html(_html_page("landing on host B", links))


def _logging_middleware(log: IO[str], port: int) -> Middleware:
    """Log each request as it arrives (before any answer, so a request whose answer
    never completes is still on record), and answer unknown paths with an HTML 404."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        entry = {
            "t": time.time(),
            "port": port,
            "host": request.headers.get("Host", ""),
            "method": request.method,
            "path": request.raw_path,
            "user_agent": request.headers.get("User-Agent", ""),
        }
        log.write(json.dumps(entry) + "\n")
        log.flush()
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _html(_html_page("404 not found", ["/"]), status=404)

    return middleware


async def serve(config: SiteConfig, log_path: Path) -> None:
    """Serve both hosts until SIGTERM or SIGINT."""
    pages = _Pages(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runners: list[web.AppRunner] = []
    with log_path.open("a", buffering=1, encoding="utf-8") as log:
        try:
            for port, routes in (
                (config.port_a, pages.routes_a()),
                (config.port_b, pages.routes_b()),
            ):
                app = web.Application(middlewares=[_logging_middleware(log, port)])
                app.add_routes(routes)
                # A short shutdown: the drip-fed page would otherwise hold it for minutes.
                runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, HOST, port).start()
            print("ready", flush=True)
            await stop.wait()
        finally:
            for runner in runners:
                await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port-a", type=int, required=True, help="port of the main host")
    parser.add_argument("--port-b", type=int, required=True, help="port of the second host")
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines request log")
    parser.add_argument("--crawl-delay-a", type=float, default=1.5)
    parser.add_argument("--crawl-delay-b", type=float, default=0.5)
    parser.add_argument("--retry-after", type=int, default=2, help="seconds, on the 429")
    args = parser.parse_args(argv)
    config = SiteConfig(
        args.port_a, args.port_b, args.crawl_delay_a, args.crawl_delay_b, args.retry_after
    )
    asyncio.run(serve(config, args.log))
    return 0


# -- the test harness -------------------------------------------------------------------


class HostileSite:
    """The site in a subprocess, for a ``with`` block: started and ready on entry,
    stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(
        self,
        log_path: Path,
        port_a: int,
        port_b: int,
        crawl_delay_a: float = 1.5,
        crawl_delay_b: float = 0.5,
        retry_after: int = 2,
    ) -> None:
        self.log_path = log_path
        self.port_a = port_a
        self.port_b = port_b
        self.crawl_delay_a = crawl_delay_a
        self.crawl_delay_b = crawl_delay_b
        self.retry_after = retry_after
        self.config = SiteConfig(port_a, port_b, crawl_delay_a, crawl_delay_b, retry_after)
        self.exit_code: int | None = None
        """The site process's exit status once stopped (0 after a clean SIGTERM)."""
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def base_a(self) -> str:
        return self.config.base_a

    @property
    def base_b(self) -> str:
        return self.config.base_b

    def requests(self) -> list[LoggedRequest]:
        return read_log(self.log_path)

    def expectations(self) -> Expectations:
        """:func:`expectations` for this site's ports (and its delays and Retry-After)."""
        base = expectations(self.port_a, self.port_b)
        rate_limited = f"{self.base_a}/rate-limited.html"
        return replace(
            base,
            crawl_delays={self.port_a: self.crawl_delay_a, self.port_b: self.crawl_delay_b},
            retry_after={**base.retry_after, rate_limited: float(self.retry_after)},
        )

    def __enter__(self) -> HostileSite:
        command = [
            sys.executable,
            # By path, not ``-m``: it runs from any working directory.
            str(Path(__file__).resolve()),
            "--port-a",
            str(self.port_a),
            "--port-b",
            str(self.port_b),
            "--log",
            str(self.log_path),
            "--crawl-delay-a",
            str(self.crawl_delay_a),
            "--crawl-delay-b",
            str(self.crawl_delay_b),
            "--retry-after",
            str(self.retry_after),
        ]
        # stderr goes to a file, so a chatty site can never block on a full pipe.
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )
        try:
            self._wait_ready(timeout=15.0)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()

    def _wait_ready(self, timeout: float) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        deadline = time.monotonic() + timeout
        seen = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while b"ready\n" not in seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"hostile site not ready within {timeout:.0f}s: {self._stderr_text()}"
                    )
                if not selector.select(left):
                    continue
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    code = process.wait()
                    raise RuntimeError(
                        f"hostile site exited with status {code} before it was ready: "
                        f"{self._stderr_text()}"
                    )
                seen += chunk

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", errors="replace")[-4000:] or "(no stderr)"

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self.exit_code = process.returncode
            if process.stdout is not None:
                process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


if __name__ == "__main__":
    sys.exit(main())
