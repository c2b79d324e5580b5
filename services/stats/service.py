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

import fcntl
import hashlib
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import IO

from ..core.config import Settings
from ..core.topics import STATS_GROUP
from .app import app_id

log = logging.getLogger(__name__)


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

        from .app import StatsApp

        lock = wait_for_lock(self.settings)
        try:
            stats = StatsApp(self.settings)
            log.info("stats: app %s, HTTP API on :%d", stats.app.conf.id, self.settings.stats_port)
            worker = faust.Worker(
                stats.app,
                loglevel=self.settings.log_level.lower(),
                redirect_stdouts=False,
                quiet=True,
            )
            worker.execute_from_commandline()
        finally:
            lock.close()
