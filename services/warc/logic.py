"""The warc stage's decisions, pure: what WARC/1.1 records one crawl.fetched response
becomes, when a payload seen before becomes a ``revisit``, how files are named, and the
small state that makes a crash lose and repeat nothing.

A response is archived as it came over the wire: the status line and the headers as
received (order, case, repeats), the body with its Content-Encoding intact, cut at the
fetcher's cap (then ``WARC-Truncated: length``). aiohttp undoes a chunked transfer coding
before the fetcher sees the body; such a body is stored as one chunk, so the block is still
the valid HTTP message its ``Transfer-Encoding: chunked`` header announces.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from ..core.errors import ReasonedError
from ..core.messages import Fetched

WARC_VERSION = "WARC/1.1"
# warcio gzips at level 9: on HTML, level 6 archives 1.7 to 1.9 times as many pages per
# second for files 0.3 % larger (bench/warc_write.py), so records are gzipped here.
GZIP_LEVEL = 6
OPEN_SUFFIX = ".open"
STATE_SUFFIX = ".state"
WARC_SUFFIX = ".warc.gz"


class Unarchivable(ReasonedError):
    """A crawl.fetched record that cannot be archived as received (it goes to the DLQ)."""


@dataclass(frozen=True)
class Spliced:
    """Deflate blocks, byte-aligned and none of them final, that inflate to
    ``payload[start:end]``: a record's gzip member carries them as they are."""

    blocks: bytes
    start: int
    end: int


@dataclass(frozen=True)
class Exchange:
    """One request and its response, ready to be written."""

    target_uri: str
    date: str
    status: int
    request_head: bytes
    response_head: bytes
    payload: bytes
    payload_digest: str
    truncated: bool
    spliced: Spliced | None = None

    @property
    def revisitable(self) -> bool:
        """Only a complete, non-empty payload stands for another response's."""
        return bool(self.payload) and not self.truncated


@dataclass(frozen=True)
class Original:
    """Where a payload was first archived: what a revisit record refers to."""

    uri: str
    date: str


# -- one response -----------------------------------------------------------------------


def exchange_from(fetched: Fetched, limit: int, splice: bool = True) -> Exchange:
    """What is archived for one crawl.fetched record; ``limit`` bounds the body. With
    ``splice``, a body the fetcher deflated spliceably is archived in the fetcher's deflate
    blocks instead of being compressed again."""
    if not fetched.body_as_received:
        raise Unarchivable(
            "body_not_as_received", f"{fetched.url}: written by a fetcher that inflated bodies"
        )
    blocks = spliceable_blocks(fetched.body) if splice else None
    body = inflated_blocks(fetched, blocks, limit) if blocks is not None else None
    if body is None:
        blocks = None
        body = carried_body(fetched, limit)
    payload = stored_payload(fetched, body)
    start = len(payload) - len(body) - len(_CHUNKED_END) if is_chunked(fetched) and body else 0
    return Exchange(
        target_uri=fetched.final_url,
        date=warc_date(fetched.fetched_at),
        status=fetched.status,
        request_head=request_head(fetched),
        response_head=response_head(fetched),
        payload=payload,
        payload_digest=payload_digest(payload),
        truncated=fetched.truncated,
        spliced=None if blocks is None else Spliced(blocks, start, start + len(body)),
    )


def carried_body(fetched: Fetched, limit: int) -> bytes:
    """The body as received: the message's zlib transport undone, never past ``limit``."""
    try:
        body = zlib.decompressobj().decompress(fetched.body, limit + 1)
    except (zlib.error, ValueError) as exc:
        raise Unarchivable("corrupt_body", f"{fetched.url}: {exc}") from exc
    if len(body) > limit:
        raise Unarchivable("body_too_large", f"{fetched.url}: inflates past {limit} bytes")
    return body


# What ``core.content.carried_body_stream`` ends its deflate data with: an empty stored
# block (a sync flush), then an empty final block; the zlib stream's Adler-32 follows.
_SYNC_THEN_FINAL = b"\x00\x00\xff\xff\x03\x00"
# An empty final block of another kind (stored), byte-aligned: see ``inflated_blocks``.
_STORED_FINAL = b"\x01\x00\x00\xff\xff"


