"""The fetcher service: crawl.fetch in; crawl.fetched, crawl.retry or crawl.dlq out.

Two loops share one process. The consumer admits records into per-host queues
(:class:`HostScheduler`); the dispatcher starts a request whenever a host's
delay has passed and a slot is free, first reading the host's robots.txt.
A URL whose host could not start it within ``host_queue_horizon`` seconds, a
retry after a failure, and the URLs of a host whose robots.txt is unavailable
go to crawl.retry with a due time, so nothing waits by holding a partition.

Records finish out of order, so offsets go through an :class:`OffsetTracker`:
only the finished prefix of a partition is committed, after its outputs are
acknowledged. Memory is bounded: at most ``fetch_max_pending`` URLs are held
and ``fetch_concurrency`` requests run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from ..core import metrics
from ..core.config import Settings
from ..core.kafka import kafka_reachable, make_consumer, make_producer
from ..core.offsets import OffsetTracker, commit_finished
from ..core.stage import DeadLetter, Output, Publisher, Record, dead_letter, decode_json
from ..core.topics import DISCOVERED, FETCH, FETCHED, FETCHER_GROUP, RETRY, topic_name
from ..core.urls import InvalidURL, canonicalize, host_of, in_scope
from .http import FetchFailed, FetchLimits, FetchResult, check_literal_address, fetch
from .politeness import HostScheduler
from .proxies import ProxyPool
from .retry import RetryPolicy, parse_retry_after, retryable_failure, retryable_status, with_attempt
from .robots import (
    ROBOTS_MAX_BYTES,
    ROBOTS_MAX_REDIRECTS,
    RobotsCache,
    RobotsRules,
    RobotsState,
    rules_from_response,
)
from .safety import SafeResolver, parse_networks

log = logging.getLogger(__name__)
STAGE = "fetcher"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_ANNOUNCED_MAX = 100_000


@dataclass
class Job:
    """One crawl.fetch record on its way through the fetcher."""

    tp: TopicPartition
    record: Record
    request: dict[str, Any]
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def host(self) -> str:
        return str(self.request["host"])


def fetched_value(request: dict[str, Any], result: FetchResult) -> dict[str, Any]:
    """The crawl.fetched record for one response (body compressed, then base64)."""
    value = {
        "url": request["url"],
        "final_url": result.final_url,
        "host": request["host"],
        "crawl_id": request["crawl_id"],
        "depth": request["depth"],
        "priority": request["priority"],
        "scope": request["scope"],
        "redirect_chain": request.get("redirect_chain", []),
        "status": result.status,
        "headers": result.headers,
        "content_type": result.content_type,
        "body": base64.b64encode(zlib.compress(result.body, 1)).decode("ascii"),
        "body_encoding": "zlib+base64",
        "body_bytes": len(result.body),
        "truncated": result.truncated,
        "fetched_at": time.time(),
        "timings": {"total_s": round(result.total_s, 6), "ttfb_s": round(result.ttfb_s, 6)},
    }
    if "kind" in request:
        value["kind"] = request["kind"]
    return value


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def sitemap_candidates(
    rules: RobotsRules, request: dict[str, Any], settings: Settings
) -> list[dict[str, Any]]:
    """The in-scope sitemaps robots.txt lists, as crawl.discovered candidates of this crawl."""
    candidates = []
    for listed in rules.sitemaps:
        try:
            url = canonicalize(listed, settings.max_url_length, settings.session_params)
        except InvalidURL:
            continue
        if not in_scope(url, request["scope"]["allow_domains"]):
            continue
        candidates.append(
            {
                "url": url,
                "host": host_of(url),
                "crawl_id": request["crawl_id"],
                "depth": 0,
                "priority": request["priority"],
                "source": f"{urljoin(request['url'], '/robots.txt')}",
                "scope": request["scope"],
                "redirect_chain": [],
                "discovered_at": time.time(),
                "kind": "sitemap",
            }
        )
    return candidates


class Fetcher:
    """Owns the consumer, the HTTP session, the host queues and the requests in flight."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = FetchLimits(
            total_s=settings.fetch_timeout,
            connect_s=settings.fetch_connect_timeout,
            read_s=settings.fetch_read_timeout,
            max_body_bytes=settings.max_body_bytes,
            allowed_networks=parse_networks(settings.allow_networks),
        )
        self.robots_limits = FetchLimits(
            total_s=min(settings.fetch_timeout, 30.0),
            connect_s=settings.fetch_connect_timeout,
            read_s=settings.fetch_read_timeout,
            max_body_bytes=ROBOTS_MAX_BYTES,
            allowed_networks=self.limits.allowed_networks,
        )
        self.policy = RetryPolicy(
            settings.retry_max_attempts, settings.retry_base_delay, settings.retry_max_delay
        )
        self.robots = RobotsCache(settings.robots_ttl, settings.robots_retry)
        self.host_delays = settings.host_delay_map()
        self.scheduler: HostScheduler[Job] = HostScheduler(
            settings.fetch_per_host_concurrency, self.delay_for
        )
        self.proxies = ProxyPool(settings.proxies, settings.proxy_cooldown)
        self.resolver = SafeResolver(self.limits.allowed_networks)
        self.tracker = OffsetTracker()
        self.tasks: dict[asyncio.Task[None], set[TopicPartition]] = {}
        self.requests_in_flight = 0
        self.assigned_at: dict[TopicPartition, float] = {}
        self._announced: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._wake = asyncio.Event()
        self._topics = {
            suffix: topic_name(settings.topic_prefix, suffix)
            for suffix in (FETCH, FETCHED, RETRY, DISCOVERED)
        }

    def configured_delay(self, host: str) -> float:
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        configured = self.host_delays.get(
            host, self.host_delays.get(hostname, self.settings.crawl_delay)
        )
        return min(self.settings.max_crawl_delay, configured)

    def delay_for(self, host: str) -> float:
        """The larger of the configured delay and the host's Crawl-delay, capped."""
        crawl_delay = self.robots.rules(host).crawl_delay(self.settings.user_agent) or 0.0
        return min(self.settings.max_crawl_delay, max(self.configured_delay(host), crawl_delay))

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        producer = make_producer(settings)
        consumer = make_consumer(settings, FETCHER_GROUP, max_poll_records=settings.batch_size)
        connector = aiohttp.TCPConnector(
            limit=settings.fetch_concurrency,
            limit_per_host=settings.fetch_per_host_concurrency,
            ttl_dns_cache=settings.dns_cache_ttl,
            use_dns_cache=True,
            resolver=self.resolver,
            enable_cleanup_closed=True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": settings.user_agent},
            auto_decompress=True,
            trust_env=False,
        )
        await producer.start()
        await consumer.start()
        self.publisher = Publisher(producer, STAGE)
        consumer.subscribe([self._topics[FETCH]], listener=_Rebalance(self, consumer))
        health = metrics.HealthServer(settings.metrics_port, lambda: kafka_reachable(consumer))
        await health.start()
        committer = asyncio.create_task(self._commit_every(consumer, stop, 1.0))
        log.info(
            "fetcher: consuming %s as group %s; %d requests in flight max, %.2fs per host",
            self._topics[FETCH],
            FETCHER_GROUP,
            settings.fetch_concurrency,
            settings.crawl_delay,
        )
        try:
            await asyncio.gather(self._consume(consumer, stop), self._dispatch(stop))
            self._hand_back(None)
            await self._drain(timeout=25.0)
            await self._commit(consumer)
        finally:
            committer.cancel()
            await health.stop()
            await consumer.stop()
            await producer.stop()
            await self.session.close()
            log.info("fetcher: stopped")

    # -- admission -------------------------------------------------------------------

    def _room(self) -> int:
        return self.settings.fetch_max_pending - self.scheduler.pending - self.requests_in_flight

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            room = self._room()
            if room <= 0:
                await asyncio.sleep(0.05)
                continue
            batches = await consumer.getmany(
                timeout_ms=200, max_records=min(room, self.settings.batch_size)
            )
            for tp, records in batches.items():
                for record in records:
                    self._admit(tp, record)
            if batches:
                self._wake.set()
            metrics.HOST_QUEUE.set(self.scheduler.pending)

    def _admit(self, tp: TopicPartition, record: Record) -> None:
        metrics.MESSAGES_IN.labels(STAGE).inc()
        self.tracker.started(tp, record.offset)
        try:
            request = decode_json(record, "fetch")
            check_literal_address(request["url"], self.limits.allowed_networks)
        except DeadLetter as exc:
            self._finish_with(tp, record, [self._dead(record, exc.reason, exc.detail)])
            return
        except FetchFailed as exc:
            self._finish_with(tp, record, [self._dead(record, exc.reason, exc.detail)])
            return
        job = Job(tp, record, request)
        now = time.monotonic()
        if self._disallowed(job, now):
            return
        wait = self.scheduler.wait_estimate(job.host, now)
        if wait > self.settings.host_queue_horizon:
            self._defer(job, wait, "host_busy", count_attempt=False)
            return
        handover = self.assigned_at.get(tp, 0.0) + self.delay_for(job.host)
        self.scheduler.add(job.host, job, now, not_before=handover)

    def _disallowed(self, job: Job, now: float) -> bool:
        """Known robots rules forbid the URL: it is done, and counted."""
        if self.robots.state(job.host, now) is not RobotsState.KNOWN:
            return False
        if self.robots.rules(job.host).allows(job.request["url"], self.settings.user_agent):
            return False
        metrics.URLS_FILTERED.labels(STAGE, "robots_disallowed").inc()
        log.info("fetcher: %s disallowed by robots.txt", job.request["url"])
        self._finish_with(job.tp, job.record, [])
        return True

    # -- dispatch --------------------------------------------------------------------

    async def _dispatch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            free = self.settings.fetch_concurrency - self.requests_in_flight
            for host, job in self.scheduler.take_ready(now, free):
                self._begin(host, job, now)
            metrics.HOSTS_ACTIVE.set(self.scheduler.hosts)
            ready_at = self.scheduler.next_ready_at()
            timeout = 0.5 if ready_at is None else min(0.5, max(0.0, ready_at - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    def _begin(self, host: str, job: Job, now: float) -> None:
        state = self.robots.state(host, now)
        if state is RobotsState.UNKNOWN:
            # The robots.txt request takes this slot; the job waits for its answer.
            self.robots.fetching(host)
            self.scheduler.push_front(host, job, now)
            self.scheduler.pause(host)
            self._spawn(self._read_robots(host, job.request["url"]), set())
            return
        if state is RobotsState.FETCHING:
            self.scheduler.unstarted(host, now)
            self.scheduler.push_front(host, job, now)
            self.scheduler.pause(host)
            return
        if state is RobotsState.UNAVAILABLE:
            self.scheduler.unstarted(host, now)
            self._defer_host(host, [job])
            return
        if self._disallowed(job, now):
            self.scheduler.unstarted(host, now)
            return
        metrics.POLITENESS_WAIT.inc(max(0.0, now - job.queued_at))
        self._spawn(self._fetch(job), {job.tp})

    def _spawn(self, work: Coroutine[Any, Any, None], partitions: set[TopicPartition]) -> None:
        task = asyncio.create_task(work)
        self.tasks[task] = partitions
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("fetcher: unexpected error: %r", task.exception())

    # -- robots.txt --------------------------------------------------------------------

    async def _read_robots(self, host: str, page_url: str) -> None:
        self.requests_in_flight += 1
        try:
            rules = await self._robots_rules(urljoin(page_url, "/robots.txt"))
        finally:
            self.requests_in_flight -= 1
        now = time.monotonic()
        self.robots.store(host, rules, now)
        self.scheduler.done(host, now)
        self.scheduler.refresh_delay(host, now)
        self.scheduler.resume(host, now)
        if rules is None:
            log.warning(
                "fetcher: robots.txt of %s unavailable; its URLs wait %.0fs",
                host,
                self.settings.robots_retry,
            )
            self._defer_host(host, [])
        else:
            log.info(
                "fetcher: robots.txt of %s read (%s), delay %.2fs, %d sitemaps",
                host,
                rules.source,
                self.delay_for(host),
                len(rules.sitemaps),
            )
        self._wake.set()

    async def _robots_rules(self, url: str) -> RobotsRules | None:
        for _ in range(ROBOTS_MAX_REDIRECTS + 1):
            try:
                result = await self._request(url, host_of(url), self.robots_limits)
            except FetchFailed as exc:
                metrics.ROBOTS_FETCHES.labels("unavailable").inc()
                if exc.reason in ("forbidden_address", "invalid_url"):
                    # Nothing will be fetched from this host anyway; each URL fails alone.
                    return RobotsRules(source=exc.reason)
                return None
            location = result.headers.get("location")
            if result.status in _REDIRECTS and location:
                url = urljoin(url, location)
                continue
            rules = rules_from_response(result.status, result.body)
            outcome = "unavailable" if rules is None else rules.source.replace(".", "_")
            metrics.ROBOTS_FETCHES.labels(outcome).inc()
            return rules
        metrics.ROBOTS_FETCHES.labels("allow_all").inc()
        return RobotsRules(source="too_many_redirects")

    def _announce_sitemaps(self, job: Job) -> list[Output]:
        key = (job.request["crawl_id"], job.host)
        if key in self._announced:
            return []
        self._announced[key] = None
        if len(self._announced) > _ANNOUNCED_MAX:
            self._announced.popitem(last=False)
        return [
            Output(self._topics[DISCOVERED], candidate, key=candidate["host"].encode())
            for candidate in sitemap_candidates(
                self.robots.rules(job.host), job.request, self.settings
            )
        ]

    # -- one request -------------------------------------------------------------------

    async def _fetch(self, job: Job) -> None:
        self.requests_in_flight += 1
        metrics.FETCH_IN_FLIGHT.inc()
        try:
            outcome: FetchResult | FetchFailed = await self._request(
                job.request["url"], job.host, self.limits
            )
        except FetchFailed as exc:
            outcome = exc
        finally:
            self.requests_in_flight -= 1
            metrics.FETCH_IN_FLIGHT.dec()
            self.scheduler.done(job.host, time.monotonic())
        outputs = self._announce_sitemaps(job)
        outputs.append(self._outcome(job, outcome))
        await self.publisher.publish(outputs)
        self.tracker.finished(job.tp, job.record.offset)

    async def _request(self, url: str, host: str, limits: FetchLimits) -> FetchResult:
        proxy = self.proxies.choose(host, time.monotonic())
        try:
            result = await fetch(self.session, url, limits, proxy=proxy, resolver=self.resolver)
        except FetchFailed as exc:
            if proxy is not None and exc.reason == "proxy_error":
                log.warning("fetcher: proxy %s failed; left out for a while", proxy)
                self.proxies.failed(proxy, time.monotonic())
            raise
        if proxy is not None:
            self.proxies.succeeded(proxy)
        return result

    def _outcome(self, job: Job, outcome: FetchResult | FetchFailed) -> Output:
        url = job.request["url"]
        if isinstance(outcome, FetchFailed):
            metrics.FETCH_REQUESTS.labels("error").inc()
            if not retryable_failure(outcome.reason):
                return self._dead(job.record, outcome.reason, f"{url}: {outcome.detail}")
            return self._retry_or_give_up(job, outcome.reason, None, outcome.detail, None)
        result = outcome
        metrics.FETCH_REQUESTS.labels(status_class(result.status)).inc()
        metrics.FETCH_DURATION.observe(result.total_s)
        metrics.PAGE_SIZE.observe(len(result.body))
        metrics.FETCH_BYTES.inc(len(result.body))
        if retryable_status(result.status):
            retry_after = parse_retry_after(result.headers.get("retry-after"))
            if retry_after is not None and result.status in (429, 503):
                until = time.monotonic() + min(retry_after, self.settings.retry_max_delay)
                self.scheduler.hold(job.host, until, time.monotonic())
            return self._retry_or_give_up(
                job, f"http_{result.status}", result.status, "", retry_after
            )
        return Output(self._topics[FETCHED], fetched_value(job.request, result), key=job.record.key)

    def _retry_or_give_up(
        self,
        job: Job,
        reason: str,
        status: int | None,
        detail: str,
        retry_after: float | None,
    ) -> Output:
        attempted = with_attempt(job.request, reason, time.time(), status, detail)
        if self.policy.exhausted(attempted["attempt"]):
            return self._dead(
                job.record,
                reason,
                f"{job.request['url']}: gave up after {attempted['attempt']} attempts",
                attempted["history"],
            )
        wait = self.policy.wait(attempted["attempt"], retry_after)
        return self._retry_output(attempted, wait, reason, job.record.key)

    # -- waiting elsewhere -------------------------------------------------------------

    def _retry_output(
        self, request: dict[str, Any], wait: float, reason: str, key: bytes | None
    ) -> Output:
        metrics.FETCH_DEFERRED.labels(reason).inc()
        value = {**request, "due_at": time.time() + wait, "retry_reason": reason}
        return Output(self._topics[RETRY], value, key=key)

    def _defer(self, job: Job, wait: float, reason: str, count_attempt: bool) -> None:
        if count_attempt:
            output = self._retry_or_give_up(job, reason, None, "", wait)
        else:
            output = self._retry_output(job.request, wait, reason, job.record.key)
        self._finish_with(job.tp, job.record, [output])

    def _defer_host(self, host: str, jobs: list[Job]) -> None:
        """robots.txt is unavailable: every URL of the host waits until it is retried."""
        wait = max(0.0, self.robots.unavailable_until(host) - time.monotonic())
        for job in [*jobs, *self.scheduler.drain_host(host)]:
            self._defer(job, wait, "robots_unavailable", count_attempt=True)

    def _dead(
        self,
        record: Record,
        reason: str,
        detail: str,
        history: list[dict[str, Any]] | None = None,
    ) -> Output:
        return dead_letter(self.settings, STAGE, record, reason, detail, history)

    def _finish_with(self, tp: TopicPartition, record: Record, outputs: list[Output]) -> None:
        """Publish ``outputs`` (possibly none), then count the record as done."""

        async def publish_then_finish() -> None:
            if outputs:
                await self.publisher.publish(outputs)
            self.tracker.finished(tp, record.offset)

        self._spawn(publish_then_finish(), {tp})

    # -- offsets and rebalances ----------------------------------------------------------

    async def _commit_every(
        self, consumer: AIOKafkaConsumer, stop: asyncio.Event, interval: float
    ) -> None:
        while not stop.is_set():
            await asyncio.sleep(interval)
            await self._commit(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        await commit_finished(consumer, self.tracker, FETCHER_GROUP, STAGE)

    async def _drain(self, timeout: float, only: set[TopicPartition] | None = None) -> None:
        waiting = [
            task
            for task, partitions in self.tasks.items()
            if only is None or not partitions or partitions & only
        ]
        if waiting:
            log.info("fetcher: finishing %d tasks in flight", len(waiting))
            await asyncio.wait(waiting, timeout=timeout)

    async def partitions_revoked(
        self, consumer: AIOKafkaConsumer, revoked: Iterable[TopicPartition]
    ) -> None:
        lost = set(revoked)
        self._hand_back(lost)
        await self._drain(timeout=20.0, only=lost)
        await self._commit(consumer)
        # The next owner of a host has not read its Crawl-delay yet: hold on until only
        # the configured delay, which it does apply, is left to wait.
        wait = self.scheduler.handover_wait(time.monotonic(), self.configured_delay)
        if lost and wait > 0:
            log.info("fetcher: handing hosts over in %.2fs (their Crawl-delay)", wait)
            await asyncio.sleep(wait)
        for tp in lost:
            self.tracker.forget(tp)
            self.assigned_at.pop(tp, None)

    def _hand_back(self, partitions: set[TopicPartition] | None) -> None:
        """URLs still waiting for their host's turn go to crawl.retry, due when that turn
        comes, so their offsets can be committed: the next owner of the partition does not
        redo what this process already finished after them (no duplicate requests)."""
        now = time.monotonic()
        waiting = self.scheduler.remove_where(
            lambda job: partitions is None or job.tp in partitions
        )
        for job in waiting:
            wait = self.scheduler.wait_estimate(job.host, now)
            self._defer(job, wait, "handover", count_attempt=False)
        if waiting:
            log.info("fetcher: %d waiting URLs handed back through crawl.retry", len(waiting))

    def partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        # A host may have been fetched by the previous owner a moment ago: its first
        # request here waits one delay from now.
        now = time.monotonic()
        partitions = sorted(tp.partition for tp in assigned)
        for tp in assigned:
            self.assigned_at[tp] = now
        log.info("fetcher: assigned %d partitions %s", len(partitions), partitions)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finish and commit the work of partitions that move to another fetcher."""

    def __init__(self, fetcher: Fetcher, consumer: AIOKafkaConsumer) -> None:
        self._fetcher = fetcher
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._fetcher.partitions_revoked(self._consumer, revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._fetcher.partitions_assigned(assigned)
        return None
