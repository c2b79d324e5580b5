"""A local crawl's stage processes forked from a pre-loaded fork server: they run
``streamcrawl run <stage>`` with their own environment and log, and the stage set
manages them as it does a fresh interpreter (exit codes, signals, timeouts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamcrawl.crawl import forked
from streamcrawl.crawl.processes import StageProcesses

pytestmark = pytest.mark.skipif(not forked.available(), reason="no fork server here")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stage_env(bootstrap: str) -> dict[str, str]:
    return {**os.environ, "STREAMCRAWL_KAFKA_BOOTSTRAP": bootstrap, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A port that accepts connections and never answers: a stage waits at its start."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_a_forked_stage_runs_the_command_with_its_environment_and_log(tmp_path: Path) -> None:
    stages = StageProcesses(stage_env("127.0.0.1:1"), tmp_path / "logs", fork=True)
    process = stages.start_one("parser")
    assert process.wait(60) == 2  # what `streamcrawl run parser` exits with here
    log = (tmp_path / "logs" / "parser.log").read_text()
    assert "Kafka refused this client" in log and "127.0.0.1:1" in log
    assert stages.dead() == ["parser"]


def test_a_forked_stage_is_named_waited_for_and_killed_like_a_child(
    tmp_path: Path, silent_broker: str
) -> None:
    stages = StageProcesses(stage_env(silent_broker), tmp_path / "logs", fork=True)
    process = stages.start_one("sink", "sink-1")
    deadline = time.monotonic() + 30
    while Path(f"/proc/{process.pid}/comm").read_text().strip() != "sink-1":
        assert time.monotonic() < deadline, "the forked stage never took its name"
        time.sleep(0.05)
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(0.3)
    assert process.poll() is None and stages.dead() == []
    stages.kill("sink-1")
    assert process.returncode == -signal.SIGKILL
    assert process.wait(1) == -signal.SIGKILL


def test_a_stopped_forked_stage_ends_on_sigterm(tmp_path: Path, silent_broker: str) -> None:
    stages = StageProcesses(stage_env(silent_broker), tmp_path / "logs", fork=True)
    process = stages.start_one("frontier")
    stages.stop(timeout=20)
    # SIGTERM ended it (0 once the stage handles it, -15 before); no SIGKILL was needed.
    assert process.returncode in (0, -signal.SIGTERM)


def test_the_fork_server_stops_when_asked_and_a_later_stage_starts_another(
    tmp_path: Path,
) -> None:
    from multiprocessing import forkserver

    stages = StageProcesses(stage_env("127.0.0.1:1"), tmp_path / "logs", fork=True)
    assert stages.start_one("parser").wait(60) == 2
    server_pid = forkserver._forkserver._forkserver_pid
    assert server_pid is not None and Path(f"/proc/{server_pid}").exists()
    forked.stop_server()
    assert not Path(f"/proc/{server_pid}").exists()  # exited and reaped
    assert stages.start_one("parser", "parser-1").wait(60) == 2
    assert forkserver._forkserver._forkserver_pid not in (None, server_pid)


def test_a_forked_stats_worker_that_runs_itself_again_execs_its_own_command(
    tmp_path: Path,
) -> None:
    """The stats worker restarts itself (same pid) after faust gave up on a Kafka error:
    in a forked process it must exec ``streamcrawl run stats``, not the fork server."""
    env = {
        **stage_env("127.0.0.1:1"),
        "STREAMCRAWL_STATE_DIR": str(tmp_path / "state"),
        "STREAMCRAWL_STATS_PORT": str(free_port()),
        "STREAMCRAWL_METRICS_PORT": "0",
    }
    stages = StageProcesses(env, tmp_path / "logs", fork=True)
    process = stages.start_one("stats")
    command: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while command[1:5] != [b"-m", b"streamcrawl.cli", b"run", b"stats"]:
            assert process.poll() is None, (tmp_path / "logs" / "stats.log").read_text()
            assert time.monotonic() < deadline, command
            time.sleep(0.2)
            command = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    finally:
        stages.stop(timeout=20)
    assert "starting it again" in (tmp_path / "logs" / "stats.log").read_text()
