"""The fault suite's harness: a crawl of the generated site, one fault injected during it,
and the figures that say what the fault cost.

A fault is an async function given a :class:`FaultContext` once the crawl has stored a
share of the site; it breaks something (a stage, the broker, the MongoDB-wire server),
brings it back, and marks the moment it did (:meth:`FaultContext.restarted`). The harness
then waits for the crawl to drain and measures, from the servers' own records:

- MongoDB: documents of the crawl id, URLs stored twice, URLs missing;
- nginx's access log: pages requested more than once (refetches), and which of those a
  crash could explain: URLs in crawl.fetch at or past the fetcher group's committed offset
  when the fault began (what was in flight or finished but not yet committed);
- a sampler of every group's committed offsets: seconds from the restart to the first page
  stored again (the sink commits only what MongoDB acknowledged), to the hit stage's group
  committing again (``resumed``: a SIGKILLed member's partitions wait for its session
  timeout), and the longest stretch during the crawl with nothing stored;
- the stage processes: any that exited without being told to.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe
from streamcrawl.core.topics import FETCH, FETCHER_GROUP, GROUP_INPUTS, SEEDS, SINK_GROUP
from streamcrawl.crawl.local import running_pipeline
from streamcrawl.crawl.processes import StageProcesses
from streamcrawl.crawl.seeds import SeedOptions, seed_payloads
from streamcrawl.crawl.watch import PipelineWatch, watch_until_drained

from .crawl import UNBOUNDED_DEPTH, Site, kcat_consume, kcat_produce, kcat_read

SAMPLE_INTERVAL = 0.5  # seconds between two reads of the sink's committed offsets
ROBOTS = "/robots.txt"


@dataclass
class FaultFigures:
    """What one fault cost; one line of the report."""

    fault: str
    expected: int  # URLs a complete crawl stores
    stored: int  # documents of the crawl id in MongoDB
    duplicated: int  # URLs with more than one document
    lost: int  # expected URLs with no document
    refetched: int  # page requests beyond the first, from nginx's log
    refetched_paths: int  # pages requested more than once
    refetch_bound: int  # URLs uncommitted in crawl.fetch when the fault began
    unexplained_refetches: int  # refetched pages outside that bound
    restart_to_stored_s: float | None  # restart -> first page stored again
    restart_to_resumed_s: float | None  # restart -> the hit stage's group commits again
    longest_stall_s: float  # longest time with nothing stored, first to last page
    dlq: int  # crawl.dlq records
    failing_requests: int  # requests for the site's failing URLs (retries included)
    dlq_unexpected: int  # of those, records that are not a failing URL of the site
    dlq_missing: int  # failing URLs of the site with no crawl.dlq record
    pages_topic_missing: int  # expected URLs with no crawl.pages record
    exited: list[str]  # stage processes that exited on their own
    crawl_s: float  # seeds to drained
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


TABLE_COLUMNS = (
    ("fault", "fault", 26),
    ("expected", "expected", 8),
    ("stored", "stored", 6),
    ("dup", "duplicated", 3),
    ("lost", "lost", 4),
    ("refetched", "refetched", 9),
    ("bound", "refetch_bound", 5),
    ("restart->stored s", "restart_to_stored_s", 17),
    ("restart->resumed s", "restart_to_resumed_s", 18),
    ("stall s", "longest_stall_s", 7),
    ("dlq", "dlq", 3),
    ("500 reqs", "failing_requests", 8),
    ("exited", "exited", 6),
    ("crawl s", "crawl_s", 7),
)


def table(results: Iterable[FaultFigures]) -> list[str]:
    """The per-fault table, as Markdown, for the closing note."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}"
        if isinstance(value, list):
            return ",".join(value) or "none"
        return str(value)

    lines = [
        "| " + " | ".join(title.ljust(width) for title, _, width in TABLE_COLUMNS) + " |",
        "|" + "|".join("-" * (width + 2) for _, _, width in TABLE_COLUMNS) + "|",
    ]
    for figures in results:
        row = asdict(figures)
        lines.append(
            "| "
            + " | ".join(cell(row[name]).ljust(width) for _, name, width in TABLE_COLUMNS)
            + " |"
        )
    return lines


