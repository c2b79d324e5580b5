"""The one type of every message on every topic, and the builders that turn one into the next.

These ``msgspec`` structs are the contract: ``schemas/*.json`` (what kcat users read) are
generated from them (``python -m streamcrawl.core.schemas``; a test fails when the committed
files drift). A record is decoded and validated once, in C, where it enters a stage
(:mod:`streamcrawl.core.runtime`); stages then work on typed objects and hand typed objects
back, which the runtime encodes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from .errors import ReasonedError

Url = Annotated[str, Meta(min_length=1, max_length=8192)]
Host = Annotated[str, Meta(min_length=1, max_length=300)]
Domain = Annotated[str, Meta(min_length=1, max_length=253)]
# (?![\s\S]) rather than $: in Python a $ also matches before a final newline.
CrawlId = Annotated[str, Meta(pattern="^[A-Za-z0-9_.:-]{1,128}(?![\\s\\S])")]
Depth = Annotated[int, Meta(ge=0, le=1000)]
Priority = Annotated[int, Meta(ge=0, le=9)]
Reason = Annotated[str, Meta(pattern="^[a-z0-9_]{1,64}(?![\\s\\S])")]
Status = Annotated[int, Meta(ge=100, le=599)]
Meta64 = Annotated[dict[str, Any], Meta(max_length=64)]
Chain = Annotated[list[Url], Meta(max_length=50)]
Kind = Annotated[
    Literal["page", "sitemap"],
    Meta(description="page (default) or sitemap: a sitemap's <loc> URLs become links."),
]
StageName = Literal[
    "frontier", "dedup", "fetcher", "delay", "parser", "sink", "warc", "stats", "scheduler"
]
HeaderLine = tuple[Annotated[str, Meta(max_length=1024)], Annotated[str, Meta(max_length=8192)]]

DEFAULT_CRAWL_ID = "default"
DEFAULT_PRIORITY = 5
MAX_HISTORY = 20
MAX_ATTEMPTS = 100


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every topic's type: unknown fields are refused, defaults left off the wire."""


class SeedScope(Message, kw_only=True):
    """The limits a seed may set; what it leaves out comes from the settings."""

    allow_domains: Annotated[list[Domain], Meta(max_length=1000)] | None = None
    max_depth: Annotated[int, Meta(ge=0, le=1000)] | None = None
    max_pages: Annotated[int, Meta(ge=0)] | None = None


class Scope(Message, kw_only=True):
    """A crawl's limits, resolved by the frontier from the seed and the settings; every URL
    of the crawl carries it, so no stage needs per-crawl state."""

    allow_domains: Annotated[list[Domain], Meta(max_length=1000)]
    max_depth: Annotated[int, Meta(ge=0, le=1000)]
    max_pages: Annotated[int, Meta(ge=0)] = 0


class Attempt(Message, kw_only=True):
    """One failed attempt at a URL."""

    at: float
    outcome: Annotated[str, Meta(max_length=64)]
    detail: Annotated[str, Meta(max_length=1024)] = ""
    status: int | None = None


class Revisit(Message, kw_only=True):
    """A revisit of a stored page (``streamcrawl recrawl``, or the scheduler stage when the
    page's ``next_visit`` came): the round it belongs to and what was stored of the page,
    for a conditional request, the unchanged decision and the next interval.
    Dedup admits a revisit once per round; the links of a changed page are plain
    candidates of the crawl (only URLs it never had get through)."""

    round: Annotated[
        int, Meta(ge=1, description="The revisit round: dedup admits a URL once per round.")
    ]
    etag: Annotated[str, Meta(max_length=1024)] | None = None
    last_modified: Annotated[str, Meta(max_length=256)] | None = None
    digest: Annotated[str, Meta(max_length=128, description="The stored content_hash.")] | None = (
        None
    )
    stored_id: (
        Annotated[str, Meta(max_length=8192, description="The _id the page is stored under.")]
        | None
    ) = None
    interval: (
        Annotated[
            float,
            Meta(
                ge=0,
                description="The page's revisit interval, s, before this visit (the adaptive "
                "schedule shrinks or grows it from here).",
            ),
        ]
        | None
    ) = None
    due: (
        Annotated[
            float,
            Meta(description="The scheduler stage: the next_visit this revisit was queued for."),
        ]
        | None
    ) = None


History = Annotated[
    list[Attempt], Meta(max_length=MAX_HISTORY, description="Earlier attempts, oldest first.")
]


class Seed(Message, kw_only=True):
    """crawl.seeds, JSON form. A value that is not a JSON object is read as a plain-text URL
    and becomes ``{"url": text}``."""

    url: Url
    crawl_id: CrawlId = DEFAULT_CRAWL_ID
    priority: Priority = DEFAULT_PRIORITY
    depth: Annotated[int, Meta(ge=0, le=1000)] = 0
    meta: Meta64 | None = None
    scope: SeedScope | None = None
    revisit: Revisit | None = None


