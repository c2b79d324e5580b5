"""No poison record blocks a partition, against a real broker (and the real FerretDB for
the sink).

Two halves. ``test_runtime_defends_*``: a stage whose step raises on one record (a real
stage class, subclassed here to raise ``StageBug`` for one chosen record, run by the real
runtime) must send that record to crawl.dlq with a reason naming the exception, process
the good records around it (batch stages: nothing the failed batch decided before the
bad record is lost or taken for a duplicate), keep running, and commit past it.

``test_*_at_the_edge`` and the others: the inputs that once made a stage raise (a URL that
canonicalised to the unbalanced IPv6 host ``http://%E2%80%8B0user:pass@%E3%80%82[::1``, a
106 KB page whose 5,000 links resolve to 10 MB, a ``meta`` key with a NUL byte) are now
caught before the step: their records go to the DLQ with the edge's reason (or the bad
link is dropped, or the links capped) and the records around them are processed.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer
from pymongo import AsyncMongoClient
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, create_topics, make_producer, stop_consumer
from streamcrawl.core.messages import (
    DeadLetterRecord,
    Discovered,
    Fetch,
    Message,
    Page,
    Retry,
    encode,
)
from streamcrawl.core.runtime import MAX_OUTPUT_BYTES, Output, Received, Stage, run_stage
from streamcrawl.core.topics import (
    DEDUP_GROUP,
    DISCOVERED,
    DLQ,
    FETCH,
    FETCHED,
    FETCHER_GROUP,
    FRONTIER_GROUP,
    PAGES,
    PARSER_GROUP,
    RETRY,
    SEEDS,
    SINK_GROUP,
    topic_name,
)
from streamcrawl.crawl.local import free_port
from streamcrawl.crawl.processes import StageProcesses, child_env
from streamcrawl.dedup.logic import Admission, BatchAdmission
from streamcrawl.dedup.service import DedupStage
from streamcrawl.fetcher.service import FetcherStage
from streamcrawl.frontier.logic import RecentBatch
from streamcrawl.frontier.service import FrontierStage
from streamcrawl.localstack.provision import ensure_ferretdb
from streamcrawl.localstack.stack import StackConfig, mongo_answers
from streamcrawl.parser.service import ParserStage
from streamcrawl.sink.service import SinkStage

from ..conftest import isolated_settings
from ..unit.test_stages import discovered, fetch, fetched, page

pytestmark = pytest.mark.integration

POISON_URL = "http://..//\u200b0user:pass@\u3002[::1"
CANONICAL_POISON = "http://%E2%80%8B0user:pass@%E3%80%82[::1"


async def produce(settings: Settings, suffix: str, values: list[bytes], partition: int) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(
                topic_name(settings.topic_prefix, suffix), value, key=b"k", partition=partition
            )
    finally:
        await producer.stop()


async def read_topic(settings: Settings, suffix: str) -> list[bytes]:
    """Every record of a topic, from the beginning."""
    probe = OffsetProbe(settings)
    await probe.start()
    try:
        ends = await probe.end_offsets([topic_name(settings.topic_prefix, suffix)])
    finally:
        await probe.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=16 * 1024 * 1024,
    )
    await consumer.start()
    try:
        consumer.assign(list(ends))
        for tp in ends:
            consumer.seek(tp, 0)
        values: list[bytes] = []
        while len(values) < sum(ends.values()):  # fresh topics: offsets from 0, no gaps
            for records in (await consumer.getmany(timeout_ms=500)).values():
                values.extend(record.value or b"" for record in records)
        return values
    finally:
        await stop_consumer(consumer)


async def wait_committed(settings: Settings, group: str, suffix: str, timeout: float) -> None:
    """Until ``group`` has committed every record of the topic."""
    probe = OffsetProbe(settings)
    await probe.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            rows = await probe.lag(group, [topic_name(settings.topic_prefix, suffix)])
            if rows and all(row.lag == 0 for row in rows):
                return
            await asyncio.sleep(0.25)
    finally:
        await probe.stop()
    raise AssertionError(f"{group} did not get past every record of {suffix} in {timeout}s")


def decoded(values: list[bytes], kind: type[Message]) -> list[Any]:
    decoder = msgspec.json.Decoder(kind)
    return [decoder.decode(value) for value in values]


async def run_with_poison(
    stack: StackConfig,
    tmp_path: Path,
    stage: str,
    group: str,
    suffix: str,
    values: list[bytes],
    **extra: str,
) -> tuple[Settings, list[DeadLetterRecord]]:
    """Produce ``values`` (one partition, one batch), run ``stage`` as a process until
    it committed them all, and return the settings and the dead letters. The process must
    still run afterwards."""
    settings = isolated_settings(stack, poison_attempts="2", **extra)
    await create_topics(settings)
    await produce(settings, suffix, values, partition=0)
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    stages.start_one(stage)
    try:
        await wait_committed(settings, group, suffix, timeout=120)
        assert not stages.dead(), (tmp_path / "logs" / f"{stage}.log").read_text()[-3000:]
    finally:
        stages.stop()
    return settings, decoded(await read_topic(settings, DLQ), DeadLetterRecord)


def the_one_dead_letter(
    dead: list[DeadLetterRecord], reason: str, offset: int, attempts: int | None = None
) -> DeadLetterRecord:
    """The only dead letter; ``attempts``: it was tried that many times by the runtime's
    poison path (the edge's letters are written at once)."""
    assert [(d.reason, d.partition, d.offset) for d in dead] == [(reason, 0, offset)], dead
    if attempts is not None:
        assert f"after {attempts} attempts" in dead[0].detail, dead[0].detail
    return dead[0]


# -- the formerly poison inputs, now caught at the edge ------------------------------------


async def test_frontier_dead_letters_an_invalid_seed_at_the_edge(
    stack: StackConfig, tmp_path: Path
) -> None:
    seeds = [b"http://a.example/seed-1", POISON_URL.encode(), b"http://a.example/seed-2"]
    settings, dead = await run_with_poison(
        stack, tmp_path, "frontier", FRONTIER_GROUP, SEEDS, seeds
    )
    urls = sorted(d.url for d in decoded(await read_topic(settings, DISCOVERED), Discovered))
    assert urls == ["http://a.example/seed-1", "http://a.example/seed-2"]
    letter = the_one_dead_letter(dead, "invalid_host", 1)
    assert "attempts" not in letter.detail  # refused once, not retried as a poison record
    assert letter.payload == POISON_URL and letter.topic.endswith(SEEDS)


async def test_frontier_drops_a_link_with_an_invalid_host_and_keeps_the_page(
    stack: StackConfig, tmp_path: Path
) -> None:
    pages = [
        page(links=["http://a.example/1", "http://a.example/2"]),
        page(url="http://a.example/poison.html", links=["http://a.example/3", POISON_URL]),
        page(url="http://a.example/last.html", links=["http://a.example/4"]),
    ]
    settings, dead = await run_with_poison(
        stack, tmp_path, "frontier", FRONTIER_GROUP, PAGES, [encode(p) for p in pages]
    )
    urls = sorted(d.url for d in decoded(await read_topic(settings, DISCOVERED), Discovered))
    assert urls == [f"http://a.example/{n}" for n in (1, 2, 3, 4)]
    assert dead == []


async def test_dedup_dead_letters_an_unsplittable_candidate_at_the_edge(
    stack: StackConfig, tmp_path: Path
) -> None:
    candidates = [
        discovered("http://a.example/1"),
        discovered(CANONICAL_POISON, host="a.example"),
        discovered("http://a.example/2"),
        discovered("http://a.example/1"),  # a true duplicate, dropped
    ]
    settings, dead = await run_with_poison(
        stack, tmp_path, "dedup", DEDUP_GROUP, DISCOVERED, [encode(c) for c in candidates]
    )
    fetches = decoded(await read_topic(settings, FETCH), Fetch)
    assert sorted(f.url for f in fetches) == ["http://a.example/1", "http://a.example/2"]
    letter = the_one_dead_letter(dead, "invalid_url", 1)
    assert "Invalid IPv6 URL" in letter.detail and letter.stage == "dedup"


async def test_parser_caps_the_links_of_a_page_that_would_parse_over_the_topic_limit(
    stack: StackConfig, tmp_path: Path
) -> None:
    base = "http://a.example/" + "p" * 1990 + "/"
    links = "".join(f'<a href="?{n}">x</a>' for n in range(5000))
    bomb = f'<html><head><base href="{base}"></head><body>{links}</body></html>'.encode()
    good = b'<html><body><a href="/next">next</a></body></html>'
    records = [
        fetched(good, url="http://a.example/before", final_url="http://a.example/before"),
        fetched(bomb, url="http://a.example/bomb", final_url="http://a.example/bomb"),
        fetched(good, url="http://a.example/after", final_url="http://a.example/after"),
    ]
    assert len(zlib.compress(bomb)) < 20_000
    settings, dead = await run_with_poison(
        stack, tmp_path, "parser", PARSER_GROUP, FETCHED, [encode(r) for r in records]
    )
    assert dead == []
    values = await read_topic(settings, PAGES)
    assert all(len(value) <= MAX_OUTPUT_BYTES for value in values)
    by_url = {p.url: p for p in decoded(values, Page)}
    assert sorted(by_url) == [f"http://a.example/{n}" for n in ("after", "before", "bomb")]
    assert 0 < len(by_url["http://a.example/bomb"].links) < 5000  # capped, not dropped


async def test_fetcher_dead_letters_an_unsplittable_fetch_at_the_edge(
    stack: StackConfig, tmp_path: Path
) -> None:
    # Port 9 on 127.0.0.1 (allowed here) refuses connections: the good URLs' robots.txt
    # is unavailable, so they are processed into crawl.retry.
    good = [fetch("http://127.0.0.1:9/a"), fetch("http://127.0.0.1:9/b")]
    settings, dead = await run_with_poison(
        stack,
        tmp_path,
        "fetcher",
        FETCHER_GROUP,
        FETCH,
        [encode(good[0]), encode(fetch(CANONICAL_POISON)), encode(good[1])],
    )
    retries = decoded(await read_topic(settings, RETRY), Retry)
    assert sorted(r.url for r in retries) == ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    letter = the_one_dead_letter(dead, "invalid_url", 1)
    assert letter.stage == "fetcher" and "Invalid IPv6 URL" in letter.detail


async def test_sink_dead_letters_a_page_the_driver_cannot_encode(
    stack: StackConfig, tmp_path: Path
) -> None:
    pages = [
        page(url="http://a.example/before"),
        page(url="http://a.example/nul", meta={"a\x00b": 1}),
        page(url="http://a.example/after"),
    ]
    settings, dead = await run_with_poison(
        stack, tmp_path, "sink", SINK_GROUP, PAGES, [encode(p) for p in pages]
    )
    letter = the_one_dead_letter(dead, "rejected_by_database", 1)
    assert "NULL byte" in letter.detail
    assert await stored_ids(settings.mongo_uri, settings) == [
        "http://a.example/after",
        "http://a.example/before",
    ]


# -- the runtime's defence against a stage bug ---------------------------------------------


class StageBug(RuntimeError):
    """What the stages below raise for the one record they are given to fail on."""


BUG_URL = "http://a.example/bug"


def bug(url: str) -> StageBug:
    return StageBug(f"a bug in the stage for {url}")


async def run_in_process(
    stage: Stage, suffix: str, values: list[bytes]
) -> tuple[Settings, list[DeadLetterRecord]]:
    """Produce ``values`` (one partition, one batch) and run ``stage`` with the real runtime
    until its group committed them all; it must still be running then. Returns the stage's
    settings and the dead letters."""
    settings = stage.settings
    await create_topics(settings)
    await produce(settings, suffix, values, partition=0)
    stop = asyncio.Event()
    running = asyncio.create_task(run_stage(stage, stop), name=stage.name)
    try:
        await wait_committed(settings, stage.group, suffix, timeout=120)
        assert not running.done(), running.exception()
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=60)
    return settings, decoded(await read_topic(settings, DLQ), DeadLetterRecord)


