"""The adaptive revisit schedule, the pure pieces: the interval after a visit (shrinks when
the page changed, grows when not, clamped; a 304 is unchanged; a missing Last-Modified plays
no part), what the sink writes for it, the scheduler's records (round = due time) and its
per-host cap, and the intervals over several rounds."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import msgspec
import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import Discovered, Page, Revisit, encode
from streamcrawl.core.schedule import next_interval, schedule_fields
from streamcrawl.crawl.recrawl import revisit_candidate
from streamcrawl.parser.logic import page_from_fetched
from streamcrawl.scheduler.logic import due_round, polite_batch
from streamcrawl.sink.logic import check_update, document_under, written_status

from .test_recrawl import ETAG, HTML, MODIFIED, parsed_digest, revisit
from .test_stages import SCOPE, fetched, page

HOUR, DAY = 3600.0, 86400.0
S = Settings()  # 1 h .. 30 d, 1 d first, x0.5 changed, x1.5 unchanged


def test_defaults_are_an_hour_to_thirty_days_starting_at_a_day() -> None:
    assert (S.revisit_min, S.revisit_initial, S.revisit_max) == (HOUR, DAY, 30 * DAY)


def test_a_first_visit_gets_the_initial_interval_within_bounds() -> None:
    assert next_interval(None, True, S) == DAY
    assert next_interval(None, False, S) == DAY
    assert next_interval(0.0, True, S) == DAY
    assert next_interval(None, True, replace(S, revisit_initial=10.0)) == HOUR  # clamped
    assert next_interval(None, True, replace(S, revisit_initial=1e9)) == 30 * DAY


def test_changed_shrinks_unchanged_grows() -> None:
    assert next_interval(DAY, True, S) == DAY / 2
    assert next_interval(DAY, False, S) == DAY * 1.5


def test_the_interval_stays_within_min_and_max() -> None:
    assert next_interval(HOUR, True, S) == HOUR
    assert next_interval(HOUR * 1.5, True, S) == HOUR
    assert next_interval(30 * DAY, False, S) == 30 * DAY
    assert next_interval(25 * DAY, False, S) == 30 * DAY
    # A stored interval outside new bounds (settings changed) is brought back in.
    assert next_interval(100 * DAY, True, S) == 30 * DAY


def test_schedule_fields_put_next_visit_one_interval_after_the_check() -> None:
    assert schedule_fields(DAY, False, 1000.0, S) == {
        "revisit_interval": 1.5 * DAY,
        "next_visit": 1000.0 + 1.5 * DAY,
    }


def test_settings_refuse_bounds_the_wrong_way_round() -> None:
    with pytest.raises(ValueError, match="REVISIT_MIN"):
        Settings.from_env({"STREAMCRAWL_REVISIT_MIN": "10", "STREAMCRAWL_REVISIT_MAX": "5"})
    with pytest.raises(ValueError, match="REVISIT_SHRINK"):
        Settings.from_env({"STREAMCRAWL_REVISIT_SHRINK": "2"})
    with pytest.raises(ValueError, match="SCHEDULE_BATCH"):
        Settings.from_env({"STREAMCRAWL_SCHEDULE_BATCH": "0"})


# -- the sink: every visit moves next_visit ---------------------------------------------------


def status_written(stored: Page, at: float, settings: Settings | None = S) -> dict[str, Any]:
    """The status document the sink writes beside ``stored`` stored at ``at``."""
    return written_status(document_under("id", stored, at), stored, at, settings)


def test_a_new_page_is_stored_with_the_initial_interval() -> None:
    status = status_written(page(), 100.0)
    assert status["revisit_interval"] == DAY
    assert status["next_visit"] == 100.0 + DAY
    assert status["checked_at"] == status["stored_at"] == 100.0


def test_the_schedule_lives_on_the_status_document_only() -> None:
    """The page document is the content as stored: a revisit that finds it unchanged moves
    the status document and leaves the page as it is, so nothing on it goes stale."""
    document = document_under("id", page(), 100.0)
    assert {"checked_at", "revisit_interval", "next_visit"}.isdisjoint(document)
    assert document["stored_at"] == 100.0


def test_without_settings_the_status_document_has_no_schedule() -> None:
    assert "next_visit" not in status_written(page(), 100.0, settings=None)
    assert check_update(page(status=304, unchanged=True), 5.0) == {"checked_at": 5.0}


def test_a_changed_page_is_stored_with_a_shorter_interval() -> None:
    changed = page(revisit=revisit(interval=DAY))
    status = status_written(changed, 100.0)
    assert status["revisit_interval"] == DAY / 2
    assert status["next_visit"] == 100.0 + DAY / 2
    assert "revisit" not in document_under("id", changed, 100.0)


def test_a_304_counts_as_unchanged_and_grows_the_interval() -> None:
    not_modified = page(status=304, unchanged=True, revisit=revisit(interval=DAY))
    update = check_update(not_modified, 100.0, S)
    assert update == {
        "checked_at": 100.0,
        "revisit_interval": 1.5 * DAY,
        "next_visit": 100.0 + 1.5 * DAY,
    }


def test_the_same_digest_without_last_modified_grows_the_interval() -> None:
    """A server that sends no validators (no Last-Modified, no ETag): the revisit is a plain
    200, and the stored digest decides; the missing header resets nothing."""
    stored = revisit(etag=None, last_modified=None, interval=2 * DAY)
    same = page_from_fetched(fetched(HTML, revisit=stored), HTML)
    assert same.unchanged and same.last_modified is None
    update = check_update(same, 100.0, S)
    assert update["revisit_interval"] == 3 * DAY
    assert update["last_modified"] is None and update["etag"] is None


def test_a_changed_body_without_last_modified_shrinks_the_interval() -> None:
    stored = revisit(etag=None, last_modified=None, interval=2 * DAY)
    body = HTML.replace(b"hello", b"hello again")
    changed = page_from_fetched(fetched(body, revisit=stored), body)
    assert not changed.unchanged
    assert status_written(changed, 100.0)["revisit_interval"] == DAY


def test_intervals_move_the_right_way_over_several_rounds() -> None:
    """A page that changes at every visit goes down to REVISIT_MIN, one that never changes
    up to REVISIT_MAX, each step the right way and none outside the bounds."""
    changing: float | None = None
    steady: float | None = None
    changing_seen, steady_seen = [], []
    for visit in range(20):
        at = 1000.0 * visit
        changing_page = page(revisit=None if changing is None else revisit(interval=changing))
        changing = status_written(changing_page, at)["revisit_interval"]
        if steady is None:
            steady = status_written(page(), at)["revisit_interval"]
        else:
            steady_page = page(status=304, unchanged=True, revisit=revisit(interval=steady))
            steady = check_update(steady_page, at, S)["revisit_interval"]
        changing_seen.append(changing)
        steady_seen.append(steady)
    assert changing_seen[0] == steady_seen[0] == DAY
    assert all(b <= a for a, b in itertools.pairwise(changing_seen))
    assert all(b >= a for a, b in itertools.pairwise(steady_seen))
    assert changing_seen[-1] == HOUR and steady_seen[-1] == 30 * DAY
    assert all(HOUR <= v <= 30 * DAY for v in changing_seen + steady_seen)


# -- the wire and the scheduler ----------------------------------------------------------------


def test_a_revisit_carries_its_interval_and_due_time_and_old_records_still_decode() -> None:
    old = b'{"round":7,"etag":"\\"e\\""}'
    assert msgspec.json.decode(old, type=Revisit) == Revisit(round=7, etag='"e"')
    full = Revisit(round=7, interval=DAY, due=5.5)
    assert msgspec.json.decode(encode(full), type=Revisit) == full
    assert b"interval" not in encode(Revisit(round=7))  # omitted when unknown


def stored(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "_id": "http://a.example/p",
        "url": "http://a.example/p",
        "host": "a.example",
        "crawl_id": "c",
        "depth": 1,
        "priority": 5,
        "scope": msgspec.to_builtins(SCOPE),
        "etag": ETAG,
        "last_modified": MODIFIED,
        "content_hash": parsed_digest(),
        "revisit_interval": 7200.0,
        "next_visit": 1234.5678,
    }
    document.update(changes)
    return document


def test_the_scheduler_record_carries_the_interval_and_the_due_time_as_its_round() -> None:
    due = stored()["next_visit"]
    candidate = revisit_candidate(stored(), "c", due_round(due), 2000.0, due=due)
    assert isinstance(candidate, Discovered) and candidate.revisit is not None
    assert candidate.revisit.round == 1234567
    assert candidate.revisit.interval == 7200.0 and candidate.revisit.due == due
    assert candidate.revisit.etag == ETAG


def test_a_round_per_due_time() -> None:
    assert due_round(1234.5678) == due_round(1234.5678)
    assert due_round(1234.5678) != due_round(1235.5678)
    assert due_round(0.0) == 1


def test_a_batch_takes_at_most_per_host_pages_of_one_host_in_due_order() -> None:
    documents = [{"host": "a", "n": n} for n in range(5)] + [{"host": "b", "n": 9}]
    chosen = polite_batch(documents, 2)
    assert [(d["host"], d["n"]) for d in chosen] == [("a", 0), ("a", 1), ("b", 9)]


def test_an_error_page_answered_again_as_before_is_not_a_change() -> None:
    again = page(status=404, content_hash=None, revisit=revisit(digest=None, interval=DAY))
    assert status_written(again, 0.0)["revisit_interval"] == 1.5 * DAY


# -- dedup: a round per due time, counted under one key per crawl -----------------------------


def test_dedup_admits_a_scheduled_revisit_once_per_due_time_and_keeps_one_count() -> None:
    from streamcrawl.core.messages import round_key
    from streamcrawl.dedup.logic import Admission, PartitionFilter, counted_key

    admission = Admission()
    admission.filters[0] = PartitionFilter(1000, 0.001)
    url = "http://a.example/p"
    keys = [round_key("c", Revisit(round=due_round(due), due=due)) for due in (10.0, 20.0)]
    assert keys[0] != keys[1] and keys[0] != round_key("c", Revisit(round=due_round(10.0)))
    assert admission.decide(0, keys[0], url, max_pages=1) is None
    assert admission.decide(0, keys[0], url, max_pages=1) == "duplicate"  # same due time
    assert admission.decide(0, keys[1], url, max_pages=1) is None  # next due time; no budget
    assert dict(admission.filters[0].admitted) == {counted_key(keys[0]): 2}
    assert counted_key(keys[0]) == counted_key(keys[1]) == "c\x00d"
    assert counted_key("c\x00r7") == "c\x00r7" and counted_key("c") == "c"


async def test_dedup_stage_admits_a_scheduled_revisit_once_per_due_time() -> None:
    from streamcrawl.dedup.service import _replay_decoder

    from .test_stages import (
        counted,
        dedup_stage,
        discovered,
        discovered_record,
        pipeline,
        run_batch,
    )

    stage = dedup_stage()
    url = "http://a.example/1"

    def scheduled(due: float) -> Any:
        return discovered(url, revisit=revisit(round=due_round(due), due=due))

    candidates = [scheduled(10.0), scheduled(10.0), scheduled(20.0), discovered(url)]
    records = [discovered_record(c, 0, n) for n, c in enumerate(candidates)]
    everything = await run_batch(stage, records)
    assert counted(everything) == {"c1": {"admitted": 3, "filtered:duplicate": 1}}
    admitted = [out.value for out in pipeline(everything) if out.topic == "crawl.fetch"]
    assert [c.revisit.due if c.revisit else None for c in admitted] == [10.0, 20.0, None]
    # A rebuilt partition keys a replayed scheduled revisit as live admission did.
    replayed = _replay_decoder.decode(encode(admitted[0]))
    assert replayed.revisit is not None and replayed.revisit.due == 10.0