@dataclass
class FaultContext:
    """What a fault may touch, and where it records when it brought things back."""

    settings: Settings
    stages: StageProcesses
    log_dir: Path
    restarted_at: float | None = None  # time.monotonic() of the (last) restart
    victim_group: str | None = None  # the consumer group of the stage the fault hit
    retired: list[tuple[str, int | None]] = field(default_factory=list)  # name, exit code
    notes: dict[str, Any] = field(default_factory=dict)

    def restarted(self) -> None:
        self.restarted_at = time.monotonic()


Fault = Callable[[FaultContext], Awaitable[None]]
Recorder = Callable[[FaultFigures], None]  # the fault_report fixture: keeps one fault's figures


class CommitSampler:
    """Reads every group's committed offsets every ``SAMPLE_INTERVAL`` seconds, on its own
    connections, riding out a broker outage (a read that fails is simply not a sample).
    The sink group's are the pages stored: it commits only what MongoDB acknowledged."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # (time.monotonic(), committed offsets summed over the group's input partitions)
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            probe = OffsetProbe(self.settings)
            try:
                await asyncio.wait_for(probe.start(), 10)
                while True:
                    committed = await asyncio.wait_for(self._committed(probe), 10)
                    self.samples.append((time.monotonic(), committed))
                    await asyncio.sleep(SAMPLE_INTERVAL)
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker is down: connect again and go on sampling
                await asyncio.sleep(SAMPLE_INTERVAL)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(probe.stop(), 10)

    async def _committed(self, probe: OffsetProbe) -> dict[str, int]:
        prefix = self.settings.topic_prefix
        committed = {}
        for group, inputs in GROUP_INPUTS.items():
            rows = await probe.lag(group, [prefix + suffix for suffix in inputs])
            committed[group] = sum(row.committed or 0 for row in rows)
        return committed

    def series(self, group: str) -> list[tuple[float, int]]:
        return [(t, committed.get(group, 0)) for t, committed in self.samples]

    def first_commit_after(self, moment: float, group: str = SINK_GROUP) -> float | None:
        """Seconds from ``moment`` to the first sample where ``group`` had committed more
        than at the last sample before it (for the sink: a page stored again)."""
        series = self.series(group)
        before = [committed for t, committed in series if t <= moment]
        baseline = before[-1] if before else 0
        for t, committed in series:
            if t > moment and committed > baseline:
                return t - moment
        return None

    def longest_stall(self, group: str = SINK_GROUP) -> float:
        """The longest time between two advances of ``group``'s commits."""
        series = self.series(group)
        advances = [t for (_, before), (t, after) in itertools.pairwise(series) if after > before]
        gaps = [later - earlier for earlier, later in itertools.pairwise(advances)]
        return max(gaps, default=0.0)


def seed_values(site: Site, crawl_id: str) -> list[bytes]:
    """The entry page and the site's failing URLs, as JSON seeds of one crawl."""
    options = SeedOptions(crawl_id=crawl_id, max_depth=UNBOUNDED_DEPTH)
    return seed_payloads([site.manifest.entry_url, *sorted(site.broken)], options)


async def fetcher_commits(settings: Settings) -> dict[int, int]:
    """The fetcher group's committed offset per crawl.fetch partition (0 when none)."""
    probe = OffsetProbe(settings)
    await probe.start()
    try:
        rows = await probe.lag(FETCHER_GROUP, [settings.topic_prefix + FETCH])
    finally:
        await probe.stop()
    return {row.partition: row.committed or 0 for row in rows}


