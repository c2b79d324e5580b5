"""Every stage as its own process, running exactly what a pod runs
(``streamcrawl run <stage>``), so a local crawl exercises the production code paths.
Where the platform has a fork server the processes are forked from it, pre-loaded
(:mod:`.forked`); elsewhere each is a fresh interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from ..core.config import Settings
from ..registry import STAGE_NAMES
from . import forked


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage process: ours, the settings, then ``extra``."""
    env = {**os.environ, **settings.as_env(), **(extra or {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def instance_id(env: dict[str, str], name: str) -> str:
    """The static group member a process slot is (``<topic prefix><name>``): unique per
    group and prefix, and the same for a process restarted in that slot, so the restart
    takes the slot's partitions straight back."""
    return env.get("STREAMCRAWL_TOPIC_PREFIX", "crawl.") + name


def warm_up_stage_processes() -> None:
    """Get ready to start stages: the fork server imports while the caller goes on."""
    if forked.available():
        forked.warm_up()


def stop_stage_processes_server() -> None:
    """No fork server outlives the crawl (its exit also hands its stages' CPU time to
    this process's wait4 accounting)."""
    if forked.available():
        forked.stop_server()


class StageProcess(Protocol):
    """What the stage set uses of a process (a :class:`subprocess.Popen` has it)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, signal: int) -> None: ...

    def kill(self) -> None: ...


class StageProcesses:
    """The stages as child processes, each logging to ``<log_dir>/<name>.log``.

    A replica beyond the first is named ``<stage>-<n>``; that name is also the process's
    static group membership (:func:`instance_id`).
    """

    def __init__(self, env: dict[str, str], log_dir: Path, fork: bool | None = None) -> None:
        self._env = env
        self._log_dir = log_dir
        self._fork = forked.available() if fork is None else fork
        self.processes: dict[str, StageProcess] = {}
        self._retiring: dict[str, StageProcess] = {}

    def start(self, stages: Iterable[str] = STAGE_NAMES) -> None:
        for stage in stages:
            self.start_one(stage)

    def start_one(self, stage: str, name: str | None = None) -> StageProcess:
        name = name or stage
        self._wait_retired(name)
        env = {**self._env, "STREAMCRAWL_INSTANCE_ID": instance_id(self._env, name)}
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{name}.log"
        process: StageProcess
        if self._fork:
            process = forked.launch(stage, name, env, log_path)
            self.processes[name] = process
            return process
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "streamcrawl.cli", "run", stage],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.processes[name] = process
        return process

    def replicas(self, stage: str) -> list[str]:
        return sorted(
            (n for n in self.processes if n == stage or n.startswith(stage + "-")),
            key=lambda n: int(n.rsplit("-", 1)[1]) if "-" in n else 0,
        )

    def scale(self, stage: str, wanted: int) -> None:
        """Start or gracefully stop replicas (SIGTERM: they drain and commit) to ``wanted``."""
        names = self.replicas(stage)
        for number in range(len(names), wanted):
            self.start_one(stage, f"{stage}-{number}" if number else stage)
        for name in names[wanted:][::-1]:
            self.retire(name)

    def retire(self, name: str) -> None:
        """Stop one replica gracefully (SIGTERM: it drains, commits and hands over)."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGTERM)
        self._retiring[name] = process

    def _wait_retired(self, name: str) -> None:
        """A slot's new process waits for the old one, still handing its work over, to
        leave: two live members with one instance id would fence each other."""
        process = self._retiring.pop(name, None)
        if process is not None and process.poll() is None:
            try:
                process.wait(self._grace() + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _grace(self) -> float:
        return float(self._env.get("STREAMCRAWL_SHUTDOWN_GRACE", "20"))

    def kill(self, stage: str) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        process = self.processes[stage]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def dead(self) -> list[str]:
        return [name for name, proc in self.processes.items() if proc.poll() is not None]

    def stop(self, timeout: float = 40.0) -> None:
        everything = [*self.processes.values(), *self._retiring.values()]
        for process in everything:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in everything:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
