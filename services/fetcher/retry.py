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
from typing import Any

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({429, 503})
RETRY_FAILURES = frozenset(
    {"timeout", "connection_error", "dns_error", "payload_error", "proxy_error"}
)
MAX_HISTORY = 20


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


def with_attempt(
    request: dict[str, Any], outcome: str, at: float, status: int | None, detail: str
) -> dict[str, Any]:
    """The request with one more attempt counted and recorded in its history."""
    history = list(request.get("history", []))
    history.append({"at": at, "outcome": outcome, "status": status, "detail": detail[:1024]})
    return {**request, "attempt": request.get("attempt", 0) + 1, "history": history[-MAX_HISTORY:]}
