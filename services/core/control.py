"""Crawl control: each crawl's state (active, paused, cancelled), as every stage sees it.

``streamcrawl pause|resume|cancel CRAWL_ID`` writes a :class:`Control` record to the
compacted ``crawl.control`` topic, keyed by crawl id, so the last record of each crawl is
its state for as long as the topic lives. Every stage keeps the states in a
:class:`CrawlStates` table (small: one entry per crawl ever controlled). The
:class:`ControlFollower` fills it: at start it reads the topic from the beginning up to
its end offsets before the stage takes its first record (so a restarted stage keeps the
states), then follows it in the background outside any consumer group (every process
reads every partition).

What a state means for a URL (:func:`verdict`): ``active`` (the default for a crawl never
controlled) goes on; ``paused`` waits in crawl.retry, due again after ``PAUSE_RECHECK``
seconds, and is checked again then (nothing held in memory); ``cancelled`` is dropped and
counted. ``cancelled`` is final: a later record for that crawl does not change it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Literal

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from .config import Settings
from .kafka import make_producer, make_reader, stop_consumer
from .messages import Control, ControlState, encode
from .topics import CONTROL, topic_name

log = logging.getLogger(__name__)

ACTIVE: ControlState = "active"
PAUSED: ControlState = "paused"
CANCELLED: ControlState = "cancelled"

Verdict = Literal["go", "hold", "drop"]

_decoder = msgspec.json.Decoder(Control)


class ControlRefused(ValueError):
    """A command that cannot apply (resuming a cancelled crawl)."""


class CrawlStates:
    """Crawl id -> its last :class:`Control` record; a crawl never controlled is active."""

    def __init__(self) -> None:
        self._records: dict[str, Control] = {}
        self._listeners: list[Callable[[str, ControlState], None]] = []

    def __len__(self) -> int:
        return len(self._records)

    def state(self, crawl_id: str) -> ControlState:
        record = self._records.get(crawl_id)
        return ACTIVE if record is None else record.state

    def record(self, crawl_id: str) -> Control | None:
        return self._records.get(crawl_id)

    def states(self) -> dict[str, ControlState]:
        return {crawl_id: record.state for crawl_id, record in sorted(self._records.items())}

    def listen(self, listener: Callable[[str, ControlState], None]) -> None:
        """Call ``listener(crawl_id, state)`` for every change applied from now on."""
        self._listeners.append(listener)

    def apply(self, record: Control) -> bool:
        """Apply one record read from crawl.control; True when the state changed. A
        cancelled crawl stays cancelled."""
        current = self.state(record.crawl_id)
        if current == CANCELLED:
            return False
        self._records[record.crawl_id] = record
        if current == record.state:
            return False
        for listener in self._listeners:
            listener(record.crawl_id, record.state)
        return True

    def verdict(self, crawl_id: str) -> Verdict:
        return verdict(self.state(crawl_id))


def verdict(state: ControlState) -> Verdict:
    """What a stage does with a URL of a crawl in ``state``."""
    if state == CANCELLED:
        return "drop"
    if state == PAUSED:
        return "hold"
    return "go"


def command_state(command: str) -> ControlState:
    """The state a CLI command asks for: pause, resume or cancel."""
    states: dict[str, ControlState] = {"pause": PAUSED, "resume": ACTIVE, "cancel": CANCELLED}
    try:
        return states[command]
    except KeyError:
        raise ValueError(f"unknown control command {command!r}") from None


def check_transition(current: ControlState, wanted: ControlState, crawl_id: str) -> None:
    """Refuse what cannot apply: a cancelled crawl is cancelled for good."""
    if current == CANCELLED and wanted != CANCELLED:
        raise ControlRefused(f"crawl {crawl_id!r} is cancelled; a cancelled crawl stays cancelled")


def decode_control(key: bytes | None, value: bytes | None) -> Control | None:
    """One crawl.control record, or None for one that is not ours (logged, skipped): a
    tombstone, garbage, a key that is not the record's crawl id."""
    if value is None:
        return None
    try:
        record = _decoder.decode(value)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        log.warning("crawl.control: a record that is not a Control skipped: %s", exc)
        return None
    if key is not None and key != record.crawl_id.encode():
        log.warning("crawl.control: key %r is not crawl id %r; skipped", key, record.crawl_id)
        return None
    return record


