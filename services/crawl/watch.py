"""A crawl's progress, read from Kafka offsets (relative to where the topics stood at the
start), and waiting until every consumer group has committed everything."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiokafka import TopicPartition
from pymongo import AsyncMongoClient

from ..core.config import Settings
from ..core.kafka import OffsetProbe
from ..core.secrets import mongo_client_uri
from ..core.topics import DLQ, FETCHED, FETCHER_GROUP, GROUP_INPUTS, PAGES, SINK_GROUP
from .autoscale import Autoscaler
from .processes import StageProcesses
from .status import StatsClient, StatsUnavailable, final_numbers, stats_url

# Every topic a stage reads or writes: a record on any of them is work in flight.
_PIPELINE_TOPICS = tuple(sorted({DLQ, *(s for inputs in GROUP_INPUTS.values() for s in inputs)}))


@dataclass
class Progress:
    fetched: int = 0
    parsed: int = 0
    stored: int = 0
    queued: int = 0
    queued_partitions: int = 0
    errors: int = 0
    lag_total: int = 0
    elapsed: float = 0.0
    fetchers: int = 1
    # Every pipeline topic's end offsets, read after the groups' lag: see watch_until_drained.
    ends: dict[TopicPartition, int] = field(default_factory=dict, repr=False)

    @property
    def rate(self) -> float:
        return self.stored / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        return (
            f"fetched {self.fetched:>7}  parsed {self.parsed:>7}  stored {self.stored:>7}  "
            f"queued {self.queued:>6}  errors {self.errors:>5}  fetchers {self.fetchers:>2}  "
            f"{self.rate:7.1f} pages/s  [{self.elapsed:6.1f}s]"
        )


class PipelineWatch:
    """Progress from Kafka offsets, relative to where the topics stood at the start; with
    ``crawl_id``, the counts (fetched, parsed, stored, errors) are that crawl's own, read
    from the stats stage, so crawls sharing a pipeline each see theirs. Lag and the drain
    check stay pipeline-wide: they are about records in flight, whichever crawl's."""

    def __init__(self, settings: Settings, crawl_id: str | None = None) -> None:
        self.settings = settings
        self.crawl_id = crawl_id
        self.probe = OffsetProbe(settings)
        self._baseline: dict[TopicPartition, int] = {}
        self._sink_baseline = 0
        self._started = time.monotonic()
        self._stats: StatsClient | None = None
        self.crawl_numbers: dict[str, Any] | None = None

    def t(self, suffix: str) -> str:
        return self.settings.topic_prefix + suffix

    async def start(self) -> None:
        if self.crawl_id is not None:
            self._stats = await StatsClient(stats_url(self.settings), timeout=2.0).__aenter__()
        await self.probe.start()
        self._baseline = await self.probe.end_offsets(self.t(s) for s in (FETCHED, PAGES, DLQ))
        self._sink_baseline = await self._sink_committed()
        self._started = time.monotonic()

    async def _sink_committed(self) -> int:
        return sum(row.committed or 0 for row in await self.probe.lag(SINK_GROUP, [self.t(PAGES)]))

    async def progress(self) -> Progress:
        # One read of every pipeline topic's end offsets serves the counts and every
        # group's lag: a poll costs the broker two ListOffsets and one OffsetFetch a group.
        ends = await self.probe.end_offsets(self.t(s) for s in _PIPELINE_TOPICS)

        def delta(suffix: str) -> int:
            return sum(
                end - self._baseline.get(tp, 0)
                for tp, end in ends.items()
                if tp.topic == self.t(suffix)
            )

        lag_total = 0
        queued = queued_partitions = sink_committed = 0
        groups = list(GROUP_INPUTS.items())
        lags = await asyncio.gather(
            *(self.probe.lag(g, [self.t(s) for s in inputs], ends) for g, inputs in groups)
        )
        for (group, _), rows in zip(groups, lags, strict=True):
            group_lag = sum(max(row.lag, 0) for row in rows)
            lag_total += group_lag
            if group == FETCHER_GROUP:
                queued = group_lag
                queued_partitions = sum(1 for row in rows if row.lag > 0)
            if group == SINK_GROUP:
                sink_committed = sum(row.committed or 0 for row in rows)
        # Read after every group's committed offsets (the drain check depends on that).
        pipeline_ends = await self.probe.end_offsets(self.t(s) for s in _PIPELINE_TOPICS)
        progress = Progress(
            fetched=delta(FETCHED),
            parsed=delta(PAGES),
            stored=sink_committed - self._sink_baseline,
            queued=queued,
            queued_partitions=queued_partitions,
            errors=delta(DLQ),
            lag_total=lag_total,
            elapsed=time.monotonic() - self._started,
            ends=pipeline_ends,
        )
        if self.crawl_id is not None:
            await self._read_crawl()
            self.apply_crawl_numbers(progress)
        return progress

    async def _read_crawl(self) -> None:
        """The crawl's numbers from the stats stage; the last ones read while it does not
        answer (starting, or handing over to another worker)."""
        assert self._stats is not None and self.crawl_id is not None
        with contextlib.suppress(StatsUnavailable):
            found = await self._stats.crawl(self.crawl_id)
            if found is not None:
                self.crawl_numbers = found

    def apply_crawl_numbers(self, progress: Progress) -> None:
        numbers = self.crawl_numbers or {}
        progress.fetched = numbers.get("fetched", 0)
        progress.parsed = numbers.get("parsed", 0)
        progress.stored = numbers.get("stored", 0)
        progress.errors = numbers.get("errors", 0)

    async def final_progress(self, progress: Progress, timeout: float = 60.0) -> Progress:
        """``progress`` with the crawl's final numbers: those the stats stage serves once
        it has read every record (unchanged when no crawl id is watched)."""
        if self.crawl_id is None:
            return progress
        final = await final_numbers(self.settings, self.crawl_id, self.probe, timeout)
        if final is not None:
            self.crawl_numbers = final
        self.apply_crawl_numbers(progress)
        return progress

    async def stop(self) -> None:
        if self._stats is not None:
            await self._stats.__aexit__()
        await self.probe.stop()


