"""The fetcher stage: crawl.fetch in; crawl.fetched, crawl.retry or crawl.dlq out.

Wiring only. The runtime admits records into per-host queues (:class:`HostScheduler`,
``politeness.py``); :meth:`FetcherStage.run` starts a request whenever a host's delay has
passed and a slot is free, first reading the host's robots.txt (``robots.py``) through the
one :class:`Downloader`; what an outcome becomes is decided by ``retry.decide``. A URL whose
host could not start it within ``host_queue_horizon`` seconds, a retry, and the URLs of a
host whose robots.txt is unavailable go to crawl.retry with a due time, so nothing waits by
holding a partition. Memory is bounded: at most ``fetch_max_pending`` URLs are held and
``fetch_concurrency`` requests run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urljoin

from aiokafka import TopicPartition

from ..core import metrics
from ..core.config import Settings
from ..core.control import Verdict
from ..core.messages import ControlState, Fetch, Tally, retry_from
from ..core.runtime import Input, Output, Received, StreamStage, json_input
from ..core.topics import DISCOVERED, EVENTS, FETCH, FETCHED, FETCHER_GROUP, RETRY
from .downloader import Downloader, observe
from .http import FetchFailed, FetchResult, check_literal_address, conditional_headers
from .politeness import HostDelays, HostScheduler
from .retry import Deliver, GiveUp, RetryPolicy, Wait, decide, retry_or_give_up
from .robots import RobotsCache, RobotsState, read_robots
from .sitemaps import SitemapAnnouncer

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One crawl.fetch record waiting for, or in, its request."""

    item: Received[Fetch]
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def request(self) -> Fetch:
        return self.item.message

    @property
    def host(self) -> str:
        return self.item.message.host


