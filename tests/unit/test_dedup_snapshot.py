"""Dedup snapshots on disk: a round trip keeps every URL and count; a torn or corrupted
file is refused; a crash mid-write leaves the previous snapshot in place."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamcrawl.dedup.logic import PartitionFilter
from streamcrawl.dedup.snapshot import SnapshotStore, decode_snapshot, encode_snapshot


def filled(count: int) -> PartitionFilter:
    bloom = PartitionFilter(capacity=1000, error_rate=1e-6, sketch_width=256, sketch_depth=4)
    for n in range(count):
        bloom.remember("c1", f"http://a.example/{n}")
        bloom.remember("c2", f"http://b.example/2024/01/{n % 28 + 1:02d}/")
    return bloom


def test_round_trip_keeps_urls_counts_and_offset() -> None:
    original = filled(3000)  # past the initial capacity: the filter has grown
    restored = decode_snapshot(encode_snapshot(original, 12345))
    assert restored.offset == 12345
    copy = restored.filter
    assert len(copy) == len(original)
    assert all(copy.seen("c1", f"http://a.example/{n}") for n in range(3000))
    assert not copy.seen("c1", "http://a.example/never")
    assert not copy.seen("c3", "http://a.example/1")
    assert copy.admitted == original.admitted
    assert copy.host_pages("c1", "http://a.example/x") == original.host_pages(
        "c1", "http://a.example/x"
    )
    copy.remember("c1", "http://a.example/new")  # a restored filter keeps working
    assert copy.seen("c1", "http://a.example/new")


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic"])
def test_damaged_snapshots_are_refused(damage: str) -> None:
    data = bytearray(encode_snapshot(filled(100), 7))
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data[0:4] = b"JUNK"
    with pytest.raises(ValueError):
        decode_snapshot(bytes(data))


def test_a_crash_mid_write_keeps_the_previous_snapshot(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, "crawl.fetch")
    store.save(3, filled(10), 10)
    # A writer killed after writing part of the next snapshot leaves only its temporary file.
    store.path(3).with_suffix(".tmp").write_bytes(encode_snapshot(filled(20), 20)[:100])
    snapshot = store.load(3)
    assert snapshot is not None and snapshot.offset == 10
    store.save(3, filled(20), 20)  # the next save replaces both
    snapshot = store.load(3)
    assert snapshot is not None and snapshot.offset == 20
    assert not store.path(3).with_suffix(".tmp").exists()


def test_an_unreadable_file_loads_as_no_snapshot(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, "crawl.fetch")
    assert store.load(0) is None
    store.path(0).write_bytes(b"garbage")
    assert store.load(0) is None