def poison_settings(stack: StackConfig) -> Settings:
    return isolated_settings(stack, poison_attempts="2")


def the_bug_letter(dead: list[DeadLetterRecord], stage: str, offset: int) -> DeadLetterRecord:
    letter = the_one_dead_letter(dead, "raised_stage_bug", offset, attempts=2)
    assert letter.stage == stage
    assert f"StageBug after 2 attempts: a bug in the stage for {BUG_URL}" in letter.detail
    return letter


class FrontierBuggyOnOnePage(FrontierStage):
    """Raises on the page ``BUG_URL`` after deciding its links (so they are in the batch's
    memory of sent links when it raises)."""

    def _from_page(self, item: Received[Page], recent: RecentBatch) -> list[Output]:
        outputs = super()._from_page(item, recent)
        if item.message.url == BUG_URL:
            raise bug(item.message.url)
        return outputs


async def test_runtime_defends_against_a_frontier_bug_and_loses_no_link_of_the_batch(
    stack: StackConfig,
) -> None:
    # One batch: links 1 and 2, then the bug page's link 3, are decided before it raises.
    # Run again record by record, the first page's links must still go out (they never
    # did), and the last page's link 3 too: the bug page's links were never sent.
    pages = [
        page(links=["http://a.example/1", "http://a.example/2"]),
        page(url=BUG_URL, links=["http://a.example/3"]),
        page(url="http://a.example/last.html", links=["http://a.example/3", "http://a.example/4"]),
    ]
    stage = FrontierBuggyOnOnePage(poison_settings(stack))
    assert stage.settings.frontier_recent_urls > 0  # the memory this test is about
    settings, dead = await run_in_process(stage, PAGES, [encode(p) for p in pages])
    urls = sorted(d.url for d in decoded(await read_topic(settings, DISCOVERED), Discovered))
    assert urls == [f"http://a.example/{n}" for n in (1, 2, 3, 4)]
    the_bug_letter(dead, "frontier", 1)


