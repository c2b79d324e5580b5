"""Every stage's processing step, no broker: real ``ConsumerRecord`` objects in, decoded by
the stage's own inputs through the runtime's edge (where a malformed record becomes a dead
letter), then ``process()`` for the batch stages, or ``admit()``/``run()``/``hand_back()``
for the stream stages under an in-memory :class:`StreamContext` that records what the
stage finishes. Fetcher requests go to real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiokafka import ConsumerRecord, TopicPartition
from pymongo.errors import BulkWriteError
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import (
    Attempt,
    DeadLetterRecord,
    Discovered,
    Fetch,
    Fetched,
    Message,
    Page,
    Retry,
    Scope,
    Tally,
    Timings,
    encode,
    fetch_from,
    fetch_from_retry,
)
from streamcrawl.core.offsets import OffsetTracker
from streamcrawl.core.runtime import (
    BatchStage,
    Output,
    Received,
    Stage,
    StreamContext,
    StreamStage,
    _Edge,
)
from streamcrawl.dedup.logic import PartitionFilter
from streamcrawl.dedup.service import DedupStage
from streamcrawl.delay.service import DelayStage
from streamcrawl.fetcher.robots import RobotsState, rules_from_response
from streamcrawl.fetcher.service import FetcherStage
from streamcrawl.frontier.service import FrontierStage
from streamcrawl.parser.service import ParserStage
from streamcrawl.registry import STAGES, stage_class
from streamcrawl.scheduler.service import SchedulerStage
from streamcrawl.sink.logic import (
    classify_failures,
    document_for,
    latest_documents,
    refusal_reason,
    storage_id,
)
from streamcrawl.sink.service import SinkStage
from streamcrawl.stats.service import StatsWorker
from streamcrawl.warc.service import WarcStage

SETTINGS = Settings(bloom_capacity=10_000)
SCOPE = Scope(allow_domains=["a.example"], max_depth=3, max_pages=0)

# What each topic carries: every output must be of its topic's type and read back as it.
TOPIC_TYPES: dict[str, type[Message]] = {
    "crawl.discovered": Discovered,
    "crawl.fetch": Fetch,
    "crawl.retry": Retry,
    "crawl.fetched": Fetched,
    "crawl.pages": Page,
    "crawl.dlq": DeadLetterRecord,
    "crawl.events": Tally,
}


def record(
    topic: str,
    value: bytes | None,
    partition: int = 0,
    offset: int = 0,
    key: bytes | None = None,
) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=int(time.time() * 1000),
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1 if key is None else len(key),
        serialized_value_size=-1 if value is None else len(value),
        headers=(),
    )


def on_the_wire(outputs: Sequence[Output]) -> None:
    """Each output is its topic's type and survives encoding (the runtime encodes it)."""
    for out in outputs:
        kind = TOPIC_TYPES[out.topic]
        assert type(out.value) is kind, (out.topic, type(out.value))
        assert msgspec.json.decode(encode(out.value), type=kind) == out.value


def letters(outputs: Sequence[Output]) -> list[DeadLetterRecord]:
    found = []
    for out in outputs:
        if out.topic == "crawl.dlq":
            assert isinstance(out.value, DeadLetterRecord)
            found.append(out.value)
    return found


def pipeline(outputs: Sequence[Output]) -> list[Output]:
    """The outputs that carry the crawl on (every output but the stats stage's tallies)."""
    return [out for out in outputs if out.topic != "crawl.events"]


def counted(outputs: Sequence[Output]) -> dict[str, dict[str, int]]:
    """The tallies on crawl.events, by crawl id (one per crawl id and batch)."""
    found: dict[str, dict[str, int]] = {}
    for out in outputs:
        if out.topic == "crawl.events":
            assert isinstance(out.value, Tally) and out.key == out.value.crawl_id.encode()
            assert out.value.crawl_id not in found
            found[out.value.crawl_id] = out.value.counts
    return found


def values(outputs: Sequence[Output], topic: str) -> list[Any]:
    return [out.value for out in outputs if out.topic == topic]


def decode_all(
    stage: Stage, records: Iterable[ConsumerRecord[bytes, bytes]]
) -> tuple[list[Received[Any]], list[Output]]:
    """The runtime's edge: each record decoded into its topic's type, or a dead letter."""
    edge = _Edge(stage)
    good: list[Received[Any]] = []
    dead: list[Output] = []
    for rec in records:
        decoded = edge.decode(rec)
        if isinstance(decoded, Output):
            dead.append(decoded)
        else:
            good.append(decoded)
    return good, dead


async def run_batch(
    stage: BatchStage, records: Iterable[ConsumerRecord[bytes, bytes]]
) -> list[Output]:
    """One batch as the batch loop runs it: the edge's dead letters, then process()."""
    good, outputs = decode_all(stage, records)
    if good:
        outputs.extend(await stage.process(good))
    on_the_wire(outputs)
    return outputs


def page(**changes: Any) -> Page:
    fields: dict[str, Any] = {
        "url": "http://a.example/dir/page.html",
        "final_url": "http://a.example/dir/page.html",
        "host": "a.example",
        "status": 200,
        "fetched_at": 1.0,
        "content_type": "text/html",
        "title": "T",
        "text": "",
        "links": [],
        "canonical": None,
        "content_hash": None,
        "depth": 1,
        "priority": 5,
        "crawl_id": "c1",
        "scope": SCOPE,
        "redirect_chain": [],
        "redirect_to": None,
        "noindex": False,
        "nofollow": False,
    }
    fields.update(changes)
    return Page(**fields)


