"""The one stage runtime: Kafka clients, decoding at the edge, publishing, commits,
rebalances, health endpoints and graceful shutdown, for every stage.

A stage is a plain class that declares its consumer group, its inputs (topic and message
type) and its processing step; it never touches a Kafka client. Two shapes:

- :class:`BatchStage` (frontier, dedup, parser, sink): ``process(batch) -> outputs``. The
  runtime consumes a bounded batch, publishes what the step returned, waits for every
  acknowledgement, then commits the batch.
- :class:`StreamStage` (fetcher, delay): records are admitted one by one and finish out of
  order (requests, timers); the stage reports each finished record with its outputs, and
  the runtime commits only the finished prefix of each partition (:class:`OffsetTracker`).

Delivery is at least once: an offset is committed only after what its record produced is
acknowledged by the broker. A record that does not decode into its topic's type goes to
the DLQ with the reason, once, here; the stage never sees it. A record whose processing
raises is isolated and dead-lettered after a few attempts; outages are waited out
(:mod:`.poison`). On SIGTERM a stage finishes within ``SHUTDOWN_GRACE`` and a static
member leaves its group (:mod:`.membership`).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import logging
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from . import metrics
from .config import Settings
from .control import ControlFollower, CrawlStates
from .errors import ReasonedError, StageCannotRun
from .kafka import export_lag, kafka_reachable, make_consumer, make_producer, stop_consumer
from .membership import consumer_options, remove_static_member
from .messages import (
    Attempt,
    ControlState,
    DeadLetterRecord,
    Message,
    check_message,
    decode_json,
    encode,
    encode_json,
)
from .offsets import OffsetTracker, commit_finished
from .poison import (
    OutputTooLarge,
    attempts_of,
    describe,
    outlasting_outages,
    poison_detail,
    poison_reason,
)
from .shutdown import Deadline, run_until_deadline
from .topics import DLQ, MAX_MESSAGE_BYTES, group_id, topic_name

log = logging.getLogger(__name__)

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"
M = TypeVar("M", bound=Message)


class DeadLetter(ReasonedError):
    """Raised while decoding or handling one record: it goes to the DLQ with this reason."""


@dataclass(frozen=True, slots=True)
class Output:
    """One message to produce. ``partition`` pins it; otherwise the key decides."""

    topic: str
    value: Message
    key: bytes | None = None
    partition: int | None = None


@dataclass(slots=True)
class Received(Generic[M]):
    """A decoded record: the typed message, and the record it came from (for offsets and
    dead letters)."""

    record: Record
    message: M

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)


Decode: TypeAlias = Callable[[bytes | None], Message]

# The producer refuses a record over MAX_MESSAGE_BYTES (key and framing included): an
# output that large is refused before publishing, and its input dead-lettered.
MAX_OUTPUT_BYTES = MAX_MESSAGE_BYTES - 64 * 1024


@dataclass(frozen=True)
class Input:
    """A topic a stage reads (by suffix: the prefix is configuration) and how its values
    become messages."""

    suffix: str
    decode: Decode


def json_input(suffix: str, kind: type[Message]) -> Input:
    """The usual input: a JSON value of one message type, validated while it is parsed,
    then checked for what the type cannot say (:func:`check_message`)."""
    decoder = msgspec.json.Decoder(kind)

    def decode(value: bytes | None) -> Message:
        if not value:
            raise DeadLetter("empty_value", "the record has no value")
        message: Message = decode_json(decoder, value, suffix)
        check_message(message)
        return message

    return Input(suffix, decode)


def dead_letter(
    settings: Settings,
    stage: str,
    record: Record,
    reason: str,
    detail: str,
    history: Sequence[Attempt] = (),
) -> Output:
    """The DLQ record for ``record``: why, where, and the original payload (cut to
    :data:`MAX_DLQ_PAYLOAD` bytes, so that the dead letter of any record fits crawl.dlq)."""
    payload = record.value or b""
    truncated = len(payload) > MAX_DLQ_PAYLOAD
    text, encoding = _payload_text(payload[:MAX_DLQ_PAYLOAD], truncated)
    raw_key = record.key[:MAX_DLQ_KEY] if record.key is not None else None
    key = raw_key.decode("utf-8", "replace") if raw_key is not None else None
    value = DeadLetterRecord(
        stage=stage,  # type: ignore[arg-type]
        reason=reason,
        detail=detail[:4096],
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key,
        payload=text,
        payload_encoding=encoding,  # type: ignore[arg-type]
        payload_truncated=truncated,
        payload_bytes=len(payload) if truncated else None,
        failed_at=time.time(),
        history=list(history),
    )
    metrics.DLQ_RECORDS.labels(stage, reason).inc()
    log.warning(
        "%s: dead letter (%s) from %s[%d]@%d: %s",
        stage,
        reason,
        record.topic,
        record.partition,
        record.offset,
        detail[:300],
    )
    return Output(topic_name(settings.topic_prefix, DLQ), value, key=raw_key)


# A dead letter must fit crawl.dlq (8 MiB) whatever the record was: a payload beyond this is
# cut (the record itself stays in its topic, at the partition and offset the letter names).
MAX_DLQ_PAYLOAD = 4 * 1024 * 1024
MAX_DLQ_KEY = 1024


def _payload_text(payload: bytes, cut: bool) -> tuple[str, str]:
    """The payload as UTF-8 text, or as base64 when it is not UTF-8 or when JSON would
    escape so much of it (control characters take six bytes each) that base64 is smaller.
    In a ``cut`` payload, a multi-byte character the cut split is left out."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(payload, final=not cut)
    except UnicodeDecodeError:
        text = ""
    else:
        if len(encode_json(text)) <= len(payload) * 4 // 3 + 4:
            return text, "utf-8"
    return base64.b64encode(payload).decode("ascii"), "base64"


