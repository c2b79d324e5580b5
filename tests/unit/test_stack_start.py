"""How the local stack reports a server that dies during start-up: with its exit status,
and as a silent exit (which ``up`` retries once) only when it wrote nothing at all."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamcrawl.localstack.stack import (
    LocalStack,
    ProcessRecord,
    SilentExit,
    StackConfig,
    StackError,
    _spawn,
)


def _stack(tmp_path: Path) -> LocalStack:
    return LocalStack(StackConfig(data_dir=tmp_path / "stack"))


def _start(stack: LocalStack, script: str, log: Path) -> ProcessRecord:
    # The data directory on the command line: that is how the stack knows its processes.
    pid = _spawn(["sh", "-c", script, str(stack.config.data_dir)], log)
    return ProcessRecord(pid=pid, port=0, started_at=time.time())


def _never(target: str, timeout: float) -> bool:
    return False


def test_a_server_that_writes_nothing_and_exits_is_a_silent_exit(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    log = tmp_path / "server.log"
    record = _start(stack, "exit 3", log)
    with pytest.raises(SilentExit, match=r"exited during start-up \(exit code 3\)"):
        stack._wait("X", record, [log], _never, "t", time.monotonic() + 30)


def test_a_killed_server_says_which_signal(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    log = tmp_path / "server.log"
    record = _start(stack, "kill -9 $$", log)
    with pytest.raises(SilentExit, match="killed by SIGKILL"):
        stack._wait("X", record, [log], _never, "t", time.monotonic() + 30)


def test_a_server_that_says_why_is_not_retried(tmp_path: Path) -> None:
    stack = _stack(tmp_path)
    quiet, stdout = tmp_path / "server.log", tmp_path / "stdout.log"
    record = _start(stack, "echo 'Address already in use'; exit 1", stdout)
    with pytest.raises(StackError, match=r"exit code 1.*Address already in use") as raised:
        stack._wait("X", record, [quiet, stdout], _never, "t", time.monotonic() + 30)
    assert not isinstance(raised.value, SilentExit)
