"""Static group membership against a real broker: a stage process SIGKILLed and
restarted in its slot takes its partitions straight back (no wait for the dead member's
session to expire), and a SIGTERMed one hands its partitions to the survivor at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, create_topics, make_producer
from streamcrawl.core.topics import FRONTIER_GROUP, SEEDS, TOPIC_SPECS, topic_name
from streamcrawl.crawl.processes import StageProcesses, child_env
from streamcrawl.localstack.stack import StackConfig

from ..conftest import isolated_settings

pytestmark = pytest.mark.integration

SESSION_TIMEOUT = 30.0  # core/kafka.py: what a dynamic member's partitions wait for
SEED_PARTITIONS = next(spec.partitions for spec in TOPIC_SPECS if spec.suffix == SEEDS)


async def seed_every_partition(settings: Settings, tag: str) -> None:
    """One seed URL on each partition of crawl.seeds."""
    producer = make_producer(settings)
    await producer.start()
    try:
        for partition in range(SEED_PARTITIONS):
            url = f"http://p{partition}.example/{tag}"
            await producer.send_and_wait(
                topic_name(settings.topic_prefix, SEEDS), url.encode(), partition=partition
            )
    finally:
        await producer.stop()


async def seconds_until_all_committed(settings: Settings, timeout: float) -> float:
    """Seconds until the frontier group has committed every record of crawl.seeds."""
    started = time.monotonic()
    probe = OffsetProbe(settings)
    await probe.start()
    try:
        while time.monotonic() - started < timeout:
            rows = await probe.lag(FRONTIER_GROUP, [topic_name(settings.topic_prefix, SEEDS)])
            if len(rows) == SEED_PARTITIONS and all(row.lag == 0 for row in rows):
                return time.monotonic() - started
            await asyncio.sleep(0.1)
    finally:
        await probe.stop()
    raise AssertionError(f"crawl.seeds not consumed within {timeout}s")


async def two_frontiers(settings: Settings, logs: Path) -> StageProcesses:
    stages = StageProcesses(child_env(settings), logs)
    stages.start_one("frontier", "frontier")
    stages.start_one("frontier", "frontier-1")
    await seed_every_partition(settings, "warm-up")
    await seconds_until_all_committed(settings, timeout=90)  # both joined, all assigned
    return stages


async def test_a_sigkilled_member_restarted_in_its_slot_resumes_at_once(
    stack: StackConfig, tmp_path: Path
) -> None:
    settings = isolated_settings(stack)
    await create_topics(settings)
    stages = await two_frontiers(settings, tmp_path / "logs")
    try:
        stages.kill("frontier-1")  # as a crash or an OOM kill would
        await asyncio.sleep(3.0)  # a container restart takes a moment
        await seed_every_partition(settings, "after-kill")
        restarted_at = time.monotonic()
        stages.start_one("frontier", "frontier-1")
        # The restarted process (same instance id) gets the dead member's partitions
        # back without a rebalance; without static membership they would wait for the
        # dead member's session to expire.
        resumed = await seconds_until_all_committed(settings, timeout=60)
        resumed = time.monotonic() - restarted_at
        print(f"\nrestart-to-progress: {resumed:.2f}s (SIGKILL, restarted after 3 s)")
        assert resumed < 10.0
        assert not stages.dead()
    finally:
        stages.stop()
    log = (tmp_path / "logs" / "frontier-1.log").read_text()
    assert f"static member {settings.topic_prefix}frontier-1" in log


async def test_a_sigtermed_member_hands_its_partitions_over_at_once(
    stack: StackConfig, tmp_path: Path
) -> None:
    settings = isolated_settings(stack)
    await create_topics(settings)
    stages = await two_frontiers(settings, tmp_path / "logs")
    try:
        leaving = stages.processes["frontier-1"]
        terminated_at = time.monotonic()
        stages.retire("frontier-1")
        assert leaving.wait(settings.shutdown_grace + 5) == 0
        exited = time.monotonic() - terminated_at
        await seed_every_partition(settings, "after-sigterm")
        # The survivor now owns every partition, the leaver's included.
        await seconds_until_all_committed(settings, timeout=60)
        handed_over = time.monotonic() - terminated_at
        print(
            f"\nSIGTERM: exit {exited:.2f}s, survivor consuming all partitions {handed_over:.2f}s"
        )
        assert handed_over < SESSION_TIMEOUT / 3
        assert stages.replicas("frontier") == ["frontier"] and not stages.dead()
    finally:
        stages.stop()
    log = (tmp_path / "logs" / "frontier-1.log").read_text()
    assert f"{settings.topic_prefix}frontier-1: left group {FRONTIER_GROUP}" in log
