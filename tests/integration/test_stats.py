"""The stats stage on a real broker: two crawls of two generated sites at once on one
pipeline, the stats process SIGKILLed mid-crawl and restarted; `streamcrawl status --json`
then shows each crawl with exactly what MongoDB holds and what each nginx served."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import CommitFailedError, RebalanceInProgressError
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import (
    OffsetProbe,
    create_topics,
    make_admin,
    make_producer,
    stop_consumer,
)
from streamcrawl.core.messages import DeadLetterRecord, Tally, encode
from streamcrawl.core.topics import FETCHED, topic_name
from streamcrawl.crawl.local import running_pipeline
from streamcrawl.crawl.processes import StageProcesses, child_env
from streamcrawl.crawl.seeds import SeedOptions, produce_seeds, seed_payloads
from streamcrawl.crawl.status import StatsClient, StatsUnavailable, final_numbers, stats_url
from streamcrawl.crawl.watch import watch_until_drained
from streamcrawl.localstack.stack import StackConfig
from streamcrawl.stats.app import CHANGELOG_CONFIG, app_id

from ..conftest import free_port, isolated_settings
from ..support.crawl import Site, served_sites

pytestmark = pytest.mark.integration

SITE_PAGES = 300


@pytest.fixture()
def sites(tmp_path: Path) -> Iterator[list[Site]]:
    with served_sites(tmp_path, "ab", SITE_PAGES) as made:
        yield made


async def documents_by_crawl(settings: Settings) -> Counter[str]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        rows = await collection.aggregate([{"$group": {"_id": "$crawl_id", "n": {"$sum": 1}}}])
        return Counter({row["_id"]: row["n"] async for row in rows})
    finally:
        await client.close()


async def stored_so_far(settings: Settings, crawl_id: str) -> int:
    async with StatsClient(stats_url(settings), timeout=2.0) as client:
        try:
            found = await client.crawl(crawl_id)
        except StatsUnavailable:
            return 0
    return 0 if found is None else int(found["stored"])


# What the stats process logs when it starts itself again (service.py's watches and its
# restart after a Kafka error).
SELF_RESTART = re.compile(r"starting this process again|starting it again")


def skipped_records(settings: Settings, timeout: float = 120.0) -> float:
    """The stats stage's skip counter, waiting for it to answer (a worker that restarts
    itself, stuck, answers again some seconds later)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(stats_url(settings) + "/metrics", timeout=5) as response:
                text = response.read().decode()
            break
        except OSError as exc:  # refused, reset or timed out
            assert time.monotonic() < deadline, f"the stats stage never answered: {exc!r}"
            time.sleep(1.0)
    match = re.search(r"^streamcrawl_stats_records_skipped_total (\S+)$", text, re.M)
    assert match is not None, "the stats stage exports its skip counter"
    return float(match.group(1))


def crawl_series(settings: Settings) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The stats stage's crawl gauges as scraped: name -> sorted labels -> value."""
    with urllib.request.urlopen(stats_url(settings) + "/metrics", timeout=5) as response:
        text = response.read().decode()
    series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("streamcrawl_crawl_"):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                series.setdefault(sample.name, {})[labels] = sample.value
    return series


def status_json(settings: Settings, *args: str) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "streamcrawl.cli", "status", "--json", *args],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


