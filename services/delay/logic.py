"""The delay buffer, pure: retries held in due-time order, released when due.

A Kafka partition is a FIFO, but retries come due in any order (backoffs differ,
Retry-After differs). So the delay service reads crawl.retry into this heap,
bounded in size, and releases each record at its due time; offsets are committed
only below the oldest record not yet released, so a restart loses nothing.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

# Fields crawl.retry adds to a crawl.fetch message.
RETRY_ONLY_FIELDS = ("due_at", "retry_reason")


@dataclass(order=True)
class Held:
    due_at: float
    sequence: int
    tp: TopicPartition = field(compare=False)
    offset: int = field(compare=False)
    key: bytes | None = field(compare=False)
    value: dict[str, Any] = field(compare=False)


def fetch_value(retry: dict[str, Any]) -> dict[str, Any]:
    """The crawl.fetch message a due crawl.retry message becomes."""
    return {name: value for name, value in retry.items() if name not in RETRY_ONLY_FIELDS}


class DelayBuffer:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._heap: list[Held] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def room(self) -> int:
        return max(0, self.capacity - len(self._heap))

    def add(
        self, tp: TopicPartition, offset: int, key: bytes | None, value: dict[str, Any]
    ) -> None:
        due = float(value["due_at"])
        heapq.heappush(self._heap, Held(due, next(self._sequence), tp, offset, key, value))

    def next_due(self) -> float | None:
        return self._heap[0].due_at if self._heap else None

    def pop_due(self, now: float) -> list[Held]:
        due: list[Held] = []
        while self._heap and self._heap[0].due_at <= now:
            due.append(heapq.heappop(self._heap))
        return due

    def drop_where(self, predicate: Callable[[Held], bool]) -> int:
        """Forget held records (their partition moved); returns how many."""
        kept = [held for held in self._heap if not predicate(held)]
        dropped = len(self._heap) - len(kept)
        heapq.heapify(kept)
        self._heap = kept
        return dropped