def discovered(url: str, crawl_id: str = "c1", **changes: Any) -> Discovered:
    host = url.split("/")[2]
    fields: dict[str, Any] = {
        "url": url,
        "host": host,
        "crawl_id": crawl_id,
        "depth": 1,
        "priority": 5,
        "scope": Scope(allow_domains=[host], max_depth=3, max_pages=0),
        "discovered_at": 1.0,
    }
    fields.update(changes)
    return Discovered(**fields)


def fetch(url: str, **changes: Any) -> Fetch:
    return fetch_from(discovered(url, **changes), 2.0)


def fetched(body: bytes, **changes: Any) -> Fetched:
    fields: dict[str, Any] = {
        "url": "http://a.example/dir/page.html",
        "final_url": "http://a.example/dir/page.html",
        "host": "a.example",
        "crawl_id": "c1",
        "depth": 1,
        "scope": SCOPE,
        "status": 200,
        "headers": {"content-type": "text/html"},
        "content_type": "text/html",
        "body": zlib.compress(body),
        "body_bytes": len(body),
        "truncated": False,
        "fetched_at": 1.0,
        "timings": Timings(total_s=0.1),
    }
    fields.update(changes)
    return Fetched(**fields)


def test_every_registered_stage_is_covered_here() -> None:
    kinds = {name: stage_class(name) for name in STAGES}
    assert kinds == {
        "frontier": FrontierStage,
        "dedup": DedupStage,
        "fetcher": FetcherStage,
        "delay": DelayStage,
        "parser": ParserStage,
        "sink": SinkStage,
        "warc": WarcStage,
        "stats": StatsWorker,
        "scheduler": SchedulerStage,
    }
    for name in ("frontier", "dedup", "parser", "sink", "warc"):
        assert issubclass(kinds[name], BatchStage)
    for name in ("fetcher", "delay"):
        assert issubclass(kinds[name], StreamStage)


# -- the edge: a record that is not its topic's message ---------------------------------------


@pytest.mark.parametrize(
    ("stage_type", "topic", "value", "reason"),
    [
        (DedupStage, "crawl.discovered", None, "empty_value"),
        (DedupStage, "crawl.discovered", b"", "empty_value"),
        (DedupStage, "crawl.discovered", b"{not json", "invalid_json"),
        (DedupStage, "crawl.discovered", b'{"url": "http://a.example/"}', "schema_violation"),
        (ParserStage, "crawl.fetched", b'{"body": "!!not base64"}', "schema_violation"),
        (SinkStage, "crawl.pages", b"[1, 2]", "schema_violation"),
        (FrontierStage, "crawl.pages", b'{"url": ""}', "schema_violation"),
        (FrontierStage, "crawl.seeds", b"   ", "empty_value"),
        (FrontierStage, "crawl.seeds", b"two words", "invalid_url"),
        (FrontierStage, "crawl.seeds", b'{"url": 42}', "schema_violation"),
        (FetcherStage, "crawl.fetch", encode(discovered("http://a.example/")), "schema_violation"),
        (DelayStage, "crawl.retry", encode(fetch("http://a.example/")), "schema_violation"),
    ],
)
async def test_a_malformed_record_becomes_one_dead_letter_at_the_edge(
    stage_type: type[Stage], topic: str, value: bytes | None, reason: str
) -> None:
    stage = stage_type(SETTINGS)
    rec = record(topic, value, partition=2, offset=41, key=b"a.example")
    good, dead = decode_all(stage, [rec])
    assert good == []
    on_the_wire(dead)
    (out,) = dead
    assert (out.topic, out.key, out.partition) == ("crawl.dlq", b"a.example", None)
    letter = out.value
    assert isinstance(letter, DeadLetterRecord)
    assert (letter.stage, letter.reason) == (stage.name, reason)
    assert (letter.topic, letter.partition, letter.offset, letter.key) == (
        topic,
        2,
        41,
        "a.example",
    )
    assert (letter.payload, letter.payload_encoding) == ((value or b"").decode(), "utf-8")
    assert letter.detail and letter.history == []


def test_a_binary_payload_is_kept_in_base64() -> None:
    rec = record("crawl.seeds", b"\xff\xfe\x00garbage\x80", offset=3)
    _, (out,) = decode_all(FrontierStage(SETTINGS), [rec])
    assert isinstance(out.value, DeadLetterRecord)
    assert (out.value.reason, out.value.payload_encoding) == ("undecodable", "base64")
    assert base64.b64decode(out.value.payload) == b"\xff\xfe\x00garbage\x80"
    assert out.key is None and out.value.key is None


async def test_each_stage_reads_its_own_topics() -> None:
    # (inside a running loop, as the runner builds stages: the fetcher's resolver needs one)
    expected = {
        FrontierStage: {"crawl.seeds", "crawl.pages"},
        DedupStage: {"crawl.discovered"},
        FetcherStage: {"crawl.fetch"},
        DelayStage: {"crawl.retry"},
        ParserStage: {"crawl.fetched"},
        SinkStage: {"crawl.pages"},
    }
    for stage_type, topics in expected.items():
        assert set(_Edge(stage_type(SETTINGS)).decoders) == topics
    prefixed = replace(SETTINGS, topic_prefix="t1.")
    assert set(_Edge(FrontierStage(prefixed)).decoders) == {"t1.seeds", "t1.pages"}


# -- frontier ----------------------------------------------------------------------------------