async def test_two_crawls_at_once_each_counted_exactly_across_a_stats_sigkill(
    stack: StackConfig, sites: list[Site], tmp_path: Path
) -> None:
    settings = isolated_settings(
        stack,
        max_depth="1000",
        crawl_delay="0.03",  # a crawl of some seconds, so the kill comes in the middle
        fetch_per_host_concurrency="2",
        stats_port=str(free_port()),
        state_dir=str(tmp_path / "state"),  # dedup's snapshots, the stats lock file
    )
    async with running_pipeline(settings, tmp_path / "logs") as (stages, watch):
        settings = watch.settings  # with the stats port the pipeline serves on
        for site in sites:
            options = SeedOptions(crawl_id=site.crawl_id)
            await produce_seeds(settings, seed_payloads([site.manifest.entry_url], options))

        deadline = time.monotonic() + 240
        while await stored_so_far(settings, sites[0].crawl_id) < SITE_PAGES // 4:
            assert time.monotonic() < deadline, "the stats stage never counted a quarter"
            await asyncio.sleep(0.5)
        await asyncio.sleep(2.0)  # its changelog holds what it applied
        counted_before_kill = await stored_so_far(settings, sites[0].crawl_id)
        stages.kill("stats")
        stored_at_kill = await documents_by_crawl(settings)
        # A crash between applying records and committing their offsets, made certain
        # (the gap of a 0.25 s commit interval is too narrow to hit by timing): the group
        # is rewound to the start of crawl.fetched, so the restarted worker reads every
        # fetch record again, most of them applied before the kill.
        rewound = await rewind_group(
            settings, app_id(settings), topic_name(settings.topic_prefix, FETCHED)
        )
        stages.start_one("stats")

        await watch_until_drained(watch, stages, sys.stderr, timeout=300)
        probe = OffsetProbe(settings)
        await probe.start()
        try:
            finals = {
                site.crawl_id: await final_numbers(settings, site.crawl_id, probe, timeout=120)
                for site in sites
            }
        finally:
            await probe.stop()
        skipped = skipped_records(settings)
        # Checked while the stats stage still runs (status asks it).
        truth = await documents_by_crawl(settings)
        listing = {crawl["crawl_id"]: crawl for crawl in status_json(settings)["crawls"]}
        assert set(listing) == {site.crawl_id for site in sites}
        gauges = crawl_series(settings)
        for site in sites:
            crawl = listing[site.crawl_id]
            assert finals[site.crawl_id] is not None
            served = site.served()
            statuses = Counter({f"{status // 100}xx": n for status, n in served.items()})
            assert crawl["stored"] == truth[site.crawl_id] > 0, site.crawl_id
            assert crawl["fetched"] == sum(served.values()), site.crawl_id
            assert crawl["status"] == dict(sorted(statuses.items())), site.crawl_id
            assert crawl["parsed"] == crawl["stored"]  # every page read by the sink was written
            assert crawl["admitted"] == crawl["fetched"]  # nothing failed, nothing left
            assert crawl["discovered"] == crawl["admitted"] + crawl["filtered"].get("duplicate", 0)
            assert crawl["errors"] == 0 and crawl["failed"] == {}
            assert crawl["bytes"] > 0 and crawl["state"] in ("running", "idle")
            # The same numbers as Prometheus gauges, labelled by crawl id (the dashboard's
            # per-crawl row), and one activity state set.
            crawl_id = site.crawl_id
            for step in ("discovered", "admitted", "fetched", "parsed", "stored", "cancelled"):
                key = (("crawl_id", crawl_id), ("step", step))
                assert gauges["streamcrawl_crawl_urls"][key] == crawl[step], step
            bytes_key = (("crawl_id", crawl_id),)
            assert gauges["streamcrawl_crawl_bytes"][bytes_key] == crawl["bytes"]
            states = {
                dict(labels)["state"]: value
                for labels, value in gauges["streamcrawl_crawl_state"].items()
                if dict(labels)["crawl_id"] == crawl_id
            }
            assert sorted(states.values()) == [0.0, 0.0, 1.0], states
            assert max(states, key=lambda name: states[name]) in ("running", "idle")
            assert not any(
                dict(labels)["crawl_id"] == crawl_id
                for labels in gauges.get("streamcrawl_crawl_failed", {})
            )
            # Every URL of the site, and each once: nginx's log is the other witness.
            assert crawl["stored"] == site.expected
            # One crawl's view with its hosts: one host here, with its own numbers.
            detail = status_json(settings, site.crawl_id, "--top", "5", "--sort", "fetched")
            (host,) = detail["hosts"]
            assert host["host"] == f"127.0.0.1:{site.port}"
            assert host["fetched"] == crawl["fetched"]
            assert host["errors"] == statuses.get("4xx", 0) + statuses.get("5xx", 0)
            assert host["latency_p95_s"] >= host["latency_mean_s"] > 0
        # The kill came mid-crawl: the stats stage had counted some pages, not all, and the
        # restarted one read records again (skipped, not counted twice).
        first = sites[0].crawl_id
        assert 0 < counted_before_kill < truth[first]
        assert stored_at_kill[first] < truth[first]
        assert rewound > 0
        stats_log = (tmp_path / "logs" / "stats.log").read_text(errors="replace")
        if SELF_RESTART.search(stats_log) is None:
            assert skipped > 0
        # else the worker restarted itself after ours (its watches: a stuck faust, a blocked
        # loop); the skips were counted by a process that is gone, and the exact numbers
        # above hold across both restarts.


async def rewind_group(settings: Settings, group: str, topic: str, timeout: float = 60) -> int:
    """Commit offset 0 for every partition of ``topic`` in ``group`` once the group is
    empty (a killed member leaves it at its session timeout); the number of partitions
    that had a committed offset above 0."""
    producer = make_producer(settings)  # its partitions_for waits for the topic's metadata
    await producer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in await producer.partitions_for(topic)]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        ahead = 0
        for partition in partitions:
            committed = await consumer.committed(partition)
            ahead += committed is not None and committed > 0
        deadline = time.monotonic() + timeout
        while True:
            try:
                await consumer.commit({partition: 0 for partition in partitions})
                return ahead
            except (CommitFailedError, RebalanceInProgressError):
                # The killed worker is still a member until its session expires.
                assert time.monotonic() < deadline, "the stats group never became empty"
                await asyncio.sleep(1.0)
    finally:
        await stop_consumer(consumer)


