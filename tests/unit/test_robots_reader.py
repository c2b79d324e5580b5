"""robots.txt: reading one host's file (redirects, statuses, failures) through an in-memory
request function, and the per-host cache's states."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from streamcrawl.fetcher.http import FetchFailed, FetchResult
from streamcrawl.fetcher.robots import (
    ROBOTS_MAX_REDIRECTS,
    RobotsCache,
    RobotsRules,
    RobotsState,
    read_robots,
    rules_from_response,
)

UA = "streamcrawl/0.1 (+https://github.com/streamcrawl/streamcrawl)"
ROBOTS_URL = "http://a.example/robots.txt"

Answer = FetchResult | FetchFailed


def answer(status: int, body: bytes = b"", location: str | None = None) -> FetchResult:
    return FetchResult(
        status=status,
        final_url="",
        headers={} if location is None else {"location": location},
        content_type="text/plain",
        body=body,
        truncated=False,
        total_s=0.01,
        ttfb_s=0.01,
    )


class Site:
    """An in-memory web: URL -> answer (a response, or the failure a request raises).
    Remembers every URL requested, in order."""

    def __init__(self, answers: dict[str, Answer] | Callable[[str], Answer]) -> None:
        self._answers = answers
        self.requested: list[str] = []

    async def get(self, url: str) -> FetchResult:
        self.requested.append(url)
        found = self._answers(url) if callable(self._answers) else self._answers.get(url)
        if found is None:
            return answer(404)
        if isinstance(found, FetchFailed):
            raise found
        return found


RULES = b"""User-agent: otherbot
Disallow: /

User-agent: streamcrawl
Disallow: /private/
Allow: /private/open.html
Crawl-delay: 2

