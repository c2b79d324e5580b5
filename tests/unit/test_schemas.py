"""The published JSON Schemas (``schemas/*.json``) and the msgspec types agree.

The files are generated from the types; these tests check that the committed files are
current, that they are valid Draft 2020-12 schemas, and that a JSON Schema validator and the
msgspec decoder accept and refuse the same messages.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from jsonschema import Draft202012Validator
from streamcrawl.core.messages import (
    SCHEMA_TYPES,
    Attempt,
    Control,
    DeadLetterRecord,
    Discovered,
    Fetched,
    Page,
    Scope,
    Seed,
    SeedScope,
    Tally,
    Timings,
    encode,
    fetch_from,
    retry_from,
    with_attempt,
)
from streamcrawl.core.schemas import SCHEMA_NAMES, json_schema, load_schema, schema_text

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

Document = dict[str, Any]


def test_every_topic_type_has_a_schema_name() -> None:
    assert set(SCHEMA_NAMES) == set(SCHEMA_TYPES)
    assert sorted(path.stem for path in SCHEMA_DIR.glob("*.json")) == sorted(SCHEMA_NAMES)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_committed_schema_is_what_the_types_generate(name: str) -> None:
    committed = (SCHEMA_DIR / f"{name}.json").read_text("utf-8")
    assert committed == schema_text(name), (
        f"schemas/{name}.json is out of date with services/core/messages.py: "
        "run `python -m streamcrawl.core.schemas` and commit the result"
    )
    assert load_schema(name) == json_schema(name)  # the packaged copy too


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_generated_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = json_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"streamcrawl/{name}.json"
    assert schema["additionalProperties"] is False
    descriptions: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("description"), str):
                descriptions.append(node["description"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(schema)
    assert descriptions
    for text in descriptions:
        assert "\n" not in text and "  " not in text, text


# -- valid examples, built with the types -------------------------------------------------

SCOPE = Scope(allow_domains=["example.com", "cdn.example.com"], max_depth=3, max_pages=500)
CANDIDATE = Discovered(
    url="https://example.com/a/b?x=1",
    host="example.com",
    crawl_id="crawl-2026.11:run_1",
    depth=2,
    priority=7,
    scope=SCOPE,
    discovered_at=1_764_000_000.25,
    source="https://example.com/a/",
    redirect_chain=["http://example.com/a/b?x=1", "https://example.com/a/b/?x=1"],
    meta={"campaign": "fall", "tags": ["x", 1, None]},
)
FETCH = with_attempt(fetch_from(CANDIDATE, 1_764_000_001.0), "timeout", 1_764_000_002.0, None, "")
BODY = b"<html><title>t</title><p>hello</p></html>" * 20


def valid_examples() -> list[tuple[str, msgspec.Struct]]:
    fetched = Fetched(
        url=CANDIDATE.url,
        final_url=CANDIDATE.url,
        host="example.com",
        crawl_id="default",
        depth=0,
        scope=SCOPE,
        status=200,
        headers={"content-type": "text/html; charset=utf-8", "etag": '"abc"'},
        content_type="text/html",
        body=zlib.compress(BODY),
        body_bytes=len(BODY),
        truncated=False,
        fetched_at=1_764_000_003.5,
        timings=Timings(total_s=0.25, ttfb_s=0.1),
        body_as_received=True,
        protocol="HTTP/1.0",
        reason="OK",
        raw_headers=[("Content-Type", "text/html; charset=utf-8"), ("ETag", '"abc"')],
        request_headers=[("Host", "example.com"), ("User-Agent", "streamcrawl")],
    )
    page = Page(
        url=CANDIDATE.url,
        final_url=CANDIDATE.url,
        host="example.com",
        status=200,
        fetched_at=1_764_000_003.5,
        content_type="text/html",
        title="Ünïcode title",
        text="hello " * 100,
        links=[f"https://example.com/p/{n}" for n in range(10)],
        canonical=None,
        content_hash="ab" * 32,
        depth=0,
        crawl_id="default",
        scope=SCOPE,
        redirect_chain=[],
        redirect_to=None,
        noindex=False,
        nofollow=True,
        charset="utf-8",
    )
    return [
        ("seed", Seed(url="https://example.com/")),
        (
            "seed",
            Seed(
                url="https://example.com/",
                crawl_id="c1",
                priority=0,
                depth=1000,
                meta={"k": "v"},
                scope=SeedScope(allow_domains=["example.com"], max_depth=0),
            ),
        ),
        ("discovered", CANDIDATE),
        ("discovered", msgspec.structs.replace(CANDIDATE, kind="sitemap", source=None)),
        ("fetch", fetch_from(CANDIDATE, 1_764_000_001.0)),
        ("fetch", with_attempt(FETCH, "http_503", 1_764_000_003.0, 503, "Service Unavailable")),
        ("retry", retry_from(FETCH, 1_764_000_060.0, "backoff")),
        ("retry", retry_from(fetch_from(CANDIDATE, 1.0), 2.0, "host_busy")),
        ("fetched", fetched),
        ("fetched", msgspec.structs.replace(fetched, status=301, body=b"", redirect_chain=[])),
        ("page", page),
        ("page", msgspec.structs.replace(page, status=404, links=[], title=None, text="")),
        (
            "dlq",
            DeadLetterRecord(
                stage="parser",
                reason="bad_message",
                detail="Expected `int`, got `str` - at `$.depth`",
                topic="crawl.fetched",
                partition=3,
                offset=12345,
                key="example.com",
                payload='{"url": 1}',
                payload_encoding="utf-8",
                failed_at=1_764_000_004.0,
                history=[Attempt(at=1.0, outcome="error", detail="boom", status=500)],
            ),
        ),
        (
            "dlq",
            DeadLetterRecord(
                stage="frontier",
                reason="not_json",
                detail="",
                topic="crawl.seeds",
                payload="gAAB",
                payload_encoding="base64",
                failed_at=0.0,
            ),
        ),
        (
            "event",
            Tally(
                stage="sink",
                crawl_id="c1",
                at=1_764_000_005.0,
                counts={},
                host="example.com",
                partition=4,
                offsets=[10, 12],
                read=[10, 11, 12],
            ),
        ),
        ("event", Tally(stage="dedup", crawl_id="c1", at=1.0, counts={"admitted": 3})),
        ("control", Control(crawl_id="c1", state="paused", at=1_764_000_006.0, by="ops@host")),
        ("control", Control(crawl_id="c2", state="cancelled", at=1.0)),
    ]


# A kcat user's hand-written records: plain JSON, defaults left out.
HAND_WRITTEN = [
    ("seed", {"url": "https://example.com/"}),
    ("seed", {"url": "https://example.com/", "scope": {"max_pages": 10}, "meta": None}),
]


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json_schema(name), format_checker=None)


def decode(name: str, document: Document) -> msgspec.Struct:
    message: msgspec.Struct = msgspec.json.decode(
        json.dumps(document).encode(), type=SCHEMA_TYPES[name]
    )
    return message


@pytest.mark.parametrize(
    ("name", "message"),
    valid_examples(),
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_valid_messages_pass_both_the_schema_and_the_decoder(
    name: str, message: msgspec.Struct
) -> None:
    assert isinstance(message, SCHEMA_TYPES[name])
    wire = encode(message)
    document = json.loads(wire)
    errors = [error.message for error in validator(name).iter_errors(document)]
    assert errors == []
    assert msgspec.json.decode(wire, type=SCHEMA_TYPES[name]) == message


@pytest.mark.parametrize(("name", "document"), HAND_WRITTEN)
def test_hand_written_records_pass_both(name: str, document: Document) -> None:
    assert list(validator(name).iter_errors(document)) == []
    decode(name, document)


def test_fetched_body_is_base64_on_the_wire() -> None:
    fetched = next(message for name, message in valid_examples() if name == "fetched")
    assert isinstance(fetched, Fetched)
    document = json.loads(encode(fetched))
    assert isinstance(document["body"], str)
    assert zlib.decompress(msgspec.json.decode(json.dumps(document["body"]), type=bytes)) == BODY
    assert json_schema("fetched")["properties"]["body"]["contentEncoding"] == "base64"


# -- invalid messages: refused by both ----------------------------------------------------

Mutation = Callable[[Document], None]


def delete(*path: str | int) -> Mutation:
    def mutate(document: Document) -> None:
        node: Any = document
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return mutate


def put(value: Any, *path: str | int) -> Mutation:
    def mutate(document: Document) -> None:
        node: Any = document
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return mutate


LONG_URL = "https://example.com/" + "a" * 8192

COMMON: dict[str, Mutation] = {
    "unknown field": put(True, "surprise"),
    "url missing": delete("url"),
    "url empty": put("", "url"),
    "url too long": put(LONG_URL, "url"),
    "url not a string": put(42, "url"),
    "crawl_id with a space": put("my crawl", "crawl_id"),
    "crawl_id empty": put("", "crawl_id"),
    "crawl_id too long": put("c" * 129, "crawl_id"),
    "crawl_id with a slash": put("a/b", "crawl_id"),
    "priority 10": put(10, "priority"),
    "priority -1": put(-1, "priority"),
    "priority a string": put("5", "priority"),
    "meta with 65 keys": put({str(n): n for n in range(65)}, "meta"),
    "meta a list": put([], "meta"),
}

# Fields every URL-carrying topic after the frontier shares.
CARRIED: dict[str, Mutation] = {
    "host missing": delete("host"),
    "host empty": put("", "host"),
    "host too long": put("h" * 301, "host"),
    "depth negative": put(-1, "depth"),
    "depth a float": put(1.5, "depth"),
    "scope missing": delete("scope"),
    "scope null": put(None, "scope"),
    "scope without max_depth": delete("scope", "max_depth"),
    "scope with an unknown field": put(1, "scope", "max_pagez"),
    "scope max_depth 1001": put(1001, "scope", "max_depth"),
    "scope allow_domains empty name": put([""], "scope", "allow_domains"),
    "scope allow_domains 1001 names": put(["d"] * 1001, "scope", "allow_domains"),
    "scope domain too long": put(["d" * 254], "scope", "allow_domains"),
    "redirect_chain 51 URLs": put(["https://e/"] * 51, "redirect_chain"),
    "redirect_chain with an empty URL": put([""], "redirect_chain"),
    "redirect_chain a string": put("https://e/", "redirect_chain"),
    "kind unknown": put("feed", "kind"),
}

REQUESTS: dict[str, Mutation] = {
    **CARRIED,
    "discovered_at missing": delete("discovered_at"),
    "discovered_at a string": put("now", "discovered_at"),
    "source too long": put(LONG_URL, "source"),
}

ATTEMPTS: dict[str, Mutation] = {
    "admitted_at missing": delete("admitted_at"),
    "attempt 101": put(101, "attempt"),
    "history 21 entries": put([{"at": 1.0, "outcome": "x"}] * 21, "history"),
    "history entry without outcome": put([{"at": 1.0}], "history"),
    "history entry with an unknown field": put([{"at": 1, "outcome": "x", "y": 1}], "history"),
    "history outcome too long": put([{"at": 1.0, "outcome": "o" * 65}], "history"),
    "history detail too long": put([{"at": 1.0, "outcome": "o", "detail": "d" * 1025}], "history"),
}

INVALID: dict[str, dict[str, Mutation]] = {
    "seed": {
        **COMMON,
        "depth 1001": put(1001, "depth"),
        "scope with an unknown field": put({"max_depth": 1, "x": 2}, "scope"),
        "scope max_depth 1001": put({"max_depth": 1001}, "scope"),
        "scope max_pages negative": put({"max_pages": -1}, "scope"),
    },
    "discovered": {**COMMON, **REQUESTS},
    "fetch": {**COMMON, **REQUESTS, **ATTEMPTS},
    "retry": {
        **COMMON,
        **REQUESTS,
        **ATTEMPTS,
        "due_at missing": delete("due_at"),
        "retry_reason missing": delete("retry_reason"),
        "retry_reason upper case": put("Backoff", "retry_reason"),
        "retry_reason with a space": put("host busy", "retry_reason"),
        "retry_reason too long": put("r" * 65, "retry_reason"),
    },
    "fetched": {
        **COMMON,
        **CARRIED,
        "final_url missing": delete("final_url"),
        "status 99": put(99, "status"),
        "status 600": put(600, "status"),
        "headers with a non-string value": put({"x": 1}, "headers"),
        "headers 201 entries": put({str(n): "v" for n in range(201)}, "headers"),
        "content_type too long": put("t" * 257, "content_type"),
        "body missing": delete("body"),
        "body not a string": put(123, "body"),
        "body_encoding gzip": put("gzip+base64", "body_encoding"),
        "body_bytes negative": put(-1, "body_bytes"),
        "truncated a string": put("no", "truncated"),
        "timings missing": delete("timings"),
        "timings negative": put({"total_s": -0.1}, "timings"),
        "timings with an unknown field": put({"total_s": 1.0, "dns_s": 0.1}, "timings"),
        "protocol not HTTP": put("SPDY/3", "protocol"),
        "protocol with a newline": put("HTTP/1.1\n", "protocol"),
        "reason too long": put("r" * 257, "reason"),
        "raw_headers a map": put({"a": "b"}, "raw_headers"),
        "raw_headers with a triple": put([["a", "b", "c"]], "raw_headers"),
        "raw_headers 201 entries": put([["h", "v"]] * 201, "raw_headers"),
        "request_headers with a number": put([["a", 1]], "request_headers"),
        "body_as_received a string": put("yes", "body_as_received"),
    },
    "page": {
        **COMMON,
        **CARRIED,
        "title missing": delete("title"),
        "text null": put(None, "text"),
        "links with an empty URL": put(["https://e/", ""], "links"),
        "links with a too-long URL": put([LONG_URL], "links"),
        "status 600": put(600, "status"),
        "noindex missing": delete("noindex"),
        "content_type too long": put("t" * 257, "content_type"),
        "sitemaps with an empty URL": put([""], "sitemaps"),
        "body_bytes negative": put(-5, "body_bytes"),
    },
    "dlq": {
        "unknown field": put(True, "surprise"),
        "stage missing": delete("stage"),
        "stage unknown": put("indexer", "stage"),
        "reason with a dash": put("bad-message", "reason"),
        "reason empty": put("", "reason"),
        "detail too long": put("d" * 4097, "detail"),
        "payload missing": delete("payload"),
        "payload_encoding hex": put("hex", "payload_encoding"),
        "offset a string": put("12", "offset"),
        "failed_at missing": delete("failed_at"),
        "history 21 entries": put([{"at": 1.0, "outcome": "x"}] * 21, "history"),
    },
    "event": {
        "unknown field": put(True, "surprise"),
        "crawl_id missing": delete("crawl_id"),
        "stage unknown": put("indexer", "stage"),
        "a count not a number": put({"admitted": "3"}, "counts"),
        "a negative offset": put([-1], "offsets"),
    },
    "control": {
        "unknown field": put(True, "surprise"),
        "crawl_id missing": delete("crawl_id"),
        "crawl_id with a space": put("a b", "crawl_id"),
        "state unknown": put("stopped", "state"),
        "at missing": delete("at"),
        "by too long": put("b" * 257, "by"),
    },
}


def base_document(name: str) -> Document:
    """The first valid example of the topic, as JSON, with every field present."""
    message = next(message for topic, message in valid_examples() if topic == name)
    # Through JSON, as a reader gets it (to_builtins would keep tuples as tuples).
    document: Document = msgspec.json.decode(msgspec.json.encode(message))
    for field in msgspec.structs.fields(type(message)):
        if field.encode_name not in document:
            value = msgspec.json.encode(getattr(message, field.name))
            document[field.encode_name] = msgspec.json.decode(value)
    if "meta" in document and document["meta"] is None:
        document["meta"] = {"k": "v"}
    return document


INVALID_CASES = [
    pytest.param(name, mutation, id=f"{name}: {label}")
    for name, cases in INVALID.items()
    for label, mutation in cases.items()
]


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_base_documents_are_valid(name: str) -> None:
    document = base_document(name)
    assert list(validator(name).iter_errors(document)) == []
    decode(name, document)


@pytest.mark.parametrize(("name", "mutation"), INVALID_CASES)
def test_invalid_messages_are_refused_by_both(name: str, mutation: Mutation) -> None:
    document = copy.deepcopy(base_document(name))
    mutation(document)
    errors = list(validator(name).iter_errors(document))
    assert errors, "the published schema accepts it"
    with pytest.raises(msgspec.ValidationError):
        decode(name, document)


def test_known_gaps_where_only_the_decoder_refuses() -> None:
    """The code is stricter than the contract here, never the other way round: a JSON Schema
    ``integer`` accepts 5.0 and ``contentEncoding`` is only an annotation."""
    seed = {"url": "https://example.com/", "priority": 5.0}
    assert list(validator("seed").iter_errors(seed)) == []
    with pytest.raises(msgspec.ValidationError):
        decode("seed", seed)
    fetched = base_document("fetched")
    fetched["body"] = "not base64!"
    assert list(validator("fetched").iter_errors(fetched)) == []
    with pytest.raises(msgspec.ValidationError):
        decode("fetched", fetched)
