"""The one downloader: an aiohttp session over a safe resolver, with hard limits and an
optional proxy pool. Every request of the fetcher (pages and robots.txt) goes through it."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import aiohttp

from ..core import metrics
from ..core.config import Settings
from ..core.content import ACCEPT_ENCODING, ContentDecodingError, decode_content
from .http import FetchFailed, FetchLimits, FetchResult, fetch
from .proxies import ProxyPool
from .robots import ROBOTS_MAX_BYTES
from .safety import IPNetwork, SafeResolver, parse_networks

log = logging.getLogger(__name__)


class Downloader:
    def __init__(self, settings: Settings) -> None:
        networks = parse_networks(settings.allow_networks)
        self.page_limits = FetchLimits(
            total_s=settings.fetch_timeout,
            connect_s=settings.fetch_connect_timeout,
            read_s=settings.fetch_read_timeout,
            max_body_bytes=settings.max_body_bytes,
            allowed_networks=networks,
        )
        self.robots_limits = FetchLimits(
            total_s=min(settings.fetch_timeout, 30.0),
            connect_s=settings.fetch_connect_timeout,
            read_s=settings.fetch_read_timeout,
            max_body_bytes=ROBOTS_MAX_BYTES,
            allowed_networks=networks,
        )
        self.proxies = ProxyPool(settings.proxies, settings.proxy_cooldown)
        self.resolver = SafeResolver(networks)
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    @property
    def allowed_networks(self) -> tuple[IPNetwork, ...]:
        return self.page_limits.allowed_networks

    async def start(self) -> None:
        settings = self._settings
        connector = aiohttp.TCPConnector(
            limit=settings.fetch_concurrency,
            limit_per_host=settings.fetch_per_host_concurrency,
            ttl_dns_cache=settings.dns_cache_ttl,
            use_dns_cache=True,
            resolver=self.resolver,
            enable_cleanup_closed=True,
        )
        # Bodies are kept as received (the warc stage archives them); the parser and the
        # robots reader inflate them, capped, so only what they can undo is asked for.
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": settings.user_agent, "Accept-Encoding": ACCEPT_ENCODING},
            auto_decompress=False,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def page(self, url: str, host: str, headers: dict[str, str] | None = None) -> FetchResult:
        """A page; ``headers`` are added to the request (a revisit's conditional ones)."""
        return await self._get(url, host, self.page_limits, headers)

    async def robots(self, url: str, host: str) -> FetchResult:
        """robots.txt, its body inflated (to at most ``ROBOTS_MAX_BYTES``)."""
        result = await self._get(url, host, self.robots_limits)
        encoding = result.headers.get("content-encoding")
        try:
            body, cut = decode_content(result.body, encoding, ROBOTS_MAX_BYTES)
        except ContentDecodingError as exc:
            raise FetchFailed("payload_error", f"{url}: {exc.detail}") from exc
        return replace(result, body=body, truncated=result.truncated or cut)

    async def _get(
        self, url: str, host: str, limits: FetchLimits, headers: dict[str, str] | None = None
    ) -> FetchResult:
        assert self._session is not None, "Downloader.start() first"
        proxy = self.proxies.choose(host, time.monotonic())
        try:
            result = await fetch(
                self._session, url, limits, proxy=proxy, resolver=self.resolver, headers=headers
            )
        except FetchFailed as exc:
            if proxy is not None and exc.reason == "proxy_error":
                log.warning("fetcher: proxy %s failed; left out for a while", proxy)
                self.proxies.failed(proxy, time.monotonic())
            raise
        if proxy is not None:
            self.proxies.succeeded(proxy)
        return result


def observe(outcome: FetchResult | FetchFailed) -> None:
    """Count one page request's outcome in the fetch metrics."""
    if isinstance(outcome, FetchFailed):
        metrics.FETCH_REQUESTS.labels("error").inc()
        return
    metrics.FETCH_REQUESTS.labels(f"{outcome.status // 100}xx").inc()
    metrics.FETCH_DURATION.observe(outcome.total_s)
    metrics.PAGE_SIZE.observe(len(outcome.body))
    metrics.FETCH_BYTES.inc(len(outcome.body))
