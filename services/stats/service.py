"""``streamcrawl run stats``: the stats stage's faust worker, one per pipeline.

faust runs its own worker (consumer, changelog recovery, commits, web server), which
does not fit the stage runtime's batch and stream loops, so this registry entry is a
runner, not a :class:`~streamcrawl.core.runtime.Stage`.

The tables are partitioned by key, not by input partition (see :mod:`.app`), so one
worker must hold them all. On one machine a second stats process of the same pipeline
(a second ``streamcrawl crawl`` on the same stack) waits on a lock file and takes over
when the first stops, recovering the tables from their changelogs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from aiokafka.errors import KafkaError

from ..core.config import Settings
from ..core.kafka import OffsetProbe, PartitionLag
from ..core.topics import STATS_GROUP, STATS_INPUTS, topic_name
from . import logic
from .app import StatsApp, app_id

log = logging.getLogger(__name__)

# A worker whose committed offsets have not moved for this long while records wait is
# stopped inside faust (logic.CommitWatch): the process starts again, its tables recovered.
STALL_AFTER_S = 45.0
STALL_CHECK_S = 5.0

# An event loop that has not turned for this long is blocked (LoopWatchdog): the process
# starts again. Longer than any synchronous step of a healthy worker on a loaded machine.
LOOP_STALL_S = 30.0

# faust gives up on the first Kafka error of its start-up (a broker restarting, a
# coordinator moving) and stops the worker: the process starts it again after this long.
RESTART_DELAY_S = 5.0

# At shutdown, how long tasks left running once every faust service has stopped (aiohttp's,
# aiokafka's) get to finish after being cancelled.
STRAY_TASKS_WAIT_S = 1.0


def lock_path(settings: Settings) -> Path:
    """One lock per pipeline (broker and topic prefix) on this machine."""
    cluster = hashlib.sha256(settings.kafka_bootstrap.encode()).hexdigest()[:12]
    folder = Path(settings.state_dir or tempfile.gettempdir())
    return folder / f"{app_id(settings)}-{cluster}.lock"


def wait_for_lock(settings: Settings) -> IO[str]:
    """Hold the pipeline's stats lock (blocking while another worker holds it)."""
    path = lock_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115 (held for the life of the process)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("stats: another stats worker serves this pipeline; waiting (%s)", path)
        # SIGTERM while waiting: exit at once (the default handler would too, but say so).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        fcntl.flock(handle, fcntl.LOCK_EX)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return handle


class StatsWorker:
    """What ``streamcrawl run stats`` starts: the lock, then the faust worker."""

    name = "stats"
    group = STATS_GROUP  # faust's application id, under the topic prefix (app.app_id)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self) -> None:
        import faust

        lock = wait_for_lock(self.settings)
        try:
            stats = StatsApp(self.settings)
            watch_commits(stats, self.settings)
            log.info("stats: app %s, HTTP API on :%d", stats.app.conf.id, self.settings.stats_port)
            worker = quick_exit_worker(faust.Worker)(
                stats.app,
                loglevel=self.settings.log_level.lower(),
                redirect_stdouts=False,
                quiet=True,
            )

            def on_blocked(stack: str) -> None:
                on_blocked_loop(stack, getattr(worker, "_signal_stop_time", None) is not None)

            LoopWatchdog(worker.loop, LOOP_STALL_S, on_blocked).start()
            try:
                worker.execute_from_commandline()
            except SystemExit as stopped:
                # A SIGTERM/SIGINT that faust handled (mode's Worker records when) stops it.
                signalled = getattr(worker, "_signal_stop_time", None)
                cause = None if signalled else kafka_failure(stopped)
                if cause is None:
                    raise
                log.error(
                    "stats: the faust worker stopped on a Kafka error (%r); starting it again"
                    " in %.0f s, the tables recovered from their changelogs",
                    cause,
                    RESTART_DELAY_S,
                )
        finally:
            lock.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a stop while waiting: stop at once
        time.sleep(RESTART_DELAY_S)
        restart_this_process()


class LoopWatchdog:
    """A thread that sees the event loop stop turning: a callback on the loop stamps the
    time every second; ``after_s`` seconds without a stamp (once there was one) calls
    ``on_blocked`` from the thread, with the main thread's stack.

    The commit watch is a timer on that loop: a worker whose loop is blocked (seen once in
    CI: no log line, no HTTP answer, no SIGTERM handled, for minutes, right after catching
    up) needs a watcher outside it."""

    TICK_S = 1.0

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        after_s: float,
        on_blocked: Callable[[str], None],
    ) -> None:
        self.loop = loop
        self.after_s = after_s
        self.on_blocked = on_blocked
        self.last_tick: float | None = None
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    def start(self) -> None:
        self.loop.call_soon_threadsafe(self._tick)
        self._thread.start()

    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        self.loop.call_later(self.TICK_S, self._tick)

    def blocked_for(self, now: float) -> float:
        return 0.0 if self.last_tick is None else now - self.last_tick

    def _watch(self) -> None:
        while True:
            time.sleep(self.TICK_S)
            if self.blocked_for(time.monotonic()) >= self.after_s:
                self.on_blocked(main_thread_stack())
                return