class Publisher:
    """Sends outputs and waits for every acknowledgement; retries a batch until it lands."""

    def __init__(self, producer: AIOKafkaProducer, stage: str) -> None:
        self._producer = producer
        self._stage = stage

    async def publish(self, outputs: Sequence[Output], payloads: list[bytes] | None = None) -> None:
        """Publish ``outputs`` (already encoded as ``payloads``, if given)."""
        if not outputs:
            return
        payloads = payloads if payloads is not None else [encode(out.value) for out in outputs]
        delay = 0.5
        while True:
            try:
                await self._send_all(outputs, payloads)
                return
            except KafkaError as exc:
                # Never drop: the batch is resent (the producer is idempotent) until it lands.
                log.error(
                    "%s: publishing %d records failed (%s); retrying in %.1fs",
                    self._stage,
                    len(outputs),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _send_all(self, outputs: Sequence[Output], payloads: list[bytes]) -> None:
        send = self._producer.send
        futures = [
            await send(out.topic, payload, key=out.key, partition=out.partition)
            for out, payload in zip(outputs, payloads, strict=True)
        ]
        await asyncio.gather(*futures)
        for out in outputs:
            metrics.MESSAGES_OUT.labels(self._stage, out.topic).inc()


class Stage(ABC):
    """What every stage declares. Hooks default to doing nothing."""

    name: ClassVar[str]
    group: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Every crawl's state (crawl.control), kept current by the runtime.
        self.crawls = CrawlStates()
        self.crawls.listen(self.on_control)

    @abstractmethod
    def inputs(self) -> tuple[Input, ...]: ...

    def on_control(self, crawl_id: str, state: ControlState) -> None:
        """A crawl's state changed (paused, resumed, cancelled): a stage holding URLs of
        it in memory acts on them now."""

    async def start(self) -> None:
        """Open connections the stage needs (a database, an HTTP session)."""

    async def stop(self) -> None:
        """Close what :meth:`start` opened."""

    async def on_assigned(self, partitions: Iterable[TopicPartition]) -> None:
        """Rebuild per-partition state before the first record of a new partition."""

    async def on_revoked(self, partitions: Iterable[TopicPartition]) -> None:
        """Forget per-partition state of partitions another consumer now owns."""

    async def ready(self) -> bool:
        return True

    def topic(self, suffix: str) -> str:
        return topic_name(self.settings.topic_prefix, suffix)

    def dead_letter(
        self, record: Record, reason: str, detail: str, history: Sequence[Attempt] = ()
    ) -> Output:
        return dead_letter(self.settings, self.name, record, reason, detail, history)


class BatchStage(Stage):
    """Records in, outputs out, a bounded batch at a time."""

    @abstractmethod
    async def process(self, batch: list[Received[Any]]) -> list[Output]: ...


class StreamContext(ABC):
    """What a :class:`StreamStage` may ask of the runtime."""

    @abstractmethod
    async def complete(self, items: Sequence[Received[Any]], outputs: Sequence[Output]) -> None:
        """Publish ``outputs``, then count ``items`` as finished (their offsets may commit)."""

    @abstractmethod
    def complete_later(self, item: Received[Any], outputs: Sequence[Output]) -> None:
        """:meth:`complete` in a task of its own, for callers that cannot wait."""

    @abstractmethod
    def spawn(
        self, work: Coroutine[Any, Any, None], partitions: Iterable[TopicPartition] = ()
    ) -> None:
        """Run ``work`` in a task the runtime waits for before giving ``partitions`` up."""

    @abstractmethod
    def spawn_record(
        self, item: Received[Any], work: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        """:meth:`spawn` the work that finishes ``item``; if it raises, it is tried again,
        and after ``POISON_ATTEMPTS`` the record goes to the DLQ (never stranded)."""


class StreamStage(Stage):
    """Records admitted one at a time, finished out of order.

    The runtime reads while :meth:`room` is positive and hands each decoded record to
    :meth:`admit`; :meth:`run` is the stage's own loop (dispatching requests, releasing
    timers). Finished records are reported through ``self.ctx``. On a rebalance or at
    shutdown, :meth:`hand_back` must finish (or move elsewhere) every record of the
    partitions given that is not in flight, so their offsets can commit.
    """

    ctx: StreamContext

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.wakeup = asyncio.Event()

    @abstractmethod
    def room(self) -> int: ...

    @abstractmethod
    def admit(self, item: Received[Any]) -> None: ...

    @abstractmethod
    async def run(self, stop: asyncio.Event) -> None: ...

    def hand_back(self, partitions: set[TopicPartition] | None) -> None:
        """Give up the records of ``partitions`` (all when None) that are not in flight."""

    async def before_release(self, partitions: set[TopicPartition]) -> None:
        """Last step before partitions go: their work is finished and committed."""


# -- the runtime ------------------------------------------------------------------------


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


class _Edge:
    """Decodes each record into its topic's message type, or into a dead letter."""

    def __init__(self, stage: Stage) -> None:
        self._stage = stage
        self.decoders = {stage.topic(spec.suffix): spec.decode for spec in stage.inputs()}

    def decode(self, record: Record) -> Received[Any] | Output:
        try:
            return Received(record, self.decoders[record.topic](record.value))
        except ReasonedError as exc:  # DeadLetter, or a decoder's own Undecodable
            metrics.MESSAGES_FAILED.labels(self._stage.name, exc.reason).inc()
            return self._stage.dead_letter(record, exc.reason, exc.detail)


class _Loop(ConsumerRebalanceListener, ABC):  # type: ignore[misc]
    def __init__(self, stage: Stage, consumer: AIOKafkaConsumer, publisher: Publisher) -> None:
        self.stage = stage
        self.consumer = consumer
        self.publisher = publisher
        self.edge = _Edge(stage)

    @abstractmethod
    async def run(self, stop: asyncio.Event) -> None: ...

    async def commit_finished(self) -> None:
        """Commit what is finished, after :meth:`run` was cut short by the deadline."""

    def poisoned(self, record: Record, exc: BaseException) -> Output:
        reason = poison_reason(exc)
        metrics.MESSAGES_FAILED.labels(self.stage.name, reason).inc()
        detail = poison_detail(exc, self.stage.settings.poison_attempts)
        return self.stage.dead_letter(record, reason, detail)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.stage.on_assigned(assigned)


class _BatchLoop(_Loop):
    """Batches are processed, published and committed under one lock that the rebalance
    callbacks take too (as a Java consumer's poll loop runs them): a stage never sees a
    revocation or an assignment in the middle of a batch. A batch fetched across a
    rebalance is not processed but read again, under the assignment now in force."""

    stage: BatchStage

    def __init__(self, stage: BatchStage, consumer: AIOKafkaConsumer, publisher: Publisher):
        super().__init__(stage, consumer, publisher)
        self.committed: dict[TopicPartition, int] = {}
        self._lock = asyncio.Lock()
        self._generation = 0

    async def run(self, stop: asyncio.Event) -> None:
        batch_size = self.stage.settings.batch_size
        while not stop.is_set():
            generation = self._generation
            batches = await self.consumer.getmany(timeout_ms=500, max_records=batch_size)
            if not batches:
                continue
            async with self._lock:
                if generation != self._generation:
                    self._refetch(batches)
                    continue
                await self._handle(batches)

    def _refetch(self, batches: dict[TopicPartition, list[Record]]) -> None:
        """A rebalance came while this batch was fetched: it is read again, under the new
        assignment (a partition now owned elsewhere is read from its committed offset)."""
        assigned = self.consumer.assignment()
        for tp, records in batches.items():
            if records and tp in assigned:
                self.consumer.seek(tp, records[0].offset)
        log.info("%s: a rebalance came during the fetch; batch read again", self.stage.name)

    async def _handle(self, batches: dict[TopicPartition, list[Record]]) -> None:
        stage = self.stage
        good: list[Received[Any]] = []
        outputs: list[Output] = []
        for records in batches.values():
            metrics.MESSAGES_IN.labels(stage.name).inc(len(records))
            for record in records:
                decoded = self.edge.decode(record)
                if isinstance(decoded, Output):
                    outputs.append(decoded)
                else:
                    good.append(decoded)
        payloads = [encode(out.value) for out in outputs]
        if good:
            processed, encoded = await self._process(good)
            outputs.extend(processed)
            payloads.extend(encoded)
        await self.publisher.publish(outputs, payloads)
        offsets = {tp: batch[-1].offset + 1 for tp, batch in batches.items() if batch}
        if await self._commit(offsets):
            self.committed.update(offsets)
        export_lag(self.consumer, stage.group, self.committed)

    async def _outputs(self, batch: list[Received[Any]]) -> tuple[list[Output], list[bytes]]:
        """The stage's outputs for ``batch``, encoded; one over the size limit raises."""
        outputs = await self.stage.process(batch)
        payloads = [encode(out.value) for out in outputs]
        for out, payload in zip(outputs, payloads, strict=True):
            if len(payload) > MAX_OUTPUT_BYTES:
                raise OutputTooLarge(f"a {out.topic} message of {len(payload)} bytes")
        return outputs, payloads

    async def _process(self, batch: list[Received[Any]]) -> tuple[list[Output], list[bytes]]:
        """The stage's outputs for ``batch``, encoded; if it raises (not an outage), the
        batch is run again record by record, so the record(s) at fault go to the DLQ and
        the others are processed."""
        stage = self.stage
        try:
            return await outlasting_outages(stage.name, partial(self._outputs, batch))
        except StageCannotRun:
            raise
        except Exception as exc:
            log.warning(
                "%s: a batch of %d raised %r; isolating the record at fault",
                stage.name,
                len(batch),
                exc,
            )
        outputs: list[Output] = []
        payloads: list[bytes] = []
        for item in batch:
            result = await attempts_of(
                f"{stage.name} {describe(item.record)}",
                partial(self._outputs, [item]),
                stage.settings.poison_attempts,
            )
            if isinstance(result, BaseException):
                dead = self.poisoned(item.record, result)
                outputs.append(dead)
                payloads.append(encode(dead.value))
            else:
                outputs.extend(result[0])
                payloads.extend(result[1])
        return outputs, payloads

    async def _commit(self, offsets: dict[TopicPartition, int]) -> bool:
        try:
            await self.consumer.commit(offsets)
            return True
        except CommitFailedError as exc:
            # The partitions moved during a rebalance; their new owner reprocesses the
            # batch, which every downstream stage tolerates (idempotent by design).
            log.warning(
                "%s: commit failed after a rebalance (%s); records will be redelivered",
                self.stage.name,
                exc,
            )
            return False

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self._lock:
            self._generation += 1
            await self.stage.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        async with self._lock:
            self._generation += 1
            await self.stage.on_assigned(assigned)


class _StreamLoop(_Loop, StreamContext):
    stage: StreamStage
    COMMIT_INTERVAL = 1.0
    # When the last task in flight ends, the finished offsets are committed at once (the
    # end of a crawl is seen sooner), but not more often than this.
    IDLE_COMMIT_GAP = 0.1
    REVOKE_DRAIN = 20.0

    def __init__(self, stage: StreamStage, consumer: AIOKafkaConsumer, publisher: Publisher):
        super().__init__(stage, consumer, publisher)
        self.tracker = OffsetTracker()
        self.tasks: dict[asyncio.Task[None], frozenset[TopicPartition]] = {}
        self._idle = asyncio.Event()
        stage.ctx = self

    # -- StreamContext ---------------------------------------------------------------

    async def complete(self, items: Sequence[Received[Any]], outputs: Sequence[Output]) -> None:
        await self._complete_records([item.record for item in items], outputs)

    def complete_later(self, item: Received[Any], outputs: Sequence[Output]) -> None:
        self._complete_record_later(item.record, outputs)

    async def _complete_records(self, records: Sequence[Record], outputs: Sequence[Output]) -> None:
        await self.publisher.publish(outputs)
        for record in records:
            self.tracker.finished(TopicPartition(record.topic, record.partition), record.offset)
        if not self.tasks:  # finished outside any task (the delay stage's releases)
            self._idle.set()

    def _complete_record_later(self, record: Record, outputs: Sequence[Output]) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self.spawn(self._complete_records([record], outputs), (tp,))

    def spawn(
        self, work: Coroutine[Any, Any, None], partitions: Iterable[TopicPartition] = ()
    ) -> None:
        task = asyncio.create_task(work)
        self.tasks[task] = frozenset(partitions)
        task.add_done_callback(self._task_done)

    def spawn_record(
        self, item: Received[Any], work: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        self.spawn(self._finish_or_dead_letter(item, work), (item.tp,))

    async def _finish_or_dead_letter(
        self, item: Received[Any], work: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        what = f"{self.stage.name} {describe(item.record)}"
        failure = await attempts_of(what, work, self.stage.settings.poison_attempts)
        if failure is not None:
            await self._complete_records([item.record], [self.poisoned(item.record, failure)])

    def _admit(self, item: Received[Any]) -> None:
        """Hand ``item`` to the stage; one that makes ``admit`` raise on every attempt goes
        to the DLQ, so its offset can commit."""
        failure: Exception | None = None
        for attempt in range(1, self.stage.settings.poison_attempts + 1):
            try:
                self.stage.admit(item)
                return
            except Exception as exc:
                failure = exc
                log.warning(
                    "%s: admitting %s raised %r (attempt %d)",
                    self.stage.name,
                    describe(item.record),
                    exc,
                    attempt,
                )
        assert failure is not None
        self._complete_record_later(item.record, [self.poisoned(item.record, failure)])

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.pop(task, None)
        self.stage.wakeup.set()
        if not self.tasks:
            self._idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: unexpected error: %r", self.stage.name, task.exception())

    # -- loops -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        committer = asyncio.create_task(self._commit_every(stop))
        try:
            await asyncio.gather(self._consume(stop), self.stage.run(stop))
            self.stage.hand_back(None)
            # Leaves time, within the grace, to commit and leave the group after it.
            await self._drain(self.stage.settings.shutdown_grace / 2)
            await self._commit()
        finally:
            committer.cancel()

    async def commit_finished(self) -> None:
        await self._commit()

    async def _consume(self, stop: asyncio.Event) -> None:
        stage, tracker = self.stage, self.tracker
        batch_size = stage.settings.batch_size
        while not stop.is_set():
            room = stage.room()
            if room <= 0:
                await asyncio.sleep(0.05)
                continue
            batches = await self.consumer.getmany(timeout_ms=200, max_records=min(room, batch_size))
            for tp, records in batches.items():
                metrics.MESSAGES_IN.labels(stage.name).inc(len(records))
                for record in records:
                    tracker.started(tp, record.offset)
                    decoded = self.edge.decode(record)
                    if isinstance(decoded, Output):
                        self._complete_record_later(record, [decoded])
                    else:
                        self._admit(decoded)
            if batches:
                stage.wakeup.set()

    async def _commit_every(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=self.COMMIT_INTERVAL)
            self._idle.clear()
            await self._commit()
            await asyncio.sleep(self.IDLE_COMMIT_GAP)

    async def _commit(self) -> None:
        await commit_finished(self.consumer, self.tracker, self.stage.group, self.stage.name)

    async def _drain(self, timeout: float, only: set[TopicPartition] | None = None) -> None:
        waiting = [
            task
            for task, partitions in self.tasks.items()
            if only is None or not partitions or partitions & only
        ]
        if waiting:
            log.info("%s: finishing %d tasks in flight", self.stage.name, len(waiting))
            await asyncio.wait(waiting, timeout=timeout)

    async def on_partitions_revoked(self, revoked: Any) -> None:
        lost = set(revoked)
        self.stage.hand_back(lost)
        await self._drain(self.REVOKE_DRAIN, only=lost)
        await self._commit()
        await self.stage.before_release(lost)
        await self.stage.on_revoked(lost)
        for tp in lost:
            self.tracker.forget(tp)


async def run_stage(stage: Stage, stop: asyncio.Event) -> None:
    """Run ``stage`` until ``stop`` is set; then finish or hand back what is in hand,
    commit, leave the group and return, all within ``SHUTDOWN_GRACE`` seconds."""
    settings = stage.settings
    # The stage first: one that cannot start (refused credentials) leaves no client unclosed.
    await stage.start()
    # Every crawl's state before the first record: a restarted stage keeps them.
    control = ControlFollower(settings, stage.crawls)
    try:
        await control.start(missing_ok=True)
    except BaseException:
        await control.stop()
        await stage.stop()
        raise
    producer = make_producer(settings)
    consumer = make_consumer(
        settings, stage.group, max_poll_records=settings.batch_size, **consumer_options(settings)
    )
    publisher = Publisher(producer, stage.name)
    loop: _Loop
    if isinstance(stage, StreamStage):
        loop = _StreamLoop(stage, consumer, publisher)
    elif isinstance(stage, BatchStage):
        loop = _BatchLoop(stage, consumer, publisher)
    else:
        raise TypeError(f"{type(stage).__name__} is neither a BatchStage nor a StreamStage")
    await producer.start()
    await consumer.start()
    topics = list(loop.edge.decoders)
    consumer.subscribe(topics, listener=loop)

    async def ready() -> bool:
        return await kafka_reachable(consumer) and await stage.ready()

    health = metrics.HealthServer(settings.metrics_port, ready)
    await health.start()
    log.info(
        "%s: consuming %s as group %s%s",
        stage.name,
        ", ".join(topics),
        group_id(settings.topic_prefix, stage.group),
        f" (static member {settings.instance_id})" if settings.instance_id else "",
    )
    deadline = Deadline(settings.shutdown_grace)
    try:
        await run_until_deadline(stage.name, loop.run(stop), stop, deadline, loop.commit_finished)
    finally:
        await health.stop()
        await deadline.bounded(f"{stage.name}: closing the consumer", stop_consumer(consumer))
        await deadline.bounded(f"{stage.name}: closing the control reader", control.stop())
        await remove_static_member(settings, stage.group, max(0.5, deadline.left()))
        await deadline.bounded(f"{stage.name}: flushing the producer", producer.stop())
        await deadline.bounded(f"{stage.name}: stopping", stage.stop())
        log.info("%s: stopped", stage.name)
