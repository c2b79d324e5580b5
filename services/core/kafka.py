"""Kafka plumbing shared by every service: clients with safe settings, topics, lag."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
)
from aiokafka.protocol.metadata import MetadataRequest

from . import kafka_transport, metrics
from .config import PREFIX, Settings
from .secrets import read_secret
from .topics import (
    MAX_MESSAGE_BYTES,
    TOPIC_SPECS,
    TopicSpec,
    group_id,
    replication_for,
    topic_name,
)

log = logging.getLogger(__name__)

kafka_transport.install()  # every Kafka client of ours is made through this module


def client_options(settings: Settings) -> dict[str, Any]:
    """Where and how every Kafka client connects: bootstrap servers and security (TLS with
    the configured CA, SASL with the password read from its file). The one place clients
    get these, so every stage and command speaks to a secured cluster the same way."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "security_protocol": protocol,
    }
    if protocol in ("SSL", "SASL_SSL"):
        # Verifies the broker's certificate and host name; the system CAs without a CA file.
        options["ssl_context"] = ssl.create_default_context(
            cafile=settings.kafka_ssl_cafile or None
        )
    if protocol.startswith("SASL_"):
        # Checked here, not with the other settings: in Kubernetes the user name comes from
        # a Secret (secretKeyRef) beside the ConfigMap, and only the pod sees both.
        if not settings.kafka_sasl_username or not settings.kafka_sasl_password_file:
            raise ValueError(
                f"{PREFIX}KAFKA_SECURITY_PROTOCOL={protocol} needs {PREFIX}KAFKA_SASL_USERNAME "
                f"and {PREFIX}KAFKA_SASL_PASSWORD_FILE"
            )
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = read_secret(
            settings.kafka_sasl_password_file, f"{PREFIX}KAFKA_SASL_PASSWORD_FILE"
        )
    return options


class KafkaAccessError(RuntimeError):
    """One line saying why this process cannot use the configured Kafka cluster."""


async def check_kafka_access(settings: Settings, timeout: float = 15.0) -> None:
    """Connect to a bootstrap server as every client will (TLS, SASL) and ask for metadata;
    :class:`KafkaAccessError` with the reason when no server accepts us. Run before a
    stage or command starts its clients, so a wrong password or a plaintext client on a
    secured cluster is one clear line instead of retries and tracebacks."""
    options = client_options(settings)
    security = {key: value for key, value in options.items() if key != "bootstrap_servers"}
    reasons = []
    for server in settings.kafka_bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            await asyncio.wait_for(_ask_metadata(host, int(port), security), timeout)
            return
        except TimeoutError:
            reasons.append(f"{server.strip()}: no answer in {timeout:.0f}s")
        except Exception as exc:  # every failure is reported, as one line
            reasons.append(f"{server.strip()}: {_access_failure(exc, settings)}")
    who = settings.kafka_security_protocol
    if who.startswith("SASL_"):
        who += f" {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username!r}"
    raise KafkaAccessError(f"Kafka refused this client ({who}): " + "; ".join(reasons))


async def _ask_metadata(host: str, port: int, security: dict[str, Any]) -> None:
    conn = await create_conn(host, port, request_timeout_ms=10000, **security)
    try:
        await conn.send(MetadataRequest([]))
    finally:
        conn.close()


