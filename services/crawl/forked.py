"""Stage processes forked from one pre-loaded interpreter instead of each a fresh one.

Every stage process imports aiokafka, aiohttp, msgspec, pymongo or faust before it does
anything: 0.3 to 0.45 CPU-seconds each, eight at once in a local crawl, which on a
two-core machine was most of the 2.2 s before its first request. multiprocessing's fork
server imports them once (:data:`PRELOAD`) and forks each stage from that state in
milliseconds; the child then runs exactly what ``streamcrawl run <stage>`` runs, with the
stage's environment, working directory and log file. Pods still run ``streamcrawl run``.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import io
import multiprocessing
import os
import subprocess
import sys
import threading
from multiprocessing import connection
from multiprocessing.context import ForkServerContext
from pathlib import Path

from ..registry import STAGES

PRELOAD = [
    "streamcrawl.cli",
    "streamcrawl.runner",
    *sorted({target.partition(":")[0] for target in STAGES.values()}),
]

# prctl(2): the process's name as ps, top and /proc/PID/comm show it (15 bytes).
_PR_SET_NAME = 15


def available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def _context() -> ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    assert isinstance(context, ForkServerContext)
    context.set_forkserver_preload(PRELOAD)  # read when the server starts, once
    return context


def warm_up() -> None:
    """Start the fork server now, so its imports overlap what the caller does next."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def stop_server() -> None:
    """Stop the fork server and reap it (a new one starts with the next launch)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    with contextlib.suppress(AttributeError, OSError):
        server._stop()  # type: ignore[union-attr]  # no public way; tests of CPython use it


def launch(stage: str, name: str, env: dict[str, str], log_path: Path) -> ForkedProcess:
    process = _context().Process(
        target=run_stage,
        args=(stage, name, env, str(log_path), os.getcwd()),
        name=name,
        # Stopped with the process that started it, should that one exit without
        # stopping its stages (multiprocessing sends SIGTERM to daemonic children).
        daemon=True,
    )
    process.start()
    return ForkedProcess(process)


def run_stage(stage: str, name: str, env: dict[str, str], log_path: str, cwd: str) -> None:
    """The forked child: ``streamcrawl run <stage>`` in this process."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    _name_process(name)
    _log_to(log_path)
    # The command this process runs, as if started by it: a worker that runs itself
    # again (the stats stage's restart) execs sys.orig_argv.
    sys.argv = ["streamcrawl", "run", stage]
    sys.orig_argv = [sys.executable, "-m", "streamcrawl.cli", "run", stage]
    # What `python -m streamcrawl.cli run <stage>` runs, the module already loaded here
    # (named, not imported: crawl must not import cli, which imports crawl).
    command = importlib.import_module("streamcrawl.cli")
    try:
        code = command.main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def _name_process(name: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _log_to(path: str) -> None:
    """stdout and stderr into the stage's log, unbuffered (as PYTHONUNBUFFERED would)."""
    sys.stdout.flush()
    sys.stderr.flush()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    for number, stream in ((1, "stdout"), (2, "stderr")):
        raw = open(number, "wb", buffering=0, closefd=False)  # noqa: SIM115 (the process's)
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace")
        text.reconfigure(write_through=True)
        setattr(sys, stream, text)


class ForkedProcess:
    """A forked stage with the part of :class:`subprocess.Popen` that the stage set uses."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        # Two threads must not both read its exit status from the fork server.
        self._lock = threading.Lock()
        pid = process.pid
        assert pid is not None
        self.pid: int = pid

    @property
    def returncode(self) -> int | None:
        with self._lock:
            return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not connection.wait([self._process.sentinel], timeout):
            raise subprocess.TimeoutExpired(f"stage process {self.pid}", timeout or 0.0)
        code = self.returncode
        assert code is not None
        return code

    def send_signal(self, signal: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal)

    def kill(self) -> None:
        self._process.kill()