async def test_frontier_turns_seeds_into_candidates_and_bad_seeds_into_dead_letters() -> None:
    stage = FrontierStage(SETTINGS)
    json_seed = (
        b'{"url": "http://b.example/x", "crawl_id": "c9", "priority": 8, "meta": {"k": 1},'
        b' "scope": {"allow_domains": ["b.example"], "max_depth": 0}}'
    )
    records = [
        record("crawl.seeds", b"HTTP://A.example/start#top", offset=0),
        record("crawl.seeds", json_seed, offset=1, key=b"mine"),
        record("crawl.seeds", b"ftp://a.example/file", offset=2),
        record(
            "crawl.seeds",
            b'{"url": "http://a.example/", "scope": {"allow_domains": ["z.example"]}}',
            offset=3,
        ),
        record("crawl.seeds", b"not-a-url", offset=4),
    ]
    outputs = await run_batch(stage, records)
    candidates = [out for out in outputs if out.topic == "crawl.discovered"]
    assert [(out.key, out.partition) for out in candidates] == [
        (b"a.example", None),
        (b"b.example", None),
    ]
    first, second = (out.value for out in candidates)
    assert (first.url, first.crawl_id, first.depth, first.priority) == (
        "http://a.example/start",
        "default",
        0,
        5,
    )
    assert first.scope == Scope(allow_domains=["a.example"], max_depth=5, max_pages=0)
    assert (second.url, second.crawl_id, second.priority, second.meta) == (
        "http://b.example/x",
        "c9",
        8,
        {"k": 1},
    )
    assert second.scope == Scope(allow_domains=["b.example"], max_depth=0, max_pages=0)
    assert [(d.reason, d.offset) for d in letters(outputs)] == [
        ("unsupported_scheme", 2),  # the seed decodes; the frontier rejects it
        ("out_of_scope", 3),
        ("unsupported_scheme", 4),
    ]
    assert {d.stage for d in letters(outputs)} == {"frontier"}


async def test_frontier_turns_page_links_into_candidates_one_level_deeper() -> None:
    stage = FrontierStage(SETTINGS)
    links = [
        "http://a.example/x.html",
        "http://elsewhere.example/",  # out of scope: dropped, not dead-lettered
        "mailto:me@a.example",
        "http://www.a.example/y.html",
    ]
    rec = record("crawl.pages", encode(page(links=links)), partition=7, offset=3, key=b"k")
    everything = await run_batch(stage, [rec])
    assert counted(everything) == {
        "c1": {"discovered": 2, "filtered:out_of_scope": 1, "filtered:unsupported_scheme": 1}
    }
    outputs = pipeline(everything)
    assert [(out.topic, out.key) for out in outputs] == [
        ("crawl.discovered", b"a.example"),
        ("crawl.discovered", b"www.a.example"),
    ]
    for out in outputs:
        candidate = out.value
        assert (candidate.depth, candidate.priority, candidate.crawl_id) == (2, 4, "c1")
        assert (candidate.source, candidate.scope) == ("http://a.example/dir/page.html", SCOPE)


async def test_frontier_sends_a_link_repeated_on_many_pages_once() -> None:
    stage = FrontierStage(SETTINGS)
    nav = ["http://a.example/", "http://a.example/about.html"]
    records = [
        record(
            "crawl.pages",
            encode(page(url=f"http://a.example/p{n}.html", links=[*nav, f"http://a.example/q{n}"])),
            partition=1,
            offset=n,
            key=b"k",
        )
        for n in range(3)
    ]
    outputs = pipeline(await run_batch(stage, records))
    urls = [out.value.url for out in outputs]
    assert sorted(urls) == sorted([*nav, *(f"http://a.example/q{n}" for n in range(3))])
    # Another crawl of the same site is a different story.
    other = record(
        "crawl.pages", encode(page(crawl_id="c2", links=nav)), partition=1, offset=9, key=b"k"
    )
    assert [out.value.url for out in pipeline(await run_batch(stage, [other]))] == nav


async def test_frontier_follows_redirects_and_dead_letters_loops() -> None:
    stage = FrontierStage(SETTINGS)
    hop = page(status=301, redirect_to="http://a.example/b", redirect_chain=["http://a.example/0"])
    loop = page(
        url="http://a.example/b",
        status=302,
        redirect_to="http://a.example/0",
        redirect_chain=["http://a.example/0", "http://a.example/dir/page.html"],
    )
    long_chain = [f"http://a.example/{n}" for n in range(11)]
    endless = page(
        url="http://a.example/11",
        status=301,
        redirect_to="http://a.example/12",
        redirect_chain=long_chain,
    )
    records = [
        record("crawl.pages", encode(hop), offset=0),
        record("crawl.pages", encode(loop), offset=1),
        record("crawl.pages", encode(endless), offset=2),
    ]
    outputs = await run_batch(stage, records)
    (follow,) = values(outputs, "crawl.discovered")
    assert (follow.url, follow.depth) == ("http://a.example/b", 1)  # a hop keeps the depth
    assert follow.redirect_chain == ["http://a.example/0", "http://a.example/dir/page.html"]
    dead = letters(outputs)
    assert [(d.reason, d.offset) for d in dead] == [("redirect_loop", 1), ("too_many_redirects", 2)]
    assert dead[0].detail == (
        "http://a.example/0 -> http://a.example/dir/page.html -> http://a.example/b"
        " -> http://a.example/0"
    )


async def test_frontier_cuts_links_past_the_depth_limit_silently() -> None:
    deep = page(depth=3, links=["http://a.example/x.html"])
    outputs = await run_batch(FrontierStage(SETTINGS), [record("crawl.pages", encode(deep))])
    assert pipeline(outputs) == []
    assert counted(outputs) == {"c1": {"filtered:max_depth": 1}}  # silent, yet counted


# -- dedup -------------------------------------------------------------------------------------


def dedup_stage(
    settings: Settings = SETTINGS, partitions: Iterable[int] = (0, 1, 2, 3)
) -> DedupStage:
    stage = DedupStage(settings)
    for p in partitions:
        # What on_assigned builds for a partition whose crawl.fetch is empty.
        stage.admission.filters[p] = PartitionFilter(
            settings.bloom_capacity, settings.bloom_error_rate
        )
    return stage