class BatchAdmissionBuggyOnOneURL(BatchAdmission):
    def decide(self, partition: int, crawl_id: str, url: str, *limits: int) -> str | None:
        verdict = super().decide(partition, crawl_id, url, *limits)
        if url == BUG_URL:
            raise bug(url)
        return verdict


class AdmissionBuggyOnOneURL(Admission):
    def batch(self) -> BatchAdmission:
        return BatchAdmissionBuggyOnOneURL(self)


class DedupBuggyOnOneURL(DedupStage):
    """Raises while admitting ``BUG_URL``, after it (and the batch's URLs before it) were
    taken into the batch's admissions."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.admission = AdmissionBuggyOnOneURL()


async def test_runtime_defends_against_a_dedup_bug_and_loses_no_url_of_the_batch(
    stack: StackConfig,
) -> None:
    # /1 is admitted in the failed batch before the bug record: run again record by record
    # it must not count as a duplicate; its true duplicate at the end still does.
    candidates = [
        discovered("http://a.example/1"),
        discovered(BUG_URL),
        discovered("http://a.example/2"),
        discovered("http://a.example/1"),
    ]
    stage = DedupBuggyOnOneURL(poison_settings(stack))
    settings, dead = await run_in_process(stage, DISCOVERED, [encode(c) for c in candidates])
    fetches = decoded(await read_topic(settings, FETCH), Fetch)
    assert sorted(f.url for f in fetches) == ["http://a.example/1", "http://a.example/2"]
    the_bug_letter(dead, "dedup", 1)


class ParserBuggyOnOnePage(ParserStage):
    async def process(self, batch: list[Received[Any]]) -> list[Output]:
        outputs = await super().process(batch)
        for item in batch:
            if item.message.url == BUG_URL:
                raise bug(item.message.url)
        return outputs


async def test_runtime_defends_against_a_parser_bug(stack: StackConfig) -> None:
    body = b'<html><body><a href="/next">next</a></body></html>'
    records = [
        fetched(body, url=url, final_url=url)
        for url in ("http://a.example/before", BUG_URL, "http://a.example/after")
    ]
    stage = ParserBuggyOnOnePage(poison_settings(stack))
    settings, dead = await run_in_process(stage, FETCHED, [encode(r) for r in records])
    pages = decoded(await read_topic(settings, PAGES), Page)
    assert sorted(p.url for p in pages) == ["http://a.example/after", "http://a.example/before"]
    the_bug_letter(dead, "parser", 1)


class FetcherBuggyOnOneURL(FetcherStage):
    def admit(self, item: Received[Any]) -> None:
        if item.message.url == BUG_URL:
            raise bug(item.message.url)
        super().admit(item)


async def test_runtime_defends_against_a_fetcher_admit_bug(stack: StackConfig) -> None:
    # Port 9 on 127.0.0.1 (allowed here) refuses connections: the good URLs' robots.txt
    # is unavailable, so they are processed into crawl.retry.
    requests = [fetch("http://127.0.0.1:9/a"), fetch(BUG_URL), fetch("http://127.0.0.1:9/b")]
    stage = FetcherBuggyOnOneURL(poison_settings(stack))
    settings, dead = await run_in_process(stage, FETCH, [encode(r) for r in requests])
    retries = decoded(await read_topic(settings, RETRY), Retry)
    assert sorted(r.url for r in retries) == ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    # admit is tried poison_attempts times, not "after N attempts" of a spawned task.
    letter = the_one_dead_letter(dead, "raised_stage_bug", 1)
    assert letter.stage == "fetcher" and f"a bug in the stage for {BUG_URL}" in letter.detail


class SinkBuggyOnOnePage(SinkStage):
    """Its write raises for a batch that holds ``BUG_URL`` (after storing nothing)."""

    async def _store(self, documents: list[dict[str, Any]]) -> dict[int, str]:
        if any(document["_id"] == BUG_URL for document in documents):
            raise bug(BUG_URL)
        return await super()._store(documents)


async def test_runtime_defends_against_a_sink_write_bug(stack: StackConfig) -> None:
    pages = [
        page(url=url) for url in ("http://a.example/before", BUG_URL, "http://a.example/after")
    ]
    stage = SinkBuggyOnOnePage(poison_settings(stack))
    settings, dead = await run_in_process(stage, PAGES, [encode(p) for p in pages])
    the_bug_letter(dead, "sink", 1)
    assert await stored_ids(settings.mongo_uri, settings) == [
        "http://a.example/after",
        "http://a.example/before",
    ]


class PrivateFerretDB:
    """A FerretDB of this test's own (the session's one must stay up), to be stopped
    and started again on the same port and data."""

    def __init__(self, stack: StackConfig, data: Path) -> None:
        self.binary = ensure_ferretdb(stack.cache_dir)
        self.data = data
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        for sub in ("data", "state"):
            (self.data / sub).mkdir(parents=True, exist_ok=True)
        with open(self.data / "ferretdb.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.binary),
                    "--handler=sqlite",
                    f"--sqlite-url=file:{self.data / 'data'}/",
                    f"--listen-addr=127.0.0.1:{self.port}",
                    f"--state-dir={self.data / 'state'}",
                    "--telemetry=disable",
                    "--debug-addr=-",
                    "--log-level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while not mongo_answers(self.uri, 2.0):
            assert time.monotonic() < deadline, "the private FerretDB did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # as a crash or a lost network would
            self.process.wait()


async def stored_ids(uri: str, settings: Settings) -> list[str]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        return sorted([doc["_id"] async for doc in collection.find({})])
    finally:
        await client.close()


async def test_sink_waits_out_a_database_outage_and_dead_letters_nothing(
    stack: StackConfig, tmp_path: Path
) -> None:
    database = PrivateFerretDB(stack, tmp_path / "ferretdb")
    database.start()
    settings = isolated_settings(stack, mongo_uri=database.uri, poison_attempts="1")
    await create_topics(settings)
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    stages.start_one("sink")
    try:
        before = [page(url=f"http://a.example/before-{n}") for n in range(3)]
        await produce(settings, PAGES, [encode(p) for p in before], partition=0)
        await wait_committed(settings, SINK_GROUP, PAGES, timeout=90)
        database.stop()
        during = [page(url=f"http://a.example/during-{n}") for n in range(3)]
        await produce(settings, PAGES, [encode(p) for p in during], partition=0)
        # Longer than the sink's 10 s server selection timeout: its writes fail with
        # ServerSelectionTimeoutError (or AutoReconnect), an outage, not a poison record.
        await asyncio.sleep(14)
        assert not stages.dead()
        database.start()
        await wait_committed(settings, SINK_GROUP, PAGES, timeout=90)
        assert not stages.dead()
    finally:
        stages.stop()
        database.stop()
    database.start()
    try:
        assert await stored_ids(database.uri, settings) == sorted(p.url for p in before + during)
    finally:
        database.stop()
    assert await read_topic(settings, DLQ) == []
    log = (tmp_path / "logs" / "sink.log").read_text()
    assert "outage" in log and "dead letter" not in log