def spliceable_blocks(stream: bytes) -> bytes | None:
    """The deflate blocks of a carried zlib stream that ends on a sync flush, without its
    final block (None for any other stream: an older fetcher's, another producer's)."""
    if len(stream) < 2 + len(_SYNC_THEN_FINAL) + 4:
        return None
    method, flags = stream[0], stream[1]
    if method & 0x0F != 8 or (method * 256 + flags) % 31 or flags & 0x20:
        return None  # not deflate, not a zlib header, or a preset dictionary
    if stream[-10:-4] != _SYNC_THEN_FINAL:
        return None
    return stream[2:-6]


def inflated_blocks(fetched: Fetched, blocks: bytes, limit: int) -> bytes | None:
    """The body the blocks hold, or None unless they stand alone as a splice needs: ended
    by a final block of another kind they still inflate to the body whose Adler-32 the
    stream carries, which holds only if they end on a byte-aligned block boundary."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        body = inflater.decompress(blocks + _STORED_FINAL, limit + 1)
    except zlib.error:
        return None
    if len(body) > limit:
        raise Unarchivable("body_too_large", f"{fetched.url}: inflates past {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        return None
    if zlib.adler32(body) != int.from_bytes(fetched.body[-4:], "big"):
        return None
    return body


def _latin1(text: str) -> bytes:
    # Header names and values travel with each byte as one character (ISO-8859-1).
    return text.encode("latin-1", "replace")


def response_head(fetched: Fetched) -> bytes:
    """Status line and headers, byte for byte as received, and the blank line."""
    reason = fetched.reason.replace("\r", " ").replace("\n", " ")
    lines = [f"{fetched.protocol} {fetched.status} {reason}".encode("latin-1", "replace")]
    lines += [_latin1(name) + b": " + _latin1(value) for name, value in fetched.raw_headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def request_head(fetched: Fetched) -> bytes:
    """The request line and the headers the fetcher sent (it only sends GETs)."""
    parts = urlsplit(fetched.final_url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = list(fetched.request_headers)
    if not any(name.lower() == "host" for name, _ in headers):
        headers.insert(0, ("Host", parts.netloc))
    lines = [f"GET {target} {fetched.protocol}".encode("latin-1", "replace")]
    lines += [_latin1(name) + b": " + _latin1(value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def is_chunked(fetched: Fetched) -> bool:
    return any(
        name.lower() == "transfer-encoding" and "chunked" in value.lower()
        for name, value in fetched.raw_headers
    )


def stored_payload(fetched: Fetched, body: bytes) -> bytes:
    """What follows the head in the record: the body, framed as one chunk when the
    response announced a chunked transfer coding."""
    if not is_chunked(fetched):
        return body
    if not body:
        return _CHUNKED_END[2:]
    return b"%x\r\n%s%s" % (len(body), body, _CHUNKED_END)


_CHUNKED_END = b"\r\n0\r\n\r\n"


def payload_digest(payload: bytes) -> str:
    """``WARC-Payload-Digest`` as warcio computes and checks it: SHA-1, base32."""
    return "sha1:" + base64.b32encode(hashlib.sha1(payload).digest()).decode("ascii")


def warc_date(timestamp: float) -> str:
    """``WARC-Date`` of a Unix time, with the microseconds WARC/1.1 allows."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- records ------------------------------------------------------------------------------


class _ExactHead(StatusAndHeaders):  # type: ignore[misc]
    """An HTTP head written exactly as given: warcio would re-serialise the headers (and
    percent-encode any byte outside ASCII), which would no longer be what was received."""

    def __init__(self, head: bytes, is_request: bool) -> None:
        first, _, rest = head.decode("latin-1").partition("\r\n")
        headers = []
        for line in rest.split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers.append((name, value.strip()))
        protocol, _, statusline = first.partition(" ") if not is_request else ("", "", first)
        super().__init__(statusline, headers, protocol=protocol, is_http_request=is_request)
        self.exact = head

    def compute_headers_buffer(self, header_filter: object = None) -> None:
        self.headers_buff = self.exact


