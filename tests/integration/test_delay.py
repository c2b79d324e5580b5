"""The delay service against a real broker: due order across a partition, no busy loop,
and nothing lost when it is killed while holding retries."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, create_topics, make_producer, stop_consumer
from streamcrawl.core.messages import Attempt, Fetch, Retry, Scope, encode, fetch_from_retry
from streamcrawl.core.topics import DELAY_GROUP, RETRY
from streamcrawl.crawl.processes import StageProcesses, child_env
from streamcrawl.localstack.stack import StackConfig

from ..conftest import isolated_settings

pytestmark = pytest.mark.integration


def retry_record(name: str, due_at: float) -> Retry:
    return Retry(
        url=f"http://example.com/{name}",
        host="example.com",
        crawl_id="delay-test",
        depth=1,
        priority=5,
        scope=Scope(allow_domains=["example.com"], max_depth=3, max_pages=0),
        discovered_at=1.0,
        admitted_at=2.0,
        attempt=1,
        history=[Attempt(at=3.0, outcome="http_503", status=503)],
        due_at=due_at,
        retry_reason="http_503",
    )


async def produce_retries(settings: Settings, records: list[tuple[int, Retry]]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for partition, value in records:
            await producer.send_and_wait(
                settings.topic_prefix + "retry",
                encode(value),
                key=b"example.com",
                partition=partition,
            )
    finally:
        await producer.stop()


_fetch_decoder = msgspec.json.Decoder(Fetch)


async def collect_fetch(
    settings: Settings, expected: int, timeout: float
) -> list[tuple[float, int, Fetch]]:
    """(arrival time, partition, value) of crawl.fetch records, until ``expected`` distinct
    URLs arrived (a redelivered one may come twice; a restarted static member re-reads
    its partitions at once, so a duplicate can come before the last URL is due);
    each value decodes as a crawl.fetch message (unknown fields, such as a leftover
    ``due_at``, would be refused)."""
    consumer = AIOKafkaConsumer(
        settings.topic_prefix + "fetch",
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: list[tuple[float, int, Fetch]] = []
    deadline = time.monotonic() + timeout
    try:
        while len({value.url for _, _, value in seen}) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    assert record.value is not None
                    seen.append(
                        (time.time(), record.partition, _fetch_decoder.decode(record.value))
                    )
        await asyncio.sleep(1.0)  # and nothing more comes
        extra = await consumer.getmany(timeout_ms=500)
        for records in extra.values():
            for record in records:
                assert record.value is not None
                seen.append((time.time(), record.partition, _fetch_decoder.decode(record.value)))
    finally:
        await stop_consumer(consumer)
    return seen


async def wait_committed(settings: Settings, partition: int, offset: int, timeout: float) -> None:
    """Until the delay group has committed ``offset`` on crawl.retry's ``partition``."""
    probe = OffsetProbe(settings)
    await probe.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await probe.lag(DELAY_GROUP, [settings.topic_prefix + RETRY])
            if any(r.partition == partition and (r.committed or 0) >= offset for r in rows):
                return
            assert time.monotonic() < deadline, f"not committed in {timeout}s: {rows}"
            await asyncio.sleep(0.1)
    finally:
        await probe.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


async def test_due_order_no_busy_loop_and_survives_sigkill(
    stack: StackConfig, tmp_path: Path
) -> None:
    settings = isolated_settings(stack)
    await create_topics(settings)
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    stages.start(["delay"])
    try:
        now = time.time()
        # On partition 0 the long wait comes first: it must not hold back the short one.
        await produce_retries(
            settings,
            [
                (0, retry_record("late", now + 9.0)),
                (0, retry_record("early", now + 2.0)),
                (5, retry_record("other-partition", now + 3.0)),
            ],
        )
        await asyncio.sleep(1.0)  # read and held
        pid = stages.processes["delay"].pid
        idle_cpu = cpu_seconds(pid)
        await asyncio.sleep(3.0)
        # Waiting costs (almost) nothing: no busy loop while records are held.
        assert cpu_seconds(pid) - idle_cpu < 0.5
        # "other-partition" was released (due after 3 s) and its offset committed (the
        # stage commits once nothing is in flight) before the kill, so it is not again.
        await wait_committed(settings, partition=5, offset=1, timeout=4.0)
        stages.kill("delay")  # SIGKILL while "late" is still held, uncommitted
        stages.start_one("delay")
        arrivals = await collect_fetch(settings, expected=3, timeout=40)
    finally:
        stages.stop()
    names = Counter(value.url.rsplit("/", 1)[1] for _, _, value in arrivals)
    # At least once: "early" was released before the kill but sits behind "late" in its
    # partition, so its offset could not be committed and it may be released again. The
    # others come exactly once; nothing is lost.
    assert names["late"] == 1 and names["other-partition"] == 1, names
    assert names["early"] in (1, 2) and set(names) == {"late", "early", "other-partition"}
    first: dict[str, tuple[float, int, Fetch]] = {}
    for arrived, partition, value in arrivals:
        first.setdefault(value.url.rsplit("/", 1)[1], (arrived, partition, value))
    for name, offset in (("early", 2.0), ("other-partition", 3.0), ("late", 9.0)):
        arrived, _, value = first[name]
        assert arrived >= now + offset - 0.05, (name, arrived - now)  # never early
        assert value.attempt == 1 and value.history[0].outcome == "http_503"
        # The retry as it was, without due_at and retry_reason (the decoder refuses
        # unknown fields), its attempts and history kept.
        assert value == fetch_from_retry(retry_record(name, now + offset))
    assert first["early"][0] < first["late"][0]
    assert first["early"][1] == first["late"][1] == 0 and first["other-partition"][1] == 5
