"""No poison record blocks a partition, against a real broker (and the real FerretDB for
the sink): for each stage a record that makes its step raise goes to crawl.dlq with the
error, the good records around it are processed, the stage process keeps running and the
partition's committed offset moves past it.

The inputs are real, not injected failures. One URL, ``POISON_URL``, makes the URL code
raise: w3lib canonicalises it to ``http://%E2%80%8B0user:pass@%E3%80%82[::1`` (an
unbalanced ``[`` in the host), which ``urlsplit`` refuses. The parser is fed a page whose
5,000 links each resolve against a 2,000-character ``<base>``: a 106 KB body that parses
into a 10 MB page, over the topic's limit. The sink gets a page whose ``meta`` has a key
with a NUL byte, which BSON cannot encode.
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
from streamcrawl.localstack.provision import ensure_ferretdb
from streamcrawl.localstack.stack import StackConfig, mongo_answers

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


def the_one_dead_letter(dead: list[DeadLetterRecord], reason: str, offset: int) -> DeadLetterRecord:
    assert [(d.reason, d.partition, d.offset) for d in dead] == [(reason, 0, offset)], dead
    assert "after 2 attempts" in dead[0].detail
    return dead[0]


async def test_frontier_dead_letters_a_poison_seed(stack: StackConfig, tmp_path: Path) -> None:
    seeds = [b"http://a.example/seed-1", POISON_URL.encode(), b"http://a.example/seed-2"]
    settings, dead = await run_with_poison(
        stack, tmp_path, "frontier", FRONTIER_GROUP, SEEDS, seeds
    )
    urls = sorted(d.url for d in decoded(await read_topic(settings, DISCOVERED), Discovered))
    assert urls == ["http://a.example/seed-1", "http://a.example/seed-2"]
    letter = the_one_dead_letter(dead, "raised_value_error", 1)
    assert "builtins.ValueError after 2 attempts: Invalid IPv6 URL" in letter.detail
    assert letter.payload == POISON_URL and letter.topic.endswith(SEEDS)


async def test_frontier_dead_letters_a_poison_page_and_loses_no_link_before_it(
    stack: StackConfig, tmp_path: Path
) -> None:
    # One batch: the first page's links are marked as sent while the batch runs; the batch
    # raises on the second page and is run again record by record: the first page's links
    # must still go out (they never did), and the poison page must raise again (its
    # first link must not have been marked either), so it reaches the DLQ.
    pages = [
        page(links=["http://a.example/1", "http://a.example/2"]),
        page(url="http://a.example/poison.html", links=["http://a.example/3", POISON_URL]),
        page(url="http://a.example/last.html", links=["http://a.example/4"]),
    ]
    settings, dead = await run_with_poison(
        stack, tmp_path, "frontier", FRONTIER_GROUP, PAGES, [encode(p) for p in pages]
    )
    urls = sorted(d.url for d in decoded(await read_topic(settings, DISCOVERED), Discovered))
    assert urls == ["http://a.example/1", "http://a.example/2", "http://a.example/4"]
    letter = the_one_dead_letter(dead, "raised_value_error", 1)
    assert "Invalid IPv6 URL" in letter.detail and "poison.html" in letter.payload


async def test_dedup_dead_letters_a_poison_candidate_and_loses_nothing_around_it(
    stack: StackConfig, tmp_path: Path
) -> None:
    # Before the poison record the batch admits /1 into the partition's Bloom filter; the
    # batch is run again record by record and /1 must not then count as a duplicate.
    candidates = [
        discovered("http://a.example/1"),
        discovered(CANONICAL_POISON, host="a.example"),
        discovered("http://a.example/2"),
        discovered("http://a.example/1"),  # a true duplicate, still dropped
    ]
    settings, dead = await run_with_poison(
        stack, tmp_path, "dedup", DEDUP_GROUP, DISCOVERED, [encode(c) for c in candidates]
    )
    fetches = decoded(await read_topic(settings, FETCH), Fetch)
    assert sorted(f.url for f in fetches) == ["http://a.example/1", "http://a.example/2"]
    letter = the_one_dead_letter(dead, "raised_value_error", 1)
    assert "Invalid IPv6 URL" in letter.detail and letter.stage == "dedup"


async def test_parser_dead_letters_a_page_that_parses_over_the_topic_limit(
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
    pages = decoded(await read_topic(settings, PAGES), Page)
    assert sorted(p.url for p in pages) == ["http://a.example/after", "http://a.example/before"]
    letter = the_one_dead_letter(dead, "raised_output_too_large", 1)
    assert "crawl.pages message of" in letter.detail or "pages message of" in letter.detail


async def test_fetcher_dead_letters_a_fetch_it_cannot_admit(
    stack: StackConfig, tmp_path: Path
) -> None:
    # Port 9 on 127.0.0.1 (allowed here) refuses connections: the good URLs' robots.txt
    # is unavailable, so they are processed into crawl.retry.
    good = [fetch("http://127.0.0.1:9/a"), fetch("http://127.0.0.1:9/b")]
    poison = fetch(CANONICAL_POISON)
    settings, dead = await run_with_poison(
        stack,
        tmp_path,
        "fetcher",
        FETCHER_GROUP,
        FETCH,
        [encode(good[0]), encode(poison), encode(good[1])],
    )
    retries = decoded(await read_topic(settings, RETRY), Retry)
    assert sorted(r.url for r in retries) == ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]
    letter = the_one_dead_letter(dead, "raised_value_error", 1)
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
    letter = the_one_dead_letter(dead, "raised_invalid_document", 1)
    assert "NULL byte" in letter.detail
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        stored = sorted([doc["_id"] async for doc in collection.find({})])
    finally:
        await client.close()
    assert stored == ["http://a.example/after", "http://a.example/before"]


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