class Discovered(Message, kw_only=True):
    """crawl.discovered: a candidate URL, canonicalised and in scope, keyed by host; dedup
    decides whether it is fetched."""

    url: Url
    host: Host
    crawl_id: CrawlId
    depth: Depth
    priority: Priority
    scope: Scope
    discovered_at: float
    source: Annotated[str, Meta(max_length=8192)] | None = None
    redirect_chain: Chain = []
    meta: Meta64 | None = None
    kind: Kind = "page"
    revisit: Revisit | None = None


class Fetch(Discovered, kw_only=True):
    """crawl.fetch: a URL cleared to fetch (new for its crawl id), keyed by host."""

    admitted_at: float
    attempt: Annotated[
        int, Meta(ge=0, le=MAX_ATTEMPTS, description="Attempts already made (0 on the first).")
    ] = 0
    history: History = []


class Retry(Fetch, kw_only=True):
    """crawl.retry: a crawl.fetch message waiting until ``due_at`` (a retry after a failure,
    a URL whose host is busy, a host whose robots.txt is unavailable); the delay service
    puts it back on crawl.fetch then. Keyed by host."""

    due_at: Annotated[float, Meta(description="Unix time at which it goes back to crawl.fetch.")]
    retry_reason: Reason


class Timings(Message, kw_only=True):
    """How long the request took: in all, and to the first byte."""

    total_s: Annotated[float, Meta(ge=0)]
    ttfb_s: Annotated[float, Meta(ge=0)] = 0.0


class Fetched(Message, kw_only=True):
    """crawl.fetched: one HTTP response (redirects are not followed here: the target goes
    back through frontier and dedup). ``body`` is the zlib-compressed body, base64 in JSON:
    with ``body_as_received`` the bytes that came over the wire (Content-Encoding not undone,
    cut at the body cap), which the warc stage archives and the parser inflates."""

    url: Url
    final_url: Url
    host: Host
    crawl_id: CrawlId
    depth: Depth
    priority: Priority = DEFAULT_PRIORITY
    scope: Scope
    redirect_chain: Chain = []
    status: Status
    headers: Annotated[dict[str, str], Meta(max_length=200)]
    content_type: Annotated[str, Meta(max_length=256)]
    body: bytes
    body_encoding: Literal["zlib+base64"] = "zlib+base64"
    body_bytes: Annotated[int, Meta(ge=0, description="Length of the body as carried.")]
    truncated: bool
    fetched_at: float
    timings: Timings
    meta: Meta64 | None = None
    kind: Kind = "page"
    body_as_received: Annotated[
        bool,
        Meta(
            description="The body is as received, its Content-Encoding not undone (false: "
            "a record of an older fetcher, whose body was already inflated)."
        ),
    ] = False
    protocol: Annotated[
        str,
        Meta(pattern="^HTTP/[0-9](\\.[0-9])?(?![\\s\\S])", description="As in the status line."),
    ] = "HTTP/1.1"
    reason: Annotated[str, Meta(max_length=256, description="The status line's reason.")] = ""
    raw_headers: Annotated[
        list[HeaderLine],
        Meta(
            max_length=200,
            description="Response headers as received: in order, names in their own case, "
            "repeats kept; each byte one character (ISO-8859-1).",
        ),
    ] = []
    request_headers: Annotated[
        list[HeaderLine],
        Meta(max_length=64, description="The request's headers as sent, in order."),
    ] = []
    revisit: Revisit | None = None


class Page(Message, kw_only=True, omit_defaults=False):
    """crawl.pages: a parsed page (or a recorded non-HTML / redirect / error response),
    keyed by URL. Every field is written, so downstream readers see one shape."""

    url: Url
    final_url: Url
    host: Host
    status: Status
    fetched_at: float
    content_type: Annotated[str, Meta(max_length=256)]
    title: str | None
    text: str
    links: list[Url]
    canonical: str | None
    content_hash: str | None
    depth: Depth
    priority: Priority = DEFAULT_PRIORITY
    crawl_id: CrawlId
    scope: Scope
    redirect_chain: Chain
    redirect_to: str | None
    noindex: bool
    nofollow: bool
    charset: str | None = None
    body_bytes: Annotated[int, Meta(ge=0)] = 0
    truncated: bool = False
    meta: Meta64 | None = None
    kind: Kind = "page"
    sitemaps: Annotated[list[Url], Meta(description="Nested sitemaps a sitemap index lists.")] = []
    etag: Annotated[str, Meta(max_length=1024)] | None = None
    last_modified: Annotated[str, Meta(max_length=256)] | None = None
    unchanged: Annotated[
        bool,
        Meta(
            description="A revisit found the stored page unchanged (a 304, or the same "
            "content_hash): the sink updates its status document's checked_at only."
        ),
    ] = False
    revisit: Revisit | None = None


