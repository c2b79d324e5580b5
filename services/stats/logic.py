"""The stats stage's arithmetic, pure: what one record adds to a table entry, how entries
add up to a crawl and its hosts, p95 from a bucketed histogram, pages per second per
minute, and the top hosts.

Exactly once without transactions: every table key names the one input partition that
updates it (``crawl | topic | partition``, ``crawl | host | topic | partition``) and its
value carries the offset of the last record applied. A record at or below that offset was
applied before a crash and is skipped when it is read again. The offset and the counts are
one value, written to the changelog in one record, so no crash can separate them. The
sink's events list the crawl.pages offsets they cover, so a batch the sink writes twice
(a crash between its write and its commit) counts once too.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..core.messages import DEFAULT_CRAWL_ID, Tally

Entry = dict[str, Any]
SEP = "\x1f"  # in no crawl id and no host name
WINDOW_MINUTES = 15  # per-minute counts kept per crawl entry
ACTIVE_WITHIN = 30.0  # a crawl with activity this recent (seconds) is "running"

# Latency histogram: bucket upper bounds in seconds, roughly x1.5 apart, 5 ms .. 2 min.
LATENCY_BOUNDS: tuple[float, ...] = tuple(
    round(0.005 * 1.5**step, 6) for step in range(26)
)  # the last bucket (index len(LATENCY_BOUNDS)) is everything above


# -- lenient views of the records read: only the fields counted ----------------------


class _Timings(msgspec.Struct):
    total_s: float = 0.0


class FetchedView(msgspec.Struct):
    crawl_id: str
    host: str
    status: int
    fetched_at: float
    body_bytes: int = 0
    timings: _Timings = msgspec.field(default_factory=_Timings)


class RetryView(msgspec.Struct):
    crawl_id: str
    host: str
    retry_reason: str
    attempt: int = 0


class DeadLetterView(msgspec.Struct):
    stage: str
    reason: str
    payload: str
    payload_encoding: str
    failed_at: float


class _Origin(msgspec.Struct):
    crawl_id: str = DEFAULT_CRAWL_ID
    host: str | None = None


_origin = msgspec.json.Decoder(_Origin)


def origin(dead: DeadLetterView) -> _Origin:
    """The crawl id and host of a dead letter's original message. A payload that is not a
    JSON object (a plain-text seed, garbage) belongs to the default crawl."""
    try:
        raw = (
            base64.b64decode(dead.payload)
            if dead.payload_encoding == "base64"
            else dead.payload.encode()
        )
        found = _origin.decode(raw)
    except (msgspec.DecodeError, binascii.Error, ValueError):
        return _Origin()
    return found


# Failures a retry records (the fetcher's retry reasons that are not a busy host).
NOT_AN_ERROR = frozenset({"host_busy", "paused"})


def status_class(status: int) -> str:
    return f"{status // 100}xx"


# -- keys -------------------------------------------------------------------------------


def crawl_key(crawl_id: str, topic: str, partition: int) -> str:
    return SEP.join((crawl_id, topic, str(partition)))


def host_key(crawl_id: str, host: str, topic: str, partition: int) -> str:
    return SEP.join((crawl_id, host, topic, str(partition)))


def crawl_of(key: str) -> str:
    return key.split(SEP, 1)[0]


def host_of_key(key: str) -> tuple[str, str]:
    crawl_id, host, _ = key.split(SEP, 2)
    return crawl_id, host


# -- applying one record to an entry --------------------------------------------------


def fresh(entry: Entry | None, offset: int) -> Entry | None:
    """The entry to update for the record at ``offset``, or None when that record was
    applied already (its offset is not above the entry's)."""
    current: Entry = dict(entry) if entry else {"o": -1, "c": {}}
    if offset <= current["o"]:
        return None
    current["o"] = offset
    current["c"] = dict(current["c"])
    return current


def add(entry: Entry, counts: Mapping[str, int]) -> None:
    counter: dict[str, int] = entry["c"]
    for name, count in counts.items():
        if count:
            counter[name] = counter.get(name, 0) + count


def touch(entry: Entry, at: float) -> None:
    """First and last activity (times of the records themselves, not of their reading)."""
    entry["f"] = min(entry.get("f", at), at)
    entry["l"] = max(entry.get("l", at), at)


def add_to_minute(entry: Entry, at: float, pages: int) -> None:
    """Pages stored in the minute of ``at``; only the last WINDOW_MINUTES minutes kept."""
    if not pages:
        return
    minutes: dict[str, int] = dict(entry.get("m", {}))
    minute = str(int(at // 60))
    minutes[minute] = minutes.get(minute, 0) + pages
    for old in sorted(minutes, key=int)[:-WINDOW_MINUTES]:
        del minutes[old]
    entry["m"] = minutes


def fetched_counts(view: FetchedView) -> dict[str, int]:
    return {"fetched": 1, "bytes": view.body_bytes, "status:" + status_class(view.status): 1}


def apply_fetched_host(entry: Entry, view: FetchedView) -> None:
    add(entry, {"fetched": 1, "errors": int(view.status >= 400)})
    touch(entry, view.fetched_at)
    buckets: list[int] = list(entry.get("h", [0] * (len(LATENCY_BOUNDS) + 1)))
    buckets[latency_bucket(view.timings.total_s)] += 1
    entry["h"] = buckets
    entry["s"] = entry.get("s", 0.0) + view.timings.total_s


def retry_counts(view: RetryView) -> dict[str, int]:
    return {"deferred:" + view.retry_reason: 1}


def apply_retry_host(entry: Entry, view: RetryView, at: float) -> None:
    failed = view.retry_reason not in NOT_AN_ERROR
    add(entry, {"deferred:" + view.retry_reason: 1, "errors": int(failed)})
    if view.retry_reason == "robots_unavailable":
        entry["r"] = "unavailable"
        entry["rt"] = at
    touch(entry, at)


def dead_letter_counts(dead: DeadLetterView) -> dict[str, int]:
    return {f"failed:{dead.stage}:{dead.reason}": 1}


def apply_dead_letter_host(entry: Entry, dead: DeadLetterView) -> None:
    add(entry, {"errors": 1, f"failed:{dead.reason}": 1})
    touch(entry, dead.failed_at)


def apply_tally(entry: Entry, tally: Tally) -> None:
    """A frontier, dedup or fetcher tally: its counts. A sink tally: the pages it read
    and wrote at offsets above what this entry counted for that crawl.pages partition."""
    touch(entry, tally.at)
    if tally.partition is None:
        add(entry, tally.counts)
        return
    watermarks: dict[str, int] = dict(entry.get("w", {}))
    partition = str(tally.partition)
    seen = watermarks.get(partition, -1)
    read = [offset for offset in tally.read if offset > seen]
    stored = sum(1 for offset in tally.offsets if offset > seen)
    if read:
        watermarks[partition] = max(read)
    entry["w"] = watermarks
    add(entry, {**tally.counts, "parsed": len(read), "stored": stored})
    add_to_minute(entry, tally.at, stored)


def apply_robots_host(entry: Entry, tally: Tally) -> None:
    add(entry, tally.counts)
    entry["r"] = "disallows"
    entry["rt"] = tally.at
    touch(entry, tally.at)


# -- latency ----------------------------------------------------------------------------


def latency_bucket(seconds: float) -> int:
    for index, bound in enumerate(LATENCY_BOUNDS):
        if seconds <= bound:
            return index
    return len(LATENCY_BOUNDS)


def quantile(buckets: list[int], q: float) -> float | None:
    """The ``q`` quantile of a bucketed histogram: the upper bound of the bucket where the
    cumulative count reaches q (an overestimate by at most one bucket, about 1.5x). None
    for no data; the last bound for the overflow bucket."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = math.ceil(q * total)
    seen = 0
    for index, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            return LATENCY_BOUNDS[min(index, len(LATENCY_BOUNDS) - 1)]
    return LATENCY_BOUNDS[-1]


# -- adding entries up -----------------------------------------------------------------


@dataclass
class CrawlTotals:
    crawl_id: str
    counts: dict[str, int] = field(default_factory=dict)
    first: float | None = None
    last: float | None = None
    minutes: dict[int, int] = field(default_factory=dict)

    def merge(self, entry: Entry) -> None:
        for name, count in entry["c"].items():
            self.counts[name] = self.counts.get(name, 0) + count
        if "f" in entry:
            self.first = entry["f"] if self.first is None else min(self.first, entry["f"])
            self.last = entry["l"] if self.last is None else max(self.last, entry["l"])
        for minute, pages in entry.get("m", {}).items():
            self.minutes[int(minute)] = self.minutes.get(int(minute), 0) + pages

    def total(self, prefix: str) -> int:
        return sum(count for name, count in self.counts.items() if name.startswith(prefix))

    def by_reason(self, prefix: str) -> dict[str, int]:
        return {
            name[len(prefix) :]: count
            for name, count in sorted(self.counts.items())
            if name.startswith(prefix)
        }

    def summary(self, now: float) -> dict[str, Any]:
        counts = self.counts
        return {
            "crawl_id": self.crawl_id,
            "state": crawl_state(self.last, now),
            "discovered": counts.get("discovered", 0),
            "admitted": counts.get("admitted", 0),
            "fetched": counts.get("fetched", 0),
            "parsed": counts.get("parsed", 0),
            "stored": counts.get("stored", 0),
            "unchanged": counts.get("unchanged", 0),
            "bytes": counts.get("bytes", 0),
            "cancelled": counts.get("cancelled", 0),
            "errors": self.total("failed:"),
            "filtered": self.by_reason("filtered:"),
            "failed": self.by_reason("failed:"),
            "deferred": self.by_reason("deferred:"),
            "status": self.by_reason("status:"),
            "first_activity": self.first,
            "last_activity": self.last,
            "age_s": None if self.first is None else max(0.0, now - self.first),
            "pages_per_s": pages_per_second(self.minutes, self.first, self.last, now),
            "minutes": [
                {"minute": minute * 60, "pages": pages, "pages_per_s": round(pages / 60, 3)}
                for minute, pages in sorted(self.minutes.items())
            ],
        }


def crawl_state(last: float | None, now: float) -> str:
    if last is None:
        return "empty"
    return "running" if now - last <= ACTIVE_WITHIN else "idle"


def pages_per_second(
    minutes: Mapping[int, int], first: float | None, last: float | None, now: float
) -> float:
    """Pages stored per second over the last full minute of a running crawl (over its
    whole life when it is younger than two minutes or has stopped)."""
    if first is None or last is None:
        return 0.0
    current = int(now // 60)
    if now - last > ACTIVE_WITHIN or current - int(first // 60) < 2:
        span = max(last - first, 1.0)
        return round(sum(minutes.values()) / span, 3)
    return round(minutes.get(current - 1, 0) / 60, 3)


def crawl_totals(items: Iterable[tuple[str, Entry]]) -> dict[str, CrawlTotals]:
    totals: dict[str, CrawlTotals] = {}
    for key, entry in items:
        crawl_id = crawl_of(key)
        totals.setdefault(crawl_id, CrawlTotals(crawl_id)).merge(entry)
    return totals


@dataclass
class HostTotals:
    host: str
    counts: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latency_sum: float = 0.0
    first: float | None = None
    last: float | None = None
    robots: str | None = None
    robots_at: float = 0.0

    def merge(self, entry: Entry) -> None:
        for name, count in entry["c"].items():
            self.counts[name] = self.counts.get(name, 0) + count
        for index, count in enumerate(entry.get("h", ())):
            self.buckets[index] += count
        self.latency_sum += entry.get("s", 0.0)
        if "f" in entry and "h" in entry:  # fetch times: from crawl.fetched entries only
            self.first = entry["f"] if self.first is None else min(self.first, entry["f"])
            self.last = entry["l"] if self.last is None else max(self.last, entry["l"])
        if "r" in entry and entry.get("rt", 0.0) >= self.robots_at:
            self.robots, self.robots_at = entry["r"], entry["rt"]

    def row(self) -> dict[str, Any]:
        fetched = self.counts.get("fetched", 0)
        timed = sum(self.buckets)
        interval = None
        if fetched > 1 and self.first is not None and self.last is not None:
            interval = round((self.last - self.first) / (fetched - 1), 3)
        return {
            "host": self.host,
            "fetched": fetched,
            "errors": self.counts.get("errors", 0),
            "latency_mean_s": round(self.latency_sum / timed, 4) if timed else None,
            "latency_p95_s": quantile(self.buckets, 0.95),
            "interval_s": interval,
            "robots": self.robots or ("allows" if fetched else "unknown"),
            "deferred": {
                name.split(":", 1)[1]: count
                for name, count in sorted(self.counts.items())
                if name.startswith("deferred:")
            },
            "failed": {
                name.split(":", 1)[1]: count
                for name, count in sorted(self.counts.items())
                if name.startswith("failed:")
            },
            "last_fetch": self.last,
        }


def host_rows(items: Iterable[tuple[str, Entry]], crawl_id: str) -> list[dict[str, Any]]:
    hosts: dict[str, HostTotals] = {}
    for key, entry in items:
        owner, host = host_of_key(key)
        if owner == crawl_id:
            hosts.setdefault(host, HostTotals(host)).merge(entry)
    return [totals.row() for totals in hosts.values()]


SORT_KEYS = ("errors", "fetched", "latency_p95_s", "latency_mean_s", "host")


def top_hosts(rows: list[dict[str, Any]], sort: str, top: int) -> list[dict[str, Any]]:
    """The ``top`` rows by ``sort`` (largest first; by name, alphabetical), ties by host."""
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}")
    if sort == "host":
        ordered = sorted(rows, key=lambda row: row["host"])
    else:
        ordered = sorted(
            rows,
            key=lambda row: (-(row[sort] if row[sort] is not None else -1.0), row["host"]),
        )
    return ordered[: max(0, top)]


# -- the worker's own health ----------------------------------------------------------------


@dataclass
class CommitWatch:
    """Whether the worker has all but stopped committing while records wait for it: fewer
    than ``min_records`` offsets committed in ``after_s`` seconds with lag left, out of
    changelog recovery.

    faust can stop a worker without stopping its process (seen after a burst that filled
    its producer buffer: no record committed, no log line), and can leave one crawling: seen
    after a restart onto a backlog, one partition committed at 1-2 records a second for
    minutes, its queues empty, nothing logged. Counted from the broker's side, that covers
    a stopped stream, a crawling one and a stopped commit alike; a healthy worker commits
    thousands of records a second, so a restart (a few seconds, tables recovered from
    compacted changelogs) costs little where the verdict is wrong."""

    after_s: float
    min_records: int = 100
    _base: int | None = None  # offsets committed, summed, when the grace started
    _waiting: int = 0  # the lag then
    _since: float = 0.0

    def stalled(
        self,
        committed: tuple[tuple[str, int, int | None], ...],
        lag: int,
        now: float,
        recovering: bool,
    ) -> bool:
        total = sum(offset or 0 for _, _, offset in committed)
        if (
            self._base is None
            or recovering
            or lag <= 0
            or total < self._base  # offsets moved back (a rewind): a new grace
            or self._progressed(total)
        ):
            self._base, self._waiting, self._since = total, lag, now
            return False
        return now - self._since >= self.after_s

    def _progressed(self, total: int) -> bool:
        """Committed enough since the grace started: ``min_records``, or all that waited."""
        assert self._base is not None
        return total - self._base >= min(self.min_records, max(1, self._waiting))

    def reset(self, now: float) -> None:
        """Start the grace again (the offsets could not be read: no verdict)."""
        self._base, self._since = None, now
