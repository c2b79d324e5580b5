"""The delay buffer, pure: retries held in due-time order, released when due.

A Kafka partition is a FIFO, but retries come due in any order (backoffs differ,
Retry-After differs). So the delay stage reads crawl.retry into this heap, bounded in
size, and releases each record at its due time; offsets are committed only below the
oldest record not yet released, so a restart loses nothing.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class Held(Generic[T]):
    due_at: float
    sequence: int
    item: T = field(compare=False)


class DelayBuffer(Generic[T]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._heap: list[Held[T]] = []
        self._sequence = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def room(self) -> int:
        return max(0, self.capacity - len(self._heap))

    def add(self, due_at: float, item: T) -> None:
        heapq.heappush(self._heap, Held(due_at, next(self._sequence), item))

    def next_due(self) -> float | None:
        return self._heap[0].due_at if self._heap else None

    def pop_due(self, now: float) -> list[T]:
        due: list[T] = []
        while self._heap and self._heap[0].due_at <= now:
            due.append(heapq.heappop(self._heap).item)
        return due

    def drop_where(self, predicate: Callable[[T], bool]) -> int:
        """Forget held items (their partition moved); returns how many."""
        kept = [held for held in self._heap if not predicate(held.item)]
        dropped = len(self._heap) - len(kept)
        heapq.heapify(kept)
        self._heap = kept
        return dropped

    def advance_where(self, predicate: Callable[[T], bool], due_at: float) -> int:
        """Make held items matching ``predicate`` due at ``due_at`` at the latest (a
        resumed crawl's paused URLs, a cancelled crawl's retries); returns how many."""
        moved = 0
        for held in self._heap:
            if held.due_at > due_at and predicate(held.item):
                held.due_at = due_at
                moved += 1
        if moved:
            heapq.heapify(self._heap)
        return moved
