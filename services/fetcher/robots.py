"""robots.txt rules per host, pure: what a fetched robots.txt means, and for how long.

RFC 9309 semantics (the only I/O here is :func:`read_robots`, through a given request
function): a 2xx body is parsed (with protego, a maintained parser);
a 4xx means no rules (allow all); a 5xx, a 429 or no answer means "disallowed
for now", and the host's URLs wait and are tried again later. The cache is an
LRU bounded in hosts, so memory does not grow with the web.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin

from protego import Protego

from ..core import metrics
from .http import FetchFailed, FetchResult

# Google's limit: a longer robots.txt is read up to here.
ROBOTS_MAX_BYTES = 500 * 1024
ROBOTS_MAX_REDIRECTS = 5
MAX_SITEMAPS = 50


class RobotsState(enum.Enum):
    UNKNOWN = "unknown"
    FETCHING = "fetching"
    UNAVAILABLE = "unavailable"
    KNOWN = "known"


@dataclass(frozen=True)
class RobotsRules:
    """The parsed rules of one host (``parser`` None: allow everything)."""

    parser: Protego | None = None
    sitemaps: tuple[str, ...] = ()
    source: str = "none"

    def allows(self, url: str, user_agent: str) -> bool:
        return self.parser is None or bool(self.parser.can_fetch(url, user_agent))

    def crawl_delay(self, user_agent: str) -> float | None:
        """Crawl-delay, or the interval a Request-rate implies, for ``user_agent``."""
        if self.parser is None:
            return None
        delay = self.parser.crawl_delay(user_agent)
        rate = self.parser.request_rate(user_agent)
        candidates = [float(delay)] if delay is not None else []
        if rate is not None and rate.requests:
            candidates.append(rate.seconds / rate.requests)
        return max(candidates) if candidates else None


ALLOW_ALL = RobotsRules(source="4xx")


def rules_from_response(status: int, body: bytes) -> RobotsRules | None:
    """Rules for a robots.txt answer, or None when the host counts as unavailable."""
    if 200 <= status < 300:
        text = body[:ROBOTS_MAX_BYTES].decode("utf-8", "replace")
        parser = Protego.parse(text)
        sitemaps = tuple(url for url in parser.sitemaps)[:MAX_SITEMAPS]
        return RobotsRules(parser=parser, sitemaps=sitemaps, source="robots.txt")
    if status == 429 or status >= 500:
        return None
    return ALLOW_ALL


@dataclass
class _Entry:
    state: RobotsState
    rules: RobotsRules = field(default_factory=RobotsRules)
    until: float = 0.0


class RobotsCache:
    """host -> rules with a TTL; an unavailable host is retried after ``retry_s``."""

    def __init__(self, ttl_s: float, retry_s: float, max_hosts: int = 10_000) -> None:
        self._ttl = ttl_s
        self._retry = retry_s
        self._max_hosts = max_hosts
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def state(self, host: str, now: float) -> RobotsState:
        entry = self._entries.get(host)
        if entry is None:
            return RobotsState.UNKNOWN
        self._entries.move_to_end(host)
        if entry.state is RobotsState.FETCHING:
            return entry.state
        if entry.until <= now:
            return RobotsState.UNKNOWN
        return entry.state

    def rules(self, host: str) -> RobotsRules:
        entry = self._entries.get(host)
        return entry.rules if entry is not None else RobotsRules()

    def unavailable_until(self, host: str) -> float:
        entry = self._entries.get(host)
        return entry.until if entry is not None else 0.0

    def fetching(self, host: str) -> None:
        self._put(host, _Entry(RobotsState.FETCHING))

    def store(self, host: str, rules: RobotsRules | None, now: float) -> None:
        """Record the outcome of a robots.txt fetch (None: unavailable for now)."""
        if rules is None:
            self._put(host, _Entry(RobotsState.UNAVAILABLE, until=now + self._retry))
        else:
            self._put(host, _Entry(RobotsState.KNOWN, rules=rules, until=now + self._ttl))

    def _put(self, host: str, entry: _Entry) -> None:
        self._entries[host] = entry
        self._entries.move_to_end(host)
        while len(self._entries) > self._max_hosts:
            oldest, old = next(iter(self._entries.items()))
            if old.state is RobotsState.FETCHING:
                # Never evict a fetch in progress; move it back and stop evicting.
                self._entries.move_to_end(oldest)
                break
            self._entries.popitem(last=False)


# -- reading one host's robots.txt, redirects included -------------------------------------

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Failures after which nothing will be fetched from the host anyway: each URL fails alone.
_FINAL_FAILURES = frozenset({"forbidden_address", "invalid_url"})


async def read_robots(url: str, get: Callable[[str], Awaitable[FetchResult]]) -> RobotsRules | None:
    """The rules at ``url`` (a host's /robots.txt), following up to
    :data:`ROBOTS_MAX_REDIRECTS` redirects; None when the host counts as unavailable.

    ``get`` performs one request without following redirects (the fetcher's downloader,
    with its limits and safety checks) and raises :class:`FetchFailed`.
    """
    for _ in range(ROBOTS_MAX_REDIRECTS + 1):
        try:
            result = await get(url)
        except FetchFailed as exc:
            metrics.ROBOTS_FETCHES.labels("unavailable").inc()
            return RobotsRules(source=exc.reason) if exc.reason in _FINAL_FAILURES else None
        location = result.headers.get("location")
        if result.status in REDIRECT_STATUSES and location:
            url = urljoin(url, location)
            continue
        rules = rules_from_response(result.status, result.body)
        outcome = "unavailable" if rules is None else rules.source.replace(".", "_")
        metrics.ROBOTS_FETCHES.labels(outcome).inc()
        return rules
    metrics.ROBOTS_FETCHES.labels("allow_all").inc()
    return RobotsRules(source="too_many_redirects")
