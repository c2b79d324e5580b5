"""A local stack (Kafka broker and MongoDB-wire server) on free ports, for one test
session or, where a test kills a server, for one test module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamcrawl.crawl.local import free_port
from streamcrawl.localstack.stack import LocalStack, StackConfig


@contextmanager
def running_stack(data_dir: Path) -> Iterator[LocalStack]:
    """Both servers started under ``data_dir`` and purged afterwards."""
    config = StackConfig(
        data_dir=data_dir,
        kafka_port=free_port(),
        controller_port=free_port(),
        mongo_port=free_port(),
        kafka_heap=os.environ.get("STREAMCRAWL_TEST_KAFKA_HEAP", "768m"),
    )
    local = LocalStack(config)
    try:
        local.up(timeout=180)
    except Exception:
        local.down()
        raise
    try:
        yield local
    finally:
        local.down(purge=True)
