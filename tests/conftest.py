"""Shared fixtures. Integration tests run against a real Kafka broker and a real
MongoDB-wire server, started once per session on free ports by the same code as
``streamcrawl stack up`` (they reuse its download cache)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.crawl.local import free_port
from streamcrawl.localstack.stack import LocalStack, StackConfig

KCAT = shutil.which("kcat")


def kcat_consume(bootstrap: str, topic: str) -> list[tuple[str, bytes]]:
    """Every record of ``topic`` as (key, value), read by Debian's kcat from the beginning."""
    assert KCAT is not None
    out = subprocess.run(
        [KCAT, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-f", "%k\t%s\n"],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    rows = []
    for line in out.split(b"\n"):
        if line:
            key, _, value = line.partition(b"\t")
            rows.append((key.decode(), value))
    return rows


def pytest_sessionstart(session: pytest.Session) -> None:
    # A run stopped with SIGTERM (a CI time-out, `timeout`) should still tear down the
    # servers it started: turn the signal into the interrupt pytest cleans up after.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    data_dir = tmp_path_factory.mktemp("stack")
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
    yield config
    local.down(purge=True)


def isolated_settings(stack: StackConfig, **extra: str) -> Settings:
    """Settings with their own topic prefix and database, so tests never share data;
    ``extra`` maps setting names (``max_depth=...``) to values."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "STREAMCRAWL_KAFKA_BOOTSTRAP": stack.bootstrap,
        "STREAMCRAWL_MONGO_URI": stack.mongo_uri,
        "STREAMCRAWL_TOPIC_PREFIX": f"t{tag}.",
        "STREAMCRAWL_MONGO_DATABASE": f"test_{tag}",
        "STREAMCRAWL_ALLOW_NETWORKS": "127.0.0.1/32",
        # The warc stage runs in every pipeline: its files go to a directory of the test's.
        "STREAMCRAWL_WARC_DIR": tempfile.mkdtemp(prefix=f"streamcrawl-warc-{tag}-"),
    }
    env.update({f"STREAMCRAWL_{name.upper()}": value for name, value in extra.items()})
    return Settings.from_env(env)


@pytest.fixture()
def settings(stack: StackConfig) -> Settings:
    return isolated_settings(stack)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
