"""The warc stage's files on disk, written so that a reader never sees half a file and a
crash (SIGKILL, power loss) loses no record and repeats none.

- A file is written as ``NAME.warc.gz.open`` (under an exclusive ``flock`` while its
  process lives) and renamed to ``NAME.warc.gz`` when complete: readers take ``*.warc.gz``.
- After each batch the file is fsynced, then its sidecar ``NAME.warc.gz.open.state``
  (length of the complete records, next offset per partition) is replaced atomically and
  fsynced; only then does ``process`` return and the runtime commit the batch's offsets.
- A new file's state is made durable before the file it replaces is renamed and its state
  removed, so the offsets always live in some state.
- At a start, every ``.open`` file no live process holds is cut back to its state's length
  (a batch cut short by the crash goes; Kafka delivers it again, as it was never
  committed). Their offsets say which records of the batch that was fsynced but perhaps
  not committed are already in a file; Kafka may deliver them again and they are skipped.
  The newest such file is continued, the others are completed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from ..core import metrics
from .logic import (
    OPEN_SUFFIX,
    STATE_SUFFIX,
    WARC_SUFFIX,
    Exchange,
    FileState,
    Original,
    RevisitIndex,
    RevisitSnapshot,
    WrittenOffsets,
    exchange_records,
    warc_name,
    warcinfo_record,
)

log = logging.getLogger(__name__)

# After a start the revisit index is refilled from this many of the newest completed files
# at most, in the background, so a start never waits for gigabytes read back.
REBUILD_FILES = 2

# The revisit index a clean stop leaves beside the files (logic.RevisitSnapshot).
SNAPSHOT_NAME = "revisits.snapshot"


@dataclass(frozen=True)
class Pending:
    """One decoded crawl.fetched record to archive, and where it came from."""

    topic: str
    partition: int
    offset: int
    exchange: Exchange


@dataclass
class BatchReport:
    responses: int = 0
    revisits: int = 0
    skipped: int = 0
    bytes: int = 0


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_path(open_path: Path) -> Path:
    return open_path.with_name(open_path.name + STATE_SUFFIX)


def _final_path(open_path: Path) -> Path:
    return open_path.with_name(open_path.name.removesuffix(OPEN_SUFFIX))


class _OpenFile:
    """An ``.open`` file this process holds (locked) and appends to."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path = path
        self.handle = handle

    @classmethod
    def lock(cls, path: Path, handle: BinaryIO) -> _OpenFile | None:
        """Take the file if no live process holds it."""
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return cls(path, handle)

    @property
    def size(self) -> int:
        return self.handle.tell()

    def append(self, data: bytes) -> None:
        self.handle.write(data)

    def sync(self, offsets: dict[str, int]) -> None:
        """Make the records durable, then the state that vouches for them."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        state = _state_path(self.path)
        temporary = state.with_name(state.name + ".tmp")
        with open(temporary, "wb") as out:
            out.write(FileState(self.size, offsets).encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, state)
        _fsync_directory(self.path.parent)

    def complete(self) -> Path:
        """Rename to the final name (readers see it from now on) and drop the state."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        final = _final_path(self.path)
        os.rename(self.path, final)
        _fsync_directory(self.path.parent)
        _state_path(self.path).unlink(missing_ok=True)
        _fsync_directory(self.path.parent)
        self.handle.close()  # releases the lock
        return final


