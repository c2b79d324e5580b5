"""Crawl control without a broker: the states table and its transitions, the commands'
records, and what the fetcher, delay, dedup and frontier do with a URL of a paused or
cancelled crawl (under the in-memory stream context of ``test_stages``)."""

from __future__ import annotations

import time
from dataclasses import replace

import msgspec
import pytest
from aiokafka import TopicPartition
from streamcrawl.core.control import (
    ControlRefused,
    CrawlStates,
    check_transition,
    command_state,
    control_record,
    decode_control,
    verdict,
)
from streamcrawl.core.messages import Control, Seed, encode, fetch_from_retry
from streamcrawl.delay.service import DelayStage
from streamcrawl.fetcher.service import FetcherStage

from .test_stages import (
    FETCH_SETTINGS,
    SETTINGS,
    Harness,
    counted,
    dedup_stage,
    discovered,
    discovered_record,
    fetch,
    fetch_record,
    pipeline,
    record,
    retry,
    retry_record,
    run_batch,
)


def control(crawl_id: str, state: str, at: float = 1.0) -> Control:
    return Control(crawl_id=crawl_id, state=state, at=at)  # type: ignore[arg-type]


# -- the table -------------------------------------------------------------------------------


def test_a_crawl_never_controlled_is_active() -> None:
    states = CrawlStates()
    assert states.state("c1") == "active" and states.verdict("c1") == "go"
    assert len(states) == 0 and states.states() == {}


def test_the_last_record_of_a_crawl_is_its_state_and_cancelled_is_final() -> None:
    states = CrawlStates()
    changes: list[tuple[str, str]] = []
    states.listen(lambda crawl_id, state: changes.append((crawl_id, state)))
    assert states.apply(control("c1", "paused"))
    assert states.verdict("c1") == "hold" and states.verdict("c2") == "go"
    assert not states.apply(control("c1", "paused", at=2.0))  # the same state: no change
    assert states.record("c1") == control("c1", "paused", at=2.0)  # but the newest record
    assert states.apply(control("c1", "active"))
    assert states.verdict("c1") == "go"
    assert states.apply(control("c2", "cancelled"))
    assert not states.apply(control("c2", "active"))  # cancelled stays cancelled
    assert not states.apply(control("c2", "paused"))
    assert states.state("c2") == "cancelled" and states.verdict("c2") == "drop"
    assert states.states() == {"c1": "active", "c2": "cancelled"}
    assert changes == [("c1", "paused"), ("c1", "active"), ("c2", "cancelled")]


def test_verdicts_commands_and_transitions() -> None:
    assert [verdict(s) for s in ("active", "paused", "cancelled")] == ["go", "hold", "drop"]
    assert [command_state(c) for c in ("pause", "resume", "cancel")] == [
        "paused",
        "active",
        "cancelled",
    ]
    with pytest.raises(ValueError, match="unknown control command"):
        command_state("stop")
    check_transition("active", "paused", "c1")
    check_transition("paused", "cancelled", "c1")
    check_transition("cancelled", "cancelled", "c1")  # cancelling twice is harmless
    for wanted in ("active", "paused"):
        with pytest.raises(ControlRefused, match="stays cancelled"):
            check_transition("cancelled", wanted, "c1")  # type: ignore[arg-type]


def test_a_command_record_is_valid_and_names_who_gave_it() -> None:
    made = control_record("crawl-a", "paused", at=5.0)
    assert (made.crawl_id, made.state, made.at) == ("crawl-a", "paused", 5.0)
    assert made.by and "@" in made.by
    with pytest.raises(ValueError, match="crawl id"):
        control_record("not an id", "paused")


def test_decoding_skips_what_is_not_a_control_record() -> None:
    good = control("c1", "paused")
    assert decode_control(b"c1", encode(good)) == good
    assert decode_control(None, encode(good)) == good
    assert decode_control(b"c1", None) is None  # a tombstone
    assert decode_control(b"c1", b"{not json") is None
    assert decode_control(b"c1", b'{"crawl_id": "c1", "state": "stopped", "at": 1}') is None
    assert decode_control(b"other", encode(good)) is None  # key and crawl id disagree