def discovered_record(
    candidate: Discovered, partition: int, offset: int
) -> ConsumerRecord[bytes, bytes]:
    return record("crawl.discovered", encode(candidate), partition, offset, candidate.host.encode())


async def test_dedup_admits_new_urls_to_the_same_partition_of_crawl_fetch() -> None:
    stage = dedup_stage()
    candidates = [
        (discovered("http://a.example/1"), 3),
        (discovered("http://a.example/1"), 3),  # a duplicate in the same batch
        (discovered("http://a.example/2", kind="sitemap", meta={"m": 1}), 3),
        (discovered("http://a.example/1", crawl_id="c2"), 3),  # another crawl fetches again
        (discovered("http://b.example/1"), 1),
    ]
    records = [discovered_record(c, p, n) for n, (c, p) in enumerate(candidates)]
    before = time.time()
    everything = await run_batch(stage, records)
    after = time.time()
    assert counted(everything) == {
        "c1": {"admitted": 3, "filtered:duplicate": 1},
        "c2": {"admitted": 1},
    }
    outputs = pipeline(everything)
    assert [(out.topic, out.key, out.partition) for out in outputs] == [
        ("crawl.fetch", b"a.example", 3),
        ("crawl.fetch", b"a.example", 3),
        ("crawl.fetch", b"a.example", 3),
        ("crawl.fetch", b"b.example", 1),
    ]
    admitted = [out.value for out in outputs]
    assert [(f.url, f.crawl_id) for f in admitted] == [
        ("http://a.example/1", "c1"),
        ("http://a.example/2", "c1"),
        ("http://a.example/1", "c2"),
        ("http://b.example/1", "c1"),
    ]
    for out, (candidate, _) in zip(
        outputs, [candidates[0], candidates[2], candidates[3], candidates[4]], strict=True
    ):
        assert before <= out.value.admitted_at <= after
        assert out.value == fetch_from(candidate, out.value.admitted_at)
        assert (out.value.attempt, out.value.history) == (0, [])
    # A later batch (a redelivery) admits nothing again.
    assert pipeline(await run_batch(stage, records)) == []


async def test_dedup_applies_the_page_budgets() -> None:
    stage = dedup_stage(replace(SETTINGS, max_pages_per_host=2))
    budget = Scope(allow_domains=["a.example", "b.example"], max_depth=3, max_pages=3)
    records = [
        discovered_record(discovered(f"http://a.example/{n}", scope=budget), 0, n) for n in range(3)
    ]
    records += [
        discovered_record(discovered(f"http://b.example/{n}", scope=budget), 1, 10 + n)
        for n in range(3)
    ]
    outputs = pipeline(await run_batch(stage, records))
    # Two per host, three per crawl (counted across partitions).
    assert [out.value.url for out in outputs] == [
        "http://a.example/0",
        "http://a.example/1",
        "http://b.example/0",
    ]


async def test_dedup_keeps_filters_of_assigned_partitions_and_drops_revoked_ones() -> None:
    stage = dedup_stage(partitions=[0, 1])
    kept = stage.admission.filters[0]
    # Already built: no replay (and so no broker) is needed; other topics are ignored.
    await stage.on_assigned(
        [TopicPartition("crawl.discovered", 0), TopicPartition("crawl.other", 5)]
    )
    assert stage.admission.filters[0] is kept and set(stage.admission.filters) == {0, 1}
    await stage.on_revoked([TopicPartition("crawl.discovered", 1)])
    assert set(stage.admission.filters) == {0}


# -- parser ------------------------------------------------------------------------------------


async def test_parser_turns_responses_into_pages_keyed_by_url() -> None:
    html = b"<html><head><title>Hello</title></head><body><a href='/x'>x</a> text</body></html>"
    records = [
        record("crawl.fetched", encode(fetched(html, meta={"k": "v"})), 4, 0, b"a.example"),
        record(
            "crawl.fetched",
            encode(
                fetched(
                    b"",
                    url="http://a.example/old",
                    final_url="http://a.example/old",
                    status=301,
                    headers={"location": "/new"},
                    content_type="",
                )
            ),
            4,
            1,
            b"a.example",
        ),
        record(
            "crawl.fetched",
            encode(
                fetched(
                    b"gone",
                    url="http://a.example/404",
                    final_url="http://a.example/404",
                    status=404,
                )
            ),
            4,
            2,
            b"a.example",
        ),
    ]
    outputs = await run_batch(ParserStage(SETTINGS), records)
    assert [(out.topic, out.key, out.partition) for out in outputs] == [
        ("crawl.pages", b"http://a.example/dir/page.html", None),
        ("crawl.pages", b"http://a.example/old", None),
        ("crawl.pages", b"http://a.example/404", None),
    ]
    ok, moved, missing = (out.value for out in outputs)
    assert (ok.title, ok.links, ok.meta, ok.status) == (
        "Hello",
        ["http://a.example/x"],
        {"k": "v"},
        200,
    )
    assert ok.content_hash and "text" in ok.text
    assert (ok.crawl_id, ok.depth, ok.scope, ok.body_bytes) == ("c1", 1, SCOPE, len(html))
    assert (moved.redirect_to, moved.links, moved.title) == ("http://a.example/new", [], None)
    assert (missing.status, missing.links, missing.text) == (404, [], "")


