"""Provisioning from scratch, twice at once: two ``streamcrawl stack provision`` processes
on one empty cache directory wait for each other (the cache's ``.provision.lock``) and both
succeed, and the cache then holds one complete Kafka and one working FerretDB, with no
half-built leftovers.

This downloads Kafka's class path from Maven Central and builds FerretDB with Go (the
Maven and Go module caches in the home directory may already hold the artifacts; the
project's own cache directory is empty), so it takes minutes on a cold machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamcrawl.localstack.provision import FERRETDB_BUILD, FERRETDB_VERSION, KAFKA_VERSION

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def provision(cache: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STREAMCRAWL_CACHE_DIR": str(cache)}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamcrawl.cli", "stack", "provision"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def test_two_provisions_at_once_on_an_empty_cache_both_succeed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert not cache.exists()
    started = time.monotonic()
    runs = [provision(cache, tmp_path / f"provision-{n}.log") for n in (1, 2)]
    codes = [run.wait(timeout=1500) for run in runs]
    elapsed = time.monotonic() - started
    logs = [(tmp_path / f"provision-{n}.log").read_text() for n in (1, 2)]
    assert codes == [0, 0], logs
    # Both report the same servers: the second waited and then found the first's work.
    kafka_home = cache / f"kafka-{KAFKA_VERSION}"
    ferretdb = cache / f"ferretdb-{FERRETDB_BUILD}" / "ferretdb"
    for output in logs:
        assert f"Kafka {KAFKA_VERSION}: {kafka_home / 'libs'}" in output, output
        assert f"FerretDB: {ferretdb}" in output, output

    # One complete Kafka: the marker, the broker jar, and no staging directory left behind.
    assert (kafka_home / ".complete").exists()
    assert (kafka_home / "libs" / f"kafka_2.13-{KAFKA_VERSION}.jar").exists()
    assert [p.name for p in kafka_home.iterdir() if p.name.startswith("libs.")] == []
    version = subprocess.run(
        ["java", "-cp", str(kafka_home / "libs" / "*"), "kafka.Kafka", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert KAFKA_VERSION in version.stdout + version.stderr

    # One working FerretDB binary, and no build directory or staged binary left behind.
    leftovers = [p.name for p in ferretdb.parent.iterdir() if p.name != "ferretdb"]
    assert leftovers == []
    answer = subprocess.run(
        [str(ferretdb), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert f"version: {FERRETDB_VERSION}" in answer.stdout
    print(f"two concurrent provisions on an empty cache: {elapsed:.1f}s")
