"""A dedup partition's state on disk: its filter, its counts and the crawl.fetch offset
they cover, so a restart replays only what came after instead of the whole topic.

One file per partition, written under a temporary name, fsynced and renamed over the
previous one: a crash mid-write leaves the previous snapshot. A file that does not read
back whole (wrong magic, short, checksum mismatch) is ignored: the partition is then
rebuilt from the beginning of crawl.fetch, which is slower but never wrong.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
from collections import Counter
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path

from pybloom_live import ScalableBloomFilter

from .logic import CountMinSketch, PartitionFilter

log = logging.getLogger(__name__)

MAGIC = b"STREAMCRAWL-DEDUP-1\n"
_LENGTH = struct.Struct("<Q")
_DIGEST = 32


@dataclass(frozen=True)
class Snapshot:
    filter: PartitionFilter
    offset: int  # the next crawl.fetch offset the filter has not seen


def encode_snapshot(bloom: PartitionFilter, offset: int) -> bytes:
    header = json.dumps(
        {
            "offset": offset,
            "admitted": dict(bloom.admitted),
            "sketch_width": bloom.counts.width,
            "sketch_depth": bloom.counts.depth,
        }
    ).encode()
    filter_bytes = io.BytesIO()
    bloom.bloom.tofile(filter_bytes)
    sections = [header, bloom.counts.to_bytes(), filter_bytes.getvalue()]
    body = b"".join(_LENGTH.pack(len(part)) + part for part in sections)
    return MAGIC + body + blake2b(body, digest_size=_DIGEST).digest()


def decode_snapshot(data: bytes) -> Snapshot:
    """Raises ValueError when ``data`` is not one whole snapshot."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _DIGEST:
        raise ValueError("not a dedup snapshot")
    body, digest = data[len(MAGIC) : -_DIGEST], data[-_DIGEST:]
    if blake2b(body, digest_size=_DIGEST).digest() != digest:
        raise ValueError("checksum mismatch")
    sections, position = [], 0
    while position < len(body):
        (length,) = _LENGTH.unpack_from(body, position)
        position += _LENGTH.size
        sections.append(body[position : position + length])
        position += length
    if len(sections) != 3 or position != len(body):
        raise ValueError("wrong number of sections")
    header = json.loads(sections[0])
    counts = CountMinSketch.from_bytes(
        sections[1], int(header["sketch_width"]), int(header["sketch_depth"])
    )
    bloom = ScalableBloomFilter.fromfile(io.BytesIO(sections[2]))
    restored = PartitionFilter.restore(bloom, Counter(header["admitted"]), counts)
    return Snapshot(restored, int(header["offset"]))


class SnapshotStore:
    """Snapshots of one topic's partitions in ``directory``."""

    def __init__(self, directory: Path, topic: str) -> None:
        self.directory = directory
        self.topic = topic

    def path(self, partition: int) -> Path:
        return self.directory / f"{self.topic}-{partition}.dedup"

    def save(self, partition: int, bloom: PartitionFilter, offset: int) -> int:
        """Write the snapshot atomically; returns its size in bytes."""
        data = encode_snapshot(bloom, offset)
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(partition)
        temporary = final.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return len(data)

    def load(self, partition: int) -> Snapshot | None:
        path = self.path(partition)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_snapshot(data)
        except (ValueError, KeyError, struct.error, EOFError) as exc:
            log.warning("dedup: snapshot %s unreadable (%s); replaying from the start", path, exc)
            return None

    def discard(self, partition: int) -> None:
        self.path(partition).unlink(missing_ok=True)