async def test_parser_dead_letters_a_body_it_cannot_read_back() -> None:
    stage = ParserStage(replace(SETTINGS, max_body_bytes=1000))
    corrupt = msgspec.structs.replace(fetched(b"x"), body=b"not zlib at all")
    records = [
        record("crawl.fetched", encode(corrupt), offset=0),
        record("crawl.fetched", encode(fetched(b"<p>" + b"a" * 5000)), offset=1),  # a bomb
        record("crawl.fetched", encode(fetched(b"<p>fine</p>")), offset=2),
    ]
    outputs = await run_batch(stage, records)
    assert [(d.reason, d.offset, d.stage) for d in letters(outputs)] == [
        ("corrupt_body", 0, "parser"),
        ("body_too_large", 1, "parser"),
    ]
    assert len(values(outputs, "crawl.pages")) == 1


async def test_parser_reads_a_sitemap_fetch_as_a_sitemap() -> None:
    body = (
        b'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
        b"<url><loc>http://a.example/1</loc></url></urlset>"
    )
    value = encode(fetched(body, kind="sitemap", content_type="application/xml"))
    (out,) = await run_batch(ParserStage(SETTINGS), [record("crawl.fetched", value)])
    assert (out.value.kind, out.value.links) == ("sitemap", ["http://a.example/1"])


# -- sink (its pure logic; the database part is tests/integration/test_sink.py) -------------------


def test_sink_decodes_pages_and_picks_the_last_version_of_each_document() -> None:
    stage = SinkStage(SETTINGS)  # no connection until start()
    pages = [
        page(url="http://a.example/a", canonical="http://a.example/a", title="v1"),
        page(url="http://a.example/b", title="b"),
        page(url="http://a.example/a", canonical="http://a.example/a", title="v2"),
        page(url="http://a.example/a?x=1", canonical="http://a.example/a", title="spelling"),
    ]
    records = [record("crawl.pages", encode(p), 0, n) for n, p in enumerate(pages)]
    records.append(record("crawl.pages", b'{"url": "http://a.example/c"}', 0, 4))
    good, dead = decode_all(stage, records)
    assert [d.value.reason for d in dead] == ["schema_violation"]
    decoded = [item.message for item in good]
    assert decoded == pages
    chosen = latest_documents(decoded, SETTINGS)
    # One document per _id: /a's last spelling wins over /a itself.
    assert sorted(chosen.values()) == [1, 3]
    assert all(storage_id(decoded[i], SETTINGS) == _id for _id, i in chosen.items())
    documents = {_id: document_for(decoded[i], 5.0, SETTINGS) for _id, i in chosen.items()}
    assert set(documents) == {"http://a.example/a", "http://a.example/b"}
    spelling = documents["http://a.example/a"]
    assert (spelling["_id"], spelling["url"], spelling["title"]) == (
        "http://a.example/a",
        "http://a.example/a?x=1",
        "spelling",
    )
    assert spelling["stored_at"] == 5.0 and spelling["scope"] == msgspec.to_builtins(SCOPE)
    assert latest_documents([], SETTINGS) == {}


def test_sink_replaces_duplicates_and_dead_letters_refusals() -> None:
    error = BulkWriteError(
        {
            "writeErrors": [
                {"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"},
                {"index": 2, "code": 2, "errmsg": "invalid key $where " + "x" * 1000},
                {"index": 3, "code": 11000, "errmsg": "E11000 duplicate key"},
            ]
        }
    )
    duplicates, rejected = classify_failures(error)
    assert duplicates == {0, 3}
    assert list(rejected) == [2] and rejected[2].startswith("code 2: invalid key $where")
    assert len(rejected[2]) == len("code 2: ") + 500
    assert classify_failures(BulkWriteError({})) == (set(), {})


def test_sink_tells_a_dollar_field_name_before_writing_at_any_depth() -> None:
    document = document_for(page(url="http://a.example/a", title="a"), 1.0, SETTINGS)
    assert refusal_reason(document) is None
    assert refusal_reason({**document, "meta": {"ok": [{"$where": "1"}]}}) == (
        "field name '$where' starts with '$' (refused before writing)"
    )
    assert "'$set'" in (refusal_reason({"meta": {"a": {"b": {"$set": 1}}}}) or "")
    assert refusal_reason({"meta": {"price": "$5", "a$": 1}}) is None


# -- a StreamContext that records what a stream stage finishes -----------------------------------


@dataclass
class Finished:
    records: list[ConsumerRecord[bytes, bytes]]
    outputs: list[Output]
    at: float


