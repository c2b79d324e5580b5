"""Commit offsets of records processed out of order, without ever skipping one.

A partition's committable offset is the lowest offset still in flight (or one
past the highest seen when none is): everything below it is finished.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from .kafka import export_lag

log = logging.getLogger(__name__)


@dataclass
class _PartitionState:
    in_flight: list[int] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)
    next_offset: int | None = None


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _PartitionState] = {}
        self._committed: dict[TopicPartition, int] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        state = self._partitions.setdefault(tp, _PartitionState())
        heapq.heappush(state.in_flight, offset)
        state.next_offset = max(state.next_offset or 0, offset + 1)

    def finished(self, tp: TopicPartition, offset: int) -> None:
        state = self._partitions.get(tp)
        if state is not None:
            state.finished.add(offset)

    def pending(self, tp: TopicPartition | None = None) -> int:
        states = (
            [self._partitions[tp]]
            if tp in self._partitions
            else ([] if tp is not None else list(self._partitions.values()))
        )
        return sum(len(s.in_flight) - len(s.finished) for s in states)

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets that advanced since the last :meth:`mark_committed`."""
        result = {}
        for tp, state in self._partitions.items():
            while state.in_flight and state.in_flight[0] in state.finished:
                state.finished.discard(heapq.heappop(state.in_flight))
            if state.next_offset is None:
                continue
            offset = state.in_flight[0] if state.in_flight else state.next_offset
            if offset != self._committed.get(tp):
                result[tp] = offset
        return result

    @property
    def committed(self) -> dict[TopicPartition, int]:
        return dict(self._committed)

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tp: TopicPartition) -> None:
        self._partitions.pop(tp, None)
        self._committed.pop(tp, None)


async def commit_finished(
    consumer: AIOKafkaConsumer, tracker: OffsetTracker, group: str, stage: str
) -> None:
    """Commit the finished prefix of every partition still assigned; export the lag."""
    offsets = {tp: off for tp, off in tracker.committable().items() if tp in consumer.assignment()}
    if not offsets:
        return
    try:
        await consumer.commit(offsets)
        tracker.mark_committed(offsets)
        export_lag(consumer, group, tracker.committed)
    except (CommitFailedError, KafkaError) as exc:
        log.warning("%s: commit failed (%s); will retry", stage, exc)