class FetcherStage(StreamStage):
    name = "fetcher"
    group = FETCHER_GROUP

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.downloader = Downloader(settings)
        self.policy = RetryPolicy(
            settings.retry_max_attempts, settings.retry_base_delay, settings.retry_max_delay
        )
        self.robots = RobotsCache(settings.robots_ttl, settings.robots_retry)
        self.delay_for = HostDelays(
            settings.crawl_delay,
            settings.host_delay_map(),
            settings.max_crawl_delay,
            lambda host: self.robots.rules(host).crawl_delay(settings.user_agent),
        )
        self.scheduler: HostScheduler[Job] = HostScheduler(
            settings.fetch_per_host_concurrency, self.delay_for
        )
        self.sitemaps = SitemapAnnouncer(settings)
        self.requests_in_flight = 0
        self.assigned_at: dict[TopicPartition, float] = {}

    def inputs(self) -> tuple[Input, ...]:
        return (json_input(FETCH, Fetch),)

    async def start(self) -> None:
        await self.downloader.start()
        settings = self.settings
        log.info(
            "fetcher: %d requests max, %.2fs per host",
            settings.fetch_concurrency,
            settings.crawl_delay,
        )

    async def stop(self) -> None:
        await self.downloader.close()

    # -- admission ---------------------------------------------------------------------

    def room(self) -> int:
        return self.settings.fetch_max_pending - self.scheduler.pending - self.requests_in_flight

    def admit(self, item: Received[Any]) -> None:
        request: Fetch = item.message
        try:
            check_literal_address(request.url, self.downloader.allowed_networks)
        except FetchFailed as exc:
            self.ctx.complete_later(item, [self.dead_letter(item.record, exc.reason, exc.detail)])
            return
        job = Job(item)
        verdict = self.crawls.verdict(request.crawl_id)
        if verdict != "go":
            self._controlled(job, verdict)
            return
        now = time.monotonic()
        if self._disallowed(job, now):
            return
        wait = self.scheduler.wait_estimate(job.host, now)
        if wait > self.settings.host_queue_horizon:
            self._wait_elsewhere(job, wait, "host_busy")
            return
        handover = self.assigned_at.get(item.tp, 0.0) + self.delay_for(job.host)
        self.scheduler.add(job.host, job, now, not_before=handover)
        metrics.HOST_QUEUE.set(self.scheduler.pending)

    def _disallowed(self, job: Job, now: float) -> bool:
        """Known robots rules forbid the URL: it is done, and counted."""
        if self.robots.state(job.host, now) is not RobotsState.KNOWN:
            return False
        if self.robots.rules(job.host).allows(job.request.url, self.settings.user_agent):
            return False
        metrics.URLS_FILTERED.labels(self.name, "robots_disallowed").inc()
        log.info("fetcher: %s disallowed by robots.txt", job.request.url)
        self._done_counted(job, "filtered:robots_disallowed", host=job.host)
        return True

    def _done_counted(self, job: Job, count: str, host: str | None = None) -> None:
        """``job`` ends without a request: its record is finished with one count of
        ``count`` for its crawl (crawl.events, for the stats stage)."""
        crawl_id = job.request.crawl_id
        tally = Tally(
            stage="fetcher", crawl_id=crawl_id, at=time.time(), counts={count: 1}, host=host
        )
        event = Output(self.topic(EVENTS), tally, key=crawl_id.encode())
        self.ctx.complete_later(job.item, [event])

    # -- dispatch ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.monotonic()
            free = self.settings.fetch_concurrency - self.requests_in_flight
            for host, job in self.scheduler.take_ready(now, free):
                self._begin(host, job, now)
            metrics.HOSTS_ACTIVE.set(self.scheduler.hosts)
            ready_at = self.scheduler.next_ready_at()
            timeout = 0.5 if ready_at is None else min(0.5, max(0.0, ready_at - now))
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=timeout)

    def _begin(self, host: str, job: Job, now: float) -> None:
        verdict = self.crawls.verdict(job.request.crawl_id)
        if verdict != "go":  # paused or cancelled while it waited: no request
            self.scheduler.unstarted(host, now)
            self._controlled(job, verdict)
            return
        state = self.robots.state(host, now)
        if state is RobotsState.UNKNOWN:
            # The robots.txt request takes this slot; the job waits for its answer.
            self.robots.fetching(host)
            self.scheduler.push_front(host, job, now)
            self.scheduler.pause(host)
            self.ctx.spawn(self._read_robots(host, job.request.url))
        elif state is RobotsState.FETCHING:
            self.scheduler.unstarted(host, now)
            self.scheduler.push_front(host, job, now)
            self.scheduler.pause(host)
        elif state is RobotsState.UNAVAILABLE:
            self.scheduler.unstarted(host, now)
            self._defer_host(host, [job])
        elif self._disallowed(job, now):
            self.scheduler.unstarted(host, now)
        else:
            metrics.POLITENESS_WAIT.inc(max(0.0, now - job.queued_at))
            self.ctx.spawn_record(job.item, partial(self._fetch, job))

    # -- crawl control ---------------------------------------------------------------

    def on_control(self, crawl_id: str, state: ControlState) -> None:
        """A crawl was paused or cancelled: its URLs waiting for their host's turn leave
        memory at once (paused: to crawl.retry; cancelled: dropped and counted). Requests
        already sent finish; no other request of the crawl starts."""
        if state == "active":
            return
        waiting = self.scheduler.remove_where(lambda job: job.request.crawl_id == crawl_id)
        for job in waiting:
            self._controlled(job, self.crawls.verdict(crawl_id))
        metrics.HOST_QUEUE.set(self.scheduler.pending)
        log.info("fetcher: crawl %s %s; %d waiting URLs moved", crawl_id, state, len(waiting))
        self.wakeup.set()

    def _controlled(self, job: Job, verdict: Verdict) -> None:
        """A URL of a paused crawl waits in crawl.retry and is checked again after
        ``PAUSE_RECHECK``; one of a cancelled crawl is dropped and counted."""
        if verdict == "hold":
            self._wait_elsewhere(job, self.settings.pause_recheck, "paused")
            return
        metrics.URLS_CANCELLED.labels(self.name).inc()
        self._done_counted(job, "cancelled")

    # -- robots.txt --------------------------------------------------------------------

    async def _read_robots(self, host: str, page_url: str) -> None:
        self.requests_in_flight += 1
        self.scheduler.started(host, time.monotonic())
        try:
            rules = await read_robots(
                urljoin(page_url, "/robots.txt"), lambda url: self.downloader.robots(url, host)
            )
        finally:
            self.requests_in_flight -= 1
        now = time.monotonic()
        self.robots.store(host, rules, now)
        self.scheduler.done(host, now)
        self.scheduler.refresh_delay(host, now)
        self.scheduler.resume(host, now)
        if rules is None:
            wait = self.settings.robots_retry
            log.warning("fetcher: robots.txt of %s unavailable; its URLs wait %.0fs", host, wait)
            self._defer_host(host, [])
        else:
            delay, sitemaps = self.delay_for(host), len(rules.sitemaps)
            log.info("fetcher: robots.txt of %s read (%s), delay %.2fs", host, rules.source, delay)
            log.debug("fetcher: robots.txt of %s lists %d sitemaps", host, sitemaps)
        self.wakeup.set()

    def _sitemaps(self, job: Job) -> list[Output]:
        listed = self.robots.rules(job.host).sitemaps
        return [
            Output(self.topic(DISCOVERED), candidate, key=candidate.host.encode())
            for candidate in self.sitemaps.candidates(job.request, listed, time.time())
        ]

    # -- one request -------------------------------------------------------------------

    async def _fetch(self, job: Job) -> None:
        self.requests_in_flight += 1
        metrics.FETCH_IN_FLIGHT.inc()
        self.scheduler.started(job.host, time.monotonic())
        try:
            outcome: FetchResult | FetchFailed = await self.downloader.page(
                job.request.url, job.host, conditional_headers(job.request.revisit) or None
            )
        except FetchFailed as exc:
            outcome = exc
        finally:
            self.requests_in_flight -= 1
            metrics.FETCH_IN_FLIGHT.dec()
            self.scheduler.done(job.host, time.monotonic())
            # The slot is free now: the next request of the host need not wait until this
            # one's outputs are acknowledged (a round trip to the broker) to start.
            self.wakeup.set()
        observe(outcome)
        outputs = self._sitemaps(job)
        outputs.append(self._decided(job, decide(job.request, outcome, self.policy, time.time())))
        await self.ctx.complete([job.item], outputs)

    def _decided(self, job: Job, decision: Deliver | Wait | GiveUp) -> Output:
        record = job.item.record
        if isinstance(decision, Deliver):
            return Output(self.topic(FETCHED), decision.fetched, key=record.key)
        if isinstance(decision, GiveUp):
            return self.dead_letter(record, decision.reason, decision.detail, decision.history)
        if decision.hold_host is not None:
            now = time.monotonic()
            self.scheduler.hold(job.host, now + decision.hold_host, now)
        metrics.FETCH_DEFERRED.labels(decision.retry.retry_reason).inc()
        return Output(self.topic(RETRY), decision.retry, key=record.key)

    # -- waiting elsewhere -------------------------------------------------------------

    def _wait_elsewhere(self, job: Job, wait: float, reason: str) -> None:
        """Park the URL in crawl.retry for ``wait`` seconds without counting an attempt."""
        metrics.FETCH_DEFERRED.labels(reason).inc()
        retry = retry_from(job.request, time.time() + wait, reason)
        output = Output(self.topic(RETRY), retry, key=job.item.record.key)
        self.ctx.complete_later(job.item, [output])

    def _defer_host(self, host: str, jobs: list[Job]) -> None:
        """robots.txt is unavailable: every URL of the host waits (an attempt each)."""
        wait = max(0.0, self.robots.unavailable_until(host) - time.monotonic())
        for job in [*jobs, *self.scheduler.drain_host(host)]:
            decision = retry_or_give_up(
                job.request, "robots_unavailable", None, "", wait, self.policy, time.time()
            )
            self.ctx.complete_later(job.item, [self._decided(job, decision)])

    # -- rebalances --------------------------------------------------------------------

    async def on_assigned(self, partitions: Iterable[TopicPartition]) -> None:
        # A host may have been fetched by the previous owner a moment ago: its first
        # request here waits one delay from now.
        now = time.monotonic()
        for tp in partitions:
            self.assigned_at[tp] = now
        numbers = sorted(tp.partition for tp in partitions)
        log.info("fetcher: assigned %d partitions %s", len(numbers), numbers)

    def hand_back(self, partitions: set[TopicPartition] | None) -> None:
        """URLs still waiting for their host's turn go to crawl.retry, due when that turn
        comes, so their offsets can be committed: the next owner of the partition does not
        redo what this process already finished after them (no duplicate requests)."""
        now = time.monotonic()
        waiting = self.scheduler.remove_where(
            lambda job: partitions is None or job.item.tp in partitions
        )
        for job in waiting:
            self._wait_elsewhere(job, self.scheduler.wait_estimate(job.host, now), "handover")
        if waiting:
            log.info("fetcher: %d waiting URLs handed back through crawl.retry", len(waiting))

    async def before_release(self, partitions: set[TopicPartition]) -> None:
        # The next owner of a host has not read its Crawl-delay yet: hold on until only
        # the configured delay, which it does apply, is left to wait.
        wait = self.scheduler.handover_wait(time.monotonic(), self.delay_for.configured)
        if partitions and wait > 0:
            log.info("fetcher: handing hosts over in %.2fs (their Crawl-delay)", wait)
            await asyncio.sleep(wait)
        for tp in partitions:
            self.assigned_at.pop(tp, None)
