"""Conditional re-crawls, the pure pieces: the revisit field on the wire, conditional
headers, the unchanged decision (parser), links of changed pages only (frontier), one
admission per URL and round (dedup), what the sink writes or only checks, and the revisit
records built from stored documents."""

from __future__ import annotations

from typing import Any

import msgspec
from streamcrawl.core.messages import (
    Discovered,
    Fetch,
    Fetched,
    Page,
    Revisit,
    Seed,
    decode_seed,
    encode,
    fetch_from,
    round_key,
)
from streamcrawl.crawl.recrawl import new_round, revisit_candidate
from streamcrawl.fetcher.http import FetchResult, conditional_headers
from streamcrawl.fetcher.retry import Deliver, RetryPolicy, decide
from streamcrawl.frontier.logic import candidates_from_page, seed_candidate
from streamcrawl.parser.logic import page_from_fetched, read_body
from streamcrawl.sink.logic import (
    STATUS_FIELDS,
    check_update,
    checked_id,
    document_under,
    latest_documents,
    split_unchanged,
    stored_tallies,
    written_status,
)

from .test_stages import (
    SCOPE,
    SETTINGS,
    counted,
    dedup_stage,
    discovered,
    discovered_record,
    fetched,
    page,
    pipeline,
    record,
    run_batch,
)

ETAG = '"6745a1b2-1f4"'
MODIFIED = "Tue, 26 Nov 2026 10:00:00 GMT"
HTML = b"<html><head><title>P</title></head><body><p>hello</p><a href='/x.html'>x</a></body></html>"


def parsed_digest(body: bytes = HTML) -> str:
    digest = page_from_fetched(fetched(body), body).content_hash
    assert digest is not None
    return digest


def revisit(**changes: Any) -> Revisit:
    fields: dict[str, Any] = {
        "round": 7,
        "etag": ETAG,
        "last_modified": MODIFIED,
        "digest": parsed_digest(),
        "stored_id": "http://a.example/dir/page.html",
    }
    fields.update(changes)
    return Revisit(**fields)


# -- the wire ------------------------------------------------------------------------------


def test_messages_without_revisit_still_decode_and_carry_none() -> None:
    old = encode(fetch_from(discovered("http://a.example/1"), 2.0))
    assert b"revisit" not in old  # omitted by default: older readers see what they knew
    assert msgspec.json.decode(old, type=Fetch).revisit is None


def test_revisit_travels_through_seed_discovered_fetch_and_fetched() -> None:
    seed = decode_seed(
        b'{"url": "http://a.example/p.html", "crawl_id": "c1", '
        b'"revisit": {"round": 3, "etag": "\\"e\\"", "digest": "d"}}'
    )
    assert seed.revisit == Revisit(round=3, etag='"e"', digest="d")
    candidate = seed_candidate(seed, SETTINGS, now=1.0)
    assert candidate.revisit == seed.revisit
    request = msgspec.json.decode(encode(fetch_from(candidate, 2.0)), type=Fetch)
    assert request.revisit == seed.revisit
    outcome = FetchResult(
        status=304,
        final_url=request.url,
        headers={"etag": '"e"'},
        content_type="",
        body=b"",
        truncated=False,
        total_s=0.01,
        ttfb_s=0.01,
    )
    decision = decide(request, outcome, RetryPolicy(3, 1.0, 10.0), 5.0)
    assert isinstance(decision, Deliver)  # a 304 is an answer, never retried
    assert decision.fetched.status == 304 and decision.fetched.revisit == seed.revisit


def test_a_revisit_round_must_be_positive() -> None:
    try:
        msgspec.json.decode(b'{"url": "http://a.example/", "revisit": {"round": 0}}', type=Seed)
    except msgspec.ValidationError:
        return
    raise AssertionError("round 0 was accepted")


# -- the fetcher's conditional request ---------------------------------------------------


def test_conditional_headers_come_from_the_stored_validators() -> None:
    assert conditional_headers(None) == {}
    assert conditional_headers(Revisit(round=1)) == {}
    assert conditional_headers(Revisit(round=1, etag=ETAG)) == {"If-None-Match": ETAG}
    assert conditional_headers(Revisit(round=1, last_modified=MODIFIED)) == {
        "If-Modified-Since": MODIFIED
    }
    assert conditional_headers(revisit()) == {
        "If-None-Match": ETAG,
        "If-Modified-Since": MODIFIED,
    }


# -- the parser's unchanged decision ------------------------------------------------------