class _Writer(WARCWriter):  # type: ignore[misc]
    """warcio's writer, each record gzipped as a member of its own at ``GZIP_LEVEL``; a
    response whose payload has a ``Spliced`` part (with the payload's length) carries
    that part in its deflate blocks as they are."""

    def __init__(self, out: io.BytesIO, spliced: tuple[int, Spliced] | None = None) -> None:
        super().__init__(out, gzip=False, warc_version=WARC_VERSION)
        self.spliced = spliced

    def _write_warc_record(self, out: io.BytesIO, record: Any) -> None:
        plain = io.BytesIO()
        super()._write_warc_record(plain, record)
        data = plain.getvalue()
        if record.rec_type != "response" or self.spliced is None:
            out.write(gzip_member(data))
            return
        payload_length, spliced = self.spliced
        payload_start = len(data) - len(_RECORD_END) - payload_length
        if not data.endswith(_RECORD_END) or payload_start < 0:
            out.write(gzip_member(data))  # not warcio's layout as known: compress it all
            return
        out.write(
            gzip_member(data, payload_start + spliced.start, payload_start + spliced.end, spliced)
        )


# warcio ends every record with this, after its payload.
_RECORD_END = b"\r\n\r\n"
# What zlib writes for a gzip member of its own (no name, no time, made on Unix).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"


def gzip_member(data: bytes, start: int = 0, end: int = 0, spliced: Spliced | None = None) -> bytes:
    """``data`` as one gzip member; with ``spliced``, ``data[start:end]`` is carried in
    its blocks and only what comes before and after is compressed here."""
    if spliced is None:
        member = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        return member.compress(data) + member.flush()
    before = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"".join(
        (
            _GZIP_HEADER,
            before.compress(data[:start]),
            before.flush(zlib.Z_SYNC_FLUSH),  # byte-aligned, not final: the blocks follow
            spliced.blocks,
            _final_blocks(data[end:]),
            struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF),
        )
    )


@functools.lru_cache(maxsize=4)
def _final_blocks(tail: bytes) -> bytes:
    # What follows a spliced body is one of very few byte strings (the record's end, a
    # chunked body's last chunk): compressed once each, not once per record.
    deflater = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(tail) + deflater.flush()


def exchange_records(exchange: Exchange, original: Original | None) -> bytes:
    """The response (or, when ``original`` holds the same payload, a revisit) and its
    request, as WARC/1.1 records each in its own gzip member."""
    out = io.BytesIO()
    spliced = exchange.spliced if original is None else None
    writer = _Writer(out, None if spliced is None else (len(exchange.payload), spliced))
    head = _ExactHead(exchange.response_head, is_request=False)
    fields = {"WARC-Date": exchange.date}
    if original is not None:
        response = writer.create_revisit_record(
            exchange.target_uri,
            exchange.payload_digest,
            original.uri,
            original.date,
            http_headers=head,
            warc_headers_dict=fields,
        )
    else:
        if exchange.truncated:
            fields["WARC-Truncated"] = "length"
        fields["WARC-Payload-Digest"] = exchange.payload_digest  # warcio's would be the same
        response = writer.create_warc_record(
            exchange.target_uri,
            "response",
            payload=io.BytesIO(exchange.payload),
            length=len(exchange.payload),
            http_headers=head,
            warc_headers_dict=fields,
        )
    request = writer.create_warc_record(
        exchange.target_uri,
        "request",
        payload=io.BytesIO(b""),
        length=0,
        http_headers=_ExactHead(exchange.request_head, is_request=True),
        warc_headers_dict={"WARC-Date": exchange.date},
    )
    writer.write_request_response_pair(request, response)  # response first, then request
    return out.getvalue()


def warcinfo_record(filename: str, fields: dict[str, str]) -> bytes:
    """The first record of every file: what wrote it, and how."""
    out = io.BytesIO()
    writer = _Writer(out)
    writer.write_record(writer.create_warcinfo_record(filename, fields))
    return out.getvalue()


# -- revisits -----------------------------------------------------------------------------


