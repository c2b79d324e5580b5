"""The scheduler's decisions, pure: which due pages a batch queues, and the round of a
revisit queued for a due time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def due_round(due: float) -> int:
    """The revisit round of a page queued for ``due`` (its ``next_visit``): the due time
    in milliseconds. Dedup admits a revisit once per (crawl id, round, URL), so a revisit
    queued twice for one due time (a scheduler that stopped between its steps) passes once,
    while the page's next due time is a round of its own."""
    return max(1, int(due * 1000))


def polite_batch(documents: Iterable[Mapping[str, Any]], per_host: int) -> list[Mapping[str, Any]]:
    """The due documents (read in ``next_visit`` order) a batch queues: at most
    ``per_host`` of one host, so one large site does not fill a batch; the rest stay due
    and come in a later batch. Per-host politeness (delays, concurrency) is the fetcher's,
    as for every URL."""
    taken: dict[str, int] = {}
    chosen = []
    for document in documents:
        host = str(document.get("host"))
        if taken.get(host, 0) >= per_host:
            continue
        taken[host] = taken.get(host, 0) + 1
        chosen.append(document)
    return chosen
