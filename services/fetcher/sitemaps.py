"""The sitemaps a host's robots.txt lists, as candidates of a crawl: once per crawl and
host, and only those the crawl's scope admits (the frontier's own rule, ``core.scope``)."""

from __future__ import annotations

from collections import OrderedDict
from urllib.parse import urljoin

from ..core.config import Settings
from ..core.messages import Discovered, Fetch
from ..core.scope import Drop, Origin, scoped_candidate

ANNOUNCED_MAX = 100_000


class SitemapAnnouncer:
    def __init__(self, settings: Settings, remember: int = ANNOUNCED_MAX) -> None:
        self._settings = settings
        self._remember = remember
        self._announced: OrderedDict[tuple[str, str], None] = OrderedDict()

    def candidates(self, request: Fetch, listed: tuple[str, ...], now: float) -> list[Discovered]:
        """The in-scope candidates of ``listed`` the first time the crawl meets the host."""
        key = (request.crawl_id, request.host)
        if key in self._announced:
            return []
        self._announced[key] = None
        if len(self._announced) > self._remember:
            self._announced.popitem(last=False)
        robots_url = urljoin(request.url, "/robots.txt")
        origin = Origin(request.crawl_id, request.scope, request.priority, robots_url)
        kept = []
        for url in listed:
            candidate = scoped_candidate(url, origin, 0, self._settings, now, "sitemap")
            if not isinstance(candidate, Drop):
                kept.append(candidate)
        return kept
