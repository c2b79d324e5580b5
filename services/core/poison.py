"""No poison record blocks a partition; no outage is mistaken for a poison record.

A batch whose processing raises is run again record by record: each record is tried up
to ``POISON_ATTEMPTS`` times and, if it still raises, goes to the DLQ with a reason that
names the exception, and its partition moves on. An outage (Kafka or the database
unreachable) is not the record's fault: it is waited out with backoff, never
dead-lettered, and the backlog waits in Kafka.

Running a failed batch again is correct only if a ``process`` that raised changed no
state a later run depends on: stages that remember what they sent (frontier's recent
links, dedup's filters) apply those changes only once their whole batch has succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka.errors import KafkaConnectionError, KafkaError

from .errors import StageCannotRun

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_OUTAGE_DELAY = 10.0

# MongoDB error codes that say the server (or our access to it) is not serving, not that a
# document is bad: every record would fail alike, so they are waited out, never
# dead-lettered. HostUnreachable, HostNotFound, Unauthorized, AuthenticationFailed,
# NetworkTimeout, ShutdownInProgress, PrimarySteppedDown, SocketException,
# NotWritablePrimary, NotPrimaryNoSecondaryOk, NotPrimaryOrSecondary,
# InterruptedAtShutdown, InterruptedDueToReplStateChange.
SERVER_NOT_SERVING = frozenset({6, 7, 13, 18, 89, 91, 189, 9001, 10107, 13435, 13436, 11600, 11602})


class OutputTooLarge(ValueError):
    """A record led to a message over the topic's size limit: the producer would refuse
    it on every try, so it is the record's fault, like any exception in processing."""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says a server is unreachable (retry later), not that the record is bad.

    pymongo's ConnectionFailure covers AutoReconnect, NotPrimaryError, NetworkTimeout and
    ServerSelectionTimeoutError; a write that pymongo labels retryable is one too.
    """
    if isinstance(exc, KafkaConnectionError | OSError):
        return True
    if isinstance(exc, KafkaError):
        return bool(exc.retriable)
    return _is_mongo_outage(exc)


def _is_mongo_outage(exc: BaseException) -> bool:
    # pymongo is looked up, not imported: only the stages that talk to MongoDB load it
    # (its import is a tenth of a stage's start-up CPU), and no other stage can meet
    # one of its errors.
    errors = sys.modules.get("pymongo.errors")
    if errors is None:
        return False
    if isinstance(exc, errors.ConnectionFailure):
        return True
    if isinstance(exc, errors.OperationFailure) and exc.code in SERVER_NOT_SERVING:
        return True
    if isinstance(exc, errors.PyMongoError):
        return bool(exc.has_error_label("RetryableWriteError"))
    return False


def poison_reason(exc: BaseException) -> str:
    """A DLQ reason naming the exception: ``BulkWriteError`` -> ``raised_bulk_write_error``."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    return ("raised_" + re.sub(r"[^a-z0-9_]", "", snake))[:64]


def poison_detail(exc: BaseException, attempts: int) -> str:
    kind = type(exc)
    return f"{kind.__module__}.{kind.__qualname__} after {attempts} attempts: {exc}"


async def outlasting_outages(what: str, action: Callable[[], Awaitable[T]]) -> T:
    """``action()``, retried with backoff for as long as it fails with an outage."""
    delay = 0.5
    while True:
        try:
            return await action()
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.error("%s: outage (%r); retrying in %.1fs", what, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_OUTAGE_DELAY)


async def attempts_of(
    what: str, action: Callable[[], Awaitable[T]], attempts: int
) -> T | BaseException:
    """``action()`` tried up to ``attempts`` times (outages waited out, not counted);
    its result, or the last exception it raised."""
    failure: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return await outlasting_outages(what, action)
        except StageCannotRun:
            raise
        except Exception as exc:
            failure = exc
            log.warning("%s: attempt %d/%d raised %r", what, attempt, attempts, exc)
    assert failure is not None
    return failure


def describe(record: Any) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"