def parsed(response: Fetched) -> Page:
    return page_from_fetched(response, *read_body(response, SETTINGS.max_body_bytes))


def test_a_304_of_a_revisit_is_unchanged_without_parsing() -> None:
    result = parsed(fetched(b"", status=304, headers={"etag": ETAG}, revisit=revisit()))
    assert result.unchanged and result.status == 304
    assert result.links == [] and result.content_hash is None and result.title is None
    assert result.revisit == revisit()


def test_a_200_with_the_stored_digest_is_unchanged_and_not_relinked() -> None:
    headers = {"content-type": "text/html", "etag": '"new"', "last-modified": MODIFIED}
    result = parsed(fetched(HTML, headers=headers, revisit=revisit()))
    assert result.unchanged
    assert result.links == []
    assert result.etag == '"new"' and result.last_modified == MODIFIED


def test_a_200_with_another_digest_is_changed_and_parsed_in_full() -> None:
    headers = {"content-type": "text/html", "etag": '"new"'}
    result = parsed(fetched(HTML, headers=headers, revisit=revisit(digest="0" * 64)))
    assert not result.unchanged
    assert result.links == ["http://a.example/x.html"]
    assert result.content_hash == parsed_digest()
    assert result.etag == '"new"' and result.last_modified is None


def test_a_first_crawl_stores_the_validators_and_is_never_unchanged() -> None:
    headers = {"content-type": "text/html", "etag": ETAG, "last-modified": MODIFIED}
    result = parsed(fetched(HTML, headers=headers))
    assert not result.unchanged and result.revisit is None
    assert (result.etag, result.last_modified) == (ETAG, MODIFIED)
    # A 304 nobody asked for is stored as what it is.
    assert not parsed(fetched(b"", status=304)).unchanged


# -- the frontier: links of changed pages only, in the page's round ----------------------


def test_an_unchanged_page_leads_nowhere() -> None:
    unchanged = page(links=["http://a.example/x.html"], unchanged=True, revisit=revisit())
    assert candidates_from_page(unchanged, SETTINGS, now=1.0) == ([], [])


def test_links_of_a_changed_page_are_plain_candidates_of_its_crawl() -> None:
    changed = page(links=["http://a.example/x.html"], revisit=revisit())
    (candidate,), drops = candidates_from_page(changed, SETTINGS, now=1.0)
    assert drops == []
    assert candidate.revisit is None and candidate.crawl_id == "c1"


# -- dedup: once per URL and round ------------------------------------------------------


def test_round_key_separates_rounds_of_one_crawl() -> None:
    assert round_key("c1", None) == "c1"
    assert round_key("c1", Revisit(round=2)) != round_key("c1", Revisit(round=3))
    assert round_key("c1", Revisit(round=2)) != "c1"


async def test_dedup_admits_a_url_once_per_round() -> None:
    stage = dedup_stage()
    url = "http://a.example/1"
    candidates = [
        discovered(url),
        discovered(url),  # the same round: a duplicate
        discovered(url, revisit=revisit(round=2)),  # a revisit round: again
        discovered(url),  # a link found in round 2: the crawl has it, a duplicate
        discovered(url, revisit=revisit(round=2)),  # round 2 again: a duplicate
        discovered(url, revisit=revisit(round=3)),
        discovered("http://a.example/new"),  # a link to a URL the crawl never had
    ]
    records = [discovered_record(c, 0, n) for n, c in enumerate(candidates)]
    everything = await run_batch(stage, records)
    assert counted(everything) == {"c1": {"admitted": 4, "filtered:duplicate": 3}}
    admitted = [out.value for out in pipeline(everything) if out.topic == "crawl.fetch"]
    assert [c.revisit.round if c.revisit else 0 for c in admitted] == [0, 2, 3, 0]
    assert admitted[1].revisit == revisit(round=2)  # the validators travel on


async def test_dedup_replay_keeps_rounds_apart() -> None:
    from streamcrawl.dedup.service import _replay_decoder

    admitted = _replay_decoder.decode(
        encode(fetch_from(discovered("http://a.example/1", revisit=revisit(round=4)), 1.0))
    )
    assert admitted.revisit is not None and admitted.revisit.round == 4
    assert (
        _replay_decoder.decode(encode(fetch_from(discovered("http://a.example/1"), 1.0))).revisit
        is None
    )


# -- the sink: rewrite changed pages, only check unchanged ones ---------------------------


