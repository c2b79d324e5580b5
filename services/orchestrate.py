"""``streamcrawl crawl``: every stage as its own local process, a progress bar, a summary.

The stages run exactly as pods would (``streamcrawl run <stage>``), so a local
crawl exercises the same code, topics and consumer groups as production.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiokafka import TopicPartition
from pymongo import AsyncMongoClient

from .core.config import Settings
from .core.kafka import OffsetProbe, create_topics, keda_replicas, make_producer
from .core.stage import encode
from .core.topics import (
    DLQ,
    FETCHED,
    FETCHER_GROUP,
    GROUP_INPUTS,
    HOST_PARTITIONS,
    PAGES,
    SEEDS,
    SINK_GROUP,
)

STAGES = ("frontier", "dedup", "fetcher", "delay", "parser", "sink")


@dataclass(frozen=True)
class CrawlRequest:
    urls: tuple[str, ...]
    crawl_id: str = field(default_factory=lambda: "crawl-" + uuid.uuid4().hex[:12])
    max_pages: int = 0
    max_depth: int | None = None
    allow_domains: tuple[str, ...] = ()

    def seed_values(self) -> list[dict[str, Any]]:
        scope: dict[str, Any] = {"max_pages": self.max_pages}
        if self.max_depth is not None:
            scope["max_depth"] = self.max_depth
        if self.allow_domains:
            scope["allow_domains"] = list(self.allow_domains)
        return [{"url": url, "crawl_id": self.crawl_id, "scope": scope} for url in self.urls]


class StageProcesses:
    """The five stages as child processes, logging to files."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self._env = env
        self._log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._retiring: list[subprocess.Popen[bytes]] = []

    def start(self, stages: Iterable[str] = STAGES) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        for stage in stages:
            self.start_one(stage)

    def start_one(self, stage: str, name: str | None = None) -> subprocess.Popen[bytes]:
        name = name or stage
        with open(self._log_dir / f"{name}.log", "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "streamcrawl.cli", "run", stage],
                env=self._env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.processes[name] = process
        return process

    def replicas(self, stage: str) -> list[str]:
        return sorted(
            (n for n in self.processes if n == stage or n.startswith(stage + "-")),
            key=lambda n: int(n.rsplit("-", 1)[1]) if "-" in n else 0,
        )

    def scale(self, stage: str, wanted: int) -> None:
        """Start or gracefully stop replicas (SIGTERM: they drain and commit) to ``wanted``."""
        names = self.replicas(stage)
        for number in range(len(names), wanted):
            self.start_one(stage, f"{stage}-{number}" if number else stage)
        for name in names[wanted:][::-1]:
            self.retire(name)

    def retire(self, name: str) -> None:
        """Stop one replica gracefully (SIGTERM: it drains, commits and hands over)."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGTERM)
        self._retiring.append(process)

    def kill(self, stage: str) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        process = self.processes[stage]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def dead(self) -> list[str]:
        return [name for name, proc in self.processes.items() if proc.poll() is not None]

    def stop(self, timeout: float = 40.0) -> None:
        everything = [*self.processes.values(), *self._retiring]
        for process in everything:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in everything:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True)
class ScalingPolicy:
    """KEDA's Kafka trigger and the HPA's scale-down stabilisation, for local processes."""

    min_replicas: int
    max_replicas: int
    lag_threshold: int = 100
    activation_lag_threshold: int = 1
    polling_interval: float = 5.0
    cooldown: float = 30.0
    partitions: int = HOST_PARTITIONS

    @classmethod
    def parse(cls, spec: str, **options: Any) -> ScalingPolicy:
        low, _, high = spec.partition(":")
        try:
            policy = cls(int(low), int(high or low), **options)
        except ValueError as exc:
            raise ValueError(f"--autoscale wants MIN:MAX, got {spec!r}") from exc
        if not 1 <= policy.min_replicas <= policy.max_replicas:
            raise ValueError(f"--autoscale wants 1 <= MIN <= MAX, got {spec!r}")
        return policy


@dataclass
class Autoscaler:
    """Scales up at once; scales down to the highest recommendation of the last
    ``cooldown`` seconds, as the HPA's stabilisation window does."""

    policy: ScalingPolicy
    current: int = 0
    history: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.current = self.current or self.policy.min_replicas

    def recommend(self, lag: int) -> int:
        p = self.policy
        return keda_replicas(
            lag,
            p.partitions,
            p.lag_threshold,
            p.activation_lag_threshold,
            p.min_replicas,
            p.max_replicas,
        )

    def decide(self, lag: int, now: float) -> int:
        wanted = self.recommend(lag)
        self.history = [(t, r) for t, r in self.history if now - t < self.policy.cooldown]
        self.history.append((now, wanted))
        target = wanted if wanted >= self.current else max(r for _, r in self.history)
        if target != self.current:
            self.events.append((now, lag, self.current, target))
            self.current = target
        return target


@dataclass
class Progress:
    fetched: int = 0
    parsed: int = 0
    stored: int = 0
    queued: int = 0
    errors: int = 0
    lag_total: int = 0
    elapsed: float = 0.0
    fetchers: int = 1

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
    """Progress from Kafka offsets, relative to where the topics stood at the start."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.probe = OffsetProbe(settings)
        self._baseline: dict[TopicPartition, int] = {}
        self._sink_baseline = 0
        self._started = time.monotonic()

    def t(self, suffix: str) -> str:
        return self.settings.topic_prefix + suffix

    async def start(self) -> None:
        await self.probe.start()
        self._baseline = await self.probe.end_offsets(self.t(s) for s in (FETCHED, PAGES, DLQ))
        self._sink_baseline = await self._sink_committed()
        self._started = time.monotonic()

    async def _sink_committed(self) -> int:
        return sum(row.committed or 0 for row in await self.probe.lag(SINK_GROUP, [self.t(PAGES)]))

    async def progress(self) -> Progress:
        ends = await self.probe.end_offsets(self.t(s) for s in (FETCHED, PAGES, DLQ))

        def delta(suffix: str) -> int:
            return sum(
                end - self._baseline.get(tp, 0)
                for tp, end in ends.items()
                if tp.topic == self.t(suffix)
            )

        lag_total = 0
        queued = 0
        for group, inputs in GROUP_INPUTS.items():
            rows = await self.probe.lag(group, [self.t(s) for s in inputs])
            group_lag = sum(row.lag for row in rows)
            lag_total += group_lag
            if group == FETCHER_GROUP:
                queued = group_lag
        return Progress(
            fetched=delta(FETCHED),
            parsed=delta(PAGES),
            stored=await self._sink_committed() - self._sink_baseline,
            queued=queued,
            errors=delta(DLQ),
            lag_total=lag_total,
            elapsed=time.monotonic() - self._started,
        )

    async def stop(self) -> None:
        await self.probe.stop()


@asynccontextmanager
async def running_pipeline(
    settings: Settings, log_dir: Path
) -> AsyncIterator[tuple[StageProcesses, PipelineWatch]]:
    """Topics created, every stage running as a process and a progress watch, for a block;
    the stages are stopped (drained, committed) when it ends."""
    await create_topics(settings)
    stages = StageProcesses(child_env(settings), log_dir)
    watch = PipelineWatch(settings)
    await watch.start()
    stages.start()
    try:
        yield stages, watch
    finally:
        await watch.stop()
        await asyncio.to_thread(stages.stop)


async def produce_seeds(
    settings: Settings, values: Sequence[dict[str, Any] | str], topic: str | None = None
) -> int:
    producer = make_producer(settings)
    await producer.start()
    try:
        for value in values:
            payload = value.encode() if isinstance(value, str) else encode(value)
            await producer.send_and_wait(topic or settings.topic_prefix + SEEDS, payload)
    finally:
        await producer.stop()
    return len(values)


async def count_stored(settings: Settings, crawl_id: str) -> int:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        return await collection.count_documents({"crawl_id": crawl_id})
    finally:
        await client.close()


async def watch_until_drained(
    watch: PipelineWatch,
    stages: StageProcesses,
    out: TextIO,
    quiet_polls: int = 3,
    interval: float = 1.0,
    timeout: float | None = None,
    autoscaler: Autoscaler | None = None,
) -> Progress:
    """Poll until every group has committed everything, several polls in a row."""
    calm = 0
    next_scale = time.monotonic()
    last: Progress | None = None
    deadline = None if timeout is None else time.monotonic() + timeout
    tty = out.isatty()
    last_print = 0.0
    while True:
        await asyncio.sleep(interval)
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
        unchanged = last is not None and (last.fetched, last.parsed, last.stored) == (
            progress.fetched,
            progress.parsed,
            progress.stored,
        )
        calm = calm + 1 if progress.lag_total == 0 and unchanged else 0
        last = progress
        if calm >= quiet_polls:
            if tty:
                out.write("\n")
            return progress
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("the crawl did not drain in time")


def _autoscale(
    autoscaler: Autoscaler, stages: StageProcesses, progress: Progress, out: TextIO
) -> None:
    before = len(stages.replicas("fetcher"))
    wanted = autoscaler.decide(progress.queued, time.monotonic())
    if wanted != before:
        stages.scale("fetcher", wanted)
        out.write(f"\nautoscale: fetch lag {progress.queued} -> fetchers {before} -> {wanted}\n")


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **settings.as_env(), **(extra or {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


__all__ = [
    "STAGES",
    "Autoscaler",
    "CrawlRequest",
    "PipelineWatch",
    "Progress",
    "ScalingPolicy",
    "StageProcesses",
    "child_env",
    "count_stored",
    "produce_seeds",
    "running_pipeline",
    "watch_until_drained",
]
