"""What ``bench/compare`` reads from /proc: CPU seconds, peak and current RSS, descendants,
and a sampling thread for the processes that are not our direct children."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()  # [0] is field 3 (state)


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of the process itself (not its children), in seconds."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kib(pid: int, key: str) -> int | None:
    """A ``Vm*`` line of /proc/PID/status in KiB (VmHWM: peak RSS, VmRSS: current)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_kib(pid: int) -> int | None:
    """Proportional set size in KiB: each page shared by n processes counts 1/n here (the
    stages forked from one fork server share its imported modules; VmHWM counts them in
    full in every one of them)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def comm(pid: int) -> str:
    """The process's name (a stage forked by a local crawl is named after its stage)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (by scanning /proc: ppid links)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


@dataclass
class Seen:
    """What the sampler saw of one process: its last CPU reading, peak VmHWM and VmRSS."""

    label: str
    cpu_first: float = -1.0
    cpu_last: float = 0.0
    hwm_kib: int = 0
    rss_max_kib: int = 0
    pss_max_kib: int = 0


class Sampler(threading.Thread):
    """Reads the given processes, and every descendant of ``root``, every ``interval``
    seconds: CPU (last value before exit), VmHWM and VmRSS (max)."""

    def __init__(
        self,
        fixed: dict[int, str],
        root: Callable[[], int | None] = lambda: None,
        label: Callable[[int], str] = str,
        interval: float = 0.25,
    ) -> None:
        super().__init__(daemon=True)
        self.fixed = fixed
        self.root = root
        self.label = label
        self.interval = interval
        self.seen: dict[int, Seen] = {}
        self._halt = threading.Event()

    def sample(self) -> None:
        pids = dict(self.fixed)
        root = self.root()
        if root is not None:
            for pid in [root, *descendants(root)]:
                if pid not in pids:
                    # Read each time: a process forked from a fork server names itself
                    # (prctl) a moment after it appears.
                    pids[pid] = self.label(pid)
        for pid, name in pids.items():
            cpu = cpu_seconds(pid)
            if cpu is None:
                continue
            seen = self.seen.setdefault(pid, Seen(name))
            seen.label = name
            if seen.cpu_first < 0:
                seen.cpu_first = cpu
            seen.cpu_last = cpu
            seen.hwm_kib = max(seen.hwm_kib, status_kib(pid, "VmHWM") or 0)
            seen.rss_max_kib = max(seen.rss_max_kib, status_kib(pid, "VmRSS") or 0)
            seen.pss_max_kib = max(seen.pss_max_kib, pss_kib(pid) or 0)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


def wait_child(
    pid: int, poll: Callable[[], bool] | None = None, timeout: float = 3600.0, every: float = 0.1
) -> tuple[int, os.struct_rusage | None, float | None]:
    """Wait for our child ``pid`` with wait4 (its rusage includes the children it reaped).

    ``poll`` is called while it runs; the first time it returns True the time is noted and
    the child gets SIGTERM. Returns (exit status, rusage, seconds until poll said done).
    """
    started = time.monotonic()
    done_at: float | None = None
    while True:
        waited, status, usage = os.wait4(pid, os.WNOHANG)
        if waited == pid:
            return os.waitstatus_to_exitcode(status), usage, done_at
        now = time.monotonic()
        if done_at is None and poll is not None and poll():
            done_at = time.monotonic() - started
            os.kill(pid, 15)
        if now - started > timeout:
            os.kill(pid, 9)
            _, status, usage = os.wait4(pid, 0)
            return os.waitstatus_to_exitcode(status), usage, done_at
        time.sleep(every)


def kafka_log_bytes(data_dir: Path, prefix: str) -> dict[str, int]:
    """Bytes of record data (``*.log`` segments) per topic named ``prefix...`` (index
    files are preallocated and sparse, so they are left out)."""
    sizes: dict[str, int] = {}
    if not data_dir.exists():
        return sizes
    for partition in data_dir.iterdir():
        if partition.is_dir() and partition.name.startswith(prefix):
            topic = partition.name.rsplit("-", 1)[0]
            size = sum(f.stat().st_size for f in partition.glob("*.log"))
            sizes[topic] = sizes.get(topic, 0) + size
    return sizes