class DeadLetterRecord(Message, kw_only=True):
    """crawl.dlq: a message that could not be processed: what failed, where, why, and the
    original payload."""

    stage: StageName
    reason: Reason
    detail: Annotated[str, Meta(max_length=4096)]
    topic: str
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    payload: str
    payload_encoding: Literal["utf-8", "base64"]
    payload_truncated: Annotated[
        bool, Meta(description="The payload was cut; the record stays at topic/partition/offset.")
    ] = False
    payload_bytes: (
        Annotated[int, Meta(ge=0, description="The original payload's size, when it was cut.")]
        | None
    ) = None
    failed_at: float
    history: History = []


class Tally(Message, kw_only=True):
    """crawl.events: what a stage decided for one crawl in one batch, as counts that the
    stats stage adds up per crawl. Keyed by crawl id."""

    stage: StageName
    crawl_id: CrawlId
    at: float
    counts: Annotated[
        dict[Annotated[str, Meta(max_length=80)], int],
        Meta(max_length=64, description="What was counted (discovered, admitted, ...)."),
    ]
    host: Host | None = None
    partition: (
        Annotated[
            int, Meta(ge=0, description="Sink: the crawl.pages partition of offsets and read.")
        ]
        | None
    ) = None
    offsets: Annotated[
        list[Annotated[int, Meta(ge=0)]],
        Meta(
            description="Sink: the offsets of the pages it wrote (a batch written twice "
            "after a crash then counts once)."
        ),
    ] = []
    read: Annotated[
        list[Annotated[int, Meta(ge=0)]],
        Meta(description="Sink: the offsets of the pages it read."),
    ] = []


ControlState = Literal["active", "paused", "cancelled"]


class Control(Message, kw_only=True):
    """crawl.control (compacted, keyed by crawl id): the state a crawl is in, written by
    ``streamcrawl pause|resume|cancel``. The last record of a crawl id is its state; every
    stage keeps the table. ``cancelled`` is final."""

    crawl_id: CrawlId
    state: Annotated[
        ControlState,
        Meta(description="active (the default, and after resume), paused, or cancelled."),
    ]
    at: Annotated[float, Meta(description="Unix time of the command.")]
    by: Annotated[str, Meta(max_length=256, description="Who gave the command.")] | None = None


# The schema file of each topic's type: the public contract.
SCHEMA_TYPES: dict[str, type[Message]] = {
    "seed": Seed,
    "discovered": Discovered,
    "fetch": Fetch,
    "retry": Retry,
    "fetched": Fetched,
    "page": Page,
    "dlq": DeadLetterRecord,
    "event": Tally,
    "control": Control,
}

M = TypeVar("M", bound=Message)

_encoder = msgspec.json.Encoder()


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def encode_json(value: Any) -> bytes:
    """Any JSON-able value (not only a message) as JSON."""
    return _encoder.encode(value)


def decoder(kind: type[M]) -> msgspec.json.Decoder[M]:
    return msgspec.json.Decoder(kind)


def to_dict(message: Message) -> dict[str, Any]:
    """Plain builtins (for MongoDB)."""
    result: dict[str, Any] = msgspec.to_builtins(message)
    return result


# -- builders: one message into the next ------------------------------------------------


def fetch_from(candidate: Discovered, admitted_at: float) -> Fetch:
    return Fetch(**msgspec.structs.asdict(candidate), admitted_at=admitted_at)


def retry_from(request: Fetch, due_at: float, reason: str) -> Retry:
    fields = msgspec.structs.asdict(request)
    return Retry(**fields, due_at=due_at, retry_reason=reason)


def fetch_from_retry(retry: Retry) -> Fetch:
    fields = msgspec.structs.asdict(retry)
    del fields["due_at"], fields["retry_reason"]
    return Fetch(**fields)


def with_attempt(request: Fetch, outcome: str, at: float, status: int | None, detail: str) -> Fetch:
    """The request with one more attempt counted and recorded in its history."""
    attempt = Attempt(at=at, outcome=outcome[:64], detail=detail[:1024], status=status)
    history = [*request.history, attempt][-MAX_HISTORY:]
    return msgspec.structs.replace(request, attempt=request.attempt + 1, history=history)


SCHEDULED = "\x00d"