class Archive:
    """The files of one warc stage process."""

    def __init__(
        self, directory: Path, max_bytes: int, info: dict[str, str], revisits: RevisitIndex
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.info = info
        self.revisits = revisits
        self.written = WrittenOffsets()
        self.instance = f"{socket.gethostname()}-{os.getpid()}"
        self.current: _OpenFile | None = None
        self._serial = 0
        # Digests read back after a start (by read_back, in its own thread), taken in by
        # the writer at its next batch.
        self._read_back: queue.SimpleQueue[RevisitIndex] = queue.SimpleQueue()

    # -- start ----------------------------------------------------------------------------

    def recover(self) -> list[Path]:
        """Take over the ``.open`` files of dead processes; return the files completed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        survivors: list[tuple[_OpenFile, FileState]] = []
        for path in sorted(self.directory.glob(f"*{WARC_SUFFIX}{OPEN_SUFFIX}")):
            taken = _OpenFile.lock(path, open(path, "r+b"))  # noqa: SIM115 (kept open)
            if taken is None:
                continue  # another live process writes it
            state = self._read_state(path)
            if state is None or state.length == 0:
                log.warning("warc: %s has no complete batch; removed", path.name)
                taken.handle.close()
                path.unlink()
                _state_path(path).unlink(missing_ok=True)
                continue
            size = path.stat().st_size
            if size < state.length:  # only if an fsync did not keep its promise
                log.error("warc: %s is shorter than its state says; kept as it is", path.name)
            length = min(size, state.length)
            cut = size - length
            taken.handle.truncate(length)
            taken.handle.seek(length)
            os.fsync(taken.handle.fileno())
            log.info("warc: recovered %s (%d bytes after its last batch cut)", path.name, cut)
            self.written.merge(state.offsets)
            survivors.append((taken, state))
        completed: list[Path] = []
        if survivors:
            # The newest goes on, carrying every survivor's offsets, before the others
            # (and their states) are completed.
            *older, (newest, _) = survivors
            self.written.recovered(self.written.offsets)
            newest.sync(self.written.offsets)
            self.current = newest
            completed = [taken.complete() for taken, _ in older]
        self._remove_orphan_states()
        return completed

    def _read_state(self, open_path: Path) -> FileState | None:
        try:
            return FileState.decode(_state_path(open_path).read_bytes())
        except FileNotFoundError:
            return None

    def _remove_orphan_states(self) -> None:
        # A state whose file is gone: left by a crash while a file was completed.
        for state in self.directory.glob(f"*{OPEN_SUFFIX}{STATE_SUFFIX}"):
            if not state.with_name(state.name.removesuffix(STATE_SUFFIX)).exists():
                state.unlink(missing_ok=True)

    def read_back(self, stop: threading.Event | None = None) -> RevisitIndex:
        """The payload digests of the newest completed files, as an index of their own.
        Runs in a thread beside the writer (which goes on archiving meanwhile; until
        :meth:`adopt` hands it over, a payload seen only before the start is archived in
        full, which a revisit record would only have abbreviated); ``stop`` ends it early.
        The file a crash left open is not read: its payloads are archived in full again."""
        index = RevisitIndex(self.revisits.capacity)
        if index.capacity <= 0:
            return index
        files = sorted(
            self.directory.glob(f"*{WARC_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True
        )
        snapshot = self._snapshot()
        if snapshot is not None and files and snapshot.newest == files[0].name:
            if stop is not None and stop.is_set():
                return index
            snapshot.fill(index)
            log.info(
                "warc: revisit index loaded from %s (saved at the last clean stop)", SNAPSHOT_NAME
            )
            return index
        for path in files[:REBUILD_FILES]:
            if index.full or (stop is not None and stop.is_set()):
                break
            _read_originals(path, index, stop)
        return index

    def _snapshot(self) -> RevisitSnapshot | None:
        path = self.directory / SNAPSHOT_NAME
        try:
            return RevisitSnapshot.decode(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # msgspec's DecodeError is a ValueError
            log.warning("warc: %s unreadable (%s); reading the files back instead", path, exc)
            return None

    def _save_snapshot(self, newest: Path) -> None:
        """The index, atomically (a crash mid-write keeps the previous file, which names
        an older file and is then ignored)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self.revisits.merge_older(self._read_back.get_nowait())
        snapshot = RevisitSnapshot(newest.name, self.revisits.entries())
        path = self.directory / SNAPSHOT_NAME
        partial = path.with_name(f"{SNAPSHOT_NAME}.{self.instance}.partial")
        try:
            with open(partial, "wb") as out:
                out.write(snapshot.encode())
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        except OSError as exc:  # the next start reads the files back instead
            log.warning("warc: revisit index not saved to %s: %s", path, exc)
            partial.unlink(missing_ok=True)

    def adopt(self, older: RevisitIndex) -> None:
        """Hand the digests :meth:`read_back` found to the writer (from any thread)."""
        self._read_back.put(older)

    # -- batches --------------------------------------------------------------------------

    def write(self, batch: Sequence[Pending]) -> BatchReport:
        """Archive a batch and make it durable; return what was written."""
        self.written.batch_committed()  # the runtime commits a batch before the next
        with contextlib.suppress(queue.Empty):
            while True:
                self.revisits.merge_older(self._read_back.get_nowait())
        report = BatchReport()
        chunks: list[bytes] = []
        for item in batch:
            self.written.delivered(item.topic, item.partition, item.offset)
            if self.written.already_written(item.topic, item.partition, item.offset):
                report.skipped += 1
                continue
            chunks.append(self._records(item.exchange, report))
            self.written.written(item.topic, item.partition, item.offset)
        if not chunks:
            return report
        current = self._file_with_room()
        for data in chunks:
            current.append(data)
            report.bytes += len(data)
        current.sync(self.written.offsets)
        return report

    def _records(self, exchange: Exchange, report: BatchReport) -> bytes:
        original = self.revisits.original(exchange.payload_digest) if exchange.revisitable else None
        if original is not None:
            report.revisits += 1
        else:
            report.responses += 1
            if exchange.revisitable:
                self.revisits.remember(
                    exchange.payload_digest, Original(exchange.target_uri, exchange.date)
                )
        return exchange_records(exchange, original)

    def _file_with_room(self) -> _OpenFile:
        """The file to append to: a new one when there is none or the current is full.
        The new file's state is durable before the full one is completed."""
        old = self.current
        if old is not None and old.size < self.max_bytes:
            return old
        new = self._create()
        new.sync(self.written.offsets)
        self.current = new
        if old is not None:
            final = old.complete()
            metrics.WARC_FILES.inc()
            log.info("warc: %s complete", final.name)
        return new

    def _create(self) -> _OpenFile:
        self._serial += 1
        name = warc_name(datetime.now(UTC), self.instance, self._serial)
        path = self.directory / f"{name}{OPEN_SUFFIX}"
        taken = _OpenFile.lock(path, open(path, "xb"))  # noqa: SIM115 (kept open)
        assert taken is not None, "a file this process just created"
        taken.append(warcinfo_record(name, self.info))
        return taken

    # -- stop -----------------------------------------------------------------------------

    def close(self) -> Path | None:
        """Complete the current file at a clean stop (every batch in it is committed).
        A file still vouching for a batch delivered before a crash and not yet delivered
        again stays ``.open``: the next start takes it over."""
        current, self.current = self.current, None
        if current is None:
            return None
        self.written.batch_committed()  # the runtime commits the last batch before a stop
        if self.written.unconfirmed():
            current.handle.close()
            log.info("warc: %s left open for the next start (recovered offsets)", current.path)
            return None
        with contextlib.suppress(FileNotFoundError):
            final = current.complete()
            metrics.WARC_FILES.inc()
            if self.revisits.capacity > 0:
                self._save_snapshot(final)
            return final
        return None


def _read_originals(path: Path, index: RevisitIndex, stop: threading.Event | None) -> None:
    """Remember the payload digest of every complete response record in ``path``."""
    try:
        with open(path, "rb") as stream:
            for record in ArchiveIterator(stream):
                if stop is not None and stop.is_set():
                    return
                if record.rec_type != "response":
                    continue
                headers = record.rec_headers
                digest = headers.get_header("WARC-Payload-Digest")
                if digest and not headers.get_header("WARC-Truncated"):
                    original = Original(
                        headers.get_header("WARC-Target-URI"), headers.get_header("WARC-Date")
                    )
                    index.remember_older(digest, original)
                if index.full:
                    return
    except (ArchiveLoadFailed, OSError, ValueError) as exc:
        log.warning("warc: could not read %s back for revisits: %s", path.name, exc)
