"""A three-node Kafka cluster (combined broker+controller nodes, a 3-voter KRaft quorum):
topics replicated three times with min.insync.replicas 2, and a crawl that loses one broker
for good (SIGKILL, never restarted) and still stores every page exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import create_topics, make_admin
from streamcrawl.core.topics import TOPIC_SPECS
from streamcrawl.crawl.watch import PipelineWatch
from streamcrawl.demo.nginx import NginxSite
from streamcrawl.demo.site import generate_site
from streamcrawl.localstack.stack import LocalStack, StackConfig

from ..conftest import free_port, isolated_settings
from ..support.crawling import assert_stored_once, crawl_site, stored_documents

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
SITE_PAGES = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = StackConfig(
        data_dir=tmp_path_factory.mktemp("cluster"),
        kafka_port=free_port(),
        controller_port=free_port(),
        mongo_port=free_port(),
        kafka_heap=os.environ.get("STREAMCRAWL_TEST_KAFKA_HEAP", "384m"),
        brokers=3,
        extra_kafka_ports=((free_port(), free_port()), (free_port(), free_port())),
    )
    local = LocalStack(config)
    try:
        local.up(timeout=300)
        yield local
    finally:
        local.down(purge=True)


async def replication(
    settings_bootstrap: str, topics: list[str]
) -> dict[str, tuple[set[int], str]]:
    """topic -> (replica counts of its partitions, its min.insync.replicas)."""
    admin = make_admin(Settings.from_env({"STREAMCRAWL_KAFKA_BOOTSTRAP": settings_bootstrap}))
    await admin.start()
    try:
        # A broker learns of a new topic from the metadata log a moment after its creation.
        for _ in range(100):
            described = {t["topic"]: t for t in await admin.describe_topics(topics)}
            if all(described[topic]["partitions"] for topic in topics):
                break
            await asyncio.sleep(0.3)
        result = {}
        for topic in topics:
            counts = {len(p["replicas"]) for p in described[topic]["partitions"]}
            result[topic] = (counts, await min_insync(admin, topic))
        return result
    finally:
        await admin.close()


async def min_insync(admin: AIOKafkaAdminClient, topic: str) -> str | None:
    """The topic's effective min.insync.replicas (asked again while the broker answering
    does not know the topic yet)."""
    for _ in range(100):
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"min.insync.replicas": None})]
        )
        error, _, _, _, entries = responses[0].resources[0]
        if not error:
            return next(value for name, value, *_ in entries if name == "min.insync.replicas")
        await asyncio.sleep(0.3)
    return None


async def test_cluster_topics_have_three_replicas_and_min_insync_two(cluster: LocalStack) -> None:
    nodes = cluster.kafka_nodes()
    assert [node.node_id for node in nodes] == [1, 2, 3]
    assert all(node.pid is not None for node in nodes)
    settings = isolated_settings(cluster.config)
    await create_topics(settings)
    names = [settings.topic_prefix + spec.suffix for spec in TOPIC_SPECS]
    assert await replication(settings.kafka_bootstrap, names) == {
        name: ({3}, "2") for name in names
    }


async def test_crawl_completes_with_one_broker_killed_for_good(
    cluster: LocalStack, tmp_path: Path
) -> None:
    port = free_port()
    manifest = generate_site(tmp_path / "site", pages=SITE_PAGES, port=port)
    settings = isolated_settings(
        cluster.config,
        max_depth="1000",
        # A crawl of some seconds, so the kill lands in its first half however fast the
        # machine (CI: with no delay the site was 2/3 stored before the progress poll saw 1/4).
        crawl_delay="0.03",
        fetch_per_host_concurrency="16",
    )
    victim = cluster.kafka_nodes()[0].pid  # the first bootstrap server, too
    assert victim is not None

    stored_at_kill: list[int] = []

    async def kill_a_broker(watch: PipelineWatch) -> None:
        while (stored := (await watch.progress()).stored) < SITE_PAGES // 4:
            await asyncio.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        stored_at_kill.append(stored)

    with NginxSite(tmp_path / "site", port):
        await crawl_site(settings, tmp_path / "logs", manifest, during=kill_a_broker)

    assert cluster.kafka_nodes()[0].pid is None  # never brought back
    # The broker died in the middle of the crawl: most pages were stored after it.
    assert stored_at_kill and stored_at_kill[0] < len(manifest.pages) // 2
    assert_stored_once(manifest, await stored_documents(settings))
    # The group offsets the stages committed live in a replicated internal topic.
    offsets = await replication(
        ",".join(node.bootstrap for node in cluster.kafka_nodes()[1:]), ["__consumer_offsets"]
    )
    assert offsets == {"__consumer_offsets": ({3}, "2")}
