"""The decode edge's answers to bad input, without a broker: what the types cannot say
(``check_message``), dead letters that always fit crawl.dlq, and documents BSON cannot hold."""

from __future__ import annotations

import base64

import msgspec
import pytest
from aiokafka import ConsumerRecord
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import (
    MAX_META_BYTES,
    MAX_RETRY_WAIT,
    DeadLetterRecord,
    Undecodable,
    check_message,
    encode,
)
from streamcrawl.core.runtime import MAX_DLQ_KEY, MAX_DLQ_PAYLOAD, dead_letter
from streamcrawl.core.topics import MAX_MESSAGE_BYTES
from streamcrawl.sink.logic import unencodable

from ..support.bad_input import discovered, page, retry

SETTINGS = Settings.from_env({})


def record(value: bytes | None, key: bytes | None = None) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="crawl.fetched",
        partition=3,
        offset=42,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=-1,
        headers=(),
    )


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"url": "javascript:alert(1)"}, "unsupported_scheme"),
        ({"url": "http:///x"}, "invalid_url"),
        ({"url": "http://[::1/x"}, "invalid_url"),
        ({"url": "http://a.example:99999/x", "host": "a.example:99999"}, "invalid_url"),
        ({"url": "http://a.example:x/", "host": "a.example:x"}, "invalid_url"),
        ({"url": "http://b.example/x"}, "host_mismatch"),
        ({"meta": {"k": "x" * MAX_META_BYTES}}, "meta_too_large"),
    ],
)
def test_what_the_types_admit_but_no_stage_writes(changes: dict[str, object], reason: str) -> None:
    message = msgspec.structs.replace(discovered("http://a.example/x"), **changes)
    with pytest.raises(Undecodable) as refused:
        check_message(message)
    assert refused.value.reason == reason


def test_pipeline_messages_pass_the_check() -> None:
    for message in (
        discovered("http://a.example/x"),
        discovered("http://[2001:db8::1]:8080/x"),
        page("https://xn--bcher-kva.example/"),
        retry("http://a.example/x", due_at=1000.0 + MAX_RETRY_WAIT),
    ):
        check_message(message, now=1000.0)
    with pytest.raises(Undecodable, match="due_too_far"):
        check_message(retry("http://a.example/x", due_at=1e300), now=1000.0)


@pytest.mark.parametrize(
    "payload",
    [
        b"{" + b" " * (MAX_MESSAGE_BYTES - 2) + b"}",  # text
        b"\xff" * MAX_MESSAGE_BYTES,  # binary: base64 grows it by a third
        b"\x01" * MAX_MESSAGE_BYTES,  # UTF-8 that JSON writes six bytes a character
    ],
)
def test_a_dead_letter_always_fits_the_dlq_topic(payload: bytes) -> None:
    output = dead_letter(SETTINGS, "parser", record(payload, b"k" * 100_000), "x", "detail")
    letter = output.value
    assert isinstance(letter, DeadLetterRecord)
    assert len(encode(letter)) + len(output.key or b"") < MAX_MESSAGE_BYTES
    assert letter.payload_truncated and letter.payload_bytes == len(payload)
    kept = (
        letter.payload.encode()
        if letter.payload_encoding == "utf-8"
        else base64.b64decode(letter.payload)
    )
    assert kept == payload[:MAX_DLQ_PAYLOAD]
    assert output.key == b"k" * MAX_DLQ_KEY


def test_a_payload_ending_in_half_a_character_is_kept_whole_in_base64() -> None:
    letter = dead_letter(SETTINGS, "parser", record(b"abc\xc3"), "x", "d").value
    assert isinstance(letter, DeadLetterRecord)
    assert letter.payload_encoding == "base64"
    assert base64.b64decode(letter.payload) == b"abc\xc3"


def test_a_small_payload_is_kept_whole_and_unmarked() -> None:
    letter = dead_letter(SETTINGS, "parser", record("héllo".encode()), "x", "d").value
    assert isinstance(letter, DeadLetterRecord)
    assert (letter.payload, letter.payload_encoding) == ("héllo", "utf-8")
    assert not letter.payload_truncated and letter.payload_bytes is None


def test_documents_bson_cannot_hold_are_named() -> None:
    documents = [{"_id": "a"}, {"_id": "b", "m": {"a\x00b": 1}}, {"_id": "c", "n": 2**70}]
    refused = unencodable(documents)
    assert sorted(refused) == [1, 2]
    assert "NULL" in refused[1] and "8-byte" in refused[2]