def main_thread_stack() -> str:
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    return "".join(traceback.format_stack(frame)) if frame is not None else "(not found)"


def on_blocked_loop(stack: str, stopping: bool) -> None:
    """Start this process again (or exit, if it was asked to stop): nothing runs on a
    blocked loop, and only a new process recovers the tables and reads on."""
    log.error(
        "stats: the event loop has not turned for %.0f s (the worker answers nothing); %s. "
        "The main thread was at:\n%s",
        LOOP_STALL_S,
        "exiting (a stop was asked)" if stopping else "starting this process again",
        stack,
    )
    if stopping:
        os._exit(1)
    restart_this_process()


def quick_exit_worker(worker_class: type[Any]) -> type[Any]:
    """faust's Worker without the two seconds mode's shutdown sleeps after every service
    has stopped (up to 1 s for stray tasks, then 1 s unconditionally): the tables' writes are
    flushed and the group left by then, and every crawl waits for this process to exit."""

    class QuickExitWorker(worker_class):  # type: ignore[misc]
        def _shutdown_loop(self) -> None:
            loop = self.loop
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._gather_futures())
            stray = asyncio.all_tasks(loop)
            for task in stray:
                task.cancel()
            if stray:
                loop.run_until_complete(asyncio.wait(stray, timeout=STRAY_TASKS_WAIT_S))
            loop.stop()
            self.log.info("Closing event loop")
            loop.close()
            if self.crash_reason:
                self.log.critical("We experienced a crash! Reraising original exception...")
                raise self.crash_reason from self.crash_reason

    return QuickExitWorker


def watch_commits(stats: StatsApp, settings: Settings) -> None:
    """A faust timer that restarts this process when the worker stopped committing."""
    watch = logic.CommitWatch(STALL_AFTER_S)
    inputs = [topic_name(settings.topic_prefix, suffix) for suffix in STATS_INPUTS]
    probes: list[OffsetProbe] = []  # made in faust's loop (aiokafka clients bind to one)

    async def check_commits() -> None:
        # A watch must never stop what it watches: faust crashes the worker on a timer's
        # exception, and a broker outage (a start or a read refused) is no stall.
        try:
            rows = await read_lag()
        except Exception as exc:
            log.info("stats: commit watch could not read offsets (%r)", exc)
            watch.reset(time.monotonic())  # commits wait on the broker too: grace anew
            return
        committed = tuple(sorted((row.topic, row.partition, row.committed) for row in rows))
        lag = sum(max(row.lag, 0) for row in rows)
        if watch.stalled(committed, lag, time.monotonic(), stats.recovering()):
            log.error(
                "stats: fewer than %d offsets committed in %.0f s with %d records waiting; "
                "the faust worker is stuck: starting this process again (tables recovered "
                "from their changelogs, records read again from the last commit). Its "
                "tasks:\n%s",
                watch.min_records,
                STALL_AFTER_S,
                lag,
                task_stacks(),
            )
            restart_this_process()

    async def read_lag() -> list[PartitionLag]:
        if not probes:
            probe = OffsetProbe(settings)
            try:
                await probe.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await probe.stop()
                raise
            probes.append(probe)
        return await probes[0].lag(STATS_GROUP, inputs)

    stats.app.timer(STALL_CHECK_S)(check_commits)


def task_stacks() -> str:
    """Where each asyncio task of this loop waits, down its chain of awaits: what a stuck
    worker needs to show (a task's own stack stops at its outermost coroutine)."""
    lines = []
    for task in asyncio.all_tasks():
        chain: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(chain) < 30:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                chain.append(repr(awaited)[:120])
                break
            chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        lines.append(f"task {task.get_name()}:\n    " + "\n    ".join(chain))
    return "\n".join(lines)


def kafka_failure(stopped: SystemExit) -> BaseException | None:
    """The Kafka error a failed worker stopped on (faust exits with the error as the
    context of its SystemExit), or None: a clean stop, or a failure of another kind."""
    if stopped.code in (0, None):
        return None
    seen: set[int] = set()
    cause = stopped.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KafkaError):
            failure: BaseException = cause  # aiokafka has no type hints
            return failure
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def restart_this_process() -> None:
    """Run this command again in this process (same pid, arguments and environment): faust
    closed its event loop and keeps module state, so a fresh interpreter is the clean way."""
    sys.stdout.flush()
    sys.stderr.flush()
    # A stage forked by a local crawl has the command it runs there too (crawl.forked).
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