async def watch_until_drained(
    watch: PipelineWatch,
    stages: StageProcesses,
    out: TextIO,
    quiet_polls: int = 1,
    interval: float = 0.25,
    timeout: float | None = None,
    autoscaler: Autoscaler | None = None,
    confirm_interval: float = 0.05,
) -> Progress:
    """Poll until the pipeline is drained: no lag in any group at two polls in a row, and
    no record added to any pipeline topic between them (``quiet_polls`` such pairs). A poll
    that sees no lag is checked by the next one after ``confirm_interval`` instead of
    ``interval``: the end of a crawl is seen sooner, and only the end costs extra polls.

    Why two polls suffice: every stage publishes a record's outputs, and waits for the
    broker's acknowledgement, before it commits the record. A poll reads the end offsets
    (E1), then every group's committed offsets (lag is measured against E1), then the end
    offsets again (E2). When two polls in a row see no lag and the same E2, the later
    poll's E1 lies between the two and equals E2: every group had committed every record
    below E2, and those records' outputs, acknowledged before their commits, lie below E2
    as well. Nothing is held in flight anywhere.
    """
    calm = 0
    next_scale = time.monotonic()
    last: Progress | None = None
    deadline = None if timeout is None else time.monotonic() + timeout
    tty = out.isatty()
    last_print = 0.0
    while True:
        await asyncio.sleep(_poll_wait(last, interval, confirm_interval))
        progress = await watch.progress()
        if autoscaler is not None and time.monotonic() >= next_scale:
            next_scale = time.monotonic() + autoscaler.policy.polling_interval
            _autoscale(autoscaler, stages, progress, out)
        progress.fetchers = len(stages.replicas("fetcher"))
        if tty:
            out.write("\r" + progress.line())
            out.flush()
        elif time.monotonic() - last_print >= 5:
            out.write(progress.line() + "\n")
            last_print = time.monotonic()
        dead = stages.dead()
        if dead:
            raise RuntimeError(f"stage(s) {', '.join(dead)} exited; see their logs")
        calm = calm + 1 if last is not None and _drained_between(last, progress) else 0
        last = progress
        if calm >= quiet_polls:
            if tty:
                out.write("\n")
            return progress
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the crawl did not drain in time")


def _poll_wait(last: Progress | None, interval: float, confirm_interval: float) -> float:
    """Seconds before the next poll: soon after a poll without lag (the one that may confirm
    the drain), else the watch's interval."""
    if last is not None and last.lag_total == 0:
        return min(interval, confirm_interval)
    return interval


def _drained_between(earlier: Progress, later: Progress) -> bool:
    return earlier.lag_total == 0 and later.lag_total == 0 and earlier.ends == later.ends


def _autoscale(
    autoscaler: Autoscaler, stages: StageProcesses, progress: Progress, out: TextIO
) -> None:
    before = len(stages.replicas("fetcher"))
    wanted = autoscaler.decide(progress.queued, time.monotonic(), progress.queued_partitions)
    if wanted != before:
        stages.scale("fetcher", wanted)
        out.write(f"\nautoscale: fetch lag {progress.queued} -> fetchers {before} -> {wanted}\n")


async def count_stored(settings: Settings, crawl_id: str) -> int:
    """Documents the sink stored in MongoDB for ``crawl_id``."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_client_uri(settings))
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        return await collection.count_documents({"crawl_id": crawl_id})
    finally:
        await client.close()
