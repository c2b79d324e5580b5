"""The dedup stage: crawl.discovered in, new URLs out to crawl.fetch.

Partition p of crawl.discovered is written to partition p of crawl.fetch (both keyed by
host, same partition count), so crawl.fetch partition p is the exact changelog of filter
p. A dedup that takes over partition p, after a restart or a rebalance, rebuilds its filter
before it admits anything: from its last snapshot (``STATE_DIR``) plus the crawl.fetch
records after the offset the snapshot covers, or from the whole partition without one. A
URL admitted once, even by a process killed before it committed, is never admitted again.

Snapshots are taken between batches (every ``DEDUP_SNAPSHOT_INTERVAL`` seconds for a
changed partition, on revocation and at shutdown), when everything the filter holds has
been published: a snapshot never claims a URL that is not on crawl.fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from ..core import metrics
from ..core.config import Settings
from ..core.kafka import make_reader, stop_consumer
from ..core.messages import Discovered, Revisit, fetch_from, round_key, tallies
from ..core.runtime import BatchStage, Input, Output, Received, json_input
from ..core.topics import DEDUP_GROUP, DISCOVERED, EVENTS, FETCH
from .logic import Admission, PartitionFilter
from .snapshot import SnapshotStore

log = logging.getLogger(__name__)


class _Round(msgspec.Struct):
    round: int
    due: float | None = None


class _Admitted(msgspec.Struct):
    """What a replay needs of a crawl.fetch record (the rest is skipped, not decoded)."""

    url: str
    crawl_id: str
    revisit: _Round | None = None


_replay_decoder = msgspec.json.Decoder(_Admitted)


class DedupStage(BatchStage):
    name = "dedup"
    group = DEDUP_GROUP

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.admission = Admission()
        self.fetch_topic = self.topic(FETCH)
        state = settings.state_dir
        self.snapshots = SnapshotStore(Path(state), self.fetch_topic) if state else None
        self._snapshot_at: dict[int, float] = {}
        self._changed: set[int] = set()
        self._replayer: AIOKafkaConsumer | None = None
        self._replay_lock = asyncio.Lock()
        self.replayed_records = 0  # crawl.fetch records read by rebuilds, for tests and logs
        self._rebuilding: asyncio.Task[None] | None = None

    def inputs(self) -> tuple[Input, ...]:
        return (json_input(DISCOVERED, Discovered),)

    async def start(self) -> None:
        self._replayer = make_reader(
            self.settings,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await self._replayer.start()

    async def stop(self) -> None:
        if self._rebuilding is not None and not self._rebuilding.done():
            self._rebuilding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebuilding
        await self._snapshot(list(self.admission.filters), force=True)
        if self._replayer is not None:
            await stop_consumer(self._replayer)

    async def on_assigned(self, partitions: Iterable[TopicPartition]) -> None:
        # The rebuild runs beside the group's callbacks, not in them: a replay of millions
        # of records must not stop the consumer's heartbeats (the member would be dropped
        # from the group). The first batch of a partition waits for it in process().
        wanted = [
            tp.partition
            for tp in partitions
            if tp.topic == self.topic(DISCOVERED) and tp.partition not in self.admission.filters
        ]
        if wanted:
            self._rebuilding = asyncio.create_task(self._rebuild(wanted))

    async def rebuilt(self) -> None:
        """Wait until the rebuild the last assignment started is over."""
        if self._rebuilding is not None:
            await asyncio.shield(self._rebuilding)

    async def on_revoked(self, partitions: Iterable[TopicPartition]) -> None:
        if self._rebuilding is not None and not self._rebuilding.done():
            # A rebuild must not install filters for partitions that are leaving.
            self._rebuilding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebuilding
        lost = [tp.partition for tp in partitions if tp.partition in self.admission.filters]
        await self._snapshot(lost, force=True)
        for partition in lost:
            self.admission.filters.pop(partition, None)
            self._changed.discard(partition)

    # -- rebuilding a partition's filter -----------------------------------------------

    async def _rebuild(self, partitions: list[int]) -> None:
        """Filters for ``partitions``: snapshot (if any) plus the crawl.fetch records after
        it, all partitions read in one pass. One rebuild at a time, so a partition is never
        rebuilt twice concurrently (a later filter never replaces one that admitted more)."""
        async with self._replay_lock:
            partitions = [p for p in partitions if p not in self.admission.filters]
            if not partitions:
                return
            started = time.monotonic()
            filters, starts, ends, snapshots = await self._starting_points(partitions)
            replayed = await self._replay(filters, starts, ends)
            self.replayed_records += sum(replayed.values())
            for partition, bloom in filters.items():
                self.admission.filters[partition] = bloom
                self._snapshot_at[partition] = time.monotonic()
                if replayed.get(partition):
                    self._changed.add(partition)  # the next snapshot spares that replay
                self._export(partition, bloom)
            log.info(
                "dedup: partitions %s rebuilt in %.2fs (%d crawl.fetch records replayed, "
                "%d from snapshots)",
                partitions,
                time.monotonic() - started,
                sum(replayed.values()),
                snapshots,
            )

    async def _starting_points(
        self, partitions: list[int]
    ) -> tuple[dict[int, PartitionFilter], dict[int, int], dict[int, int], int]:
        """Per partition: its filter (from a snapshot, or empty), the crawl.fetch offset to
        replay from and the end offset to replay to; and how many snapshots were used."""
        assert self._replayer is not None
        tps = [TopicPartition(self.fetch_topic, p) for p in partitions]
        firsts = await self._replayer.beginning_offsets(tps)
        ends = await self._replayer.end_offsets(tps)
        filters: dict[int, PartitionFilter] = {}
        starts: dict[int, int] = {}
        used = 0
        for tp in tps:
            snapshot = self.snapshots.load(tp.partition) if self.snapshots else None
            if snapshot is not None and snapshot.offset > ends[tp]:
                log.warning(
                    "dedup: snapshot of %s[%d] covers offset %d past the end %d (topic "
                    "recreated?); replaying from the start",
                    tp.topic,
                    tp.partition,
                    snapshot.offset,
                    ends[tp],
                )
                snapshot = None
            if snapshot is not None and snapshot.offset < firsts[tp]:
                log.warning(
                    "dedup: records %d..%d of %s[%d] expired after the snapshot; URLs "
                    "admitted only there may be admitted again",
                    snapshot.offset,
                    firsts[tp],
                    tp.topic,
                    tp.partition,
                )
            filters[tp.partition] = (
                snapshot.filter
                if snapshot is not None
                else PartitionFilter(self.settings.bloom_capacity, self.settings.bloom_error_rate)
            )
            starts[tp.partition] = snapshot.offset if snapshot is not None else firsts[tp]
            used += snapshot is not None
        return filters, starts, {tp.partition: ends[tp] for tp in tps}, used

    async def _replay(
        self, filters: dict[int, PartitionFilter], starts: dict[int, int], ends: dict[int, int]
    ) -> dict[int, int]:
        """Replay crawl.fetch into ``filters`` from ``starts`` to ``ends``; records read per
        partition. Positions are followed from the records read (a broker round trip per
        partition and poll would cost seconds on a busy start); a partition that returns
        nothing is asked for its position."""
        replayer = self._replayer
        assert replayer is not None
        tps = {TopicPartition(self.fetch_topic, p): p for p in filters}
        replayer.assign(list(tps))
        positions = {}
        for tp, partition in tps.items():
            replayer.seek(tp, starts[partition])
            positions[tp] = starts[partition]
        pending = {tp for tp, partition in tps.items() if positions[tp] < ends[partition]}
        replayed: dict[int, int] = {}
        while pending:
            batches = await replayer.getmany(*pending, timeout_ms=1000, max_records=5000)
            for tp, records in batches.items():
                bloom = filters[tp.partition]
                for record in records:
                    try:
                        admitted = _replay_decoder.decode(record.value or b"")
                    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                        continue  # never produced by us; nothing to remember
                    try:
                        # remember() also rebuilds the per-host and calendar counts.
                        crawl_key = (
                            admitted.crawl_id
                            if admitted.revisit is None
                            else round_key(
                                admitted.crawl_id,
                                Revisit(round=admitted.revisit.round, due=admitted.revisit.due),
                            )
                        )
                        bloom.remember(crawl_key, admitted.url)
                    except ValueError:
                        continue  # a URL no stage admits (an unbalanced IPv6 bracket)
                if records:
                    positions[tp] = records[-1].offset + 1
                replayed[tp.partition] = replayed.get(tp.partition, 0) + len(records)
            for tp in pending - set(batches):
                positions[tp] = await replayer.position(tp)
            pending = {tp for tp in pending if positions[tp] < ends[tp.partition]}
        replayer.assign([])
        return replayed

    # -- snapshots -----------------------------------------------------------------------

    async def _snapshot(self, partitions: Iterable[int], force: bool = False) -> None:
        """Snapshot the changed ``partitions`` (those due, unless ``force``). Called only
        between batches, when every URL in the filters is on crawl.fetch."""
        if self.snapshots is None or self._replayer is None:
            return
        now = time.monotonic()
        due = [
            p
            for p in partitions
            if p in self._changed
            and (
                force
                or now - self._snapshot_at.get(p, 0.0) >= self.settings.dedup_snapshot_interval
            )
        ]
        if not due:
            return
        tps = [TopicPartition(self.fetch_topic, p) for p in due]
        ends = await self._replayer.end_offsets(tps)
        store = self.snapshots
        for tp in tps:
            bloom = self.admission.filters[tp.partition]
            size = await asyncio.to_thread(store.save, tp.partition, bloom, ends[tp])
            self._snapshot_at[tp.partition] = now
            self._changed.discard(tp.partition)
            log.debug(
                "dedup: snapshot of partition %d at %d (%d bytes)", tp.partition, ends[tp], size
            )

    # -- the step --------------------------------------------------------------------------

    async def process(self, batch: list[Received[Any]]) -> list[Output]:
        # The previous batch is published and committed: its URLs are on crawl.fetch.
        await self._snapshot(list(self.admission.filters))
        now = time.time()
        outputs: list[Output] = []
        # Remembered in the filters only once the whole batch succeeded (see BatchAdmission).
        admission = self.admission.batch()
        # (crawl id, what): admitted and filtered URLs, for the stats stage.
        counts: Counter[tuple[str, str]] = Counter()
        for item in batch:
            candidate: Discovered = item.message
            partition = item.record.partition
            if partition not in self.admission.filters:
                # Waits for the rebuild on_assigned started (or starts one).
                await self._rebuild([partition])
            if self.crawls.verdict(candidate.crawl_id) == "drop":  # crawl.control
                metrics.URLS_CANCELLED.labels(self.name).inc()
                counts[candidate.crawl_id, "cancelled"] += 1
                continue
            verdict = admission.decide(
                partition,
                # Each revisit round is a crawl of its own for dedup: a URL passes once per round.
                round_key(candidate.crawl_id, candidate.revisit),
                candidate.url,
                candidate.scope.max_pages,
                self.settings.max_pages_per_host,
                self.settings.max_calendar_pages,
            )
            if verdict is not None:
                metrics.URLS_FILTERED.labels(self.name, verdict).inc()
                counts[candidate.crawl_id, "filtered:" + verdict] += 1
                continue
            counts[candidate.crawl_id, "admitted"] += 1
            self._changed.add(partition)
            outputs.append(
                Output(
                    self.fetch_topic,
                    fetch_from(candidate, now),
                    key=item.record.key,
                    partition=partition,
                )
            )
        admission.apply()
        for partition, bloom in self.admission.filters.items():
            self._export(partition, bloom)
        outputs.extend(
            Output(self.topic(EVENTS), tally, key=tally.crawl_id.encode())
            for tally in tallies("dedup", counts, now)
        )
        return outputs

    @staticmethod
    def _export(partition: int, bloom: PartitionFilter) -> None:
        label = str(partition)
        metrics.BLOOM_FILL.labels(label).set(bloom.fill_ratio)
        metrics.BLOOM_FP_RATE.labels(label).set(bloom.estimated_false_positive_rate())
