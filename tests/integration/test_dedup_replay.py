"""Dedup's start-up on a real broker: rebuilding a partition's filter from crawl.fetch, and
admitting nothing twice while a rebuild is in progress.

The duplicates seen in benchmarks (a URL fetched twice with no fault, in runs where one
dedup partition was rebuilt twice during start-up) came from a race: the assignment
callback was still replaying partition p when the first batch for p arrived; the batch
path started a second replay, admitted URLs into that filter, and then the first replay
finished and replaced it with a filter that had never seen them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import create_topics, make_producer, stop_consumer
from streamcrawl.core.messages import Discovered, Scope, encode, fetch_from
from streamcrawl.core.runtime import Output, Received, run_stage
from streamcrawl.core.topics import DEDUP_GROUP, group_id
from streamcrawl.dedup.service import DedupStage
from streamcrawl.localstack.stack import StackConfig

from ..conftest import isolated_settings

pytestmark = pytest.mark.integration

SCOPE = Scope(allow_domains=["example.com"], max_depth=5)
HISTORY = 20_000  # enough crawl.fetch records that a replay takes a while


def candidate(path: str, crawl_id: str = "replay-test") -> Discovered:
    return Discovered(
        url=f"http://example.com/{path}",
        host="example.com",
        crawl_id=crawl_id,
        depth=1,
        priority=5,
        scope=SCOPE,
        discovered_at=1.0,
    )


def to_fetch(outputs: list[Output]) -> list[Output]:
    """The outputs on crawl.fetch (dedup also sends its counts to crawl.events)."""
    return [out for out in outputs if not out.topic.endswith("events")]


def received(settings: Settings, message: Discovered, offset: int) -> Received[Discovered]:
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic=settings.topic_prefix + "discovered",
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"example.com",
        value=encode(message),
        checksum=None,
        serialized_key_size=11,
        serialized_value_size=0,
        headers=(),
    )
    return Received(record, message)


async def fill_history(settings: Settings, count: int) -> None:
    producer = make_producer(settings, linger_ms=50)
    await producer.start()
    try:
        topic = settings.topic_prefix + "fetch"
        batch = []
        for n in range(count):
            value = encode(fetch_from(candidate(f"old/{n}", "earlier-crawl"), 2.0))
            batch.append(await producer.send(topic, value, key=b"example.com", partition=0))
        await asyncio.gather(*batch)
    finally:
        await producer.stop()


async def test_a_batch_during_the_assignment_replay_is_not_admitted_twice(
    stack: StackConfig,
) -> None:
    settings = isolated_settings(stack)
    await create_topics(settings)
    await fill_history(settings, HISTORY)
    stage = DedupStage(settings)
    await stage.start()
    partition = TopicPartition(settings.topic_prefix + "discovered", 0)

    await stage.on_assigned([partition])  # starts the rebuild beside the group's callbacks
    rebuilding = asyncio.create_task(stage.rebuilt())
    await asyncio.sleep(0.05)
    assert not rebuilding.done(), "the replay should still be running"
    first = to_fetch(await stage.process([received(settings, candidate("new"), 0)]))
    await rebuilding
    again = to_fetch(await stage.process([received(settings, candidate("new"), 1)]))
    await stage.stop()
    assert stage.replayed_records == HISTORY, "partition 0 was rebuilt more than once"

    assert [out.value.url for out in first] == ["http://example.com/new"]
    assert again == [], "a URL admitted during the replay was admitted a second time"
    # The history was rebuilt too: an earlier crawl's URL is known under its crawl id.
    old = candidate("old/7", "earlier-crawl")
    assert to_fetch(await stage.process([received(settings, old, 2)])) == []


async def produce_candidates(settings: Settings, messages: list[Discovered]) -> None:
    producer = make_producer(settings, linger_ms=20)
    await producer.start()
    try:
        topic = settings.topic_prefix + "discovered"
        sent = [
            await producer.send(topic, encode(message), key=message.host.encode())
            for message in messages
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def admitted_urls(settings: Settings, expected: int, timeout: float) -> list[str]:
    """Every URL on crawl.fetch, once at least ``expected`` arrived and a second passed."""
    consumer = AIOKafkaConsumer(
        settings.topic_prefix + "fetch",
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    urls: list[str] = []
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            got = [record for batch in batches.values() for record in batch]
            urls.extend(_url_decoder.decode(record.value).url for record in got)
            if got:
                quiet_since = time.monotonic()
            elif len(urls) >= expected and time.monotonic() - quiet_since > 3:
                break
    finally:
        await stop_consumer(consumer)
    return urls


class _Url(msgspec.Struct):
    url: str


_url_decoder = msgspec.json.Decoder(_Url)


class SlowDedup(DedupStage):
    """Dedup whose batches take a while after deciding (as when decoding cost 69% of its
    CPU), so rebalances land while a batch is in flight."""

    async def process(self, batch: list[Received[Any]]) -> list[Output]:
        outputs = await super().process(batch)
        await asyncio.sleep(0.25)
        return outputs


async def test_rebalances_during_a_crawl_admit_no_url_twice(stack: StackConfig) -> None:
    """Other members join and leave dedup's group while it works through a backlog in
    which every URL comes three times: crawl.fetch must hold each URL exactly once."""
    settings = isolated_settings(stack, batch_size="200")
    await create_topics(settings)
    hosts = [f"h{n}.example" for n in range(40)]
    urls = [f"http://{hosts[n % 40]}/p/{n}" for n in range(3000)]
    messages = [
        Discovered(
            url=url,
            host=url.split("/")[2],
            crawl_id="storm",
            depth=1,
            priority=5,
            scope=Scope(allow_domains=hosts, max_depth=5),
            discovered_at=1.0,
        )
        for url in urls * 3
    ]
    await produce_candidates(settings, messages)
    stop = asyncio.Event()
    running = asyncio.create_task(run_stage(SlowDedup(settings), stop))
    try:
        for _ in range(6):
            await asyncio.sleep(0.7)
            intruder = AIOKafkaConsumer(
                settings.topic_prefix + "discovered",
                bootstrap_servers=settings.kafka_bootstrap,
                group_id=group_id(settings.topic_prefix, DEDUP_GROUP),
                enable_auto_commit=False,
                session_timeout_ms=10000,
            )
            await intruder.start()
            await intruder.getmany(timeout_ms=1000)  # joins: the group rebalances
            await stop_consumer(intruder)  # leaves: it rebalances again
        admitted = await admitted_urls(settings, len(urls), timeout=120)
    finally:
        stop.set()
        await running
    twice = {url: count for url, count in Counter(admitted).items() if count > 1}
    assert not twice, f"{len(twice)} URLs admitted more than once, e.g. {list(twice)[:3]}"
    assert set(admitted) == set(urls)


async def test_a_restart_replays_only_what_came_after_its_snapshot(
    stack: StackConfig, tmp_path: Path
) -> None:
    settings = isolated_settings(stack, state_dir=str(tmp_path))
    await create_topics(settings)
    await fill_history(settings, 5000)
    partition = TopicPartition(settings.topic_prefix + "discovered", 0)

    first = DedupStage(settings)
    await first.start()
    await first.on_assigned([partition])
    await first.rebuilt()
    assert first.replayed_records == 5000
    outputs = await first.process([received(settings, candidate("a"), 0)])
    await produce_outputs(settings, outputs)  # what the runtime does after process()
    await first.on_revoked([partition])  # snapshot: 5,001 records covered
    await first.stop()
    assert (tmp_path / f"{settings.topic_prefix}fetch-0.dedup").is_file()

    # Another dedup owned the partition meanwhile and admitted two more URLs.
    await fill_tail(settings, ["b", "c"])

    second = DedupStage(settings)
    await second.start()
    await second.on_assigned([partition])
    await second.rebuilt()
    try:
        assert second.replayed_records == 2, "only the records after the snapshot"
        for n, path in enumerate(["a", "b", "c"]):
            assert (
                to_fetch(await second.process([received(settings, candidate(path), 10 + n)])) == []
            )
        old = candidate("old/4999", "earlier-crawl")
        assert to_fetch(await second.process([received(settings, old, 20)])) == []
        fresh = to_fetch(await second.process([received(settings, candidate("d"), 21)]))
        assert [out.value.url for out in fresh] == ["http://example.com/d"]
    finally:
        await second.stop()


async def test_an_unreadable_snapshot_means_a_full_replay(
    stack: StackConfig, tmp_path: Path
) -> None:
    settings = isolated_settings(stack, state_dir=str(tmp_path))
    await create_topics(settings)
    await fill_history(settings, 300)
    (tmp_path / f"{settings.topic_prefix}fetch-0.dedup").write_bytes(b"half a file")
    stage = DedupStage(settings)
    await stage.start()
    try:
        await stage.on_assigned([TopicPartition(settings.topic_prefix + "discovered", 0)])
        await stage.rebuilt()
        assert stage.replayed_records == 300
        old = candidate("old/299", "earlier-crawl")
        assert to_fetch(await stage.process([received(settings, old, 0)])) == []
    finally:
        await stage.stop()


async def produce_outputs(settings: Settings, outputs: list[Output]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for out in outputs:
            await producer.send_and_wait(
                out.topic, encode(out.value), key=out.key, partition=out.partition
            )
    finally:
        await producer.stop()


async def fill_tail(settings: Settings, paths: list[str]) -> None:
    outputs = [
        Output(
            settings.topic_prefix + "fetch",
            fetch_from(candidate(path), 2.0),
            key=b"example.com",
            partition=0,
        )
        for path in paths
    ]
    await produce_outputs(settings, outputs)