class RevisitIndex:
    """Payload digest -> where it was first archived, for the ``capacity`` digests seen
    most recently (least recently used goes first): memory stays bounded, and a payload
    older than that is simply archived again in full."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, Original] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    @property
    def full(self) -> bool:
        return len(self._seen) >= self.capacity

    def original(self, digest: str) -> Original | None:
        found = self._seen.get(digest)
        if found is not None:
            self._seen.move_to_end(digest)
        return found

    def remember(self, digest: str, original: Original) -> None:
        """A payload just archived in full: the newest entry."""
        if self.capacity <= 0:
            return
        self._seen[digest] = original
        self._seen.move_to_end(digest)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def remember_older(self, digest: str, original: Original) -> None:
        """A payload read back from a file at a start, newest files first: it never
        displaces what is already known, and is dropped once the index is full."""
        if self.full or digest in self._seen:
            return
        self._seen[digest] = original
        self._seen.move_to_end(digest, last=False)

    def entries(self) -> list[tuple[str, str, str]]:
        """(digest, uri, date) of every entry, least recently used first."""
        return [(digest, found.uri, found.date) for digest, found in self._seen.items()]

    def merge_older(self, older: RevisitIndex) -> None:
        """Take in an index read back from older files: its entries rank below every
        entry here (what was archived since the start is newer), in their own order."""
        for digest, original in reversed(older._seen.items()):
            self.remember_older(digest, original)


class RevisitSnapshot(msgspec.Struct, frozen=True):
    """The revisit index as a clean stop left it, beside the files: the next start loads it
    instead of reading digests back out of gzipped WARC files (seconds of CPU per 100,000
    records). Valid only while ``newest`` is still the newest completed file: after a crash,
    or another writer's file, the files are read back as before."""

    newest: str
    entries: list[tuple[str, str, str]]  # (digest, uri, date), least recently used first

    def encode(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> RevisitSnapshot:
        return msgspec.msgpack.decode(data, type=cls)

    def fill(self, index: RevisitIndex) -> None:
        """Its entries into ``index`` as older ones (newest first, up to its capacity)."""
        for digest, uri, date in reversed(self.entries):
            if index.full:
                return
            index.remember_older(digest, Original(uri, date))


# -- files and their state ----------------------------------------------------------------


def warc_name(started: datetime, instance: str, serial: int) -> str:
    """``streamcrawl-<UTC start>-<instance>-<serial>.warc.gz``: the instance (host and
    process) keeps replicas sharing a directory from ever writing one file."""
    safe = "".join(char if char.isalnum() or char in "-_" else "_" for char in instance)
    stamp = started.strftime("%Y%m%d%H%M%S%f")
    return f"streamcrawl-{stamp}-{safe[:80]}-{serial:05d}{WARC_SUFFIX}"


def offset_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


@dataclass(frozen=True)
class FileState:
    """What an ``.open`` file's ``.state`` sidecar says, written (and fsynced) after each
    batch is fsynced and before its offsets are committed: the file's bytes up to
    ``length`` are complete records, and they hold every record of ``offsets`` (next
    offset per topic:partition) that came before."""

    length: int
    offsets: dict[str, int]

    def encode(self) -> bytes:
        return json.dumps({"length": self.length, "offsets": self.offsets}).encode()

    @classmethod
    def decode(cls, data: bytes) -> FileState | None:
        """The state, or None for a sidecar that is unreadable (then nothing in the file
        is known to be complete)."""
        try:
            raw = json.loads(data)
            length = int(raw["length"])
            offsets = {str(key): int(value) for key, value in raw["offsets"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return cls(length, offsets) if length >= 0 else None


class WrittenOffsets:
    """Per partition, the next offset not yet in a file. After a crash between a batch's
    fsync and its commit, Kafka delivers that batch again: its records are below these
    offsets and are skipped, so no record is archived twice.

    Offsets read back at a start stay "unconfirmed" until a batch reaching them has been
    delivered and committed (the runtime commits each batch before the next begins):
    until then they must survive in some file's state."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}
        self._unconfirmed: dict[str, int] = {}
        self._delivered: dict[str, int] = {}

    def merge(self, offsets: dict[str, int]) -> None:
        for key, value in offsets.items():
            self.offsets[key] = max(value, self.offsets.get(key, 0))

    def recovered(self, offsets: dict[str, int]) -> None:
        self._unconfirmed = dict(offsets)

    def already_written(self, topic: str, partition: int, offset: int) -> bool:
        return offset < self.offsets.get(offset_key(topic, partition), 0)

    def delivered(self, topic: str, partition: int, offset: int) -> None:
        key = offset_key(topic, partition)
        self._delivered[key] = max(offset + 1, self._delivered.get(key, 0))

    def written(self, topic: str, partition: int, offset: int) -> None:
        key = offset_key(topic, partition)
        self.offsets[key] = max(offset + 1, self.offsets.get(key, 0))

    def batch_committed(self) -> None:
        """The batch delivered since the last call is committed."""
        for key, upto in self._delivered.items():
            if upto >= self._unconfirmed.get(key, upto + 1):
                del self._unconfirmed[key]
        self._delivered.clear()

    def unconfirmed(self) -> bool:
        return bool(self._unconfirmed)
