"""The foundation against real servers: Kafka 4 (aiokafka and kcat), FerretDB (PyMongo async),
and the ``streamcrawl stack`` command's process management."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pymongo import AsyncMongoClient
from pymongo.errors import DuplicateKeyError
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, create_topics, group_lag, make_producer
from streamcrawl.core.topics import TOPIC_SPECS, group_id
from streamcrawl.localstack.stack import LocalStack, StackConfig

from ..conftest import free_port, kcat_consume

pytestmark = pytest.mark.integration
KCAT = shutil.which("kcat")


async def _new_topic(settings: Settings, partitions: int = 3) -> str:
    name = f"{settings.topic_prefix}infra-{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


async def test_group_commits_and_lag_is_end_minus_committed(settings: Settings) -> None:
    topic = await _new_topic(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for partition, count in ((0, 5), (1, 7), (2, 3)):
            for n in range(count):
                await producer.send_and_wait(
                    topic, f"{partition}-{n}".encode(), partition=partition
                )
    finally:
        await producer.stop()

    group = f"g-{uuid.uuid4().hex[:6]}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        # The probe reads a pipeline group under this test's topic prefix.
        group_id=group_id(settings.topic_prefix, group),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        seen: list[bytes] = []
        while len(seen) < 15:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "the broker returned nothing within 5 s"
            seen += [record.value for records in batch.values() for record in records]
        assert sorted(seen) == sorted(
            f"{p}-{n}".encode() for p, c in ((0, 5), (1, 7), (2, 3)) for n in range(c)
        )
        # Commit a different point per partition, as a stage that is part-way through would.
        await consumer.commit({TopicPartition(topic, 0): 5, TopicPartition(topic, 1): 2})
    finally:
        await consumer.stop()

    rows = {row.partition: row for row in await group_lag(settings, group, [topic])}
    assert {p: (r.end_offset, r.committed, r.lag) for p, r in rows.items()} == {
        0: (5, 5, 0),
        1: (7, 2, 5),
        2: (3, None, 3),
    }

    # The progress watch's way: end offsets read once for several topics, shared by every
    # group's read, and the group's coordinator remembered across polls.
    probe = OffsetProbe(settings)
    await probe.start()
    try:
        other = await _new_topic(settings)
        ends = await probe.end_offsets([topic, other])
        assert {tp.topic for tp in ends} == {topic, other}
        for _ in range(2):
            shared = {row.partition: row for row in await probe.lag(group, [topic], ends)}
            assert shared == rows
    finally:
        await probe.stop()


@pytest.mark.skipif(KCAT is None, reason="Debian's kcat is not installed")
async def test_a_topic_sent_to_keeps_its_metadata_when_a_new_one_is_added(
    settings: Settings,
) -> None:
    """aiokafka replaces what it knows with each metadata answer, and asks only for the
    topics it tracks once one was added: a topic known from its first (all topics) answer
    dropped out, and a batch queued for it waited, the sender asking for metadata
    thousands of times a second, until it expired (core/kafka_transport.py)."""
    known = await _new_topic(settings)
    producer = make_producer(settings, linger_ms=1000)
    await producer.start()
    try:
        queued = await producer.send(known, b"queued for a second")
        added = await _new_topic(settings)  # unknown to the producer's first metadata
        second = await producer.send(added, b"to a topic created after the start")
        done = await asyncio.wait_for(asyncio.gather(queued, second), timeout=15)
        assert [record.topic for record in done] == [known, added]
        assert {known, added} <= producer.client._topics
    finally:
        await producer.stop()


async def test_kcat_and_aiokafka_interoperate(settings: Settings) -> None:
    assert KCAT is not None
    topic = await _new_topic(settings, partitions=1)
    subprocess.run(
        [KCAT, "-P", "-b", settings.kafka_bootstrap, "-t", topic, "-k", "host-a"],
        input=b"from kcat\n",
        check=True,
        timeout=30,
    )
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"host-a", b"from kcat")

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b'{"from":"aiokafka"}', key=b"host-b")
    finally:
        await producer.stop()
    assert kcat_consume(settings.kafka_bootstrap, topic) == [
        ("host-a", b"from kcat"),
        ("host-b", b'{"from":"aiokafka"}'),
    ]


async def test_pipeline_topics_are_created_with_their_partitions(settings: Settings) -> None:
    created = await create_topics(settings)
    assert sorted(created) == sorted(settings.topic_prefix + s.suffix for s in TOPIC_SPECS)
    assert await create_topics(settings) == []  # idempotent
    probe = OffsetProbe(settings)
    await probe.start()
    try:
        for spec in TOPIC_SPECS:
            partitions = await probe.partitions([settings.topic_prefix + spec.suffix])
            assert len(partitions) == spec.partitions, spec
    finally:
        await probe.stop()


async def test_mongo_wire_insert_upsert_unique_and_read_back(settings: Settings) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(settings.mongo_uri)
    try:
        pages = client[settings.mongo_database]["pages"]
        await pages.create_index("url", unique=True)
        await pages.insert_one({"url": "http://a.example/", "title": "first"})
        with pytest.raises(DuplicateKeyError):
            await pages.insert_one({"url": "http://a.example/", "title": "again"})
        for title in ("upserted", "upserted twice"):
            await pages.update_one(
                {"url": "http://b.example/"}, {"$set": {"title": title}}, upsert=True
            )
        await pages.update_one(
            {"url": "http://a.example/"}, {"$set": {"title": "updated"}}, upsert=True
        )
        docs = {doc["url"]: doc["title"] async for doc in pages.find({}, {"_id": 0})}
        assert docs == {"http://a.example/": "updated", "http://b.example/": "upserted twice"}
        info = await client.server_info()
        assert info.get("ferretdbVersion", "").startswith("v1.24")
    finally:
        await client.close()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamcrawl.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _stack_env(config: StackConfig) -> dict[str, str]:
    return {
        **os.environ,
        "STREAMCRAWL_STACK_DIR": str(config.data_dir),
        "STREAMCRAWL_STACK_KAFKA_PORT": str(config.kafka_port),
        "STREAMCRAWL_STACK_CONTROLLER_PORT": str(config.controller_port),
        "STREAMCRAWL_STACK_MONGO_PORT": str(config.mongo_port),
    }


def _our_processes(data_dir: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if str(data_dir).encode() in cmdline and state != "Z" and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def _cmdline(pid: int) -> bytes:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes()


def test_stack_up_twice_reuses_down_stops_and_taken_port_is_one_line(
    stack: StackConfig, tmp_path: Path
) -> None:
    # 'up' against the running session stack reuses it: same PIDs, no second server.
    before = sorted(_our_processes(stack.data_dir))
    assert len(before) == 2
    assert any(b"\0-XX:TieredStopAtLevel=1\0" in _cmdline(pid) for pid in before)  # C1 only
    result = _cli(_stack_env(stack), "stack", "up")
    assert result.returncode == 0, result.stderr
    assert f"STREAMCRAWL_KAFKA_BOOTSTRAP={stack.bootstrap}" in result.stdout
    assert sorted(_our_processes(stack.data_dir)) == before

    # A second stack on a port that is taken fails with one line and no traceback.
    clash = StackConfig(
        data_dir=tmp_path / "clash",
        kafka_port=stack.kafka_port,
        controller_port=free_port(),
        mongo_port=free_port(),
    )
    result = _cli(_stack_env(clash), "stack", "up")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"streamcrawl: error: port {stack.kafka_port} for Kafka is taken by "
        "another process; stop it or set STREAMCRAWL_STACK_KAFKA_PORT to a free port"
    ]
    assert "Traceback" not in result.stderr

    # A fresh stack: up twice gives one broker and one database; down leaves none.
    own = StackConfig(
        data_dir=tmp_path / "own",
        kafka_port=free_port(),
        controller_port=free_port(),
        mongo_port=free_port(),
    )
    env = _stack_env(own) | {"STREAMCRAWL_STACK_KAFKA_JVM_OPTIONS": "-Dstreamcrawl.probe=1"}
    try:
        assert _cli(env, "stack", "up").returncode == 0
        first = sorted(_our_processes(own.data_dir))
        kafka = [pid for pid in first if b"kafka.Kafka" in _cmdline(pid)]
        assert len(kafka) == 1 and b"\0-Dstreamcrawl.probe=1\0" in _cmdline(kafka[0])
        assert b"TieredStopAtLevel" not in _cmdline(kafka[0])  # the options replace the default
        assert _cli(env, "stack", "up").returncode == 0
        assert sorted(_our_processes(own.data_dir)) == first and len(first) == 2
        status = _cli(env, "stack", "status")
        assert status.returncode == 0 and status.stdout.count("answering") == 2
        down = _cli(env, "stack", "down")
        assert down.returncode == 0 and "kafka" in down.stdout and "mongo" in down.stdout
        assert _our_processes(own.data_dir) == []
        assert (own.data_dir / "kafka").exists()  # data is kept without --purge
        assert _cli(env, "stack", "status").returncode == 3
    finally:
        LocalStack(own).down(purge=True)
    state = json.dumps(_cli(env, "stack", "status").stdout)
    assert "stopped" in state