def _access_failure(exc: BaseException, settings: Settings) -> str:
    """Why a connection failed, in words an operator can act on."""
    if isinstance(exc, SaslAuthenticationFailed) or "authentication" in str(exc).lower():
        return (
            "authentication failed: wrong user name or password "
            f"({PREFIX}KAFKA_SASL_USERNAME, {PREFIX}KAFKA_SASL_PASSWORD_FILE)"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's certificate is not trusted ({PREFIX}KAFKA_SSL_CAFILE): {exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason}): is the listener using TLS?"
    if isinstance(exc, KafkaConnectionError) and settings.kafka_security_protocol in (
        "PLAINTEXT",
        "SASL_PLAINTEXT",
    ):
        return (
            "the broker closed the connection: the listener probably wants TLS and/or SASL "
            f"({PREFIX}KAFKA_SECURITY_PROTOCOL is {settings.kafka_security_protocol})"
        )
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent producer: a retried send never duplicates a record."""
    options: dict[str, Any] = {
        **client_options(settings),
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 5,
        "max_batch_size": 1024 * 1024,
        "max_request_size": MAX_MESSAGE_BYTES,
        # zstd (level 3): crawl.pages (text and links as JSON) shrinks ~5x for ~60 us a page.
        # Not lz4: aiokafka compresses it at level 9, ~18x zstd's CPU for less gain.
        "compression_type": "zstd",
        "request_timeout_ms": 30000,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    settings: Settings, group: str, *topics: str, **overrides: Any
) -> AIOKafkaConsumer:
    """A group consumer that never commits on its own: stages commit after downstream acks."""
    options: dict[str, Any] = {
        **client_options(settings),
        "group_id": group_id(settings.topic_prefix, group),
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_partition_fetch_bytes": MAX_MESSAGE_BYTES,
        "fetch_max_bytes": 4 * MAX_MESSAGE_BYTES,
        "max_poll_interval_ms": 300000,
        "session_timeout_ms": 30000,
        "heartbeat_interval_ms": 3000,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def export_lag(
    consumer: AIOKafkaConsumer, group: str, committed: dict[TopicPartition, int]
) -> None:
    """Publish this consumer's lag per assigned partition (high watermark minus commit)."""
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        offset = committed.get(tp)
        if highwater is None or offset is None:
            continue
        metrics.CONSUMER_LAG.labels(group, tp.topic, str(tp.partition)).set(
            max(0, highwater - offset)
        )


async def kafka_reachable(consumer: AIOKafkaConsumer, timeout: float = 3.0) -> bool:
    """Readiness: the cluster answers a metadata request."""
    try:
        await asyncio.wait_for(consumer.topics(), timeout)
        return True
    except (KafkaError, TimeoutError):
        return False


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer, absorbing aiokafka 0.14's stray CancelledError.

    Closing a consumer without a group awaits an internal task it has just
    cancelled, so ``stop()`` raises CancelledError although nobody cancelled us.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


def make_reader(settings: Settings, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer outside any group (it assigns partitions itself): replays, offsets."""
    return AIOKafkaConsumer(**{**client_options(settings), **overrides})


def make_admin(settings: Settings, **overrides: Any) -> AIOKafkaAdminClient:
    options = {**client_options(settings), "request_timeout_ms": 15000, **overrides}
    return AIOKafkaAdminClient(**options)


def topic_configs(spec: TopicSpec, replicas: int, min_insync: int) -> dict[str, str]:
    """A topic's configs: its own, plus min.insync.replicas where it is replicated (with
    acks=all a write then needs that many copies; one broker may be lost without stopping
    producers)."""
    configs = dict(spec.config)
    if replicas > 1:
        configs["min.insync.replicas"] = str(min_insync)
    return configs


async def create_topics(settings: Settings, replication: int | None = None) -> list[str]:
    """Create every pipeline topic that does not exist yet; return the names created.

    Without ``replication``, min(3, brokers in the cluster) replicas each, with
    min.insync.replicas 2 at three replicas (see :func:`replication_for`).
    """
    admin = make_admin(settings)
    await admin.start()
    try:
        if replication is None:
            cluster = await admin.describe_cluster()
            replicas, min_insync = replication_for(len(cluster.get("brokers") or []))
        else:
            replicas, min_insync = replication, replication_for(replication)[1]
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                topic_name(settings.topic_prefix, spec.suffix),
                spec.partitions,
                replicas,
                topic_configs=topic_configs(spec, replicas, min_insync),
            )
            for spec in TOPIC_SPECS
            if topic_name(settings.topic_prefix, spec.suffix) not in existing
        ]
        created = []
        for topic in wanted:
            try:
                await admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            await _wait_for_leaders(admin, created)
        return created
    finally:
        await admin.close()


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, topics: list[str], timeout: float = 30
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        described = await admin.describe_topics(topics)
        ready = all(
            not topic["error_code"]
            and topic["partitions"]
            and all(partition["leader"] >= 0 for partition in topic["partitions"])
            for topic in described
        )
        if ready:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"topics {topics} have no leaders after {timeout}s")
        await asyncio.sleep(0.2)


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    end_offset: int
    committed: int | None

    @property
    def lag(self) -> int:
        # A group with no commit yet reads from the beginning (auto_offset_reset=earliest).
        return self.end_offset - (self.committed or 0)


class OffsetProbe:
    """Reads log-end and committed offsets, reusing its connections across polls.

    A poll is meant to be cheap for the broker (the crawl's progress watch polls every
    group four times a second): end offsets of all topics in one request, and each
    group's coordinator remembered for a while instead of looked up before every read.
    """

    # How long a group's coordinator is trusted. A moved coordinator answers with no
    # offsets (aiokafka does not raise on that), which can only overstate lag, and is
    # found again after this long.
    COORDINATOR_TTL_S = 10.0

    def __init__(self, settings: Settings) -> None:
        self._admin = make_admin(settings)
        self._topic_prefix = settings.topic_prefix
        self._consumer = make_reader(settings)
        self._partitions: dict[str, list[int]] = {}
        self._coordinators: dict[str, tuple[int, float]] = {}

    async def start(self) -> None:
        await self._admin.start()
        await self._consumer.start()

    async def stop(self) -> None:
        await stop_consumer(self._consumer)
        await self._admin.close()

    async def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        """Partitions of the topics that exist (cached: partition counts only grow)."""
        wanted = [topic for topic in topics if topic not in self._partitions]
        if wanted:
            for described in await self._admin.describe_topics(wanted):
                if not described["error_code"]:
                    self._partitions[described["topic"]] = sorted(
                        p["partition"] for p in described["partitions"]
                    )
        return [
            TopicPartition(topic, number)
            for topic in topics
            for number in self._partitions.get(topic, [])
        ]

    async def end_offsets(self, topics: Iterable[str]) -> dict[TopicPartition, int]:
        partitions = await self.partitions(list(topics))
        return dict(await self._consumer.end_offsets(partitions)) if partitions else {}

    async def lag(
        self,
        group: str,
        topics: Iterable[str],
        ends: dict[TopicPartition, int] | None = None,
    ) -> list[PartitionLag]:
        """Lag of ``group`` on ``topics``; against ``ends`` when given (end offsets read
        before, shared by several groups' reads), else against end offsets read now."""
        wanted = set(topics)
        if ends is None:
            ends = await self.end_offsets(wanted)
        else:
            ends = {tp: end for tp, end in ends.items() if tp.topic in wanted}
        if not ends:
            return []
        committed = await self._committed(group, list(ends))
        rows = []
        for tp, end in ends.items():
            meta = committed.get(tp)
            offset = meta.offset if meta is not None and meta.offset >= 0 else None
            rows.append(PartitionLag(group, tp.topic, tp.partition, end, offset))
        return rows

    async def _committed(
        self, group: str, partitions: list[TopicPartition], attempts: int = 60
    ) -> dict[TopicPartition, Any]:
        # A new broker creates __consumer_offsets lazily: the coordinator may be
        # unavailable for a few seconds, which is retriable.
        name = group_id(self._topic_prefix, group)
        for attempt in range(attempts):
            try:
                coordinator = await self._coordinator(name)
                result: dict[TopicPartition, Any] = await self._admin.list_consumer_group_offsets(
                    name, coordinator, partitions=partitions
                )
                return result
            except KafkaError as exc:
                self._coordinators.pop(name, None)
                if not exc.retriable or attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def _coordinator(self, name: str) -> int:
        known = self._coordinators.get(name)
        now = time.monotonic()
        if known is not None and now - known[1] < self.COORDINATOR_TTL_S:
            return known[0]
        coordinator: int = await self._admin.find_coordinator(name)
        self._coordinators[name] = (coordinator, now)
        return coordinator


async def group_lag(settings: Settings, group: str, topics: Iterable[str]) -> list[PartitionLag]:
    """Lag of ``group`` per partition of ``topics``: log-end offset minus committed offset."""
    probe = OffsetProbe(settings)
    await probe.start()
    try:
        return await probe.lag(group, topics)
    finally:
        await probe.stop()