# -- the stages ------------------------------------------------------------------------------

CONTROL_SETTINGS = replace(FETCH_SETTINGS, pause_recheck=7.0)


async def test_fetcher_holds_a_paused_crawl_in_crawl_retry_and_drops_a_cancelled_one() -> None:
    stage = FetcherStage(CONTROL_SETTINGS)
    harness = Harness(stage)
    tp = TopicPartition("crawl.fetch", 0)
    await stage.on_assigned([tp])
    stage.crawls.apply(control("paused-crawl", "paused"))
    stage.crawls.apply(control("gone", "cancelled"))
    before = time.time()
    harness.admit(fetch_record(fetch("http://a.example/1", crawl_id="paused-crawl"), offset=0))
    harness.admit(fetch_record(fetch("http://a.example/2", crawl_id="gone"), offset=1))
    harness.admit(fetch_record(fetch("http://a.example/3"), offset=2))  # c1: active
    await harness.settle()
    (held,) = harness.outputs_of(0)
    assert held.topic == "crawl.retry" and held.value.retry_reason == "paused"
    assert before + 7 <= held.value.due_at <= time.time() + 7
    assert fetch_from_retry(held.value) == fetch("http://a.example/1", crawl_id="paused-crawl")
    dropped = harness.outputs_of(1)
    assert pipeline(dropped) == [] and counted(dropped) == {"gone": {"cancelled": 1}}
    assert stage.scheduler.pending == 1  # only the active crawl's URL waits in memory
    assert harness.commit() == {tp: 2}


async def test_fetcher_moves_waiting_urls_out_of_memory_when_their_crawl_is_paused() -> None:
    stage = FetcherStage(CONTROL_SETTINGS)
    harness = Harness(stage)
    tp = TopicPartition("crawl.fetch", 0)
    await stage.on_assigned([tp])  # nothing starts for 10 s: every URL waits in memory
    harness.admit(fetch_record(fetch("http://a.example/1", crawl_id="p"), offset=0))
    harness.admit(fetch_record(fetch("http://b.example/1", crawl_id="x"), offset=1))
    harness.admit(fetch_record(fetch("http://c.example/1"), offset=2))
    assert stage.scheduler.pending == 3
    stage.crawls.apply(control("p", "paused"))
    stage.crawls.apply(control("x", "cancelled"))
    await harness.settle()
    assert stage.scheduler.pending == 1
    assert harness.outputs_of(0)[0].value.retry_reason == "paused"
    assert counted(harness.outputs_of(1)) == {"x": {"cancelled": 1}}
    assert harness.commit() == {tp: 2}
    stage.crawls.apply(control("p", "active"))  # resuming takes nothing from memory
    assert stage.scheduler.pending == 1


async def test_fetcher_checks_the_state_again_just_before_the_request() -> None:
    stage = FetcherStage(replace(CONTROL_SETTINGS, crawl_delay=0.0))
    harness = Harness(stage)
    harness.admit(fetch_record(fetch("http://a.example/1", crawl_id="p"), offset=0))
    # Paused after admission, without the listener (as if the change came in between).
    stage.crawls._records["p"] = control("p", "paused")
    [(host, job)] = stage.scheduler.take_ready(time.monotonic() + 60, 1)
    stage._begin(host, job, time.monotonic())
    await harness.settle()
    assert harness.outputs_of(0)[0].value.retry_reason == "paused"
    assert stage.requests_in_flight == 0 and stage.scheduler.pending == 0


async def test_delay_drops_a_cancelled_crawls_retries_and_releases_the_others() -> None:
    stage = DelayStage(SETTINGS)
    harness = Harness(stage)
    stage.crawls.apply(control("gone", "cancelled"))
    stage.crawls.apply(control("p", "paused"))
    gone = msgspec.structs.replace(retry("1", due_at=1.0), crawl_id="gone")
    paused = msgspec.structs.replace(retry("2", due_at=1.0), crawl_id="p")
    harness.admit(retry_record(gone, 0, 0))
    harness.admit(retry_record(paused, 0, 1))
    harness.admit(retry_record(retry("3", due_at=1.0), 0, 2))
    await stage.release(time.time())
    await harness.settle()
    (finished,) = harness.finished
    assert [out.value.url for out in pipeline(finished.outputs)] == [
        "http://a.example/2",  # a paused crawl's retry goes on to the fetcher, which holds it
        "http://a.example/3",
    ]
    assert counted(finished.outputs) == {"gone": {"cancelled": 1}}