User-agent: *
Disallow: /
Crawl-delay: 9
Sitemap: http://a.example/sitemap.xml
"""


async def test_200_rules_apply_our_group_not_the_star_group() -> None:
    site = Site({ROBOTS_URL: answer(200, RULES)})
    rules = await read_robots(ROBOTS_URL, site.get)
    assert rules is not None and rules.source == "robots.txt"
    assert site.requested == [ROBOTS_URL]
    assert rules.allows("http://a.example/page.html", UA)
    assert not rules.allows("http://a.example/private/secret.html", UA)
    assert rules.allows("http://a.example/private/open.html", UA)
    assert rules.crawl_delay(UA) == 2.0  # our group's, not the star group's 9
    # Another agent falls under "*" (or its own group) and is kept out.
    assert not rules.allows("http://a.example/page.html", "somebot/1.0")
    assert not rules.allows("http://a.example/page.html", "otherbot/2.0")
    assert rules.sitemaps == ("http://a.example/sitemap.xml",)


async def test_without_a_group_of_ours_the_star_group_applies() -> None:
    body = b"User-agent: *\nDisallow: /admin\nCrawl-delay: 3\n"
    rules = await read_robots(ROBOTS_URL, Site({ROBOTS_URL: answer(200, body)}).get)
    assert rules is not None
    assert not rules.allows("http://a.example/admin/x", UA)
    assert rules.allows("http://a.example/x", UA)
    assert rules.crawl_delay(UA) == 3.0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451])
async def test_4xx_allows_everything(status: int) -> None:
    rules = await read_robots(ROBOTS_URL, Site({ROBOTS_URL: answer(status, b"Disallow: /")}).get)
    assert rules is not None and rules.parser is None and rules.source == "4xx"
    assert rules.allows("http://a.example/anything", UA)
    assert rules.crawl_delay(UA) is None


async def test_a_missing_robots_txt_allows_everything() -> None:
    rules = await read_robots(ROBOTS_URL, Site({}).get)
    assert rules is not None and rules.allows("http://a.example/x", UA)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 599])
async def test_5xx_and_429_mean_unavailable_for_now(status: int) -> None:
    assert await read_robots(ROBOTS_URL, Site({ROBOTS_URL: answer(status, RULES)}).get) is None


@pytest.mark.parametrize("reason", ["timeout", "connection_error", "dns_error", "http_error"])
async def test_no_answer_means_unavailable_for_now(reason: str) -> None:
    site = Site({ROBOTS_URL: FetchFailed(reason, "no answer")})
    assert await read_robots(ROBOTS_URL, site.get) is None


@pytest.mark.parametrize("reason", ["forbidden_address", "invalid_url"])
async def test_a_host_we_may_never_fetch_gets_rules_naming_why(reason: str) -> None:
    # Nothing of the host will be fetched anyway; each URL then fails on its own.
    rules = await read_robots(ROBOTS_URL, Site({ROBOTS_URL: FetchFailed(reason, "no")}).get)
    assert rules == RobotsRules(source=reason)


async def test_a_redirect_chain_is_followed_to_the_rules() -> None:
    site = Site(
        {
            ROBOTS_URL: answer(301, location="https://a.example/robots.txt"),
            "https://a.example/robots.txt": answer(302, location="/rules/robots.txt"),
            "https://a.example/rules/robots.txt": answer(
                307, location="https://www.a.example/robots.txt"
            ),
            "https://www.a.example/robots.txt": answer(200, b"User-agent: *\nDisallow: /x\n"),
        }
    )
    rules = await read_robots(ROBOTS_URL, site.get)
    assert site.requested == [
        ROBOTS_URL,
        "https://a.example/robots.txt",
        "https://a.example/rules/robots.txt",
        "https://www.a.example/robots.txt",
    ]
    assert rules is not None and rules.source == "robots.txt"
    assert not rules.allows("http://a.example/x", UA) and rules.allows("http://a.example/y", UA)


async def test_a_redirect_to_an_unavailable_or_forbidden_target() -> None:
    unavailable = Site(
        {ROBOTS_URL: answer(301, location="/r2"), "http://a.example/r2": answer(503)}
    )
    assert await read_robots(ROBOTS_URL, unavailable.get) is None
    forbidden = Site(
        {
            ROBOTS_URL: answer(302, location="http://10.0.0.1/robots.txt"),
            "http://10.0.0.1/robots.txt": FetchFailed("forbidden_address", "private"),
        }
    )
    rules = await read_robots(ROBOTS_URL, forbidden.get)
    assert rules is not None and rules.source == "forbidden_address"


async def test_a_redirect_without_location_is_a_4xx_like_answer() -> None:
    rules = await read_robots(ROBOTS_URL, Site({ROBOTS_URL: answer(301)}).get)
    assert rules is not None and rules.source == "4xx" and rules.allows("http://a.example/", UA)


async def test_the_redirect_limit_is_exactly_max_redirects() -> None:
    def hops(count: int) -> Callable[[str], Answer]:
        def at(url: str) -> Answer:
            n = int(url.rsplit("/", 1)[1] or 0)
            if n < count:
                return answer(301, location=f"/{n + 1}")
            return answer(200, b"User-agent: *\nDisallow: /private\n")

        return at

    within = Site(hops(ROBOTS_MAX_REDIRECTS))
    rules = await read_robots("http://a.example/0", within.get)
    assert rules is not None and rules.source == "robots.txt"
    assert len(within.requested) == ROBOTS_MAX_REDIRECTS + 1

    beyond = Site(hops(ROBOTS_MAX_REDIRECTS + 1))
    rules = await read_robots("http://a.example/0", beyond.get)
    assert rules == RobotsRules(source="too_many_redirects")
    assert rules.allows("http://a.example/private", UA)  # treated as no rules
    assert len(beyond.requested) == ROBOTS_MAX_REDIRECTS + 1  # and no further request


async def test_a_redirect_loop_stops_at_the_limit() -> None:
    site = Site(
        {
            ROBOTS_URL: answer(301, location="/robots2.txt"),
            "http://a.example/robots2.txt": answer(301, location="/robots.txt"),
        }
    )
    rules = await read_robots(ROBOTS_URL, site.get)
    assert rules is not None and rules.source == "too_many_redirects"
    assert len(site.requested) == ROBOTS_MAX_REDIRECTS + 1


async def test_a_huge_robots_txt_is_read_up_to_its_limit() -> None:
    filler = b"# " + b"x" * 600 * 1024 + b"\n"
    body = b"User-agent: *\nDisallow: /early\n" + filler + b"Disallow: /late\n"
    rules = await read_robots(ROBOTS_URL, Site({ROBOTS_URL: answer(200, body)}).get)
    assert rules is not None
    assert not rules.allows("http://a.example/early", UA)
    assert rules.allows("http://a.example/late", UA)  # past 500 KiB: not read


# -- the cache ----------------------------------------------------------------------------------


def test_unknown_fetching_known_then_expired_after_the_ttl() -> None:
    cache = RobotsCache(ttl_s=100, retry_s=10)
    assert cache.state("a", 0) is RobotsState.UNKNOWN
    assert cache.rules("a") == RobotsRules()  # nothing known: allow all
    cache.fetching("a")
    # A fetch in progress never expires by itself, whatever the time.
    assert cache.state("a", 0) is RobotsState.FETCHING
    assert cache.state("a", 10_000) is RobotsState.FETCHING
    rules = rules_from_response(200, b"User-agent: *\nDisallow: /p\n")
    cache.store("a", rules, now=50)
    assert cache.state("a", 50) is RobotsState.KNOWN
    assert cache.rules("a") is rules
    assert cache.state("a", 149.9) is RobotsState.KNOWN
    assert cache.state("a", 150) is RobotsState.UNKNOWN  # TTL over: read it again
    cache.fetching("a")
    assert cache.state("a", 150) is RobotsState.FETCHING


def test_unavailable_until_the_retry_time_then_unknown() -> None:
    cache = RobotsCache(ttl_s=100, retry_s=10)
    cache.fetching("a")
    cache.store("a", None, now=5)
    assert cache.state("a", 5) is RobotsState.UNAVAILABLE
    assert cache.state("a", 14.9) is RobotsState.UNAVAILABLE
    assert cache.unavailable_until("a") == 15
    assert cache.unavailable_until("never-seen") == 0.0
    assert cache.state("a", 15) is RobotsState.UNKNOWN
    cache.fetching("a")
    cache.store("a", RobotsRules(source="4xx"), now=15)
    assert cache.state("a", 16) is RobotsState.KNOWN


def test_hosts_are_independent() -> None:
    cache = RobotsCache(ttl_s=100, retry_s=10)
    cache.fetching("a")
    cache.store("b", None, now=0)
    cache.store("c", RobotsRules(source="4xx"), now=0)
    assert [cache.state(h, 1) for h in "abcd"] == [
        RobotsState.FETCHING,
        RobotsState.UNAVAILABLE,
        RobotsState.KNOWN,
        RobotsState.UNKNOWN,
    ]


def test_least_recently_used_hosts_go_first_but_never_a_fetch_in_progress() -> None:
    cache = RobotsCache(ttl_s=100, retry_s=10, max_hosts=2)
    cache.store("a", RobotsRules(source="4xx"), now=0)
    cache.store("b", RobotsRules(source="4xx"), now=0)
    assert cache.state("a", 1) is RobotsState.KNOWN  # a is now the most recently used
    cache.store("c", RobotsRules(source="4xx"), now=0)
    assert len(cache) == 2
    assert cache.state("b", 1) is RobotsState.UNKNOWN  # evicted
    assert cache.state("a", 1) is RobotsState.KNOWN

    busy = RobotsCache(ttl_s=100, retry_s=10, max_hosts=2)
    busy.fetching("a")
    busy.store("b", RobotsRules(source="4xx"), now=0)
    busy.store("c", RobotsRules(source="4xx"), now=0)
    busy.store("d", RobotsRules(source="4xx"), now=0)
    assert busy.state("a", 1) is RobotsState.FETCHING
    assert len(busy) == 2