class ControlFollower:
    """Keeps a :class:`CrawlStates` table current from crawl.control."""

    # How long the broker holds an empty fetch: a command produced meanwhile is answered at
    # once (the fetch completes on the first byte), so this sets only how often an idle
    # follower asks. At 100 ms, nine stages' followers cost the broker 0.07 of a core idle
    # (bench/RESULTS.md, "idle pipeline").
    POLL_MS = 500

    def __init__(self, settings: Settings, states: CrawlStates | None = None) -> None:
        self.settings = settings
        self.states = states if states is not None else CrawlStates()
        self.topic = topic_name(settings.topic_prefix, CONTROL)
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.caught_up = False

    async def start(self, timeout: float = 60.0, missing_ok: bool = False) -> None:
        """Read crawl.control up to its current end, then follow it in the background.

        A topic that does not exist (``streamcrawl topics create`` makes it) raises, or
        with ``missing_ok`` is looked for again in the background (logged)."""
        self._consumer = make_reader(
            self.settings,
            enable_auto_commit=False,
            fetch_max_wait_ms=self.POLL_MS,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        partitions = await self._partitions(5.0 if missing_ok else timeout)
        if not partitions:
            if not missing_ok:
                raise TimeoutError(f"topic {self.topic} does not exist (streamcrawl topics create)")
            log.error("crawl control: %s does not exist yet; looking for it", self.topic)
            self._task = asyncio.create_task(self._follow(timeout))
            return
        await self._catch_up(partitions, timeout)
        self._task = asyncio.create_task(self._follow(timeout))

    async def _catch_up(self, partitions: list[TopicPartition], timeout: float) -> None:
        assert self._consumer is not None
        self._consumer.assign(partitions)
        # Explicit offsets, not seek_to_beginning: a position to reset is only resolved by
        # aiokafka's next fetch cycle (fetch_max_wait_ms, 0.5 s at every stage's start).
        beginnings = await self._consumer.beginning_offsets(partitions)
        for tp, offset in beginnings.items():
            self._consumer.seek(tp, offset)
        ends = await self._consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout
        while not await self._at(ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.topic} not read to its end in {timeout:.0f}s")
            await self._poll()
        self.caught_up = True
        log.info("crawl control: %d crawls with a state %s", len(self.states), self.states.states())

    async def _at(self, ends: dict[TopicPartition, int]) -> bool:
        assert self._consumer is not None
        for tp, end in ends.items():
            if await self._consumer.position(tp) < end:
                return False
        return True

    async def _partitions(self, timeout: float) -> list[TopicPartition]:
        assert self._consumer is not None
        deadline = time.monotonic() + timeout
        while True:
            found: set[int] | None = None
            with contextlib.suppress(KafkaError):
                # The whole cluster's metadata (a reader's own covers assigned topics only).
                cluster = await self._consumer._client.fetch_all_metadata()
                found = cluster.partitions_for_topic(self.topic)
            if found:
                return [TopicPartition(self.topic, p) for p in sorted(found)]
            if time.monotonic() > deadline:
                return []
            await asyncio.sleep(0.5)

    async def _poll(self) -> None:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=self.POLL_MS * 5)
        for records in batches.values():
            for record in records:
                control = decode_control(record.key, record.value)
                if control is not None and self.states.apply(control):
                    log.info("crawl control: crawl %s is %s", control.crawl_id, control.state)

    async def _follow(self, timeout: float) -> None:
        while True:
            try:
                if not self.caught_up:
                    partitions = await self._partitions(timeout)
                    if partitions:
                        await self._catch_up(partitions, timeout)
                    continue
                await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an outage: keep following
                log.warning("crawl control: reading %s failed (%r); retrying", self.topic, exc)
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await stop_consumer(self._consumer)
            self._consumer = None


async def read_states(settings: Settings, timeout: float = 30.0) -> CrawlStates:
    """Every crawl's state, read once from crawl.control (for the CLI)."""
    follower = ControlFollower(settings)
    await follower.start(timeout)
    await follower.stop()
    return follower.states


def _who() -> str:
    try:
        user = os.getlogin()
    except OSError:
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"[:256]


def control_record(crawl_id: str, state: ControlState, at: float | None = None) -> Control:
    """A valid :class:`Control` record (a crawl id the types refuse raises ValueError)."""
    record = Control(
        crawl_id=crawl_id, state=state, at=time.time() if at is None else at, by=_who()
    )
    try:
        return _decoder.decode(encode(record))
    except msgspec.ValidationError as exc:
        raise ValueError(f"crawl id {crawl_id!r}: {exc}") from None


async def send_control(
    settings: Settings, crawl_ids: Iterable[str], state: ControlState
) -> list[Control]:
    """Write ``state`` for each crawl to crawl.control and wait until the broker has it
    (acks=all). A cancelled crawl cannot be paused or resumed (:class:`ControlRefused`)."""
    crawl_ids = list(crawl_ids)
    for crawl_id in crawl_ids:
        control_record(crawl_id, state)  # validates the id before anything is sent
    current = await read_states(settings)
    for crawl_id in crawl_ids:
        check_transition(current.state(crawl_id), state, crawl_id)
    producer = make_producer(settings)
    await producer.start()
    sent = []
    try:
        topic = topic_name(settings.topic_prefix, CONTROL)
        for crawl_id in crawl_ids:
            record = control_record(crawl_id, state)
            await producer.send_and_wait(topic, encode(record), key=crawl_id.encode())
            sent.append(record)
    finally:
        await producer.stop()
    return sent
