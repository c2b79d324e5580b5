"""When a request is tried again, and after how long, pure.

Backoff is exponential with "equal jitter" (half fixed, half random), so retries
of many URLs spread out but never come back at once; a Retry-After on 429/503 is
honoured (capped, so a hostile header cannot park a URL for a year).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from ..core.content import carried_body_stream
from ..core.messages import (
    Attempt,
    Fetch,
    Fetched,
    Retry,
    Timings,
    retry_from,
    with_attempt,
)
from .http import FetchFailed, FetchResult

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({429, 503})
RETRY_FAILURES = frozenset(
    {"timeout", "connection_error", "dns_error", "payload_error", "proxy_error"}
)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    cap_s: float

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Wait before attempt ``attempt + 1`` (``attempt`` >= 1 attempts made so far)."""
        ceiling = min(self.cap_s, self.base_s * 2 ** max(0, attempt - 1))
        return float(ceiling / 2 + (rng or random).uniform(0, ceiling / 2))

    def wait(
        self, attempt: int, retry_after: float | None, rng: random.Random | None = None
    ) -> float:
        """The larger of the backoff and an honoured Retry-After, capped."""
        return min(self.cap_s, max(self.backoff(attempt, rng), retry_after or 0.0))

    def exhausted(self, attempts_made: int) -> bool:
        return attempts_made >= self.max_attempts


def retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES


def retryable_failure(reason: str) -> bool:
    return reason in RETRY_FAILURES


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


# -- the decision: what one outcome of a request becomes --------------------------------


@dataclass(frozen=True)
class Deliver:
    """A response (any status that is not retried): it goes on to crawl.fetched."""

    fetched: Fetched


@dataclass(frozen=True)
class Wait:
    """Try again later: the request goes to crawl.retry, due in ``wait`` seconds.
    ``hold_host`` (seconds) holds every URL of the host, for a Retry-After."""

    retry: Retry
    wait: float
    hold_host: float | None = None


@dataclass(frozen=True)
class GiveUp:
    """No more attempts (or a failure that no attempt cures): crawl.dlq."""

    reason: str
    detail: str
    history: tuple[Attempt, ...] = ()


Decision = Deliver | Wait | GiveUp


def decide(
    request: Fetch,
    outcome: FetchResult | FetchFailed,
    policy: RetryPolicy,
    now: float,
    rng: random.Random | None = None,
) -> Decision:
    """The fate of one attempt at ``request``; ``now`` is Unix time."""
    if isinstance(outcome, FetchFailed):
        if not retryable_failure(outcome.reason):
            return GiveUp(outcome.reason, f"{request.url}: {outcome.detail}")
        return retry_or_give_up(
            request, outcome.reason, None, outcome.detail, None, policy, now, rng
        )
    if not retryable_status(outcome.status):
        return Deliver(fetched_from(request, outcome, now))
    retry_after = parse_retry_after(outcome.headers.get("retry-after"), now)
    decision = retry_or_give_up(
        request, f"http_{outcome.status}", outcome.status, "", retry_after, policy, now, rng
    )
    if (
        isinstance(decision, Wait)
        and retry_after is not None
        and outcome.status in RETRY_AFTER_STATUSES
    ):
        return Wait(decision.retry, decision.wait, min(retry_after, policy.cap_s))
    return decision


def retry_or_give_up(
    request: Fetch,
    reason: str,
    status: int | None,
    detail: str,
    retry_after: float | None,
    policy: RetryPolicy,
    now: float,
    rng: random.Random | None = None,
) -> Wait | GiveUp:
    """One more attempt counted: wait for the next, or give up when none is left."""
    attempted = with_attempt(request, reason, now, status, detail)
    if policy.exhausted(attempted.attempt):
        detail = f"{request.url}: gave up after {attempted.attempt} attempts"
        return GiveUp(reason, detail, tuple(attempted.history))
    wait = policy.wait(attempted.attempt, retry_after, rng)
    return Wait(retry_from(attempted, now + wait, reason), wait)


def fetched_from(request: Fetch, result: FetchResult, now: float) -> Fetched:
    """The crawl.fetched record of one response: the body as received, zlib-compressed
    (spliceable into a WARC record's gzip member: ``carried_body_stream``),
    with what an archive needs (status line, headers as received, the request's headers)."""
    return Fetched(
        url=request.url,
        final_url=result.final_url,
        host=request.host,
        crawl_id=request.crawl_id,
        depth=request.depth,
        priority=request.priority,
        scope=request.scope,
        redirect_chain=request.redirect_chain,
        status=result.status,
        headers=result.headers,
        content_type=result.content_type,
        body=carried_body_stream(result.body),
        body_bytes=len(result.body),
        truncated=result.truncated,
        fetched_at=now,
        timings=Timings(total_s=round(result.total_s, 6), ttfb_s=round(result.ttfb_s, 6)),
        meta=request.meta,
        kind=request.kind,
        body_as_received=True,
        protocol=result.protocol,
        reason=result.reason,
        raw_headers=list(result.raw_headers),
        request_headers=list(result.request_headers),
        revisit=request.revisit,
    )