async def test_dedup_and_frontier_drop_a_cancelled_crawl() -> None:
    stage = dedup_stage()
    stage.crawls.apply(control("gone", "cancelled"))
    outputs = await run_batch(
        stage,
        [
            discovered_record(discovered("http://a.example/1", crawl_id="gone"), 0, 0),
            discovered_record(discovered("http://a.example/2"), 0, 1),
        ],
    )
    assert [out.value.url for out in pipeline(outputs)] == ["http://a.example/2"]
    assert counted(outputs)["gone"] == {"cancelled": 1}

    from streamcrawl.frontier.service import FrontierStage

    frontier = FrontierStage(SETTINGS)
    frontier.crawls.apply(control("gone", "cancelled"))
    seeds = [
        record("crawl.seeds", encode(Seed(url="http://a.example/", crawl_id=crawl_id)), 0, n)
        for n, crawl_id in enumerate(["gone", "kept"])
    ]
    outputs = await run_batch(frontier, seeds)
    assert [out.value.crawl_id for out in pipeline(outputs)] == ["kept"]
    assert counted(outputs) == {"gone": {"cancelled": 1}, "kept": {"discovered": 1}}


# -- the commands --------------------------------------------------------------------------


def test_the_commands_parse_one_or_more_crawl_ids() -> None:
    from streamcrawl.cli import build_parser

    for command in ("pause", "resume", "cancel"):
        args = build_parser().parse_args([command, "shop", "blog"])
        assert (args.command, args.crawl_ids) == (command, ["shop", "blog"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pause"])  # a crawl id is required


def test_status_shows_a_paused_or_cancelled_crawl_as_such() -> None:
    from streamcrawl.crawl.status import crawls_table

    def row(crawl_id: str, control: str | None) -> dict[str, object]:
        found: dict[str, object] = {
            "crawl_id": crawl_id,
            "state": "running",
            "stored": 1,
            "pages_per_s": 1.0,
            "errors": 0,
            "age_s": 5.0,
        }
        if control is not None:
            found["control"] = control
        return found

    listing = {
        "crawls": [row("a", "paused"), row("b", "cancelled"), row("c", "active"), row("d", None)],
        "recovering": False,
    }
    lines = crawls_table(listing).splitlines()[2:]
    assert [line.split()[:2] for line in lines] == [
        ["a", "paused"],
        ["b", "cancelled"],
        ["c", "running"],
        ["d", "running"],
    ]


async def test_delay_releases_a_resumed_crawls_paused_urls_at_once() -> None:
    stage = DelayStage(SETTINGS)
    harness = Harness(stage)
    stage.crawls.apply(control("p", "paused"))
    later = time.time() + 3600
    held = msgspec.structs.replace(retry("1", due_at=later, reason="paused"), crawl_id="p")
    failed = msgspec.structs.replace(retry("2", due_at=later), crawl_id="p")  # a real retry
    other = msgspec.structs.replace(retry("3", due_at=later, reason="paused"), crawl_id="q")
    for offset, value in enumerate([held, failed, other]):
        harness.admit(retry_record(value, 0, offset))
    await stage.release(time.time())
    assert harness.finished == []
    stage.crawls.apply(control("p", "active"))
    await stage.release(time.time())
    await harness.settle()
    (finished,) = harness.finished
    assert [out.value.url for out in finished.outputs] == ["http://a.example/1"]
    assert stage.buffer.next_due() == later  # the failed one keeps its backoff
    stage.crawls.apply(control("q", "cancelled"))
    await stage.release(time.time())
    await harness.settle()
    assert counted(harness.finished[-1].outputs) == {"q": {"cancelled": 1}}
    assert len(stage.buffer) == 1
