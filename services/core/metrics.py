"""Prometheus metrics and the /metrics, /healthz, /readyz endpoint of every service.

Label values are always from small fixed sets (stage, status class, reason,
partition number): never a URL or a host, so cardinality stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

MESSAGES_IN = Counter("streamcrawl_messages_in_total", "Messages consumed by a stage.", ["stage"])
MESSAGES_OUT = Counter(
    "streamcrawl_messages_out_total", "Messages produced by a stage.", ["stage", "topic"]
)
MESSAGES_FAILED = Counter(
    "streamcrawl_messages_failed_total", "Messages a stage could not process.", ["stage", "reason"]
)
DLQ_RECORDS = Counter(
    "streamcrawl_dlq_records_total",
    "Records written to the dead-letter topic.",
    ["stage", "reason"],
)
URLS_FILTERED = Counter(
    "streamcrawl_urls_filtered_total",
    "Candidate URLs dropped by scope or dedup.",
    ["stage", "reason"],
)
FETCH_REQUESTS = Counter(
    "streamcrawl_fetch_requests_total",
    "HTTP requests by status class (2xx..5xx, error).",
    ["status_class"],
)
FETCH_DURATION = Histogram(
    "streamcrawl_fetch_duration_seconds",
    "Time from request start to full body.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PAGE_SIZE = Histogram(
    "streamcrawl_page_size_bytes",
    "Size of fetched bodies.",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216),
)
FETCH_BYTES = Counter("streamcrawl_fetch_bytes_total", "Body bytes downloaded.")
FETCH_IN_FLIGHT = Gauge("streamcrawl_fetch_in_flight", "Requests in flight in this process.")
POLITENESS_WAIT = Counter(
    "streamcrawl_politeness_wait_seconds_total", "Seconds requests waited for host politeness."
)
URLS_CANCELLED = Counter(
    "streamcrawl_urls_cancelled_total",
    "URLs of a cancelled crawl dropped (crawl.control), by stage.",
    ["stage"],
)
FETCH_DEFERRED = Counter(
    "streamcrawl_fetch_deferred_total",
    "URLs sent to crawl.retry, by reason (retry after a failure, busy host, robots outage).",
    ["reason"],
)
ROBOTS_FETCHES = Counter(
    "streamcrawl_robots_fetches_total",
    "robots.txt fetches by outcome (parsed, allow_all, unavailable).",
    ["outcome"],
)
HOST_QUEUE = Gauge(
    "streamcrawl_fetch_queued", "URLs a fetcher holds waiting for their host's turn."
)
HOSTS_ACTIVE = Gauge("streamcrawl_fetch_hosts", "Hosts with politeness state in this fetcher.")
DELAY_HELD = Gauge("streamcrawl_delay_held", "Retries the delay service holds until due.")
PAGES_STORED = Counter("streamcrawl_pages_stored_total", "Pages upserted into MongoDB.")
PAGES_UNCHANGED = Counter(
    "streamcrawl_pages_unchanged_total",
    "Revisited pages found unchanged (304 or same content): only their status documents updated.",
)
BLOOM_FILL = Gauge(
    "streamcrawl_bloom_fill_ratio",
    "Items in the dedup filter over its current capacity.",
    ["partition"],
)
BLOOM_FP_RATE = Gauge(
    "streamcrawl_bloom_false_positive_rate",
    "Estimated false-positive rate of the dedup filter.",
    ["partition"],
)
WARC_RECORDS = Counter(
    "streamcrawl_warc_records_total",
    "Responses archived by the warc stage, by record type (response, revisit); skipped: "
    "records delivered again after a crash and already in a file.",
    ["type"],
)
WARC_BYTES = Counter("streamcrawl_warc_bytes_total", "Bytes appended to WARC files.")
WARC_FILES = Counter("streamcrawl_warc_files_total", "WARC files completed (renamed from .open).")
CONSUMER_LAG = Gauge(
    "streamcrawl_consumer_lag",
    "Log-end offset minus committed offset.",
    ["group", "topic", "partition"],
)

ReadinessCheck = Callable[[], Awaitable[bool]]


class HealthServer:
    """Serves /metrics, /healthz (the loop runs) and /readyz (dependencies answer)."""

    def __init__(self, port: int, readiness: ReadinessCheck, host: str = "0.0.0.0") -> None:
        self._port = port
        self._host = host
        self._readiness = readiness
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if self._port <= 0:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        log.info("metrics and health on :%d", self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        try:
            ready = await asyncio.wait_for(self._readiness(), timeout=5)
        except Exception:  # a failing dependency check means "not ready", never a crash
            ready = False
        return web.Response(
            text="ready\n" if ready else "not ready\n", status=200 if ready else 503
        )
