"""The fetcher's decision table, pure: what one outcome of a request becomes.

``retry.decide(request, outcome, policy, now, rng)`` turns a response or a failure into a
crawl.fetched record (:class:`Deliver`), a crawl.retry record due later (:class:`Wait`) or
a dead letter (:class:`GiveUp`). The jitter comes from a seeded ``random.Random``, so each
wait is checked against its exact bounds.
"""

from __future__ import annotations

import random
import zlib
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import msgspec
import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import (
    MAX_HISTORY,
    Attempt,
    Fetch,
    Fetched,
    Retry,
    Scope,
    encode,
    fetch_from_retry,
)
from streamcrawl.fetcher.http import FetchFailed, FetchResult
from streamcrawl.fetcher.retry import (
    RETRY_FAILURES,
    Deliver,
    GiveUp,
    RetryPolicy,
    Wait,
    decide,
)

NOW = 1_800_000_000.0
URL = "http://a.example/page.html"
POLICY = RetryPolicy(max_attempts=4, base_s=2.0, cap_s=600.0)


def request(**changes: Any) -> Fetch:
    fields: dict[str, Any] = {
        "url": URL,
        "host": "a.example",
        "crawl_id": "c1",
        "depth": 2,
        "priority": 4,
        "scope": Scope(allow_domains=["a.example"], max_depth=5, max_pages=0),
        "discovered_at": NOW - 20,
        "admitted_at": NOW - 10,
        "source": "http://a.example/",
        "redirect_chain": ["http://a.example/old.html"],
        "meta": {"k": "v"},
    }
    fields.update(changes)
    return Fetch(**fields)


def response(status: int, body: bytes = b"", retry_after: str | None = None) -> FetchResult:
    return FetchResult(
        status=status,
        final_url=URL,
        headers={} if retry_after is None else {"retry-after": retry_after},
        content_type="",
        body=body,
        truncated=False,
        total_s=0.1234567,
        ttfb_s=0.0123456,
    )


def backoff_bounds(attempts_made: int, policy: RetryPolicy = POLICY) -> tuple[float, float]:
    """Equal jitter: half the exponential ceiling fixed, half random."""
    ceiling = min(policy.cap_s, policy.base_s * 2 ** (attempts_made - 1))
    return ceiling / 2, ceiling


def waited(decision: object) -> Wait:
    assert isinstance(decision, Wait), decision
    # What goes on crawl.retry reads back as the same message.
    assert msgspec.json.decode(encode(decision.retry), type=Retry) == decision.retry
    return decision


# -- responses that go on to the parser ---------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, {"content-type": "text/html"}),
        (204, {}),
        (301, {"location": "/moved.html"}),
        (302, {"location": "http://b.example/"}),
        (304, {}),
        (403, {}),
        (404, {"content-type": "text/html"}),
        (410, {}),
        (501, {}),
    ],
)
def test_responses_that_are_not_retried_are_delivered(status: int, headers: dict[str, str]) -> None:
    body = b"<html><title>x</title></html>" * 10
    result = FetchResult(
        status=status,
        final_url=URL,
        headers=headers,
        content_type=headers.get("content-type", ""),
        body=body,
        truncated=status == 200,
        total_s=0.1234567,
        ttfb_s=0.0123456,
    )
    decision = decide(request(), result, POLICY, NOW, random.Random(1))
    assert isinstance(decision, Deliver)
    fetched = decision.fetched
    assert msgspec.json.decode(encode(fetched), type=Fetched) == fetched
    assert (fetched.url, fetched.final_url, fetched.status) == (URL, URL, status)
    assert fetched.headers == headers  # a redirect's Location goes on: the parser follows it
    assert zlib.decompress(fetched.body) == body and fetched.body_bytes == len(body)
    assert fetched.truncated is (status == 200)
    assert fetched.fetched_at == NOW
    assert (fetched.timings.total_s, fetched.timings.ttfb_s) == (0.123457, 0.012346)
    # Everything the next stages need travels from the request.
    assert (fetched.host, fetched.crawl_id, fetched.depth, fetched.priority) == (
        "a.example",
        "c1",
        2,
        4,
    )
    assert fetched.scope == request().scope
    assert fetched.redirect_chain == ["http://a.example/old.html"]
    assert (fetched.meta, fetched.kind) == ({"k": "v"}, "page")


