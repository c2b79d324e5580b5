"""Static group membership against a real broker: a stage process SIGKILLed and
restarted in its slot takes its partitions straight back (no wait for the dead member's
session to expire), and a SIGTERMed one hands its partitions to the survivor at once."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, create_topics, make_producer
from streamcrawl.core.messages import encode
from streamcrawl.core.runtime import _StreamLoop
from streamcrawl.core.topics import FETCH, FRONTIER_GROUP, SEEDS, TOPIC_SPECS, topic_name
from streamcrawl.crawl.processes import StageProcesses, child_env
from streamcrawl.localstack.stack import StackConfig

from ..conftest import isolated_settings
from ..unit.test_stages import fetch
from .test_poison import produce
from .test_shutdown import HangingSite

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


async def until_assigned(log: Path, timeout: float = 90) -> None:
    """Until the process logging to ``log`` holds partitions (not just started joining)."""
    deadline = time.monotonic() + timeout
    while "Setting newly assigned partitions {TopicPartition" not in (
        log.read_text() if log.exists() else ""
    ):
        assert time.monotonic() < deadline, f"{log.name}: no partitions in {timeout}s"
        await asyncio.sleep(0.2)


async def two_frontiers(settings: Settings, logs: Path) -> StageProcesses:
    """Two frontier processes of one group, both holding partitions and consuming."""
    stages = StageProcesses(child_env(settings), logs)
    stages.start_one("frontier", "frontier")
    await until_assigned(logs / "frontier.log")
    stages.start_one("frontier", "frontier-1")
    await until_assigned(logs / "frontier-1.log")  # the second generation: both hold some
    await seed_every_partition(settings, "warm-up")
    await seconds_until_all_committed(settings, timeout=90)
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
    # Both runs of the slot joined the same generation: the restart caused no rebalance.
    generations = re.findall(r"Joined group '[^']+' \(generation (\d+)\)", log)
    assert len(generations) >= 2 and generations[-1] == generations[-2], generations


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


async def test_after_a_fetcher_sigkill_only_the_last_commit_interval_is_fetched_again(
    stack: StackConfig, tmp_path: Path
) -> None:
    """The fetcher commits its finished prefix every second: a SIGKILLed fetcher's
    successor re-requests only what was in flight or finished within about one commit
    interval before the kill."""
    settings = isolated_settings(stack, crawl_delay="0.1")
    await create_topics(settings)
    site = HangingSite(hosts=4)
    site.released.set()
    await site.start()
    urls = [f"http://127.0.0.1:{port}/p{n}" for port in site.ports for n in range(60)]
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    try:
        for index, url in enumerate(urls):
            await produce(settings, FETCH, [encode(fetch(url))], partition=index % 12)
        stages.start(["fetcher", "delay"])
        while len(site.requests) < len(urls) // 3:
            await asyncio.sleep(0.05)
        stages.kill("fetcher")
        killed_at = time.monotonic()
        await asyncio.sleep(3.0)
        stages.start_one("fetcher")
        deadline = time.monotonic() + 120
        while not set(urls) <= {url for _, url in site.requests}:
            assert time.monotonic() < deadline, "not every URL was fetched after the restart"
            await asyncio.sleep(0.5)
    finally:
        stages.stop()
        await site.stop()
    first: dict[str, float] = {}
    again: list[str] = []
    for at, url in site.requests:
        if url.endswith("/robots.txt"):
            continue  # the new process reads robots.txt afresh
        if url in first:
            again.append(url)
        else:
            first.setdefault(url, at)
    window = _StreamLoop.COMMIT_INTERVAL + 1.0  # the interval, plus publish and commit time
    late = sorted(killed_at - first[url] for url in again) or [0.0]
    print(
        f"\nfetcher SIGKILL: {len(again)} of {len(first)} pages requested again, "
        f"first requested {late[0]:.2f}-{late[-1]:.2f}s before the kill"
    )
    assert all(killed_at - first[url] <= window for url in again), late
