"""Decoding and validating one message, per topic: jsonschema (before) against msgspec (after).

Run from the repository root: ``python bench/messages.py [--json]``. Before: ``json.loads``
then a ``Draft202012Validator`` over the committed (generated) ``schemas/NAME.json``,
reporting the first error as the stages used to. After: ``msgspec.json.Decoder(type)``,
which checks the same contract while it builds the typed message. Both run side by side in
this process on the same realistic encoded messages, alternating over several rounds; the
table gives the median microseconds per message and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
import zlib
from collections.abc import Callable
from typing import Any

import msgspec
from jsonschema import Draft202012Validator
from streamcrawl.core.messages import (
    SCHEMA_TYPES,
    DeadLetterRecord,
    Discovered,
    Fetched,
    Page,
    Scope,
    Seed,
    SeedScope,
    Timings,
    encode,
    fetch_from,
    retry_from,
    with_attempt,
)
from streamcrawl.core.schemas import SCHEMA_NAMES, load_schema

ROUNDS = 7
ROUND_SECONDS = 0.25  # per method and topic in each round

_VOCABULARY = (
    "crawl fetch page host link robots sitemap queue frontier kafka broker partition offset "
    "commit schema message parser extract title text canonical redirect status header body "
    "compress delay retry budget politeness domain scope depth priority seed dedup bloom"
)
_WORDS = _VOCABULARY.split()


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS)
        words.append(word.capitalize() + "." if rng.random() < 0.08 else word)
        size += len(word) + 1
    return " ".join(words)[:chars]


def _html(rng: random.Random, compressed_target: int) -> bytes:
    """An HTML page whose zlib form is about ``compressed_target`` bytes."""
    parts = ["<!doctype html><html><head><title>Bench page</title></head><body>"]
    while len(zlib.compress("".join(parts).encode())) < compressed_target:
        href = f"/section-{rng.randrange(50)}/item-{rng.randrange(10**6)}.html"
        parts.append(f'<p>{_text(rng, 400)} <a href="{href}">{rng.choice(_WORDS)}</a></p>\n')
    return "".join([*parts, "</body></html>"]).encode()


def messages() -> dict[str, msgspec.Struct]:
    """One realistic message per topic, built with the types."""
    rng = random.Random(1)
    scope = Scope(allow_domains=["news.example.com", "example.com"], max_depth=5, max_pages=10_000)
    chain = ["http://example.com/2026/11/story", "https://example.com/2026/11/story"]
    url = "https://news.example.com/2026/11/story?utm=feed&page=2"
    candidate = Discovered(
        url=url,
        host="news.example.com",
        crawl_id="news-2026-11-27",
        depth=3,
        priority=6,
        scope=scope,
        discovered_at=1_764_255_600.125,
        source="https://news.example.com/2026/11/",
        redirect_chain=chain,
        meta={"campaign": "daily", "referrer_rank": 3},
    )
    fetch = fetch_from(candidate, 1_764_255_600.5)
    failed = fetch
    attempts = [("timeout", None), ("http_503", 503), ("http_429", 429)]
    for n, (outcome, status) in enumerate(attempts):
        detail = f"attempt {n}: {outcome}"
        failed = with_attempt(failed, outcome, 1_764_255_601.0 + n, status, detail)
    html = _html(rng, 20_000)
    body = zlib.compress(html)
    fetched = Fetched(
        url=url,
        final_url=url,
        host="news.example.com",
        crawl_id="news-2026-11-27",
        depth=3,
        priority=6,
        scope=scope,
        redirect_chain=chain,
        status=200,
        headers={
            "content-type": "text/html; charset=utf-8",
            "content-length": str(len(html)),
            "cache-control": "max-age=60",
            "etag": '"5f3a-1c2b"',
            "last-modified": "Thu, 27 Nov 2026 14:00:00 GMT",
            "server": "nginx",
            "vary": "Accept-Encoding",
        },
        content_type="text/html",
        body=body,
        body_bytes=len(html),
        truncated=False,
        fetched_at=1_764_255_605.75,
        timings=Timings(total_s=0.412, ttfb_s=0.118),
        meta={"campaign": "daily", "referrer_rank": 3},
    )
    page = Page(
        url=url,
        final_url=url,
        host="news.example.com",
        status=200,
        fetched_at=1_764_255_605.75,
        content_type="text/html",
        title="A story about crawling the news, part 2",
        text=_text(rng, 5_000),
        links=[
            f"https://news.example.com/section-{rng.randrange(50)}/item-{rng.randrange(10**6)}.html"
            for _ in range(60)
        ],
        canonical="https://news.example.com/2026/11/story",
        content_hash="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        depth=3,
        priority=6,
        crawl_id="news-2026-11-27",
        scope=scope,
        redirect_chain=chain,
        redirect_to=None,
        noindex=False,
        nofollow=False,
        charset="utf-8",
        body_bytes=len(html),
        meta={"campaign": "daily", "referrer_rank": 3},
    )
    dlq = DeadLetterRecord(
        stage="dedup",
        reason="schema_violation",
        detail="Expected `int` >= 0, got -1 - at `$.depth`",
        topic="crawl.discovered",
        partition=4,
        offset=1_234_567,
        key="news.example.com",
        payload=encode(msgspec.structs.replace(candidate, meta=None)).decode(),
        payload_encoding="utf-8",
        failed_at=1_764_255_606.0,
        history=list(failed.history),
    )
    seed = Seed(
        url="https://news.example.com/",
        crawl_id="news-2026-11-27",
        priority=8,
        meta={"owner": "news-team"},
        scope=SeedScope(allow_domains=["news.example.com", "example.com"], max_depth=5),
    )
    return {
        "seed": seed,
        "discovered": candidate,
        "fetch": fetch,
        "retry": retry_from(failed, 1_764_255_660.0, "backoff"),
        "fetched": fetched,
        "page": page,
        "dlq": dlq,
    }


def before(name: str) -> Callable[[bytes], Any]:
    """The old way: parse to builtins, then validate against the JSON Schema."""
    validator = Draft202012Validator(load_schema(name))

    def decode(wire: bytes) -> Any:
        document = json.loads(wire)
        error = next(iter(validator.iter_errors(document)), None)
        if error is not None:
            raise ValueError(error.message)
        return document

    return decode


def after(name: str) -> Callable[[bytes], Any]:
    return msgspec.json.Decoder(SCHEMA_TYPES[name]).decode


def per_message_us(decode: Callable[[bytes], Any], wire: bytes, loops: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(loops):
            decode(wire)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed / loops * 1e6


def calibrate(decode: Callable[[bytes], Any], wire: bytes) -> int:
    """How many loops take about ROUND_SECONDS (this also warms both decoders up)."""
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            decode(wire)
        elapsed = time.perf_counter() - start
        if elapsed >= ROUND_SECONDS / 5:
            return max(1, int(loops * ROUND_SECONDS / elapsed))
        loops *= 2


def run() -> list[dict[str, Any]]:
    rows = []
    for name, message in messages().items():
        wire = encode(message)
        methods = {"before": before(name), "after": after(name)}
        assert methods["after"](wire) == message
        assert methods["before"](wire) == json.loads(wire)  # valid under the contract too
        loops = {method: calibrate(decode, wire) for method, decode in methods.items()}
        samples: dict[str, list[float]] = {method: [] for method in methods}
        for round_ in range(ROUNDS):
            order = list(methods) if round_ % 2 == 0 else list(reversed(methods))
            for method in order:
                samples[method].append(per_message_us(methods[method], wire, loops[method]))
        rows.append(
            {
                "topic": name,
                "bytes": len(wire),
                "before_us": statistics.median(samples["before"]),
                "after_us": statistics.median(samples["after"]),
                "before_min_us": min(samples["before"]),
                "after_min_us": min(samples["after"]),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| topic | message bytes | before: json.loads + jsonschema (µs) "
        "| after: msgspec decode (µs) | before / after |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['topic']} | {row['bytes']:,} | {row['before_us']:,.1f} "
            f"| {row['after_us']:,.2f} | {row['before_us'] / row['after_us']:,.1f}x |"
        )
    total_before = sum(row["before_us"] for row in rows)
    total_after = sum(row["after_us"] for row in rows)
    lines.append(
        f"| all seven, one message each | {sum(row['bytes'] for row in rows):,} "
        f"| {total_before:,.1f} | {total_after:,.2f} | {total_before / total_after:,.1f}x |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    args = parser.parse_args()
    assert set(SCHEMA_NAMES) == set(messages())
    rows = run()
    print(json.dumps(rows, indent=2) if args.json else table(rows))


if __name__ == "__main__":
    main()