def test_a_stored_document_has_validators_and_digest_and_its_status_checked_at() -> None:
    stored = page(etag=ETAG, content_hash="h", revisit=revisit())
    document = document_under("id", stored, 9.0)
    assert document["etag"] == ETAG and document["content_hash"] == "h"
    assert document["last_modified"] is None
    assert document["stored_at"] == 9.0 and "checked_at" not in document
    assert "revisit" not in document and "unchanged" not in document
    status = written_status(document, stored, 9.0)
    assert status == {
        "_id": "id",
        **{name: document[name] for name in STATUS_FIELDS if name in document},
        "checked_at": 9.0,
    }


def test_unchanged_pages_are_only_checked() -> None:
    pages = [
        page(url="http://a.example/1", unchanged=True, status=304, revisit=revisit(stored_id="s1")),
        page(url="http://a.example/2", title="new", revisit=revisit()),
        page(
            url="http://a.example/3", unchanged=True, etag='"e3"', revisit=revisit(stored_id=None)
        ),
    ]
    changed, unchanged = split_unchanged(pages, latest_documents(pages, SETTINGS))
    assert changed == {"http://a.example/2": 1}
    assert unchanged == [0, 2]
    assert checked_id(pages[0], SETTINGS) == "s1"
    assert checked_id(pages[2], SETTINGS) == "http://a.example/3"
    assert check_update(pages[0], 5.0) == {"checked_at": 5.0}
    assert check_update(pages[2], 5.0) == {"checked_at": 5.0, "etag": '"e3"', "last_modified": None}


def test_sink_tallies_count_unchanged_pages_apart_from_stored_ones() -> None:
    class Item:
        def __init__(self, offset: int, message: Page) -> None:
            self.record = record("crawl.pages", b"", 0, offset)
            self.message = message

    batch = [Item(0, page(unchanged=True)), Item(1, page()), Item(2, page(unchanged=True))]
    (tally,) = stored_tallies(batch, [1], 3.0, [0, 2])
    assert tally.counts == {"unchanged": 2}
    assert tally.offsets == [1] and tally.read == [0, 1, 2]


# -- the revisit records of stored documents ------------------------------------------------


def stored(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "_id": "http://a.example/dir/page.html",
        "url": "http://a.example/dir/page.html",
        "host": "a.example",
        "depth": 2,
        "priority": 4,
        "scope": msgspec.to_builtins(SCOPE),
        "kind": "page",
        "meta": None,
        "etag": ETAG,
        "last_modified": MODIFIED,
        "content_hash": "abc",
    }
    document.update(changes)
    return document


def test_a_stored_document_becomes_a_revisit_candidate() -> None:
    candidate = revisit_candidate(stored(), "c1", 11, 100.0)
    assert isinstance(candidate, Discovered)
    assert (candidate.url, candidate.host, candidate.crawl_id) == (
        "http://a.example/dir/page.html",
        "a.example",
        "c1",
    )
    assert (candidate.depth, candidate.priority, candidate.scope) == (2, 4, SCOPE)
    assert candidate.revisit == Revisit(
        round=11,
        etag=ETAG,
        last_modified=MODIFIED,
        digest="abc",
        stored_id="http://a.example/dir/page.html",
    )
    # An older document, stored before validators were kept: revisited unconditionally.
    older = stored(etag=None, last_modified=None)
    del older["etag"], older["last_modified"]
    bare = revisit_candidate(older, "c1", 11, 100.0)
    assert bare is not None and bare.revisit is not None
    assert conditional_headers(bare.revisit) == {}


def test_a_document_no_stage_wrote_is_skipped() -> None:
    assert revisit_candidate(stored(scope=None), "c1", 1, 1.0) is None
    assert revisit_candidate(stored(url=""), "c1", 1, 1.0) is None


def test_new_round_is_the_unix_second() -> None:
    assert new_round(1_800_000_000.7) == 1_800_000_000
    assert new_round(0.0) == 1


def test_a_snapshot_keeps_the_rounds_apart() -> None:
    from streamcrawl.dedup.logic import PartitionFilter
    from streamcrawl.dedup.snapshot import decode_snapshot, encode_snapshot

    bloom = PartitionFilter(1000, 0.001)
    url = "http://a.example/1"
    bloom.remember("c1", url)
    bloom.remember(round_key("c1", Revisit(round=2)), url)
    restored = decode_snapshot(encode_snapshot(bloom, 7)).filter
    assert restored.seen("c1", url)
    assert restored.seen(round_key("c1", Revisit(round=2)), url)
    assert not restored.seen(round_key("c1", Revisit(round=3)), url)
    assert restored.admitted == {"c1": 1, round_key("c1", Revisit(round=2)): 1}