def test_a_sitemap_request_is_delivered_as_a_sitemap() -> None:
    decision = decide(request(kind="sitemap"), response(200, b"<urlset/>"), POLICY, NOW)
    assert isinstance(decision, Deliver) and decision.fetched.kind == "sitemap"


# -- retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "reason", "status"),
    [
        (FetchFailed("timeout", "no answer in 30s"), "timeout", None),
        (FetchFailed("connection_error", "refused"), "connection_error", None),
        (FetchFailed("dns_error", "no such host"), "dns_error", None),
        (FetchFailed("payload_error", "cut short"), "payload_error", None),
        (FetchFailed("proxy_error", "proxy down"), "proxy_error", None),
        (response(408), "http_408", 408),
        (response(429), "http_429", 429),
        (response(500), "http_500", 500),
        (response(502), "http_502", 502),
        (response(503), "http_503", 503),
        (response(504), "http_504", 504),
    ],
)
def test_transient_outcomes_wait_with_jittered_backoff(
    outcome: FetchResult | FetchFailed, reason: str, status: int | None
) -> None:
    for attempts_before in range(POLICY.max_attempts - 1):
        earlier = [Attempt(at=NOW - 100 + n, outcome="timeout") for n in range(attempts_before)]
        fetch = request(attempt=attempts_before, history=earlier)
        decision = waited(decide(fetch, outcome, POLICY, NOW, random.Random(attempts_before)))
        low, high = backoff_bounds(attempts_before + 1)
        assert low <= decision.wait <= high, (reason, attempts_before, decision.wait)
        assert decision.hold_host is None  # no Retry-After: only this URL waits
        retry = decision.retry
        assert (retry.due_at, retry.retry_reason) == (NOW + decision.wait, reason)
        assert retry.attempt == attempts_before + 1
        assert retry.history[:-1] == earlier
        detail = outcome.detail if isinstance(outcome, FetchFailed) else ""
        assert retry.history[-1] == Attempt(at=NOW, outcome=reason, status=status, detail=detail)
        # The rest of the request is unchanged.
        assert (retry.url, retry.scope, retry.meta, retry.admitted_at) == (
            URL,
            fetch.scope,
            fetch.meta,
            fetch.admitted_at,
        )


def test_every_retryable_failure_is_in_the_table() -> None:
    retried = {"timeout", "connection_error", "dns_error", "payload_error", "proxy_error"}
    assert retried == RETRY_FAILURES


def test_the_jitter_is_the_given_generators() -> None:
    outcome = FetchFailed("timeout", "slow")
    first = waited(decide(request(), outcome, POLICY, NOW, random.Random(42)))
    again = waited(decide(request(), outcome, POLICY, NOW, random.Random(42)))
    assert first.wait == again.wait
    waits = {
        waited(decide(request(), outcome, POLICY, NOW, random.Random(n))).wait for n in range(50)
    }
    assert len(waits) == 50 and all(1.0 <= wait <= 2.0 for wait in waits)


def test_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=30, base_s=2.0, cap_s=60.0)
    fetch = request(attempt=20)
    for seed in range(20):
        decision = waited(decide(fetch, response(500), policy, NOW, random.Random(seed)))
        assert 30.0 <= decision.wait <= 60.0


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_is_honoured_and_holds_the_host(status: int) -> None:
    decision = waited(
        decide(request(), response(status, retry_after="120"), POLICY, NOW, random.Random(3))
    )
    assert decision.wait == 120.0 and decision.retry.due_at == NOW + 120.0
    assert decision.hold_host == 120.0  # every URL of the host waits, not only this one
    assert decision.retry.retry_reason == f"http_{status}"


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_http_date_is_honoured_and_holds_the_host(status: int) -> None:
    when = format_datetime(datetime.fromtimestamp(NOW + 300, UTC), usegmt=True)
    decision = waited(
        decide(request(), response(status, retry_after=when), POLICY, NOW, random.Random(3))
    )
    assert decision.wait == pytest.approx(300.0)
    assert decision.hold_host == pytest.approx(300.0)


def test_a_short_retry_after_never_shortens_the_backoff() -> None:
    fetch = request(attempt=2)  # third attempt: backoff between 4 and 8 s
    decision = waited(decide(fetch, response(429, retry_after="1"), POLICY, NOW, random.Random(5)))
    assert 4.0 <= decision.wait <= 8.0
    assert decision.hold_host == 1.0