def round_key(crawl_id: str, revisit: Revisit | None) -> str:
    """What dedup (and the frontier's memory of recent links) keys a URL's crawl by: the
    crawl id, and in a revisit round the round too, so each URL passes once per round. A
    revisit the scheduler queued (``due`` set; its round is its due time) is marked apart,
    so dedup counts those under one key per crawl (see ``counted_key`` in dedup)."""
    if revisit is None:
        return crawl_id
    if revisit.due is not None:
        return f"{crawl_id}{SCHEDULED}{revisit.round}"
    return f"{crawl_id}\x00r{revisit.round}"


def tallies(stage: StageName, counts: Mapping[tuple[str, str], int], at: float) -> list[Tally]:
    """One crawl.events record per crawl id from counts keyed by (crawl id, name)."""
    by_crawl: dict[str, dict[str, int]] = {}
    for (crawl_id, name), count in counts.items():
        if count:
            by_crawl.setdefault(crawl_id, {})[name] = count
    return [
        Tally(stage=stage, crawl_id=crawl_id, at=at, counts=named)
        for crawl_id, named in by_crawl.items()
    ]


# -- crawl.seeds: plain text or JSON ------------------------------------------------------

_MAX_SEED_BYTES = 64 * 1024
_seed_decoder = msgspec.json.Decoder(Seed)


class Undecodable(ReasonedError):
    """A value that is not a message of its topic; ``reason`` is machine-readable."""


def decode_json(decoder: msgspec.json.Decoder[M], text: bytes | str, what: str) -> M:
    """``text`` decoded and validated as ``decoder``'s type, or :class:`Undecodable`."""
    try:
        return decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise Undecodable("schema_violation", f"{what}: {str(exc)[:300]}") from exc
    except msgspec.DecodeError as exc:
        raise Undecodable("invalid_json", str(exc)[:300]) from exc
    except UnicodeDecodeError as exc:  # msgspec raises it for invalid UTF-8 in a string
        raise Undecodable("invalid_json", f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:  # msgspec's own depth limit
        raise Undecodable("invalid_json", "nested too deeply") from exc


def decode_seed(value: bytes | None) -> Seed:
    """A crawl.seeds value: a JSON object (``schemas/seed.json``) or one plain-text URL."""
    if not value or not value.strip():
        raise Undecodable("empty_value", "the seed is empty")
    if len(value) > _MAX_SEED_BYTES:
        raise Undecodable("too_large", f"{len(value)} bytes > {_MAX_SEED_BYTES}")
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise Undecodable("undecodable", f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if text.startswith(("{", "[", '"')):
        return decode_json(_seed_decoder, text, "seed")
    if any(char.isspace() for char in text):
        raise Undecodable("invalid_url", f"a plain-text seed is one URL, got {text[:200]!r}")
    return Seed(url=text)


# -- what the types cannot say -------------------------------------------------------------

# A seed is at most 64 KiB, so its meta is too; a larger one (from a faulty producer) would
# be copied into every candidate of the crawl and could push a record past its topic's limit.
MAX_META_BYTES = _MAX_SEED_BYTES
# The fetcher's longest wait (a full host queue at the longest Crawl-delay) is under two
# days; a retry due later than this is no record of ours, and held it would stop its
# partition's commits for good.
MAX_RETRY_WAIT = 30 * 24 * 3600.0

Addressed = Discovered | Fetched | Page


def check_message(message: Message, now: float | None = None) -> None:
    """Raise :class:`Undecodable` for a decoded message that the types admit but no stage
    produces: a URL that is not absolute http(s), a ``host`` that is not the URL's, a
    ``meta`` larger than a seed, a retry due beyond :data:`MAX_RETRY_WAIT`."""
    if isinstance(message, Discovered | Fetched | Page):
        _check_address(message)
        if message.meta is not None and len(encode_json(message.meta)) > MAX_META_BYTES:
            raise Undecodable("meta_too_large", f"meta is over {MAX_META_BYTES} bytes")
    if isinstance(message, Retry):
        wait = message.due_at - (time.time() if now is None else now)
        if wait > MAX_RETRY_WAIT:
            raise Undecodable("due_too_far", f"due in {wait:.3g}s > {MAX_RETRY_WAIT:.0f}s")


def _check_address(message: Addressed) -> None:
    try:
        parts = urlsplit(message.url)
        hostname = parts.hostname
        parts.port  # noqa: B018 (reading it raises ValueError for a port out of range)
    except ValueError as exc:  # an unbalanced IPv6 bracket, a bad port
        raise Undecodable("invalid_url", f"{exc} in {message.url[:200]!r}") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise Undecodable("unsupported_scheme", f"{message.url[:200]!r} is not http(s)")
    if not hostname:
        raise Undecodable("invalid_url", f"no host in {message.url[:200]!r}")
    if parts.netloc != message.host:
        raise Undecodable("host_mismatch", f"host {message.host[:200]!r} is not the URL's")
