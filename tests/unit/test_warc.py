"""The warc stage without a broker: the records one response becomes (read back with
warcio, checked with ``warcio check``), revisits, and the files' crash safety (an ``.open``
file cut back to its state, a batch delivered again skipped, rotation)."""

from __future__ import annotations

import gzip
import io
import random
import re
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.content import carried_body_stream
from streamcrawl.core.messages import Fetched, Scope, Timings
from streamcrawl.warc.files import REBUILD_FILES, SNAPSHOT_NAME, Archive, Pending
from streamcrawl.warc.logic import (
    FileState,
    Original,
    RevisitIndex,
    Spliced,
    Unarchivable,
    WrittenOffsets,
    exchange_from,
    exchange_records,
    gzip_member,
    payload_digest,
    spliceable_blocks,
    warc_date,
    warc_name,
)
from streamcrawl.warc.service import MIN_FILE_BYTES, WarcStage, warc_directory
from warcio.archiveiterator import ArchiveIterator

LIMIT = 1_000_000
HTML = b"<html><head><title>t</title></head><body>hello</body></html>"
HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Content-Encoding", "gzip"),
    ("set-cookie", "a=1"),
    ("Set-Cookie", "b=2"),
    ("X-Caf\xe9", "cr\xe8me"),  # bytes outside ASCII, one character each
]


def fetched(body: bytes, **changes: Any) -> Fetched:
    fields: dict[str, Any] = {
        "url": "http://a.example/p.html",
        "final_url": "http://a.example/p.html?q=1",
        "host": "a.example",
        "crawl_id": "c1",
        "depth": 1,
        "scope": Scope(allow_domains=["a.example"], max_depth=5),
        "status": 200,
        "headers": {"content-type": "text/html; charset=utf-8", "content-encoding": "gzip"},
        "content_type": "text/html; charset=utf-8",
        "body": carried_body_stream(body),  # as the fetcher carries it: spliceable
        "body_bytes": len(body),
        "truncated": False,
        "fetched_at": 1_764_000_000.25,
        "timings": Timings(total_s=0.1),
        "body_as_received": True,
        "protocol": "HTTP/1.1",
        "reason": "OK",
        "raw_headers": HEADERS,
        "request_headers": [("Host", "a.example"), ("User-Agent", "ua/1")],
    }
    fields.update(changes)
    return Fetched(**fields)


