"""The stats worker through a Kafka failure at start-up: faust stops its worker on the
first Kafka error (a broker restarting while the tables' changelog topics are created);
the process starts it again, as the same process, until the broker answers, and a SIGTERM
still stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, NodeNotReadyError
from streamcrawl.stats.service import kafka_failure

from ..conftest import free_port

pytestmark = pytest.mark.integration


def _exit_while_handling(error: BaseException, code: int = 1) -> SystemExit:
    """What mode's ``exiting()`` raises: sys.exit in the except block of the failure."""
    try:
        try:
            raise error
        except BaseException:
            sys.exit(code)
    except SystemExit as stopped:
        return stopped
    raise AssertionError("unreachable")


def test_a_kafka_error_is_a_restartable_failure_and_nothing_else_is() -> None:
    not_ready = NodeNotReadyError("node 1")
    assert kafka_failure(_exit_while_handling(not_ready)) is not_ready
    wrapped = RuntimeError("table start failed")
    wrapped.__cause__ = KafkaConnectionError("gone")
    assert isinstance(kafka_failure(_exit_while_handling(wrapped)), KafkaConnectionError)
    assert kafka_failure(_exit_while_handling(ValueError("a bug"))) is None
    assert kafka_failure(_exit_while_handling(not_ready, code=0)) is None
    itself = RuntimeError("crash")  # mode re-raises a crash "from" itself: no endless walk
    itself.__cause__ = itself
    assert kafka_failure(_exit_while_handling(itself)) is None


def test_the_worker_starts_again_in_its_process_until_stopped(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "STREAMCRAWL_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # nothing listens there
        "STREAMCRAWL_STATE_DIR": str(tmp_path),
        "STREAMCRAWL_STATS_PORT": str(free_port()),
    }
    log = tmp_path / "stats.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "streamcrawl.cli", "run", "stats"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while log.read_text(errors="replace").count("starting it again") < 2:
            assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert "stopped on a Kafka error (KafkaConnectionError" in log.read_text(errors="replace")
