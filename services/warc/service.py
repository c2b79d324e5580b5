"""The warc stage: crawl.fetched in, WARC/1.1 files out (``streamcrawl run warc``).

It reads crawl.fetched in a consumer group of its own, so it adds no work to the parser
and can be scaled, stopped or replayed alone. Each batch becomes a ``request`` and a
``response`` (or ``revisit``) record per fetch, appended to this process's ``.open`` file,
fsynced with its state before ``process`` returns; the runtime commits the batch's offsets
only after that. What the records hold is decided in ``logic.py``; the files, their
rotation and the recovery after a crash are ``files.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..core import metrics
from ..core.config import Settings
from ..core.messages import Fetched
from ..core.runtime import BatchStage, Input, Output, Received, json_input
from ..core.topics import FETCHED, WARC_GROUP
from .files import Archive, Pending
from .logic import RevisitIndex, Unarchivable, exchange_from

log = logging.getLogger(__name__)

MIN_FILE_BYTES = 64 * 1024


def warc_directory(settings: Settings) -> Path:
    """``WARC_DIR``, else ``<STATE_DIR>/warc``, else ``./warc``."""
    if settings.warc_dir:
        return Path(settings.warc_dir)
    if settings.state_dir:
        return Path(settings.state_dir) / "warc"
    return Path("warc")


def warcinfo_fields(settings: Settings) -> dict[str, str]:
    return {
        "software": "streamcrawl warc stage",
        "format": "WARC File Format 1.1",
        "conformsTo": "https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/",
        "hostname": socket.gethostname(),
        "http-header-user-agent": settings.user_agent,
        "isPartOf": settings.topic_prefix.rstrip("."),
    }


class WarcStage(BatchStage):
    name = "warc"
    group = WARC_GROUP

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        if settings.warc_max_bytes < MIN_FILE_BYTES:
            raise ValueError(f"STREAMCRAWL_WARC_MAX_BYTES must be at least {MIN_FILE_BYTES}")
        self.archive = Archive(
            warc_directory(settings),
            settings.warc_max_bytes,
            warcinfo_fields(settings),
            RevisitIndex(settings.warc_revisit_cache),
        )

    def inputs(self) -> tuple[Input, ...]:
        return (json_input(FETCHED, Fetched),)

    async def start(self) -> None:
        completed = await asyncio.to_thread(self.archive.recover)
        metrics.WARC_FILES.inc(len(completed))
        log.info("warc: writing under %s", self.archive.directory.resolve())
        # Read back in the background: a start archives at once, however large the files.
        self._stop_reading = threading.Event()
        self._reading = asyncio.create_task(self._read_back())

    async def _read_back(self) -> None:
        began = time.monotonic()
        try:
            older = await asyncio.to_thread(self.archive.read_back, self._stop_reading)
        except Exception as exc:  # the index only abbreviates: archiving goes on without it
            log.warning("warc: reading digests back for revisits failed: %r", exc)
            return
        self.archive.adopt(older)
        if len(older):
            log.info(
                "warc: %d payload digests ready for revisits in %.1fs",
                len(older),
                time.monotonic() - began,
            )

    async def stop(self) -> None:
        reading = getattr(self, "_reading", None)
        if reading is not None:
            self._stop_reading.set()
            await reading
        final = await asyncio.to_thread(self.archive.close)
        if final is not None:
            log.info("warc: %s complete", final.name)

    async def process(self, batch: list[Received[Any]]) -> list[Output]:
        pending: list[Pending] = []
        dead: list[Output] = []
        limit = self.settings.max_body_bytes
        splice = self.settings.warc_splice_bodies
        for item in batch:
            record = item.record
            try:
                exchange = exchange_from(item.message, limit, splice)
            except Unarchivable as exc:
                dead.append(self.dead_letter(record, exc.reason, exc.detail))
                continue
            pending.append(Pending(record.topic, record.partition, record.offset, exchange))
        # gzip and fsync off the event loop: heartbeats and /metrics keep answering.
        report = await asyncio.to_thread(self.archive.write, pending)
        metrics.WARC_RECORDS.labels("response").inc(report.responses)
        metrics.WARC_RECORDS.labels("revisit").inc(report.revisits)
        metrics.WARC_RECORDS.labels("skipped").inc(report.skipped)
        metrics.WARC_BYTES.inc(report.bytes)
        return dead