class Harness(StreamContext):
    """The runtime's side of a stream stage, in memory: admitted records are tracked by a
    real :class:`OffsetTracker`; completions are recorded instead of published."""

    def __init__(self, stage: StreamStage) -> None:
        self.stage = stage
        self.finished: list[Finished] = []
        self.tracker = OffsetTracker()
        self.tasks: set[asyncio.Task[None]] = set()
        self.errors: list[BaseException | None] = []
        stage.ctx = self

    # The runtime's part: admission.
    def admit(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        self.tracker.started(TopicPartition(rec.topic, rec.partition), rec.offset)
        decoded = _Edge(self.stage).decode(rec)
        if isinstance(decoded, Output):
            self.complete_later(Received(rec, None), [decoded])
        else:
            self.stage.admit(decoded)
        self.stage.wakeup.set()

    # StreamContext.
    async def complete(self, items: Sequence[Received[Any]], outputs: Sequence[Output]) -> None:
        on_the_wire(outputs)
        self.finished.append(Finished([item.record for item in items], list(outputs), time.time()))
        for item in items:
            self.tracker.finished(item.tp, item.record.offset)

    def complete_later(self, item: Received[Any], outputs: Sequence[Output]) -> None:
        self.spawn(self.complete([item], outputs))

    def spawn(
        self, work: Coroutine[Any, Any, None], partitions: Iterable[TopicPartition] = ()
    ) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def spawn_record(
        self, item: Received[Any], work: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        self.spawn(work(), (item.tp,))

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.stage.wakeup.set()
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())

    # For the tests.
    def commit(self) -> dict[TopicPartition, int]:
        """What the runtime would commit now (the finished prefix of each partition)."""
        offsets = self.tracker.committable()
        self.tracker.mark_committed(offsets)
        return offsets

    async def settle(self) -> None:
        while self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        assert self.errors == [], "a task the stage spawned failed"

    def outputs_of(self, offset: int, partition: int = 0) -> list[Output]:
        found = [
            f.outputs
            for f in self.finished
            for rec in f.records
            if (rec.offset, rec.partition) == (offset, partition)
        ]
        assert len(found) == 1, f"offset {offset} finished {len(found)} times"
        return found[0]

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(len(f.records) for f in self.finished) < count:
            assert self.errors == [], "a task the stage spawned failed"
            assert time.monotonic() < deadline, f"{len(self.finished)} of {count} finished"
            await asyncio.sleep(0.02)


# -- delay -------------------------------------------------------------------------------------


def retry(name: str, due_at: float, reason: str = "http_503") -> Retry:
    base = fetch(f"http://a.example/{name}")
    fields = msgspec.structs.asdict(base)
    fields.update(attempt=1, history=[Attempt(at=1.0, outcome=reason, status=503)])
    return Retry(**fields, due_at=due_at, retry_reason=reason)


def retry_record(value: Retry, partition: int, offset: int) -> ConsumerRecord[bytes, bytes]:
    return record("crawl.retry", encode(value), partition, offset, b"a.example")


async def test_delay_releases_in_due_order_and_commits_nothing_early() -> None:
    stage = DelayStage(replace(SETTINGS, delay_max_held=10))
    harness = Harness(stage)
    now = time.time()
    held = [
        (retry("late", now + 300), 0, 0),
        (retry("early", now + 100), 0, 1),
        (retry("middle", now + 200), 0, 2),
        (retry("other", now + 150), 5, 0),
    ]
    for value, partition, offset in held:
        harness.admit(retry_record(value, partition, offset))
    assert stage.room() == 6
    p0, p5 = TopicPartition("crawl.retry", 0), TopicPartition("crawl.retry", 5)
    await stage.release(now + 99)
    assert harness.finished == []
    assert harness.commit() == {p0: 0, p5: 0}  # nothing finished
    await stage.release(now + 210)
    released = [(f.records[0].partition, f.records[0].offset) for f in harness.finished]
    assert [(rec.partition, rec.offset) for f in harness.finished for rec in f.records] == [
        (0, 1),
        (5, 0),
        (0, 2),
    ]
    assert released[0] == (0, 1)  # due order, not offset order
    outputs = [out for f in harness.finished for out in f.outputs]
    assert [(out.topic, out.key, out.partition) for out in outputs] == [
        ("crawl.fetch", b"a.example", 0),
        ("crawl.fetch", b"a.example", 5),  # partition p of crawl.retry -> p of crawl.fetch
        ("crawl.fetch", b"a.example", 0),
    ]
    assert [out.value for out in outputs] == [
        fetch_from_retry(held[1][0]),
        fetch_from_retry(held[3][0]),
        fetch_from_retry(held[2][0]),
    ]
    # Offset 0 of partition 0 ("late") still waits: nothing of partition 0 may commit.
    assert harness.commit() == {p5: 1}
    assert harness.tracker.committed == {p0: 0, p5: 1}
    assert stage.room() == 9


async def test_delay_hands_nothing_back_before_it_is_due() -> None:
    stage = DelayStage(SETTINGS)
    harness = Harness(stage)
    now = time.time()
    harness.admit(retry_record(retry("a", now + 100), 0, 0))
    harness.admit(retry_record(retry("b", now + 100), 1, 0))
    stage.hand_back(None)  # shutdown: held records stay uncommitted, for the next owner
    stage.hand_back({TopicPartition("crawl.retry", 0)})  # a revoked partition is forgotten
    await harness.settle()
    assert harness.finished == [] and len(stage.buffer) == 1
    await stage.release(now + 100)
    assert [f.records[0].partition for f in harness.finished] == [1]


async def test_delay_run_sleeps_until_each_due_time() -> None:
    stage = DelayStage(SETTINGS)
    harness = Harness(stage)
    stop = asyncio.Event()
    runner = asyncio.create_task(stage.run(stop))
    try:
        now = time.time()
        harness.admit(retry_record(retry("second", now + 0.6), 0, 0))
        harness.admit(retry_record(retry("first", now + 0.3), 0, 1))
        harness.admit(retry_record(retry("overdue", now - 5), 0, 2))
        bad = record("crawl.retry", b'{"url": "x"}', 0, 3)
        harness.admit(bad)
        await harness.wait_for(4, timeout=10)
    finally:
        stop.set()
        await runner
    by_name = {
        out.value.url.rsplit("/", 1)[1]: f.at
        for f in harness.finished
        for out in f.outputs
        if out.topic == "crawl.fetch"
    }
    assert list(by_name) == ["overdue", "first", "second"]
    assert by_name["first"] >= now + 0.3 and by_name["second"] >= now + 0.6
    assert [d.reason for d in letters(harness.outputs_of(3))] == ["schema_violation"]
    assert harness.commit() == {TopicPartition("crawl.retry", 0): 4}


# -- fetcher: admission ----------------------------------------------------------------------------


def fetch_record(value: Fetch, partition: int = 0, offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    return record("crawl.fetch", encode(value), partition, offset, value.host.encode())


FETCH_SETTINGS = replace(
    SETTINGS,
    allow_networks=("127.0.0.0/8",),
    crawl_delay=10.0,
    host_queue_horizon=5.0,
    fetch_per_host_concurrency=1,
)


async def test_fetcher_dead_letters_a_forbidden_literal_address_at_admission() -> None:
    stage = FetcherStage(FETCH_SETTINGS)
    harness = Harness(stage)
    for offset, url in enumerate(
        ["http://10.1.2.3/x", "http://169.254.169.254/latest/meta-data/", "http://[::1]:8080/"]
    ):
        harness.admit(fetch_record(fetch(url), offset=offset))
    await harness.settle()
    for offset in range(3):
        (letter,) = letters(harness.outputs_of(offset))
        assert (letter.stage, letter.reason, letter.offset) == (
            "fetcher",
            "forbidden_address",
            offset,
        )
        assert "not a public address" in letter.detail
    assert stage.scheduler.pending == 0


async def test_fetcher_sends_urls_of_a_busy_host_to_crawl_retry() -> None:
    stage = FetcherStage(FETCH_SETTINGS)
    harness = Harness(stage)
    tp = TopicPartition("crawl.fetch", 0)
    await stage.on_assigned([tp])  # a host's first request waits one delay (10 s) here
    room = stage.room()
    harness.admit(fetch_record(fetch("http://a.example/1"), offset=0))
    before = time.time()
    harness.admit(fetch_record(fetch("http://a.example/2"), offset=1))
    harness.admit(fetch_record(fetch("http://b.example/1"), offset=2))
    await harness.settle()
    assert stage.scheduler.pending == 2 and stage.room() == room - 2
    (out,) = harness.outputs_of(1)
    assert (out.topic, out.key, out.partition) == ("crawl.retry", b"a.example", None)
    waiting = out.value
    assert waiting.retry_reason == "host_busy"
    # 10 s until its host's first start, then 10 s for the one queued ahead of it.
    assert before + 19 <= waiting.due_at <= time.time() + 20
    # Waiting is no attempt: the message is the request as it came.
    assert fetch_from_retry(waiting) == fetch("http://a.example/2")
    assert harness.commit() == {tp: 0}  # offsets 0 and 2 are still held


async def test_fetcher_hands_waiting_urls_back_through_crawl_retry() -> None:
    stage = FetcherStage(FETCH_SETTINGS)
    harness = Harness(stage)
    p0, p1 = TopicPartition("crawl.fetch", 0), TopicPartition("crawl.fetch", 1)
    await stage.on_assigned([p0, p1])
    harness.admit(fetch_record(fetch("http://a.example/1"), partition=0, offset=0))
    harness.admit(fetch_record(fetch("http://b.example/1"), partition=1, offset=0))
    before = time.time()
    stage.hand_back({p0})
    await harness.settle()
    (out,) = harness.outputs_of(0, partition=0)
    assert out.topic == "crawl.retry" and out.value.retry_reason == "handover"
    # Due when its host's turn would have come here (its first start, 10 s after assignment).
    assert before + 9 <= out.value.due_at <= time.time() + 10
    assert fetch_from_retry(out.value) == fetch("http://a.example/1")
    assert stage.scheduler.pending == 1
    assert harness.commit() == {p0: 1, p1: 0}
    stage.hand_back(None)  # shutdown: every waiting URL
    await harness.settle()
    assert harness.outputs_of(0, partition=1)[0].value.retry_reason == "handover"
    assert stage.scheduler.pending == 0
    assert harness.commit() == {p1: 1}


async def test_fetcher_completes_a_url_robots_txt_disallows_without_output() -> None:
    stage = FetcherStage(FETCH_SETTINGS)
    harness = Harness(stage)
    rules = rules_from_response(200, b"User-agent: *\nDisallow: /private\n")
    stage.robots.store("a.example", rules, time.monotonic())
    assert stage.robots.state("a.example", time.monotonic()) is RobotsState.KNOWN
    harness.admit(fetch_record(fetch("http://a.example/private/x"), offset=0))
    await harness.settle()
    outputs = harness.outputs_of(0)
    assert pipeline(outputs) == [] and stage.scheduler.pending == 0
    assert counted(outputs) == {"c1": {"filtered:robots_disallowed": 1}}
    assert outputs[0].value.host == "a.example"


# -- fetcher: requests against real servers ------------------------------------------------------


class Origin:
    """A real HTTP server on 127.0.0.1; ``routes`` maps a path to a handler."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.requests: list[str] = []
        app = web.Application(middlewares=[self._log])
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        self.server = TestServer(app, host="127.0.0.1")

    @web.middleware
    async def _log(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture()
async def origins() -> AsyncIterator[list[Origin]]:
    started: list[Origin] = []
    yield started
    for origin in started:
        await origin.server.close()


async def serve(origins: list[Origin], routes: dict[str, Any]) -> Origin:
    origin = Origin(routes)
    await origin.server.start_server()
    origins.append(origin)
    return origin


def text(body: str, status: int = 200, **headers: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            text=body,
            status=status,
            content_type="text/html",
            headers={name.replace("_", "-"): value for name, value in headers.items()},
        )

    return handler


def local_fetch(origin: Origin, path: str, **changes: Any) -> Fetch:
    url = origin.base + path
    fields: dict[str, Any] = {
        "url": url,
        "host": origin.host,
        "crawl_id": "c1",
        "depth": 1,
        "priority": 5,
        "scope": Scope(allow_domains=["127.0.0.1"], max_depth=3, max_pages=0),
        "discovered_at": 1.0,
        "admitted_at": 2.0,
    }
    fields.update(changes)
    return Fetch(**fields)


async def run_fetcher(
    settings: Settings, values: list[Fetch], expected: int | None = None
) -> tuple[FetcherStage, Harness]:
    stage = FetcherStage(settings)
    harness = Harness(stage)
    await stage.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(stage.run(stop))
    try:
        for offset, value in enumerate(values):
            harness.admit(fetch_record(value, offset=offset))
        await harness.wait_for(len(values) if expected is None else expected)
        await harness.settle()
    finally:
        stop.set()
        await runner
        await stage.stop()
    return stage, harness


LIVE = replace(SETTINGS, allow_networks=("127.0.0.0/8",), crawl_delay=0.0, retry_max_attempts=2)


async def test_fetcher_reads_robots_txt_first_then_fetches_and_decides(
    origins: list[Origin],
) -> None:
    async def robots(request: web.Request) -> web.Response:
        listed = f"http://{request.host}/sitemap.xml"
        body = f"User-agent: *\nDisallow: /private\nSitemap: {listed}\n"
        return web.Response(text=body)

    html = "<html><title>p</title></html>"
    routes: dict[str, Any] = {
        "/page.html": text(html),
        "/missing": text("no", status=404),
        "/moved": text("", status=301, location="/page.html"),
        "/broken": text("oops", status=500),
        "/private/x": text("secret"),
        "/robots.txt": robots,
    }
    origin = await serve(origins, routes)
    values = [
        local_fetch(origin, "/page.html", meta={"k": "v"}),
        local_fetch(origin, "/missing"),
        local_fetch(origin, "/moved"),
        local_fetch(origin, "/broken"),
        local_fetch(
            origin,
            "/broken",
            attempt=1,
            history=[Attempt(at=1.0, outcome="http_500", status=500)],
        ),
        local_fetch(origin, "/private/x"),
    ]
    stage, harness = await run_fetcher(LIVE, values)
    assert origin.requests[0] == "/robots.txt" and origin.requests.count("/robots.txt") == 1
    assert "/private/x" not in origin.requests
    assert stage.robots.state(origin.host, time.monotonic()) is RobotsState.KNOWN

    everything = [out for f in harness.finished for out in f.outputs]
    # The sitemap robots.txt lists is announced once for the crawl and host.
    (sitemap,) = [out for out in everything if out.topic == "crawl.discovered"]
    assert sitemap.value.url == f"{origin.base}/sitemap.xml"
    assert (sitemap.value.kind, sitemap.value.depth) == ("sitemap", 0)
    assert sitemap.value.source == f"{origin.base}/robots.txt"
    assert sitemap.key == origin.host.encode()

    def main_output(offset: int) -> Output:
        (out,) = [out for out in harness.outputs_of(offset) if out.topic != "crawl.discovered"]
        assert out.key == origin.host.encode() and out.partition is None
        return out

    ok = main_output(0)
    assert ok.topic == "crawl.fetched"
    assert (ok.value.status, ok.value.meta, ok.value.final_url) == (200, {"k": "v"}, values[0].url)
    assert zlib.decompress(ok.value.body) == html.encode()
    assert main_output(1).value.status == 404
    moved = main_output(2)
    assert moved.topic == "crawl.fetched" and moved.value.status == 301
    assert moved.value.headers["location"] == "/page.html"  # not followed here
    again = main_output(3)
    assert again.topic == "crawl.retry" and again.value.retry_reason == "http_500"
    assert again.value.attempt == 1
    assert 0 < again.value.due_at - time.time() <= LIVE.retry_base_delay
    gave_up = main_output(4)
    assert gave_up.topic == "crawl.dlq"
    assert (gave_up.value.reason, gave_up.value.offset) == ("http_500", 4)
    assert [(a.outcome, a.status) for a in gave_up.value.history] == [
        ("http_500", 500),
        ("http_500", 500),
    ]
    # Disallowed: finished, nothing produced but its count for the stats stage.
    assert pipeline(harness.outputs_of(5)) == []
    assert counted(harness.outputs_of(5)) == {"c1": {"filtered:robots_disallowed": 1}}
    assert harness.commit() == {TopicPartition("crawl.fetch", 0): 6}


async def test_fetcher_holds_a_host_for_retry_after(origins: list[Origin]) -> None:
    origin = await serve(
        origins,
        {
            "/robots.txt": text("", status=404),
            "/busy": text("later", status=503, retry_after="1"),
            "/next": text("ok"),
        },
    )
    settings = replace(LIVE, fetch_per_host_concurrency=1)
    _, harness = await run_fetcher(
        settings, [local_fetch(origin, "/busy"), local_fetch(origin, "/next")]
    )
    (busy,) = harness.outputs_of(0)
    assert busy.topic == "crawl.retry" and busy.value.retry_reason == "http_503"
    # The larger of the backoff (1 to 2 s on a first attempt) and Retry-After (1 s).
    assert 1.0 <= busy.value.due_at - busy.value.history[-1].at <= 2.0
    (ok,) = harness.outputs_of(1)
    assert ok.topic == "crawl.fetched"
    # The host was held: the next request came a second after the 503.
    first, second = (f for f in harness.finished)
    assert second.at - first.at >= 0.9


async def test_fetcher_defers_a_host_whose_robots_txt_is_unavailable(
    origins: list[Origin],
) -> None:
    origin = await serve(origins, {"/robots.txt": text("down", status=503), "/a": text("a")})
    settings = replace(LIVE, robots_retry=30.0)
    stage, harness = await run_fetcher(
        settings, [local_fetch(origin, "/a"), local_fetch(origin, "/a")]
    )
    assert origin.requests == ["/robots.txt"]  # no page is fetched while it is unavailable
    for offset in (0, 1):
        (out,) = harness.outputs_of(offset)
        assert out.topic == "crawl.retry" and out.value.retry_reason == "robots_unavailable"
        assert out.value.attempt == 1
        assert 25 <= out.value.due_at - time.time() <= 30
    assert stage.robots.state(origin.host, time.monotonic()) is RobotsState.UNAVAILABLE