async def read_topic(
    settings: Settings, suffix: str, count: int, timeout: float = 60
) -> list[bytes]:
    """The first ``count`` values of a topic (all partitions), waiting up to ``timeout``."""
    consumer = AIOKafkaConsumer(
        settings.topic_prefix + suffix,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while len(values) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                values.extend(record.value or b"" for record in records)
    finally:
        await stop_consumer(consumer)
    return values


async def test_the_api_answers_and_a_bad_event_is_dead_lettered(
    stack: StackConfig, tmp_path: Path
) -> None:
    settings = isolated_settings(
        stack, stats_port=str(free_port()), state_dir=str(tmp_path / "state")
    )
    await create_topics(settings)
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    stages.start(["stats"])
    try:
        producer = make_producer(settings)
        await producer.start()
        try:
            events = settings.topic_prefix + "events"
            await producer.send_and_wait(events, b'{"stage": "sink", "crawl_id": 5}', key=b"x")
            tally = Tally(stage="dedup", crawl_id="ok", at=time.time(), counts={"admitted": 7})
            await producer.send_and_wait(events, encode(tally), key=b"ok")
        finally:
            await producer.stop()
        deadline = time.monotonic() + 120
        async with StatsClient(stats_url(settings), timeout=2.0) as client:
            found = None
            while found is None:
                assert time.monotonic() < deadline, "the stats stage never counted the tally"
                with contextlib.suppress(StatsUnavailable):
                    found = await client.crawl("ok")
                await asyncio.sleep(0.5)
            assert found["admitted"] == 7 and found["stored"] == 0
            assert await client.crawl("nobody") is None  # 404
            with pytest.raises(StatsUnavailable, match="HTTP 400"):
                await client.hosts("ok", sort="url")
            assert await client.hosts("ok") == []
        (letter,) = await read_topic(settings, "dlq", 1)
        dead = msgspec.json.decode(letter, type=DeadLetterRecord)
        assert (dead.stage, dead.reason, dead.offset) == ("stats", "schema_violation", 0)
        assert dead.payload == '{"stage": "sink", "crawl_id": 5}'
    finally:
        stages.stop()


async def test_a_worker_that_stopped_committing_is_started_again(
    stack: StackConfig, tmp_path: Path
) -> None:
    """The commit watch: records wait, the worker commits nothing (its crawl.fetched agent
    is stuck for good), so after the grace the process logs why, with its tasks, and runs
    itself again (same pid)."""
    settings = isolated_settings(
        stack, stats_port=str(free_port()), state_dir=str(tmp_path / "state")
    )
    await create_topics(settings)
    log_path = tmp_path / "stats.log"
    script = Path(__file__).parents[1] / "support" / "stuck_stats.py"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(script)],
            env=child_env(settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        producer = make_producer(settings)
        await producer.start()
        try:
            await producer.send_and_wait(
                settings.topic_prefix + FETCHED, b'{"crawl_id": "c", "host": "h"}', key=b"h"
            )
        finally:
            await producer.stop()
        deadline = time.monotonic() + 120
        text = ""
        while text.count("stats: app ") < 2:
            assert process.poll() is None, "the stats process exited instead of restarting"
            assert time.monotonic() < deadline, text[-3000:]
            await asyncio.sleep(1.0)
            text = log_path.read_text(errors="replace")
        stuck = text.index("the faust worker is stuck")
        assert "records waiting" in text[stuck - 200 : stuck]
        # Where its tasks waited, down their awaits (the agents' among them).
        assert "faust/agents/agent.py" in text[stuck:] and "_execute_actor" in text[stuck:]
        assert text.index("stats: app ", stuck) > stuck  # started again after saying why
    finally:
        process.terminate()
        process.wait(timeout=30)


async def topic_configs(settings: Settings, topic: str, names: list[str]) -> dict[str, str]:
    admin = make_admin(settings)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, dict.fromkeys(names))]
        )
        ((_, _, _, _, entries),) = response.resources
        return {entry[0]: entry[1] for entry in entries}
    finally:
        await admin.close()


async def test_changelogs_made_before_get_their_compaction_settings(
    stack: StackConfig, tmp_path: Path
) -> None:
    """Changelog topics that exist already with compaction alone (as faust made them before
    CHANGELOG_CONFIG, never cleaned while their one segment stays open) get the rolling and
    cleaning settings when the worker starts."""
    settings = isolated_settings(
        stack, stats_port=str(free_port()), state_dir=str(tmp_path / "state")
    )
    await create_topics(settings)
    changelogs = [f"{app_id(settings)}-{table}-changelog" for table in ("crawls", "hosts")]
    admin = make_admin(settings)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, 12, 1, topic_configs={"cleanup.policy": "compact"})
                for name in changelogs
            ]
        )
    finally:
        await admin.close()
    names = list(CHANGELOG_CONFIG)
    before = await topic_configs(settings, changelogs[0], names)
    assert before["segment.ms"] != CHANGELOG_CONFIG["segment.ms"]
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    stages.start(["stats"])
    try:
        deadline = time.monotonic() + 90
        for topic in changelogs:
            while await topic_configs(settings, topic, names) != CHANGELOG_CONFIG:
                assert time.monotonic() < deadline, await topic_configs(settings, topic, names)
                await asyncio.sleep(1.0)
    finally:
        stages.stop()
