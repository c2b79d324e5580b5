"""Crawl control on a real broker: three crawls of three generated sites at once on one
pipeline. One is paused (no request for it reaches its nginx from a few seconds after
``streamcrawl pause`` returned, across a restart of the fetcher, while the others go on),
then resumed (it finishes with every page requested once and stored once); another is
cancelled (no request for it reaches its nginx ever again). The states live in the
compacted crawl.control topic: a new reader gets them all back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from pymongo import AsyncMongoClient
from streamcrawl.core.config import Settings
from streamcrawl.core.control import ControlRefused, read_states, send_control
from streamcrawl.core.kafka import create_topics, make_admin
from streamcrawl.crawl.local import running_pipeline
from streamcrawl.crawl.processes import child_env
from streamcrawl.crawl.seeds import SeedOptions, produce_seeds, seed_payloads
from streamcrawl.crawl.watch import watch_until_drained
from streamcrawl.localstack.stack import StackConfig

from ..conftest import free_port, isolated_settings
from ..support.crawl import Site, served_sites

pytestmark = pytest.mark.integration

SITE_PAGES = 300
CRAWL_DELAY = 0.1  # one host per crawl: at most 10 requests a second each, so ~30 s a crawl
# A command reaches every stage within about a second (crawl.control is read every 0.1 s);
# no request of the crawl starts after that. Requests already sent are local and short.
SETTLE = 3.0
PAUSE_RECHECK = 2.0  # paused URLs go round crawl.retry several times during the pause


@pytest.fixture()
def sites(tmp_path: Path) -> Iterator[list[Site]]:
    with served_sites(tmp_path, "abc", SITE_PAGES) as made:
        yield made


def command(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``streamcrawl ARGS`` as a user runs it; returns once the command has returned."""
    return subprocess.run(
        [sys.executable, "-m", "streamcrawl.cli", *args],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def documents(settings: Settings, crawl_id: str) -> Counter[str]:
    """Stored documents of one crawl, by URL."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        return Counter(
            [doc["url"] async for doc in collection.find({"crawl_id": crawl_id}, {"url": 1})]
        )
    finally:
        await client.close()


async def wait_for_requests(site: Site, count: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(site.requests()) < count:
        assert time.monotonic() < deadline, f"{site.crawl_id}: fewer than {count} requests"
        await asyncio.sleep(0.2)


async def crawl_status(settings: Settings, crawl_id: str, timeout: float = 120) -> dict[str, Any]:
    """``streamcrawl status --json CRAWL_ID``, once the stats stage answers for the crawl."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(command, settings, "status", "--json", crawl_id)
        if result.returncode == 0:
            found: dict[str, Any] = json.loads(result.stdout)
            return found
        assert time.monotonic() < deadline, result.stderr
        await asyncio.sleep(1.0)


async def test_pause_resume_and_cancel_two_of_three_crawls_on_one_pipeline(
    stack: StackConfig, sites: list[Site], tmp_path: Path
) -> None:
    paused, running, cancelled = sites
    settings = isolated_settings(
        stack,
        max_depth="1000",
        crawl_delay=str(CRAWL_DELAY),
        fetch_per_host_concurrency="1",
        pause_recheck=str(PAUSE_RECHECK),
        shutdown_grace="15",
        stats_port=str(free_port()),  # its own stats stage, not another test's
        state_dir=str(tmp_path / "state"),
    )
    async with running_pipeline(settings, tmp_path / "logs") as (stages, watch):
        settings = watch.settings  # with the stats port the pipeline serves on
        for site in sites:
            options = SeedOptions(crawl_id=site.crawl_id)
            await produce_seeds(settings, seed_payloads([site.manifest.entry_url], options))
        await wait_for_requests(paused, 20)
        await wait_for_requests(cancelled, 20)

        result = await asyncio.to_thread(command, settings, "pause", paused.crawl_id)
        assert result.returncode == 0, result.stderr
        paused_at = time.time()
        assert f"crawl {paused.crawl_id}: paused" in result.stdout
        result = await asyncio.to_thread(command, settings, "cancel", cancelled.crawl_id)
        assert result.returncode == 0, result.stderr
        cancelled_at = time.time()

        # The pause holds, the other crawl goes on; across a restart of the fetcher too
        # (gracefully: what it had in hand goes back through crawl.retry, nothing twice).
        await asyncio.sleep(SETTLE + 3 * PAUSE_RECHECK)
        stages.retire("fetcher")
        await asyncio.to_thread(stages.start_one, "fetcher")
        await asyncio.sleep(10 + 2 * PAUSE_RECHECK)  # the new fetcher starts, reads the states
        pause_ended = time.time()
        assert paused.requested_after(paused_at + SETTLE) == []
        assert cancelled.requested_after(cancelled_at + SETTLE) == []
        during = [ts for ts, _ in running.requests() if paused_at + SETTLE < ts < pause_ended]
        assert len(during) >= 20, "the crawl that was not paused went on meanwhile"
        held_back = len(paused.requests())
        last_paused = max(ts for ts, _ in paused.requests()) - paused_at
        last_cancelled = max(ts for ts, _ in cancelled.requests()) - cancelled_at
        print(
            f"\ncontrol figures: last request of the paused crawl {last_paused:+.2f}s and of "
            f"the cancelled one {last_cancelled:+.2f}s after their command returned; "
            f"{len(during)} requests of the other crawl during the pause "
            f"({pause_ended - paused_at - SETTLE:.0f}s); paused at {held_back}/"
            f"{paused.expected} pages",
            file=sys.stderr,
        )
        assert held_back < paused.expected, "the paused crawl was paused mid-way"
        assert len(cancelled.requests()) < cancelled.expected

        refused = await asyncio.to_thread(command, settings, "resume", cancelled.crawl_id)
        assert refused.returncode == 2 and "stays cancelled" in refused.stderr
        listed = await crawl_status(settings, paused.crawl_id)
        assert listed["control"] == "paused"

        result = await asyncio.to_thread(command, settings, "resume", paused.crawl_id)
        assert result.returncode == 0, result.stderr
        resumed_at = time.time()
        await wait_for_requests(paused, held_back + 1, timeout=60)
        first = min(ts for ts, _ in paused.requests() if ts > resumed_at - SETTLE) - resumed_at
        print(f"control figures: first request after resume {first:+.2f}s", file=sys.stderr)
        await watch_until_drained(watch, stages, sys.stderr, quiet_polls=2, timeout=300)

        # Resumed: finished, every page requested once and stored once.
        for site in (paused, running):
            paths = Counter(path for _, path in site.requests())
            assert [path for path, n in paths.items() if n > 1] == [], site.crawl_id
            stored = await documents(settings, site.crawl_id)
            assert len(stored) == site.expected, site.crawl_id
            assert sum(stored.values()) == site.expected, site.crawl_id
        assert len(paused.requests()) > held_back
        # Cancelled: nothing more, for good, and its dropped URLs are counted.
        assert cancelled.requested_after(cancelled_at + SETTLE) == []
        assert len(await documents(settings, cancelled.crawl_id)) < cancelled.expected
        deadline = time.monotonic() + 120
        while True:
            report = await crawl_status(settings, cancelled.crawl_id)
            if report["cancelled"] > 0:
                break
            assert time.monotonic() < deadline, "the stats stage never counted cancelled URLs"
            await asyncio.sleep(1.0)
        assert report["control"] == "cancelled"
        assert (await crawl_status(settings, paused.crawl_id))["control"] == "active"


async def test_the_states_are_kept_in_a_compacted_topic_and_read_back_by_a_new_reader(
    stack: StackConfig,
) -> None:
    settings = isolated_settings(stack)
    await create_topics(settings)
    topic = settings.topic_prefix + "control"
    admin = make_admin(settings)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"cleanup.policy": None})]
        )
        ((_, _, _, _, entries),) = response.resources
        (entry,) = [entry for entry in entries if entry[0] == "cleanup.policy"]
        assert entry[1] == "compact"
    finally:
        await admin.close()

    await send_control(settings, ["x", "y", "z"], "paused")
    await send_control(settings, ["y"], "active")
    await send_control(settings, ["z"], "cancelled")
    with pytest.raises(ControlRefused):
        await send_control(settings, ["z"], "active")
    # What a restarted stage reads before its first record.
    states = await read_states(settings)
    assert states.states() == {"x": "paused", "y": "active", "z": "cancelled"}
    assert states.verdict("x") == "hold" and states.verdict("z") == "drop"
    assert states.verdict("never-controlled") == "go"
