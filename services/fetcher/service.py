"""The fetcher service: crawl.fetch in, crawl.fetched (or crawl.dlq) out.

Thousands of requests run concurrently in one process. Records finish out of
order, so offsets go through an :class:`OffsetTracker` and only the finished
prefix of each partition is committed, after its outputs are acknowledged.
The consumer takes no more records than there are free request slots, so the
buffer is bounded by ``fetch_concurrency``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import zlib
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from ..core import metrics
from ..core.config import Settings
from ..core.kafka import export_lag, kafka_reachable, make_consumer, make_producer
from ..core.offsets import OffsetTracker
from ..core.stage import DeadLetter, Output, Publisher, Record, dead_letter, decode_json
from ..core.topics import FETCH, FETCHED, FETCHER_GROUP, topic_name
from .http import FetchFailed, FetchLimits, FetchResult, fetch
from .safety import SafeResolver, parse_networks

log = logging.getLogger(__name__)
STAGE = "fetcher"


def fetched_value(request: dict[str, Any], result: FetchResult) -> dict[str, Any]:
    """The crawl.fetched record for one response (body compressed, then base64)."""
    return {
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


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Fetcher:
    """Owns the consumer, the HTTP session and the in-flight requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = FetchLimits(
            total_s=settings.fetch_timeout,
            connect_s=settings.fetch_connect_timeout,
            read_s=settings.fetch_read_timeout,
            max_body_bytes=settings.max_body_bytes,
            allowed_networks=parse_networks(settings.allow_networks),
        )
        self.tracker = OffsetTracker()
        self.tasks: dict[asyncio.Task[None], TopicPartition] = {}
        self._fetch_topic = topic_name(settings.topic_prefix, FETCH)
        self._fetched_topic = topic_name(settings.topic_prefix, FETCHED)

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        producer = make_producer(settings)
        consumer = make_consumer(settings, FETCHER_GROUP, max_poll_records=settings.batch_size)
        connector = aiohttp.TCPConnector(
            limit=settings.fetch_concurrency,
            limit_per_host=settings.fetch_per_host_concurrency,
            ttl_dns_cache=settings.dns_cache_ttl,
            use_dns_cache=True,
            resolver=SafeResolver(self.limits.allowed_networks),
            enable_cleanup_closed=True,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": settings.user_agent},
            auto_decompress=True,
            trust_env=False,
        )
        await producer.start()
        await consumer.start()
        self.publisher = Publisher(producer, STAGE)
        self.session = session
        consumer.subscribe([self._fetch_topic], listener=_Drain(self, consumer))
        health = metrics.HealthServer(settings.metrics_port, lambda: kafka_reachable(consumer))
        await health.start()
        committer = asyncio.create_task(self._commit_every(consumer, stop, 1.0))
        log.info(
            "fetcher: consuming %s as group %s, %d in flight max",
            self._fetch_topic,
            FETCHER_GROUP,
            settings.fetch_concurrency,
        )
        try:
            await self._consume(consumer, stop)
            await self._drain(self.tasks, timeout=25.0)
            await self._commit(consumer)
        finally:
            committer.cancel()
            await health.stop()
            await consumer.stop()
            await producer.stop()
            await session.close()
            log.info("fetcher: stopped")

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        while not stop.is_set():
            free = self.settings.fetch_concurrency - len(self.tasks)
            if free <= 0:
                await asyncio.wait(
                    list(self.tasks), timeout=0.5, return_when=asyncio.FIRST_COMPLETED
                )
                continue
            batches = await consumer.getmany(timeout_ms=200, max_records=free)
            for tp, records in batches.items():
                for record in records:
                    self._start(tp, record)

    def _start(self, tp: TopicPartition, record: Record) -> None:
        metrics.MESSAGES_IN.labels(STAGE).inc()
        self.tracker.started(tp, record.offset)
        task = asyncio.create_task(self._handle(tp, record))
        self.tasks[task] = tp
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("fetcher: unexpected error: %r", task.exception())

    async def _handle(self, tp: TopicPartition, record: Record) -> None:
        output = await self._outcome(record)
        await self.publisher.publish([output])
        self.tracker.finished(tp, record.offset)

    async def _outcome(self, record: Record) -> Output:
        try:
            request = decode_json(record, "fetch")
        except DeadLetter as exc:
            return dead_letter(self.settings, STAGE, record, exc.reason, exc.detail)
        metrics.FETCH_IN_FLIGHT.inc()
        try:
            result = await fetch(self.session, request["url"], self.limits)
        except FetchFailed as exc:
            metrics.FETCH_REQUESTS.labels("error").inc()
            return dead_letter(
                self.settings, STAGE, record, exc.reason, f"{request['url']}: {exc.detail}"
            )
        finally:
            metrics.FETCH_IN_FLIGHT.dec()
        metrics.FETCH_REQUESTS.labels(status_class(result.status)).inc()
        metrics.FETCH_DURATION.observe(result.total_s)
        metrics.PAGE_SIZE.observe(len(result.body))
        metrics.FETCH_BYTES.inc(len(result.body))
        return Output(self._fetched_topic, fetched_value(request, result), key=record.key)

    async def _commit_every(
        self, consumer: AIOKafkaConsumer, stop: asyncio.Event, interval: float
    ) -> None:
        while not stop.is_set():
            await asyncio.sleep(interval)
            await self._commit(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        offsets = {
            tp: off for tp, off in self.tracker.committable().items() if tp in consumer.assignment()
        }
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
            self.tracker.mark_committed(offsets)
            export_lag(consumer, FETCHER_GROUP, self.tracker.committed)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("fetcher: commit failed (%s); will retry", exc)

    async def _drain(
        self,
        tasks: dict[asyncio.Task[None], TopicPartition],
        timeout: float,
        only: set[TopicPartition] | None = None,
    ) -> None:
        waiting = [task for task, tp in tasks.items() if only is None or tp in only]
        if waiting:
            log.info("fetcher: finishing %d requests in flight", len(waiting))
            await asyncio.wait(waiting, timeout=timeout)

    async def partitions_revoked(
        self, consumer: AIOKafkaConsumer, revoked: Iterable[TopicPartition]
    ) -> None:
        lost = set(revoked)
        await self._drain(self.tasks, timeout=20.0, only=lost)
        await self._commit(consumer)
        for tp in lost:
            self.tracker.forget(tp)


class _Drain(ConsumerRebalanceListener):  # type: ignore[misc]
    """Finish and commit in-flight requests of partitions that move to another fetcher."""

    def __init__(self, fetcher: Fetcher, consumer: AIOKafkaConsumer) -> None:
        self._fetcher = fetcher
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._fetcher.partitions_revoked(self._consumer, revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None
