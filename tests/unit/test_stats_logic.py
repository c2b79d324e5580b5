"""The stats stage's arithmetic: idempotent updates by offset, sink tallies counted once
across a redelivery, p95 from buckets, the per-minute window, and the top hosts."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from streamcrawl.core.messages import Tally, encode, tallies
from streamcrawl.sink.logic import stored_tallies
from streamcrawl.stats import logic


def _apply(entries: dict[str, logic.Entry], key: str, offset: int, change: Any) -> bool:
    """What the app does: skip a record already applied, else change and store."""
    entry = logic.fresh(entries.get(key), offset)
    if entry is None:
        return False
    change(entry)
    entries[key] = entry
    return True


def _fetched(status: int = 200, total_s: float = 0.1, at: float = 1000.0) -> logic.FetchedView:
    return logic.FetchedView(
        crawl_id="a",
        host="h.example",
        status=status,
        fetched_at=at,
        body_bytes=100,
        timings=logic._Timings(total_s=total_s),
    )


def test_a_record_read_again_is_not_counted_again() -> None:
    entries: dict[str, logic.Entry] = {}
    key = logic.crawl_key("a", "fetched", 3)
    view = _fetched()

    def change(entry: logic.Entry) -> None:
        logic.add(entry, logic.fetched_counts(view))

    assert [_apply(entries, key, offset, change) for offset in (0, 1, 2)] == [True] * 3
    # A restart reads offsets 1..3 again: only 3 is new.
    assert [_apply(entries, key, offset, change) for offset in (1, 2, 3)] == [
        False,
        False,
        True,
    ]
    assert entries[key]["c"] == {"fetched": 4, "bytes": 400, "status:2xx": 4}
    assert entries[key]["o"] == 3


def test_the_entry_survives_a_json_round_trip_as_the_changelog_stores_it() -> None:
    entries: dict[str, logic.Entry] = {}
    key = logic.crawl_key("a", "events", 0)
    tally = Tally(
        stage="sink", crawl_id="a", at=120.0, counts={}, partition=2, offsets=[5, 6], read=[5, 6]
    )
    _apply(entries, key, 10, lambda entry: logic.apply_tally(entry, tally))
    restored = msgspec.json.decode(msgspec.json.encode(entries[key]))
    again = logic.fresh(restored, 11)
    assert again is not None
    logic.apply_tally(again, tally)  # the same sink batch, in a later event: nothing new
    assert again["c"] == {"parsed": 2, "stored": 2}
    assert again["m"] == {"2": 2}


@dataclass
class _Record:
    partition: int
    offset: int


@dataclass
class _Received:
    record: _Record
    message: Any


def _page(crawl_id: str) -> Any:
    @dataclass
    class Page:
        crawl_id: str

    return Page(crawl_id)


def test_a_sink_batch_written_twice_counts_once_and_a_longer_one_adds_the_rest() -> None:
    first = [_Received(_Record(4, offset), _page("a")) for offset in (10, 11, 12)]
    # The sink wrote offsets 10..12 (11 superseded in its batch), then crashed before its
    # commit; its successor reads 10..14 and writes them all.
    again = [_Received(_Record(4, offset), _page("a")) for offset in range(10, 15)]
    entry: logic.Entry = {"o": -1, "c": {}}
    for tally in [
        *stored_tallies(first, [0, 2], 60.0),
        *stored_tallies(again, [0, 1, 2, 3, 4], 61.0),
    ]:
        logic.apply_tally(entry, tally)
    assert entry["c"] == {"parsed": 5, "stored": 4}
    assert entry["w"] == {"4": 14}


def test_sink_tallies_split_by_crawl_and_partition() -> None:
    batch = [
        _Received(_Record(0, 1), _page("a")),
        _Received(_Record(0, 2), _page("b")),
        _Received(_Record(1, 7), _page("a")),
    ]
    found = {
        (t.crawl_id, t.partition): (t.read, t.offsets) for t in stored_tallies(batch, [0, 2], 1.0)
    }
    assert found == {("a", 0): ([1], [1]), ("b", 0): ([2], []), ("a", 1): ([7], [7])}


def test_stage_tallies_group_counts_by_crawl_and_leave_out_zeros() -> None:
    found = tallies(
        "dedup", {("a", "admitted"): 3, ("a", "filtered:duplicate"): 0, ("b", "admitted"): 1}, 5.0
    )
    assert sorted((t.crawl_id, t.counts) for t in found) == [
        ("a", {"admitted": 3}),
        ("b", {"admitted": 1}),
    ]
    assert all(msgspec.json.decode(encode(t), type=Tally) == t for t in found)


def test_quantile_is_the_upper_bound_of_the_bucket_reaching_the_rank() -> None:
    buckets = [0] * (len(logic.LATENCY_BOUNDS) + 1)
    assert logic.quantile(buckets, 0.95) is None
    for seconds in [0.004] * 94 + [0.3] * 6:
        buckets[logic.latency_bucket(seconds)] += 1
    assert logic.quantile(buckets, 0.95) == logic.LATENCY_BOUNDS[logic.latency_bucket(0.3)]
    assert logic.quantile(buckets, 0.5) == logic.LATENCY_BOUNDS[0]
    bound = logic.LATENCY_BOUNDS[logic.latency_bucket(0.3)]
    assert 0.3 <= bound < 0.3 * 1.5
    buckets[-1] += 1000  # beyond the last bound
    assert logic.quantile(buckets, 0.95) == logic.LATENCY_BOUNDS[-1]


def test_host_rows_merge_partitions_and_compute_mean_p95_interval() -> None:
    entries: dict[str, logic.Entry] = {}
    key = logic.host_key("a", "h.example", "fetched", 1)
    for offset, (status, seconds, at) in enumerate(
        [(200, 0.1, 100.0), (500, 0.2, 101.0), (200, 0.3, 104.0)]
    ):
        view = _fetched(status, seconds, at)
        _apply(entries, key, offset, lambda entry, v=view: logic.apply_fetched_host(entry, v))
    dead = logic.DeadLetterView(
        stage="fetcher", reason="timeout", payload="{}", payload_encoding="utf-8", failed_at=105.0
    )
    dkey = logic.host_key("a", "h.example", "dlq", 0)
    _apply(entries, dkey, 0, lambda entry: logic.apply_dead_letter_host(entry, dead))
    entries[logic.host_key("b", "h.example", "fetched", 1)] = {"o": 0, "c": {"fetched": 9}}
    [row] = logic.host_rows(entries.items(), "a")
    assert row["fetched"] == 3
    assert row["errors"] == 2  # one 500, one request given up
    assert row["latency_mean_s"] == pytest.approx(0.2)
    assert row["latency_p95_s"] == logic.LATENCY_BOUNDS[logic.latency_bucket(0.3)]
    assert row["interval_s"] == 2.0  # 100 -> 104 over two gaps
    assert row["failed"] == {"timeout": 1}
    assert row["robots"] == "allows"


def test_robots_state_is_the_latest_seen() -> None:
    totals = logic.HostTotals("h")
    totals.merge({"c": {}, "r": "unavailable", "rt": 10.0})
    totals.merge({"c": {}, "r": "disallows", "rt": 5.0})
    assert totals.row()["robots"] == "unavailable"


def _row(host: str, errors: int, fetched: int, p95: float | None) -> dict[str, Any]:
    return {
        "host": host,
        "errors": errors,
        "fetched": fetched,
        "latency_p95_s": p95,
        "latency_mean_s": p95,
    }


def test_top_hosts_sorts_largest_first_ties_by_name_and_cuts() -> None:
    rows = [_row("c", 1, 5, 0.2), _row("a", 3, 1, None), _row("b", 1, 9, 0.5)]
    assert [r["host"] for r in logic.top_hosts(rows, "errors", 2)] == ["a", "b"]
    assert [r["host"] for r in logic.top_hosts(rows, "fetched", 10)] == ["b", "c", "a"]
    assert [r["host"] for r in logic.top_hosts(rows, "latency_p95_s", 10)] == ["b", "c", "a"]
    assert [r["host"] for r in logic.top_hosts(rows, "host", 10)] == ["a", "b", "c"]
    assert logic.top_hosts(rows, "errors", 0) == []
    with pytest.raises(ValueError):
        logic.top_hosts(rows, "url", 1)


def test_minute_window_keeps_the_last_minutes_only() -> None:
    entry: logic.Entry = {"o": 0, "c": {}}
    for minute in range(logic.WINDOW_MINUTES + 5):
        logic.add_to_minute(entry, minute * 60 + 1.0, minute + 1)
    kept = sorted(int(m) for m in entry["m"])
    assert len(kept) == logic.WINDOW_MINUTES
    assert kept[-1] == logic.WINDOW_MINUTES + 4


def test_pages_per_second_over_the_last_full_minute_of_a_running_crawl() -> None:
    minutes = {10: 600, 11: 1200, 12: 30}
    now = 12 * 60 + 20.0
    # Running (last activity 5 s ago), three minutes old: minute 11 gave 1200 / 60.
    assert logic.pages_per_second(minutes, 10 * 60.0, now - 5, now) == 20.0
    # Finished (idle for long): everything over its active span.
    later = now + 3600
    assert logic.pages_per_second(minutes, 600.0, 740.0, later) == round(1830 / 140, 3)
    assert logic.pages_per_second({}, None, None, now) == 0.0


def test_crawl_totals_add_up_entries_and_name_reasons() -> None:
    items = [
        (
            logic.crawl_key("a", "events", 0),
            {"o": 1, "c": {"discovered": 5, "filtered:x": 2}, "f": 10.0, "l": 20.0},
        ),
        (
            logic.crawl_key("a", "dlq", 2),
            {"o": 1, "c": {"failed:fetcher:timeout": 1}, "f": 15.0, "l": 30.0},
        ),
        (logic.crawl_key("b", "events", 0), {"o": 1, "c": {"discovered": 1}}),
    ]
    totals = logic.crawl_totals(items)
    summary = totals["a"].summary(now=1000.0)
    assert summary["discovered"] == 5
    assert summary["errors"] == 1
    assert summary["filtered"] == {"x": 2}
    assert summary["failed"] == {"fetcher:timeout": 1}
    assert (summary["first_activity"], summary["last_activity"]) == (10.0, 30.0)
    assert summary["state"] == "idle"
    assert totals["b"].summary(now=1000.0)["state"] == "empty"


def test_a_dead_letter_names_its_crawl_and_host_or_the_default_crawl() -> None:
    def dead(payload: bytes, encoding: str = "utf-8") -> logic.DeadLetterView:
        text = base64.b64encode(payload).decode() if encoding == "base64" else payload.decode()
        return logic.DeadLetterView(
            stage="fetcher", reason="r", payload=text, payload_encoding=encoding, failed_at=1.0
        )

    found = logic.origin(dead(b'{"crawl_id": "c1", "host": "h", "url": "http://h/"}'))
    assert (found.crawl_id, found.host) == ("c1", "h")
    assert logic.origin(dead(b"http://plain.example/")).crawl_id == "default"
    assert logic.origin(dead(b"\xff\xfe", "base64")).crawl_id == "default"


# -- the commit watch ---------------------------------------------------------------------

AT_5 = (("crawl.fetched", 0, 5),)
AT_9 = (("crawl.fetched", 0, 9),)


def at(*offsets: int | None) -> tuple[tuple[str, int, int | None], ...]:
    return tuple(("crawl.fetched", partition, offset) for partition, offset in enumerate(offsets))


def test_commits_frozen_with_records_waiting_is_a_stall_only_after_the_grace() -> None:
    watch = logic.CommitWatch(after_s=45.0)
    assert not watch.stalled(AT_5, lag=10, now=100.0, recovering=False)
    assert not watch.stalled(AT_5, lag=10, now=144.0, recovering=False)
    assert watch.stalled(AT_5, lag=10, now=145.0, recovering=False)


def test_a_worker_crawling_through_a_backlog_is_a_stall() -> None:
    """Seen after a restart onto a backlog: one partition committed 1-2 records a second."""
    watch = logic.CommitWatch(after_s=45.0, min_records=100)
    assert not watch.stalled(at(1000, 300), lag=700, now=100.0, recovering=False)
    assert not watch.stalled(at(1000, 340), lag=660, now=120.0, recovering=False)
    assert watch.stalled(at(1000, 390), lag=610, now=145.0, recovering=False)


def test_committing_enough_or_all_that_waited_restarts_the_grace() -> None:
    watch = logic.CommitWatch(after_s=45.0, min_records=100)
    watch.stalled(at(1000, 300), lag=700, now=100.0, recovering=False)
    assert not watch.stalled(at(1000, 400), lag=900, now=140.0, recovering=False)  # 100 more
    assert not watch.stalled(at(1050, 400), lag=850, now=184.0, recovering=False)
    assert watch.stalled(at(1050, 440), lag=810, now=185.0, recovering=False)  # 90 in 45 s
    few = logic.CommitWatch(after_s=45.0, min_records=100)
    few.stalled(AT_5, lag=4, now=100.0, recovering=False)
    assert not few.stalled(AT_9, lag=3, now=140.0, recovering=False)  # the 4 that waited
    assert not few.stalled(AT_9, lag=3, now=184.0, recovering=False)
    assert few.stalled(AT_9, lag=3, now=185.0, recovering=False)


def test_offsets_moved_back_restart_the_grace() -> None:
    watch = logic.CommitWatch(after_s=45.0, min_records=100)
    watch.stalled(at(1000, 300), lag=700, now=100.0, recovering=False)
    assert not watch.stalled(at(0, 300), lag=1700, now=140.0, recovering=False)  # rewound
    assert not watch.stalled(at(60, 300), lag=1640, now=184.0, recovering=False)
    assert watch.stalled(at(60, 300), lag=1640, now=185.0, recovering=False)


def test_an_empty_backlog_or_a_recovery_restart_the_grace() -> None:
    watch = logic.CommitWatch(after_s=45.0)
    watch.stalled(AT_9, lag=10, now=100.0, recovering=False)
    assert not watch.stalled(AT_9, lag=10, now=140.0, recovering=False)  # 40 s since
    assert not watch.stalled(AT_9, lag=0, now=190.0, recovering=False)  # nothing waits
    assert not watch.stalled(AT_9, lag=3, now=230.0, recovering=False)  # 40 s since
    assert not watch.stalled(AT_9, lag=3, now=280.0, recovering=True)  # recovering
    assert not watch.stalled(AT_9, lag=3, now=320.0, recovering=False)
    assert watch.stalled(AT_9, lag=3, now=325.0, recovering=False)


def test_offsets_that_could_not_be_read_restart_the_grace() -> None:
    """A broker outage stops commits too: the first reading after it is no stall."""
    watch = logic.CommitWatch(after_s=45.0)
    watch.stalled(AT_5, lag=10, now=100.0, recovering=False)
    watch.reset(now=130.0)  # the broker did not answer
    assert not watch.stalled(AT_5, lag=10, now=160.0, recovering=False)
    assert not watch.stalled(AT_5, lag=10, now=204.0, recovering=False)
    assert watch.stalled(AT_5, lag=10, now=205.0, recovering=False)