def records(data: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """(type, WARC headers, content as a reader gets it) of each record."""
    found = []
    for record in ArchiveIterator(io.BytesIO(data)):
        headers = dict(record.rec_headers.headers)
        found.append((record.rec_type, headers, record.content_stream().read()))
    return found


def inflated(data: bytes) -> bytes:
    return gzip.decompress(data)  # every gzip member, one after another


def warcio_check(path: Path) -> subprocess.CompletedProcess[str]:
    warcio = shutil.which("warcio", path=str(Path(sys.executable).parent))
    assert warcio is not None
    return subprocess.run(
        [warcio, "check", "-v", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


# -- one response ------------------------------------------------------------------------


def test_a_response_is_archived_as_received() -> None:
    body = gzip.compress(HTML)
    exchange = exchange_from(fetched(body), LIMIT)
    data = exchange_records(exchange, None)
    (response, request) = records(data)
    assert response[0] == "response" and request[0] == "request"
    warc = response[1]
    assert warc["WARC-Target-URI"] == "http://a.example/p.html?q=1"
    assert warc["WARC-Date"] == "2025-11-24T16:00:00.250000Z" == warc_date(1_764_000_000.25)
    assert warc["WARC-Payload-Digest"] == payload_digest(body)
    assert warc["WARC-Block-Digest"].startswith("sha1:")
    assert "WARC-Truncated" not in warc
    assert request[1]["WARC-Concurrent-To"] == warc["WARC-Record-ID"]
    # Byte for byte: the status line, the headers in order with their case and repeats,
    # the body still gzip-encoded.
    plain = inflated(data)
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Encoding: gzip"
        b"\r\nset-cookie: a=1\r\nSet-Cookie: b=2\r\nX-Caf\xe9: cr\xe8me\r\n\r\n"
    )
    assert head + body in plain
    assert response[2] == HTML  # warcio undoes the Content-Encoding for readers
    assert b"GET /p.html?q=1 HTTP/1.1\r\nHost: a.example\r\nUser-Agent: ua/1\r\n\r\n" in plain


def test_a_capped_body_is_marked_truncated() -> None:
    exchange = exchange_from(fetched(HTML[:10], truncated=True, raw_headers=[]), LIMIT)
    assert not exchange.revisitable
    (response, _) = records(exchange_records(exchange, None))
    assert response[1]["WARC-Truncated"] == "length"
    assert response[2] == HTML[:10]


def test_a_chunked_response_is_stored_as_one_chunk() -> None:
    record = fetched(HTML, raw_headers=[("Transfer-Encoding", "chunked")])
    data = exchange_records(exchange_from(record, LIMIT), None)
    assert b"%x\r\n%s\r\n0\r\n\r\n" % (len(HTML), HTML) in inflated(data)
    assert records(data)[0][2] == HTML


def test_records_it_cannot_archive_as_received_say_why() -> None:
    with pytest.raises(Unarchivable) as older:
        exchange_from(fetched(HTML, body_as_received=False), LIMIT)
    with pytest.raises(Unarchivable) as corrupt:
        exchange_from(msgspec.structs.replace(fetched(HTML), body=b"not zlib"), LIMIT)
    with pytest.raises(Unarchivable) as large:
        exchange_from(fetched(b"x" * 100), 50)
    assert [e.value.reason for e in (older, corrupt, large)] == [
        "body_not_as_received",
        "corrupt_body",
        "body_too_large",
    ]


# -- bodies spliced into the gzip member ---------------------------------------------------

RECORD_ID = re.compile(rb"<urn:uuid:[0-9a-f-]+>")


def same_records(spliced: bytes, compressed: bytes) -> bool:
    """Both inflate to the same records, record ids aside."""
    return RECORD_ID.sub(b"", inflated(spliced)) == RECORD_ID.sub(b"", inflated(compressed))


BODIES = {
    "html": HTML * 50,
    "empty": b"",
    "random": random.Random(3).randbytes(70_000),  # stored blocks, a window's worth and more
}


@pytest.mark.parametrize("name", sorted(BODIES))
@pytest.mark.parametrize("chunked", [False, True])
def test_a_spliced_body_makes_the_same_records_as_a_compressed_one(
    name: str, chunked: bool, tmp_path: Path
) -> None:
    body = BODIES[name]
    raw_headers = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Type", "a/b")]
    carried = fetched(body, raw_headers=raw_headers)
    spliced = exchange_from(carried, LIMIT)
    compressed = exchange_from(carried, LIMIT, splice=False)
    assert spliced.spliced is not None and compressed.spliced is None
    assert spliced.payload == compressed.payload
    part = spliced.payload[spliced.spliced.start : spliced.spliced.end]
    assert part == body
    data = exchange_records(spliced, None)
    assert same_records(data, exchange_records(compressed, None))
    (response, _) = records(data)
    assert response[2] == body and response[1]["WARC-Payload-Digest"] == spliced.payload_digest
    path = tmp_path / "spliced.warc.gz"
    path.write_bytes(data)
    result = warcio_check(path)
    assert result.returncode == 0 and result.stdout.count("digest pass") == 2, result.stdout


def test_only_a_stream_ending_on_a_sync_flush_is_spliced() -> None:
    body = HTML * 20
    assert spliceable_blocks(carried_body_stream(body)) is not None
    for stream in (b"x" * 20, b""):
        assert spliceable_blocks(stream) is None
    for stream in (zlib.compress(body), zlib.compress(body, 1)):
        assert spliceable_blocks(stream) is None
        # An older fetcher's record: compressed here, as before.
        exchange = exchange_from(msgspec.structs.replace(fetched(body), body=stream), LIMIT)
        assert exchange.spliced is None and exchange.payload == body
    # A preset dictionary cannot be spliced, even when the tail looks right.
    with_dictionary = bytearray(carried_body_stream(body))
    with_dictionary[1] |= 0x20
    with_dictionary[1] += (31 - (with_dictionary[0] * 256 + with_dictionary[1]) % 31) % 31
    assert spliceable_blocks(bytes(with_dictionary)) is None


def test_a_spliceable_stream_that_does_not_check_out_is_not_spliced() -> None:
    body = HTML * 20
    stream = carried_body_stream(body)
    wrong_sum = stream[:-1] + bytes([stream[-1] ^ 1])
    assert spliceable_blocks(wrong_sum) is not None
    with pytest.raises(Unarchivable) as corrupt:  # the check the full inflate does, too
        exchange_from(msgspec.structs.replace(fetched(body), body=wrong_sum), LIMIT)
    assert corrupt.value.reason == "corrupt_body"
    with pytest.raises(Unarchivable) as large:
        exchange_from(fetched(body), len(body) - 1)
    assert large.value.reason == "body_too_large"


def test_gzip_member_carries_the_blocks_between_what_it_compresses() -> None:
    data = b"head " * 40 + BODIES["html"] + b"tail\r\n\r\n"
    start, end = 200, 200 + len(BODIES["html"])
    blocks = spliceable_blocks(carried_body_stream(data[start:end]))
    assert blocks is not None
    member = gzip_member(data, start, end, Spliced(blocks, 0, 0))
    assert gzip.decompress(member) == data
    assert blocks in member


def test_a_revisit_refers_to_the_original_and_keeps_the_headers_only() -> None:
    exchange = exchange_from(fetched(HTML), LIMIT)
    original = Original("http://a.example/first", "2025-11-24T15:00:00.000000Z")
    (revisit, _) = records(exchange_records(exchange, original))
    warc = revisit[1]
    assert revisit[0] == "revisit"
    assert warc["WARC-Profile"].endswith("/warc/1.1/revisit/identical-payload-digest")
    assert warc["WARC-Refers-To-Target-URI"] == original.uri
    assert warc["WARC-Refers-To-Date"] == original.date
    assert warc["WARC-Payload-Digest"] == payload_digest(HTML)
    assert revisit[2] == b""


def test_warcio_check_passes_and_catches_a_changed_byte(tmp_path: Path) -> None:
    good = tmp_path / "good.warc.gz"
    exchange = exchange_from(fetched(HTML, raw_headers=[("Content-Type", "text/html")]), LIMIT)
    good.write_bytes(exchange_records(exchange, None))
    result = warcio_check(good)
    assert result.returncode == 0 and result.stdout.count("digest pass") == 2, result.stdout
    # The same records uncompressed, with one byte of the body changed: warcio must notice.
    plain = inflated(good.read_bytes())
    assert plain.count(b"hello") == 1
    bad = tmp_path / "bad.warc"
    bad.write_bytes(plain.replace(b"hello", b"jello"))
    result = warcio_check(bad)
    assert result.returncode == 1 and "digest failed" in result.stdout, result.stdout


# -- revisits and offsets, pure ----------------------------------------------------------


def test_revisit_index_is_bounded_and_keeps_the_most_recent() -> None:
    index = RevisitIndex(2)
    a, b, c = (Original(f"http://x/{n}", "d") for n in "abc")
    index.remember("sha1:A", a)
    index.remember("sha1:B", b)
    assert index.original("sha1:A") == a  # used: now the most recent
    index.remember("sha1:C", c)
    assert (index.original("sha1:B"), len(index)) == (None, 2)
    index.remember_older("sha1:D", a)  # full: read-back entries never displace
    assert index.original("sha1:D") is None and index.original("sha1:C") == c
    off = RevisitIndex(0)
    off.remember("sha1:A", a)
    assert off.original("sha1:A") is None


def test_written_offsets_skip_a_batch_delivered_again_until_confirmed() -> None:
    offsets = WrittenOffsets()
    offsets.merge({"t:0": 10, "t:1": 3})
    offsets.recovered(dict(offsets.offsets))
    assert offsets.already_written("t", 0, 9) and not offsets.already_written("t", 0, 10)
    assert not offsets.already_written("t", 2, 0)
    offsets.delivered("t", 0, 9)
    offsets.batch_committed()
    assert offsets.unconfirmed()  # partition 1 has not come back yet
    offsets.delivered("t", 1, 5)
    offsets.batch_committed()
    assert not offsets.unconfirmed()


def test_file_state_round_trip_and_garbage() -> None:
    state = FileState(1234, {"t:0": 5})
    assert FileState.decode(state.encode()) == state
    for junk in (b"", b"{", b'{"length": -1, "offsets": {}}', b'{"length": 3}', b"[]"):
        assert FileState.decode(junk) is None


def test_file_names_carry_the_instance() -> None:
    from datetime import UTC, datetime

    name = warc_name(datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "pod/a b", 7)
    assert name == "streamcrawl-20260102030405000006-pod_a_b-00007.warc.gz"


# -- files ------------------------------------------------------------------------------


def pending(offset: int, partition: int = 0, body: bytes | None = None) -> Pending:
    page = body if body is not None else b"<p>page %d/%d</p>" % (partition, offset)
    url = f"http://a.example/{partition}/{offset}"
    exchange = exchange_from(fetched(page, final_url=url, raw_headers=[]), LIMIT)
    return Pending("crawl.fetched", partition, offset, exchange)


def archived_urls(directory: Path, pattern: str = "*.warc.gz") -> list[str]:
    urls = []
    for path in sorted(directory.glob(pattern)):
        with open(path, "rb") as stream:
            urls += [
                r.rec_headers.get_header("WARC-Target-URI")
                for r in ArchiveIterator(stream)
                if r.rec_type in ("response", "revisit")
            ]
    return urls


def die(archive: Archive) -> None:
    """What a SIGKILL leaves: the file as written, its lock released, nothing completed."""
    assert archive.current is not None
    archive.current.handle.close()


def test_a_crash_mid_batch_leaves_complete_files_and_no_duplicates(tmp_path: Path) -> None:
    first = Archive(tmp_path, 10**9, {"software": "test"}, RevisitIndex(100))
    first.recover()
    first.write([pending(0), pending(1)])
    first.write([pending(2), pending(3)])  # fsynced; say the commit never happened
    assert first.current is not None
    first.current.append(b"\x1f\x8b half a record")  # the next batch, cut by the crash
    die(first)
    assert list(tmp_path.glob("*.warc.gz")) == []  # readers see nothing half-written

    second = Archive(tmp_path, 10**9, {"software": "test"}, RevisitIndex(100))
    second.recover()
    # Kafka delivers the uncommitted batch again (2, 3), then new records.
    report = second.write([pending(2), pending(3), pending(4)])
    assert (report.skipped, report.responses) == (2, 1)
    second.close()
    (complete,) = tmp_path.glob("*.warc.gz")
    assert warcio_check(complete).returncode == 0
    assert archived_urls(tmp_path) == [f"http://a.example/0/{n}" for n in range(5)]
    assert list(tmp_path.glob("*.open*")) == []


def test_a_restart_before_the_batch_came_back_keeps_its_offsets(tmp_path: Path) -> None:
    first = Archive(tmp_path, 10**9, {}, RevisitIndex(0))
    first.recover()
    first.write([pending(0)])
    die(first)
    second = Archive(tmp_path, 10**9, {}, RevisitIndex(0))
    second.recover()
    second.close()  # stopped before offset 0 was delivered again: the file stays open
    third = Archive(tmp_path, 10**9, {}, RevisitIndex(0))
    third.recover()
    assert third.write([pending(0), pending(1)]).skipped == 1
    third.close()
    assert archived_urls(tmp_path) == ["http://a.example/0/0", "http://a.example/0/1"]


def test_files_rotate_by_size_and_revisits_survive_a_restart(tmp_path: Path) -> None:
    same = b"<p>the same payload everywhere</p>" * 20
    archive = Archive(tmp_path, 2_000, {}, RevisitIndex(100))
    archive.recover()
    archive.write([pending(0, body=same)])
    for offset in range(1, 6):
        archive.write([pending(offset)])
    archive.close()
    files = sorted(tmp_path.glob("*.warc.gz"))
    assert len(files) >= 2 and all(warcio_check(p).returncode == 0 for p in files)
    assert archived_urls(tmp_path) == [f"http://a.example/0/{n}" for n in range(6)]

    again = Archive(tmp_path, 2_000, {}, RevisitIndex(100))
    again.recover()
    # Until the digests read back are handed over, the payload is archived in full.
    before = again.write([pending(6, body=same)])
    assert (before.revisits, before.responses) == (0, 1)
    older = again.read_back()
    assert len(older) == 6
    again.adopt(older)
    report = again.write([pending(7, body=same)])
    again.close()
    assert (report.revisits, report.responses) == (1, 0)


def archive_in_small_files(directory: Path, count: int) -> None:
    """``count`` distinct payloads, a few per file, then a clean stop."""
    archive = Archive(directory, 2_000, {}, RevisitIndex(100))
    archive.recover()
    for offset in range(count):
        archive.write([pending(offset)])
    archive.close()


def test_a_clean_stop_leaves_the_index_and_the_next_start_loads_it(tmp_path: Path) -> None:
    archive_in_small_files(tmp_path, 8)
    files = list(tmp_path.glob("*.warc.gz"))
    assert len(files) > REBUILD_FILES  # read back from files, only the newest would count
    from_files = sum(len(archived_urls(tmp_path, path.name)) for path in newest(files))
    assert from_files < 8
    index = Archive(tmp_path, 2_000, {}, RevisitIndex(100)).read_back()
    assert len(index) == 8
    # The order survives: the least recently used is the first to go in a smaller index.
    small = Archive(tmp_path, 2_000, {}, RevisitIndex(3)).read_back()
    assert [uri for _, uri, _ in small.entries()] == [f"http://a.example/0/{n}" for n in (5, 6, 7)]


def test_an_index_that_does_not_name_the_newest_file_is_not_loaded(tmp_path: Path) -> None:
    archive_in_small_files(tmp_path, 8)
    crashed = Archive(tmp_path, 2_000, {}, RevisitIndex(100))
    crashed.recover()
    for offset in range(8, 12):
        crashed.write([pending(offset)])  # files completed as they fill, after the index
    die(crashed)
    restarted = Archive(tmp_path, 2_000, {}, RevisitIndex(100))
    restarted.recover()
    files = list(tmp_path.glob("*.warc.gz"))
    expected = {url for path in newest(files) for url in archived_urls(tmp_path, path.name)}
    index = restarted.read_back()
    assert {uri for _, uri, _ in index.entries()} == expected
    assert "http://a.example/0/0" not in expected  # the saved index had it


def test_an_unreadable_index_means_reading_the_files_back(tmp_path: Path) -> None:
    archive_in_small_files(tmp_path, 8)
    (tmp_path / SNAPSHOT_NAME).write_bytes(b"not msgpack at all")
    files = list(tmp_path.glob("*.warc.gz"))
    expected = sum(len(archived_urls(tmp_path, path.name)) for path in newest(files))
    assert len(Archive(tmp_path, 2_000, {}, RevisitIndex(100)).read_back()) == expected


def newest(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)[:REBUILD_FILES]


def test_reading_back_stops_when_asked(tmp_path: Path) -> None:
    archive = Archive(tmp_path, 10**9, {}, RevisitIndex(100))
    archive.recover()
    archive.write([pending(n) for n in range(5)])
    archive.close()
    stop = threading.Event()
    assert len(Archive(tmp_path, 10**9, {}, RevisitIndex(100)).read_back(stop)) == 5
    stop.set()
    assert len(Archive(tmp_path, 10**9, {}, RevisitIndex(100)).read_back(stop)) == 0


def test_digests_read_back_rank_below_those_archived_since() -> None:
    index = RevisitIndex(3)
    index.remember("new", Original("http://a.example/new", "2026-01-02"))
    older = RevisitIndex(3)
    for n in range(3):
        older.remember_older(f"old{n}", Original(f"http://a.example/{n}", "2026-01-01"))
    index.merge_older(older)  # room for two of the three: the newest read back (old0, old1)
    assert len(index) == 3
    index.remember("newer", Original("http://a.example/newer", "2026-01-03"))
    # Full: the least recent goes first, and that is one read back (old1), not "new".
    assert len(index) == 3
    assert [d for d in ("new", "newer", "old0", "old1", "old2") if index.original(d)] == [
        "new",
        "newer",
        "old0",
    ]


def test_a_live_writers_file_is_left_alone(tmp_path: Path) -> None:
    live = Archive(tmp_path, 10**9, {}, RevisitIndex(0))
    live.recover()
    live.write([pending(0)])
    other = Archive(tmp_path, 10**9, {}, RevisitIndex(0))
    assert other.recover() == []
    assert other.current is None and not other.written.offsets
    live.close()
    assert archived_urls(tmp_path) == ["http://a.example/0/0"]


def test_a_file_without_a_complete_batch_is_removed(tmp_path: Path) -> None:
    stray = tmp_path / "streamcrawl-1-x-00001.warc.gz.open"
    stray.write_bytes(b"\x1f\x8b partial")
    archive = Archive(tmp_path, 10**9, {}, RevisitIndex(0))
    assert archive.recover() == [] and not stray.exists()


def test_the_stage_settings(tmp_path: Path) -> None:
    assert warc_directory(Settings(warc_dir=str(tmp_path))) == tmp_path
    assert warc_directory(Settings(state_dir=str(tmp_path))) == tmp_path / "warc"
    assert warc_directory(Settings()) == Path("warc")
    with pytest.raises(ValueError, match="WARC_MAX_BYTES"):
        WarcStage(Settings(warc_max_bytes=MIN_FILE_BYTES - 1))
