"""The dedup service: crawl.discovered in, new URLs out to crawl.fetch.

Partition p of crawl.discovered is written to partition p of crawl.fetch (both
keyed by host, same partition count), so crawl.fetch partition p is the exact
changelog of filter p. A dedup that takes over partition p, after a restart or
a rebalance, replays it before it admits anything: a URL admitted once, even by
a process killed before it committed, is never admitted again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from ..core import metrics
from ..core.config import Settings
from ..core.kafka import stop_consumer
from ..core.messages import Discovered, fetch_from
from ..core.runtime import BatchStage, Input, Output, Received, json_input
from ..core.topics import DEDUP_GROUP, DISCOVERED, FETCH
from .logic import Admission, PartitionFilter

log = logging.getLogger(__name__)


class _Admitted(msgspec.Struct):
    """What a replay needs of a crawl.fetch record (the rest is skipped, not decoded)."""

    url: str
    crawl_id: str


_replay_decoder = msgspec.json.Decoder(_Admitted)


class DedupStage(BatchStage):
    name = "dedup"
    group = DEDUP_GROUP

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.admission = Admission()

    def inputs(self) -> tuple[Input, ...]:
        return (json_input(DISCOVERED, Discovered),)

    async def on_assigned(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            if tp.topic == self.topic(DISCOVERED) and tp.partition not in self.admission.filters:
                self.admission.filters[tp.partition] = await self._replay(tp.partition)

    async def on_revoked(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self.admission.filters.pop(tp.partition, None)

    async def _replay(self, partition: int) -> PartitionFilter:
        bloom = PartitionFilter(self.settings.bloom_capacity, self.settings.bloom_error_rate)
        started = time.monotonic()
        fetch = TopicPartition(self.topic(FETCH), partition)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await consumer.start()
        try:
            consumer.assign([fetch])
            await consumer.seek_to_beginning(fetch)
            end = (await consumer.end_offsets([fetch]))[fetch]
            while await consumer.position(fetch) < end:
                batch = await consumer.getmany(fetch, timeout_ms=1000, max_records=5000)
                for record in batch.get(fetch, []):
                    try:
                        admitted = _replay_decoder.decode(record.value or b"")
                    except msgspec.DecodeError:
                        continue  # never produced by us; nothing to remember
                    # remember() also rebuilds the per-host and calendar counts.
                    bloom.remember(admitted.crawl_id, admitted.url)
        finally:
            await stop_consumer(consumer)
        log.info(
            "dedup: partition %d rebuilt from %d fetch records in %.2fs",
            partition,
            len(bloom),
            time.monotonic() - started,
        )
        self._export(partition, bloom)
        return bloom

    async def process(self, batch: list[Received[Any]]) -> list[Output]:
        fetch_topic = self.topic(FETCH)
        now = time.time()
        outputs: list[Output] = []
        for item in batch:
            candidate: Discovered = item.message
            partition = item.record.partition
            if partition not in self.admission.filters:
                # Assigned without the callback having run (should not happen): rebuild now.
                self.admission.filters[partition] = await self._replay(partition)
            verdict = self.admission.decide(
                partition,
                candidate.crawl_id,
                candidate.url,
                candidate.scope.max_pages,
                self.settings.max_pages_per_host,
                self.settings.max_calendar_pages,
            )
            if verdict is not None:
                metrics.URLS_FILTERED.labels(self.name, verdict).inc()
                continue
            outputs.append(
                Output(
                    fetch_topic,
                    fetch_from(candidate, now),
                    key=item.record.key,
                    partition=partition,
                )
            )
        for partition, bloom in self.admission.filters.items():
            self._export(partition, bloom)
        return outputs

    @staticmethod
    def _export(partition: int, bloom: PartitionFilter) -> None:
        label = str(partition)
        metrics.BLOOM_FILL.labels(label).set(bloom.fill_ratio)
        metrics.BLOOM_FP_RATE.labels(label).set(bloom.estimated_false_positive_rate())
