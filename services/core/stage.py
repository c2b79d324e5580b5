"""The loop every batch stage runs: consume a batch, process it, publish, commit.

Delivery is at least once: offsets are committed only after every record the
batch produced (including dead letters) is acknowledged by the broker. A batch
that cannot be published is retried, never skipped, so a broker outage slows the
pipeline down instead of losing data. Batches are bounded (``batch_size``), so
memory is too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError

from . import metrics
from .config import Settings
from .errors import ReasonedError
from .kafka import export_lag, kafka_reachable, make_consumer, make_producer
from .schemas import SchemaError, validate
from .topics import DLQ, topic_name

log = logging.getLogger(__name__)

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


@dataclass(frozen=True)
class Output:
    """One record to produce. ``partition`` pins it; otherwise the key decides."""

    topic: str
    value: dict[str, Any]
    key: bytes | None = None
    partition: int | None = None


class DeadLetter(ReasonedError):
    """Raised while handling one record: it goes to the DLQ with this reason."""


def decode_json(record: Record, schema: str) -> dict[str, Any]:
    """Parse and validate a record value, or raise :class:`DeadLetter`."""
    if record.value is None:
        raise DeadLetter("empty_value", "the record has no value")
    try:
        document = json.loads(record.value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DeadLetter("invalid_json", str(exc)[:300]) from exc
    if not isinstance(document, dict):
        raise DeadLetter(
            "schema_violation", f"expected a JSON object, got {type(document).__name__}"
        )
    try:
        validate(schema, document)
    except SchemaError as exc:
        raise DeadLetter("schema_violation", str(exc)) from exc
    return document


def dead_letter(
    settings: Settings,
    stage: str,
    record: Record,
    reason: str,
    detail: str,
    history: list[dict[str, Any]] | None = None,
) -> Output:
    payload = record.value or b""
    try:
        text, encoding = payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(payload).decode("ascii"), "base64"
    key = record.key.decode("utf-8", "replace") if record.key is not None else None
    value: dict[str, Any] = {
        "stage": stage,
        "reason": reason,
        "detail": detail[:4096],
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": key,
        "payload": text,
        "payload_encoding": encoding,
        "failed_at": time.time(),
    }
    if history:
        value["history"] = history
    validate("dlq", value)
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
    return Output(topic_name(settings.topic_prefix, DLQ), value, key=record.key)


def encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Publisher:
    """Sends outputs and waits for every acknowledgement; retries a batch until it lands."""

    def __init__(self, producer: AIOKafkaProducer, stage: str) -> None:
        self._producer = producer
        self._stage = stage

    async def publish(self, outputs: Sequence[Output]) -> None:
        delay = 0.5
        while True:
            try:
                await self._send_all(outputs)
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

    async def _send_all(self, outputs: Sequence[Output]) -> None:
        futures = [
            await self._producer.send(
                out.topic, encode(out.value), key=out.key, partition=out.partition
            )
            for out in outputs
        ]
        if futures:
            await asyncio.gather(*futures)
        for out in outputs:
            metrics.MESSAGES_OUT.labels(self._stage, out.topic).inc()


class BatchStage(ABC):
    """The pure part of a stage: records in, outputs out. Runners own the I/O."""

    name: str
    group: str

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    def input_topics(self) -> tuple[str, ...]: ...

    @abstractmethod
    async def process(self, records: Sequence[Record]) -> list[Output]: ...

    async def start(self) -> None:
        """Open connections the stage needs (a database, for the sink)."""

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

    def dead_letter(self, record: Record, reason: str, detail: str) -> Output:
        return dead_letter(self.settings, self.name, record, reason, detail)

    def decode_all(
        self, records: Sequence[Record], schema: str
    ) -> tuple[list[tuple[Record, dict[str, Any]]], list[Output]]:
        """Records that parse and validate, and dead letters for those that do not."""
        good: list[tuple[Record, dict[str, Any]]] = []
        dead: list[Output] = []
        for record in records:
            try:
                good.append((record, decode_json(record, schema)))
            except DeadLetter as exc:
                dead.append(self.dead_letter(record, exc.reason, exc.detail))
        return good, dead


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stage: BatchStage) -> None:
        self._stage = stage

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._stage.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._stage.on_assigned(assigned)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run_batch_stage(stage: BatchStage, stop: asyncio.Event) -> None:
    """Run ``stage`` until ``stop`` is set; finish the batch in hand, commit, and return."""
    settings = stage.settings
    producer = make_producer(settings)
    consumer = make_consumer(settings, stage.group)
    await stage.start()
    await producer.start()
    await consumer.start()
    consumer.subscribe(list(stage.input_topics()), listener=_Rebalance(stage))

    async def ready() -> bool:
        return await kafka_reachable(consumer) and await stage.ready()

    health = metrics.HealthServer(settings.metrics_port, ready)
    await health.start()
    publisher = Publisher(producer, stage.name)
    log.info(
        "%s: consuming %s as group %s", stage.name, ", ".join(stage.input_topics()), stage.group
    )
    committed: dict[TopicPartition, int] = {}
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=500, max_records=settings.batch_size)
            records = [record for batch in batches.values() for record in batch]
            if not records:
                continue
            metrics.MESSAGES_IN.labels(stage.name).inc(len(records))
            outputs = await stage.process(records)
            await publisher.publish(outputs)
            if await _commit(consumer, batches, stage.name):
                committed.update({tp: batch[-1].offset + 1 for tp, batch in batches.items()})
            export_lag(consumer, stage.group, committed)
    finally:
        await health.stop()
        await consumer.stop()
        await producer.stop()
        await stage.stop()
        log.info("%s: stopped", stage.name)


async def _commit(consumer: Any, batches: dict[TopicPartition, list[Record]], stage: str) -> bool:
    offsets = {tp: batch[-1].offset + 1 for tp, batch in batches.items() if batch}
    try:
        await consumer.commit(offsets)
        return True
    except CommitFailedError as exc:
        # The partitions moved during a rebalance; their new owner reprocesses the
        # batch, which every downstream stage tolerates (idempotent by design).
        log.warning(
            "%s: commit failed after a rebalance (%s); records will be redelivered", stage, exc
        )
        return False
