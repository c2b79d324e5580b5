"""The delay stage: crawl.retry in, crawl.fetch out, each record at its due time.

It never blocks a partition and never busy-loops: the runtime reads while the buffer has
room (``delay_max_held``), and the stage sleeps until the earliest due time or a new
record. Partition p of crawl.retry goes back to partition p of crawl.fetch: both are keyed
by host, so a host keeps its fetcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiokafka import TopicPartition

from ..core import metrics
from ..core.config import Settings
from ..core.messages import ControlState, Retry, fetch_from_retry, tallies
from ..core.runtime import Input, Output, Received, StreamStage, json_input
from ..core.topics import DELAY_GROUP, EVENTS, FETCH, RETRY
from .logic import DelayBuffer

_MAX_SLEEP = 0.5


class DelayStage(StreamStage):
    name = "delay"
    group = DELAY_GROUP

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.buffer: DelayBuffer[Received[Retry]] = DelayBuffer(settings.delay_max_held)

    def inputs(self) -> tuple[Input, ...]:
        return (json_input(RETRY, Retry),)

    def room(self) -> int:
        return self.buffer.room

    def admit(self, item: Received[Any]) -> None:
        self.buffer.add(item.message.due_at, item)
        metrics.DELAY_HELD.set(len(self.buffer))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.release(time.time())
            due = self.buffer.next_due()
            sleep = _MAX_SLEEP if due is None else min(_MAX_SLEEP, max(0.0, due - time.time()))
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=sleep)

    async def release(self, now: float) -> None:
        due = self.buffer.pop_due(now)
        if due:
            # A cancelled crawl's retries end here (counted); a paused crawl's go back to
            # the fetcher, which holds them again.
            going = [item for item in due if self.crawls.verdict(item.message.crawl_id) != "drop"]
            outputs = [self.output(item) for item in going]
            dropped = len(due) - len(going)
            if dropped:
                metrics.URLS_CANCELLED.labels(self.name).inc(dropped)
                counts: dict[tuple[str, str], int] = {}
                for item in due:
                    if self.crawls.verdict(item.message.crawl_id) == "drop":
                        key = (item.message.crawl_id, "cancelled")
                        counts[key] = counts.get(key, 0) + 1
                outputs.extend(
                    Output(self.topic(EVENTS), tally, key=tally.crawl_id.encode())
                    for tally in tallies("delay", counts, now)
                )
            await self.ctx.complete(due, outputs)
            metrics.DELAY_HELD.set(len(self.buffer))

    def output(self, item: Received[Retry]) -> Output:
        return Output(
            self.topic(FETCH),
            fetch_from_retry(item.message),
            key=item.record.key,
            partition=item.record.partition,
        )

    def on_control(self, crawl_id: str, state: ControlState) -> None:
        """A resumed crawl's paused URLs go back to the fetcher now, not after their
        ``PAUSE_RECHECK``; a cancelled crawl's retries are dropped now (see release)."""
        if state == "paused":
            return

        def matches(item: Received[Retry]) -> bool:
            message = item.message
            return message.crawl_id == crawl_id and (
                state == "cancelled" or message.retry_reason == "paused"
            )

        if self.buffer.advance_where(matches, time.time()):
            self.wakeup.set()

    def hand_back(self, partitions: set[TopicPartition] | None) -> None:
        # Held records were never committed: the partition's next owner reads them again.
        if partitions is not None:
            self.buffer.drop_where(lambda item: item.tp in partitions)
