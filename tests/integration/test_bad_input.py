"""Bad input on every topic, against the real broker and database.

For each topic, a corpus of records a faulty producer could write (``tests/support/
bad_input.py``) is produced between good records, mostly with kcat as a user would, and
the stages reading the topic run on it (the runtime's ``run_stage``, as ``streamcrawl run``
runs them). Then: each bad record is one dead letter in crawl.dlq naming its offset, with
the expected reason (and, past the size a dead letter may hold, a cut payload saying so);
every good and every valid-but-unusual record came out downstream; the frontier counted
each URL it left out; every stage is still running; and every group committed past the
end of the corpus.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import create_topics, group_lag, make_admin, stop_consumer
from streamcrawl.core.messages import DeadLetterRecord, decoder
from streamcrawl.core.runtime import MAX_DLQ_PAYLOAD, Stage, run_stage
from streamcrawl.core.topics import TOPIC_SPECS
from streamcrawl.crawl.local import free_port
from streamcrawl.localstack.stack import StackConfig
from streamcrawl.registry import stage_class

from ..conftest import KCAT, isolated_settings
from ..support.bad_input import READERS, Case, corpus, good_value, message, to_json

pytestmark = pytest.mark.integration

# What each stage writes, by topic suffix (the sink writes MongoDB).
WRITES = {
    "frontier": ("discovered",),
    "dedup": ("fetch",),
    "fetcher": ("fetched", "retry"),
    "delay": ("fetch",),
    "parser": ("pages",),
    "sink": (),
}
GOOD = 3  # good records before and after each corpus
STOP_TIMEOUT = 60.0  # a stage drains and stops within this after stop is set
DEADLINE = 300.0  # seconds for the stages to work through a corpus on a busy 2-core machine

_letters = decoder(DeadLetterRecord)


async def max_message_bytes(settings: Settings, topic: str) -> int:
    """The topic's effective max.message.bytes (its own, or the broker's default)."""
    admin = make_admin(settings)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})]
        )
    finally:
        await admin.close()
    ((_, _, _, _, entries),) = response.resources
    (entry,) = [entry for entry in entries if entry[0] == "max.message.bytes"]
    return int(entry[1])


def kcat_produce(bootstrap: str, topic: str, values: list[bytes], directory: Path) -> None:
    """Each value as one record on partition 0, in order: kcat sends each file given as
    one message."""
    assert KCAT is not None
    files = []
    for n, value in enumerate(values):
        path = directory / f"{n:04d}.msg"
        path.write_bytes(value)
        files.append(str(path))
    subprocess.run(
        [KCAT, "-P", "-b", bootstrap, "-t", topic, "-p", "0", *files],
        check=True,
        timeout=120,
        capture_output=True,
    )


async def produce(
    settings: Settings, topic: str, cases: list[Case], limit: int, directory: Path
) -> None:
    """The cases in order on partition 0: runs of kcat-able ones through kcat, the others
    (null values, keys, records past kcat's limit) through aiokafka, uncompressed so a
    near-limit record is near the limit on the wire too."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        max_request_size=limit,
        max_batch_size=limit,
        acks="all",
        enable_idempotence=True,
    )
    await producer.start()
    try:
        run: list[bytes] = []
        for case in cases:
            if case.kcat:
                assert case.value is not None
                run.append(case.value)
                continue
            if run:
                kcat_produce(settings.kafka_bootstrap, topic, run, directory)
                run = []
            await producer.send_and_wait(topic, case.value, key=case.key, partition=0)
        if run:
            kcat_produce(settings.kafka_bootstrap, topic, run, directory)
    finally:
        await producer.stop()


class Tail:
    """Reads a topic (every partition) from the beginning, a little more at each poll."""

    def __init__(self, settings: Settings, suffix: str) -> None:
        (spec,) = [spec for spec in TOPIC_SPECS if spec.suffix == suffix]
        self.partitions = [
            TopicPartition(settings.topic_prefix + suffix, p) for p in range(spec.partitions)
        ]
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            max_partition_fetch_bytes=32 * 1024 * 1024,
            fetch_max_bytes=64 * 1024 * 1024,
            auto_offset_reset="earliest",
        )
        self.records: list[Any] = []

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.assign(self.partitions)
        await self.consumer.seek_to_beginning(*self.partitions)

    async def stop(self) -> None:
        await stop_consumer(self.consumer)

    async def poll(self) -> list[Any]:
        """Every record up to the current end of each partition."""
        ends = await self.consumer.end_offsets(self.partitions)
        while any([await self.consumer.position(tp) < end for tp, end in ends.items()]):
            for batch in (await self.consumer.getmany(timeout_ms=500)).values():
                self.records.extend(batch)
        return self.records


async def read_all(settings: Settings, suffix: str) -> list[Any]:
    tail = Tail(settings, suffix)
    await tail.start()
    try:
        return await tail.poll()
    finally:
        await tail.stop()