def uncommitted_fetches(settings: Settings, committed: dict[int, int]) -> set[str]:
    """URLs of crawl.fetch records at or past ``committed``: those a crashed fetcher may
    have requested without its commit landing, so their new owner requests them again."""
    urls = set()
    for line in kcat_read(settings.kafka_bootstrap, settings.topic_prefix + FETCH, "%p\t%o\t%s\n"):
        partition, offset, value = line.split(b"\t", 2)
        if int(offset) >= committed.get(int(partition), 0):
            urls.add(json.loads(value)["url"])
    return urls


async def crawl_documents(settings: Settings, crawl_id: str) -> list[dict[str, Any]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        cursor = collection.find({"crawl_id": crawl_id}, {"url": 1, "status": 1})
        return [doc async for doc in cursor]
    finally:
        await client.close()


async def wait_until_stored(watch: PipelineWatch, pages: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await watch.progress()).stored < pages:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the crawl did not store {pages} pages in {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def drain(
    settings: Settings, stages: StageProcesses, timeout: float, log_dir: Path
) -> list[str]:
    """Wait until every group committed everything; the stages that exited meanwhile."""
    watch = PipelineWatch(settings)  # fresh connections: the broker may have restarted
    await watch.start()
    try:
        await watch_until_drained(watch, stages, io.StringIO(), timeout=timeout)
    except RuntimeError:  # a stage exited: watch_until_drained stops there
        return stages.dead()
    except TimeoutError as exc:  # say where the work stands, for a failure seen only in CI
        lagging = await lagging_partitions(settings)
        raise TimeoutError(f"{exc}; lagging: {lagging}; logs: {log_tails(log_dir)}") from exc
    finally:
        await watch.stop()
    return stages.dead()


async def lagging_partitions(settings: Settings) -> list[str]:
    """'group topic[partition] committed/end' of every partition some group lags on."""
    probe = OffsetProbe(settings)
    await probe.start()
    try:
        rows = [
            row
            for group, inputs in GROUP_INPUTS.items()
            for row in await probe.lag(group, [settings.topic_prefix + s for s in inputs])
        ]
    finally:
        await probe.stop()
    return [
        f"{row.group} {row.topic}[{row.partition}] {row.committed}/{row.end_offset}"
        for row in rows
        if row.lag
    ]


def log_tails(log_dir: Path, lines: int = 4) -> dict[str, list[str]]:
    """The last lines of every stage's log."""
    return {
        log.stem: log.read_text(errors="replace").splitlines()[-lines:]
        for log in sorted(log_dir.glob("*.log"))
    }


async def crawl_through_fault(
    name: str,
    settings: Settings,
    site: Site,
    log_dir: Path,
    fault: Fault,
    kill_at: float = 0.35,
    timeout: float = 480,
) -> tuple[FaultFigures, FaultContext]:
    """Crawl ``site`` from seeds produced with kcat, inject ``fault`` once ``kill_at`` of
    it is stored, wait for the crawl to drain and measure."""
    crawl_id = f"faults-{name}"
    expected = site.expected_urls()
    sampler = CommitSampler(settings)
    async with running_pipeline(settings, log_dir) as (stages, watch):
        context = FaultContext(settings, stages, log_dir)
        sampler.start()
        try:
            started = time.monotonic()
            kcat_produce(settings, settings.topic_prefix + SEEDS, seed_values(site, crawl_id))
            await wait_until_stored(watch, int(len(expected) * kill_at), timeout)
            committed = await fetcher_commits(settings)
            context.notes["fault_at_s"] = round(time.monotonic() - started, 1)
            await fault(context)
            exited = await drain(settings, stages, timeout, log_dir)
            crawl_s = time.monotonic() - started
        finally:
            await sampler.stop()
    figures = await measure(name, settings, site, crawl_id, committed, context, sampler)
    figures.notes["tracebacks"] = tracebacks(log_dir)
    figures.exited = sorted({*exited, *(who for who, code in context.retired if code != 0)})
    figures.crawl_s = crawl_s
    return figures, context


def tracebacks(log_dir: Path) -> dict[str, int]:
    """Tracebacks per stage log (a stage that logs one and goes on is worth a look)."""
    counts = {
        log.stem: log.read_text(errors="replace").count("Traceback")
        for log in sorted(log_dir.glob("*.log"))
    }
    return {name: count for name, count in counts.items() if count}


async def measure(
    name: str,
    settings: Settings,
    site: Site,
    crawl_id: str,
    committed: dict[int, int],
    context: FaultContext,
    sampler: CommitSampler,
) -> FaultFigures:
    expected = site.expected_urls()

    def t(suffix: str) -> str:
        return settings.topic_prefix + suffix

    def is_site_failure(record: dict[str, Any]) -> bool:
        return bool(
            record["stage"] == "fetcher"
            and record["reason"] == "http_500"
            and json.loads(record["payload"]).get("url") in site.broken
        )

    documents = await crawl_documents(settings, crawl_id)
    per_url = Counter(doc["url"] for doc in documents)
    base = site.manifest.base_url.rstrip("/")
    requests = Counter(entry.path for entry in site.nginx.access_log_entries())
    robots = requests.pop(ROBOTS, 0)
    failing_requests = sum(requests.pop(url.removeprefix(base), 0) for url in site.broken)
    repeated = {base + path: n - 1 for path, n in requests.items() if n > 1}
    bound = uncommitted_fetches(settings, committed)
    dead = [json.loads(value) for _, value in kcat_consume(settings.kafka_bootstrap, t("dlq"))]
    failed = {json.loads(record["payload"])["url"] for record in dead if is_site_failure(record)}
    published = {key for key, _ in kcat_consume(settings.kafka_bootstrap, t("pages"))}
    return FaultFigures(
        fault=name,
        expected=len(expected),
        stored=len(documents),
        duplicated=sum(1 for n in per_url.values() if n > 1),
        lost=len(expected - set(per_url)),
        refetched=sum(repeated.values()),
        refetched_paths=len(repeated),
        refetch_bound=len(bound - site.broken),
        unexplained_refetches=len(set(repeated) - bound),
        restart_to_stored_s=(
            None
            if context.restarted_at is None
            else sampler.first_commit_after(context.restarted_at)
        ),
        restart_to_resumed_s=(
            None
            if context.restarted_at is None or context.victim_group is None
            else sampler.first_commit_after(context.restarted_at, context.victim_group)
        ),
        longest_stall_s=sampler.longest_stall(),
        dlq=len(dead),
        failing_requests=failing_requests,
        dlq_unexpected=sum(1 for record in dead if not is_site_failure(record)),
        dlq_missing=len(site.broken - failed),
        pages_topic_missing=len(expected - published),
        exited=[],
        crawl_s=0.0,
        notes={
            **context.notes,
            "robots_requests": robots,
            "extra_urls": sorted(set(per_url) - expected)[:5],
        },
    )


def assert_recovered(figures: FaultFigures, refetch_may_happen: bool) -> None:
    """Every reachable page stored exactly once and published, only the site's real
    failures dead-lettered, no stage exited on its own, and nothing requested twice that
    the fault does not explain."""
    assert figures.exited == [], f"stage(s) exited on their own: {figures.exited}"
    assert figures.duplicated == 0, figures
    assert figures.lost == 0, figures
    assert figures.stored == figures.expected, figures
    assert figures.notes["extra_urls"] == [], figures
    assert figures.pages_topic_missing == 0, figures
    assert figures.dlq_unexpected == 0 and figures.dlq_missing == 0, figures
    if refetch_may_happen:
        # Only what was uncommitted in crawl.fetch when the fault began may come twice.
        assert figures.unexplained_refetches == 0, figures
    else:
        assert figures.refetched == 0, figures