def test_a_hostile_retry_after_is_capped() -> None:
    policy = RetryPolicy(max_attempts=4, base_s=2.0, cap_s=600.0)
    year = str(365 * 24 * 3600)
    decision = waited(decide(request(), response(503, retry_after=year), policy, NOW))
    assert decision.wait == 600.0 and decision.hold_host == 600.0


@pytest.mark.parametrize("value", ["soon", "", "Thu, 99 Foo 2026 99:99:99 GMT"])
def test_an_unreadable_retry_after_leaves_the_backoff_and_holds_nothing(value: str) -> None:
    decision = waited(decide(request(), response(503, retry_after=value), POLICY, NOW))
    assert 1.0 <= decision.wait <= 2.0 and decision.hold_host is None


@pytest.mark.parametrize("status", [408, 500, 502, 504])
def test_retry_after_on_other_statuses_holds_no_host(status: int) -> None:
    decision = waited(decide(request(), response(status, retry_after="120"), POLICY, NOW))
    assert decision.hold_host is None


# -- giving up ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "detail"),
    [
        ("forbidden_address", "10.0.0.1 is not a public address"),
        ("invalid_url", "bad URL"),
        ("http_error", "TooManyRedirects: x"),
    ],
)
def test_failures_no_attempt_cures_are_dead_lettered_at_once(reason: str, detail: str) -> None:
    fetch = request(attempt=1, history=[Attempt(at=NOW - 5, outcome="timeout")])
    decision = decide(fetch, FetchFailed(reason, detail), POLICY, NOW, random.Random(0))
    assert decision == GiveUp(reason, f"{URL}: {detail}")
    assert decision.history == ()  # no attempt counted for it


@pytest.mark.parametrize(
    ("outcome", "reason", "status"),
    [
        (FetchFailed("timeout", "slow"), "timeout", None),
        (response(503, retry_after="5"), "http_503", 503),
        (response(429), "http_429", 429),
    ],
)
def test_the_last_attempt_gives_up_with_the_full_history(
    outcome: FetchResult | FetchFailed, reason: str, status: int | None
) -> None:
    earlier = [
        Attempt(at=NOW - 30, outcome="connection_error", detail="refused"),
        Attempt(at=NOW - 20, outcome="http_500", status=500),
        Attempt(at=NOW - 10, outcome="timeout", detail="slow"),
    ]
    fetch = request(attempt=3, history=earlier)
    decision = decide(fetch, outcome, POLICY, NOW, random.Random(0))
    assert isinstance(decision, GiveUp)
    assert decision.reason == reason
    assert decision.detail == f"{URL}: gave up after 4 attempts"
    detail = outcome.detail if isinstance(outcome, FetchFailed) else ""
    assert decision.history == (
        *earlier,
        Attempt(at=NOW, outcome=reason, status=status, detail=detail),
    )


def test_history_keeps_the_latest_attempts_only() -> None:
    policy = RetryPolicy(max_attempts=100, base_s=1.0, cap_s=10.0)
    fetch = request()
    for n in range(MAX_HISTORY + 5):
        # The delay stage puts each retry back on crawl.fetch as a Fetch.
        fetch = fetch_from_retry(waited(decide(fetch, response(500), policy, NOW + n)).retry)
    assert fetch.attempt == MAX_HISTORY + 5
    assert len(fetch.history) == MAX_HISTORY
    assert [a.at for a in fetch.history] == [NOW + n for n in range(5, MAX_HISTORY + 5)]
    assert msgspec.json.decode(encode(fetch), type=Fetch) == fetch


def test_settings_refuse_more_attempts_than_crawl_retry_can_carry() -> None:
    with pytest.raises(ValueError, match="RETRY_MAX_ATTEMPTS"):
        Settings.from_env({"STREAMCRAWL_RETRY_MAX_ATTEMPTS": "150"})


def test_every_retry_the_settings_allow_fits_crawl_retry() -> None:
    settings = Settings.from_env({"STREAMCRAWL_RETRY_MAX_ATTEMPTS": "100"})
    policy = RetryPolicy(settings.retry_max_attempts, 1.0, 10.0)
    fetch = request()
    decision = decide(fetch, response(500), policy, NOW)
    while isinstance(decision, Wait):
        # As the delay stage reads it back off crawl.retry.
        retry = msgspec.json.decode(encode(decision.retry), type=Retry)
        fetch = fetch_from_retry(retry)
        decision = decide(fetch, response(500), policy, NOW)
    assert isinstance(decision, GiveUp) and fetch.attempt == settings.retry_max_attempts - 1
