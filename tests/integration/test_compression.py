"""Records compressed by other clients (kcat with lz4, zstd, snappy, gzip) are read by every
stage's consumer: a user's producer settings never stop the pipeline."""

from __future__ import annotations

import subprocess

import pytest
from aiokafka import TopicPartition
from streamcrawl.core.kafka import create_topics, make_consumer, stop_consumer
from streamcrawl.core.topics import SEEDS
from streamcrawl.localstack.stack import StackConfig

from ..conftest import KCAT, isolated_settings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy", "gzip"])
async def test_records_compressed_by_kcat_are_read(stack: StackConfig, codec: str) -> None:
    assert KCAT is not None
    settings = isolated_settings(stack)
    await create_topics(settings)
    topic = settings.topic_prefix + SEEDS
    lines = "".join(f"http://example.com/{codec}/{n}\n" for n in range(50))
    subprocess.run(
        [KCAT, "-P", "-b", settings.kafka_bootstrap, "-t", topic, "-p", "0", "-z", codec],
        input=lines.encode(),
        check=True,
        timeout=60,
    )
    consumer = make_consumer(settings, f"compression-{codec}")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        values: list[bytes] = []
        for _ in range(20):
            batches = await consumer.getmany(timeout_ms=500)
            values.extend(record.value for batch in batches.values() for record in batch)
            if len(values) >= 50:
                break
    finally:
        await stop_consumer(consumer)
    assert [value.decode() for value in values] == lines.splitlines()