def urls_of(records: list[Any]) -> Counter[str]:
    return Counter(msgspec.json.decode(record.value)["url"] for record in records)


async def stored_ids(settings: Settings) -> set[str]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        return {doc["_id"] async for doc in collection.find({}, {"_id": 1})}
    finally:
        await client.close()


def filtered_counts(stage: str) -> dict[str, float]:
    counts: dict[str, float] = defaultdict(float)
    for metric in REGISTRY.collect():
        if metric.name != "streamcrawl_urls_filtered":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["stage"] == stage:
                counts[sample.labels["reason"]] += sample.value
    return counts


@contextlib.asynccontextmanager
async def page_server() -> AsyncIterator[str]:
    """A real HTTP server for the fetcher's good records: every path is a small page,
    /robots.txt is missing (allow all)."""

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/robots.txt":
            return web.Response(status=404)
        return web.Response(
            text=f"<html><title>{request.path}</title></html>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class Observed:
    """What the stages made of the corpus so far."""

    def __init__(self, settings: Settings, topic: str, stages: tuple[str, ...]) -> None:
        self.settings = settings
        self.topic = settings.topic_prefix + topic
        self.stages = stages
        self.dlq = Tail(settings, "dlq")
        written = sorted({suffix for stage in stages for suffix in WRITES[stage]})
        self.written = [Tail(settings, suffix) for suffix in written]
        self.letters: dict[tuple[str, int], DeadLetterRecord] = {}
        self.other_letters: list[DeadLetterRecord] = []
        self.outputs: Counter[str] = Counter()
        self.lag: dict[str, int] = {}

    async def start(self) -> None:
        for tail in (self.dlq, *self.written):
            await tail.start()

    async def stop(self) -> None:
        for tail in (self.dlq, *self.written):
            await tail.stop()

    async def refresh(self) -> None:
        self.letters, self.other_letters = {}, []
        for record in await self.dlq.poll():
            letter = _letters.decode(record.value)
            if letter.topic == self.topic and letter.offset is not None:
                assert (letter.stage, letter.offset) not in self.letters, letter
                self.letters[(letter.stage, letter.offset)] = letter
            else:
                self.other_letters.append(letter)
        self.outputs = Counter()
        for tail in self.written:
            self.outputs.update(urls_of(await tail.poll()))
        if "sink" in self.stages:
            self.outputs.update(await stored_ids(self.settings))
        for stage in self.stages:
            rows = await group_lag(self.settings, stage_class(stage).group, [self.topic])
            self.lag[stage] = sum(row.lag for row in rows)

    def missing(self, cases: list[Case]) -> list[str]:
        """What is still to come, in words (empty when everything expected happened)."""
        gaps = []
        for offset, case in enumerate(cases):
            for stage in self.stages:
                if stage in case.dlq and (stage, offset) not in self.letters:
                    gaps.append(f"{stage}: no dead letter for {case.name!r} @{offset}")
            gaps.extend(
                f"no output {url!r} ({case.name})"
                for url in case.outputs
                if url not in self.outputs
            )
        gaps.extend(f"{stage}: lag {lag}" for stage, lag in self.lag.items() if lag)
        return gaps


async def run_corpus(
    settings: Settings,
    topic: str,
    cases: list[Case],
    tmp_path: Path,
    extra: tuple[str, ...] = (),
    extra_outputs: tuple[str, ...] = (),
) -> tuple[Observed, list[Stage]]:
    """Produce ``cases`` on ``topic``, run its readers (and ``extra`` stages) until
    everything expected happened (``extra_outputs`` included), and return what was
    observed."""
    name = settings.topic_prefix + topic
    await produce(settings, name, cases, await max_message_bytes(settings, name), tmp_path)
    # The topic holds exactly the corpus, in order: offset n is case n.
    produced = await read_all(settings, topic)
    assert [(r.offset, r.value) for r in produced] == [(n, c.value) for n, c in enumerate(cases)]

    stop = asyncio.Event()
    stages = [stage_class(stage)(settings) for stage in (*READERS[topic], *extra)]
    tasks = [asyncio.create_task(run_stage(stage, stop), name=stage.name) for stage in stages]
    observed = Observed(settings, topic, READERS[topic])
    await observed.start()
    deadline = time.monotonic() + DEADLINE
    try:
        while True:
            await asyncio.sleep(2.0)
            crashed = [task for task in tasks if task.done()]
            assert not crashed, (
                f"stages stopped: {[(t.get_name(), t.exception()) for t in crashed]}"
            )
            await observed.refresh()
            gaps = observed.missing(cases)
            gaps += [f"no output {url!r}" for url in extra_outputs if url not in observed.outputs]
            if not gaps or time.monotonic() > deadline:
                break
        assert not gaps, gaps
        # Still running after the whole corpus: no stage stopped or restarted.
        assert all(not task.done() for task in tasks)
    finally:
        stop.set()
        # A stage stuck on a record (publishing a letter that can never land, say) would
        # not stop either: it is cancelled, and that is a failure of its own.
        _, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        for task in stuck:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await observed.stop()
    assert not stuck, f"stages that did not stop: {[task.get_name() for task in stuck]}"
    assert [r for r in results if r is not None] == [], results
    return observed, stages


def check_letters(observed: Observed, cases: list[Case]) -> None:
    """Each bad record is exactly one dead letter per stage that refuses it, with the
    expected reason and its payload (cut, and said to be, past MAX_DLQ_PAYLOAD); no good
    record has one."""
    expected = {
        (stage, offset): (case, reason)
        for offset, case in enumerate(cases)
        for stage, reason in case.dlq.items()
    }
    assert set(observed.letters) == set(expected), sorted(set(observed.letters) ^ set(expected))
    for key, letter in observed.letters.items():
        case, reason = expected[key]
        assert letter.reason == reason, (case.name, letter.reason, letter.detail)
        assert letter.detail, case.name
        value = case.value or b""
        kept = value[:MAX_DLQ_PAYLOAD]
        payload = (
            letter.payload.encode()
            if letter.payload_encoding == "utf-8"
            else msgspec.json.decode(to_json(letter.payload), type=bytes)
        )
        if len(value) > MAX_DLQ_PAYLOAD:
            # A multi-byte character the cut split may be left out of a utf-8 payload.
            assert kept.startswith(payload) and len(kept) - len(payload) < 4, case.name
        else:
            assert payload == value, case.name
        assert letter.payload_truncated == (len(value) > MAX_DLQ_PAYLOAD), case.name
        if letter.payload_truncated:
            assert letter.payload_bytes == len(value)


def good(topic: str, base: str, label: str) -> list[Case]:
    urls = [f"{base}/good-{label}-{n}" for n in range(GOOD)]
    return [
        Case(f"good {label} {n}", good_value(topic, url), outputs=(url,))
        for n, url in enumerate(urls)
    ]


@pytest.mark.parametrize("topic", ["seeds", "discovered", "retry", "fetched"])
async def test_bad_input_is_dead_lettered_and_the_rest_processed(
    stack: StackConfig, topic: str, tmp_path: Path
) -> None:
    settings = isolated_settings(stack)
    await create_topics(settings)
    name = settings.topic_prefix + topic
    base = "http://good.example"
    cases = (
        good(topic, base, "before")
        + corpus(topic, await max_message_bytes(settings, name), base)
        + good(topic, base, "after")
    )
    observed, _ = await run_corpus(settings, topic, cases, tmp_path)
    check_letters(observed, cases)
    assert observed.other_letters == []


async def test_bad_input_on_crawl_fetch(stack: StackConfig, tmp_path: Path) -> None:
    """The fetcher on crawl.fetch, with dedup beside it: dedup rebuilds its filters from
    crawl.fetch (the corpus included) when it starts, and must still know the good URLs."""
    settings = isolated_settings(stack, crawl_delay="0")
    await create_topics(settings)
    name = settings.topic_prefix + "fetch"
    async with page_server() as base:
        cases = (
            good("fetch", base, "before")
            + corpus("fetch", await max_message_bytes(settings, name), base)
            + good("fetch", base, "after")
        )
        # Dedup: one URL crawl.fetch already holds (must not come again), one new one.
        known, new = f"{base}/good-before-0", f"{base}/dedup-new"
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
        await producer.start()
        try:
            for url in (known, new):
                await producer.send_and_wait(
                    settings.topic_prefix + "discovered",
                    to_json(message("discovered", url)),
                    partition=0,
                )
        finally:
            await producer.stop()
        observed, _ = await run_corpus(
            settings, "fetch", cases, tmp_path, extra=("dedup",), extra_outputs=(new,)
        )
    check_letters(observed, cases)
    assert observed.other_letters == []
    # Dedup wrote the new URL once, and not the one its rebuilt filter knew from the corpus.
    admitted = [r for r in await read_all(settings, "fetch") if r.offset >= len(cases)]
    assert urls_of(admitted) == Counter([new])


async def test_bad_input_on_crawl_pages(stack: StackConfig, tmp_path: Path) -> None:
    """crawl.pages has two readers, the frontier and the sink: each gives its own verdict."""
    settings = isolated_settings(stack)
    await create_topics(settings)
    name = settings.topic_prefix + "pages"
    base = "http://good.example"
    cases = (
        good("pages", base, "before")
        + corpus("pages", await max_message_bytes(settings, name), base)
        + good("pages", base, "after")
    )
    before = filtered_counts("frontier")
    observed, _ = await run_corpus(settings, "pages", cases, tmp_path)
    check_letters(observed, cases)
    after = filtered_counts("frontier")
    expected: Counter[str] = Counter()
    for case in cases:
        expected.update(case.filtered)
    assert {
        r: after[r] - before.get(r, 0.0) for r in after if after[r] != before.get(r, 0.0)
    } == dict(expected)
