"""The delay service: crawl.retry in, crawl.fetch out, each record at its due time.

It never blocks a partition and never busy-loops: it reads while it has room,
sleeps until the earliest due time (or new records), and pauses reading when
``delay_max_held`` records are waiting. Partition p of crawl.retry goes back to
partition p of crawl.fetch: both are keyed by host, so a host keeps its fetcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from ..core import metrics
from ..core.config import Settings
from ..core.kafka import kafka_reachable, make_consumer, make_producer
from ..core.offsets import OffsetTracker, commit_finished
from ..core.stage import DeadLetter, Output, Publisher, Record, dead_letter, decode_json
from ..core.topics import DELAY_GROUP, FETCH, RETRY, topic_name
from .logic import DelayBuffer, Held, fetch_value

log = logging.getLogger(__name__)
STAGE = "delay"
_MAX_SLEEP = 0.5


class DelayService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buffer = DelayBuffer(settings.delay_max_held)
        self.tracker = OffsetTracker()
        self._retry_topic = topic_name(settings.topic_prefix, RETRY)
        self._fetch_topic = topic_name(settings.topic_prefix, FETCH)

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        producer = make_producer(settings)
        consumer = make_consumer(settings, DELAY_GROUP, max_poll_records=settings.batch_size)
        await producer.start()
        await consumer.start()
        self.publisher = Publisher(producer, STAGE)
        consumer.subscribe([self._retry_topic], listener=_Rebalance(self, consumer))
        health = metrics.HealthServer(settings.metrics_port, lambda: kafka_reachable(consumer))
        await health.start()
        log.info("delay: consuming %s as group %s", self._retry_topic, DELAY_GROUP)
        last_commit = 0.0
        try:
            while not stop.is_set():
                await self._read(consumer)
                await self._release(time.time())
                if time.monotonic() - last_commit >= 1.0:
                    await self._commit(consumer)
                    last_commit = time.monotonic()
            await self._commit(consumer)
        finally:
            await health.stop()
            await consumer.stop()
            await producer.stop()
            log.info("delay: stopped")

    def _sleep_for(self, now: float) -> float:
        due = self.buffer.next_due()
        return _MAX_SLEEP if due is None else min(_MAX_SLEEP, max(0.0, due - now))

    async def _read(self, consumer: AIOKafkaConsumer) -> None:
        wait = self._sleep_for(time.time())
        room = self.buffer.room
        if room == 0:
            # Full: what is held comes due first; new records wait in Kafka.
            await asyncio.sleep(wait)
            return
        batches = await consumer.getmany(
            timeout_ms=int(wait * 1000), max_records=min(room, self.settings.batch_size)
        )
        dead: list[tuple[TopicPartition, Record, Output]] = []
        for tp, records in batches.items():
            for record in records:
                metrics.MESSAGES_IN.labels(STAGE).inc()
                self.tracker.started(tp, record.offset)
                try:
                    value = decode_json(record, "retry")
                except DeadLetter as exc:
                    output = dead_letter(self.settings, STAGE, record, exc.reason, exc.detail)
                    dead.append((tp, record, output))
                    continue
                self.buffer.add(tp, record.offset, record.key, value)
        if dead:
            await self.publisher.publish([output for _, _, output in dead])
            for tp, record, _ in dead:
                self.tracker.finished(tp, record.offset)
        metrics.DELAY_HELD.set(len(self.buffer))

    async def _release(self, now: float) -> None:
        due = self.buffer.pop_due(now)
        if not due:
            return
        await self.publisher.publish([self._output(held) for held in due])
        for held in due:
            self.tracker.finished(held.tp, held.offset)
        metrics.DELAY_HELD.set(len(self.buffer))

    def _output(self, held: Held) -> Output:
        return Output(
            self._fetch_topic, fetch_value(held.value), key=held.key, partition=held.tp.partition
        )

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        await commit_finished(consumer, self.tracker, DELAY_GROUP, STAGE)

    async def partitions_revoked(
        self, consumer: AIOKafkaConsumer, revoked: Iterable[TopicPartition]
    ) -> None:
        lost = set(revoked)
        await self._commit(consumer)
        # Held records were never committed: the partition's next owner reads them again.
        self.buffer.drop_where(lambda held: held.tp in lost)
        for tp in lost:
            self.tracker.forget(tp)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: DelayService, consumer: AIOKafkaConsumer) -> None:
        self._service = service
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._service.partitions_revoked(self._consumer, revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None
