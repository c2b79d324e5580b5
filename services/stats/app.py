"""The stats stage as a faust app: agents on crawl.events, crawl.fetched, crawl.retry
and crawl.dlq keep two changelog-backed tables (per crawl, per host of a crawl), served
as JSON over HTTP and as crawl-level Prometheus gauges.

Table keys name the input partition that updates them and each value carries the offset
of the last record applied (:mod:`.logic`), so a restart that reads records again after
a crash skips those it had applied: no double count, and no loss because an offset is
committed only after the changelog records written before it are acknowledged (faust
alone does not make sure of that: :class:`ChangelogAcks`). A changelog
record holds a key's whole value, so one written twice by a retried send changes nothing,
and aiokafka keeps one batch per partition in flight, so a key's records keep their order.

A key's changelog partition is a hash of the key (:class:`KeyPartitionedTable`), not
the partition of the record being processed (faust's default, which requires every
input to have as many partitions as the tables; crawl.dlq has fewer). Every worker
must therefore hold every table partition: run one stats worker per pipeline (a
Deployment of one replica; locally :mod:`.service` makes a second one wait).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import faust
import mode
import msgspec
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..core.config import Settings
from ..core.kafka import client_options, make_admin
from ..core.messages import DeadLetterRecord, Tally, encode
from ..core.metrics import HealthServer
from ..core.topics import (
    DLQ,
    EVENTS,
    FETCHED,
    HOST_PARTITIONS,
    RETRY,
    STATS_GROUP,
    group_id,
    topic_name,
)
from . import gauges, logic

log = logging.getLogger(__name__)

# Kafka's log cleaner compacts only closed segments, and a changelog's one segment stays
# open until it reaches Kafka's defaults (1 GiB or 7 days): every table write is kept, and
# each start of the worker reads them all back (10 s on a stack after a few crawls, and
# growing). A segment is rolled on the first write 10 s after it began and cleaned once a
# tenth of the log is dirty: a changelog holds about one record per key plus the writes
# of its last 10 s or so (a roll happens on a write, so the last segment stays as it is).
CHANGELOG_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": "10000",
    "min.cleanable.dirty.ratio": "0.1",
}

RECORDS_SKIPPED = Counter(
    "streamcrawl_stats_records_skipped_total",
    "Table updates the stats stage skipped because their record was applied before "
    "(records read again after a restart).",
)

_tally = msgspec.json.Decoder(Tally)
_fetched = msgspec.json.Decoder(logic.FetchedView)
_retry = msgspec.json.Decoder(logic.RetryView)
_dead = msgspec.json.Decoder(logic.DeadLetterView)

Table = Any  # faust.Table[str, dict]: faust's generics do not type-check usefully


def app_id(settings: Settings) -> str:
    return group_id(settings.topic_prefix, STATS_GROUP)


def broker_urls(bootstrap: str) -> str:
    return ";".join("kafka://" + server.strip() for server in bootstrap.split(",") if server)


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """The security every other client gets from ``client_options``, in faust's terms."""
    options = client_options(settings)
    protocol = options["security_protocol"]
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(options["ssl_context"])
    return faust.SASLCredentials(
        username=options["sasl_plain_username"],
        password=options["sasl_plain_password"],
        ssl_context=options.get("ssl_context"),
        mechanism=options["sasl_mechanism"],
    )


class ChangelogWriteFailed(Exception):
    """A changelog record was not written: no input offset may be committed after it."""


class ChangelogAcks:
    """The changelog records handed to faust and not yet acknowledged by the broker.

    Before a commit faust flushes its producer, but that flush gives up after 0.1 s
    without a send (``ProducerBuffer.flush_atmost``), misses a record taken from its
    buffer and not yet handed to aiokafka, and a failed send is only logged: the input
    offset can be committed before the table change that applied it is stored, and a
    crash then loses the change (seen in CI: 342 stored pages counted of 343 after a
    SIGKILL). :class:`AckedCommitsApp` makes every commit wait here.
    """

    def __init__(self) -> None:
        self._pending: set[asyncio.Future[Any]] = set()
        self._failure: BaseException | None = None

    def track(self, future: asyncio.Future[Any]) -> None:
        self._pending.add(future)
        future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        failure = asyncio.CancelledError() if future.cancelled() else future.exception()
        if failure is not None and self._failure is None:
            self._failure = failure
            log.error(
                "stats: a changelog record was not written (%r): no offset is committed "
                "until the worker starts again and applies its records again",
                failure,
            )

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def wait(self) -> None:
        """Return once every record tracked so far is acknowledged; raise if one failed."""
        if self._pending:
            await asyncio.wait(list(self._pending))
        if self._failure is not None:
            raise ChangelogWriteFailed(repr(self._failure))


class AckedCommitsApp(faust.App):
    """A faust app whose offset commits wait for its changelog records. faust flushes its
    producer before each commit; the flush here first writes what the tables hold back
    (:meth:`KeyPartitionedTable.write_changed`), and ends with :meth:`ChangelogAcks.wait`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.changelog_acks = ChangelogAcks()
        self.before_commit: list[Callable[[], None]] = []
        super().__init__(*args, **kwargs)

    def _new_producer(self) -> Any:
        producer = super()._new_producer()
        flush_buffer = producer.flush

        async def flush() -> None:
            self.write_changed()
            await flush_buffer()
            await self.changelog_acks.wait()

        producer.flush = flush  # type: ignore[method-assign]
        return producer

    def write_changed(self) -> None:
        """Every table's keys changed since they were last written, to the changelogs."""
        for write in self.before_commit:
            write()


class StatsApp:
    """The faust app, its tables, agents and web pages."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = AckedCommitsApp(
            app_id(settings),
            broker=broker_urls(settings.kafka_bootstrap),
            broker_credentials=broker_credentials(settings),
            store="memory://",
            topic_partitions=HOST_PARTITIONS,
            topic_replication_factor=settings.stats_replication,
            consumer_auto_offset_reset="earliest",
            # A crawl's final numbers wait for this worker's commit of its last records: a
            # commit is one small request, four a second cost nothing measurable.
            broker_commit_interval=0.25,
            producer_linger=settings.stats_linger_ms / 1000,
            # A restarted worker waits for its crashed predecessor's session to expire
            # before it gets the partitions: keep that short.
            broker_session_timeout=10.0,
            broker_heartbeat_interval=3.0,
            web_enabled=True,
            web_bind="0.0.0.0",
            web_port=settings.stats_port,
            web_in_thread=False,
            # faust keeps a folder per app (nothing in it with the memory store): not in
            # the working directory, which may be read-only.
            datadir=str(Path(settings.state_dir or tempfile.gettempdir()) / "faust"),
            # An agent that fails stops the worker (the process exits and is restarted)
            # instead of leaving the tables silently behind.
            agent_supervisor=mode.CrashingSupervisor,
        )
        self.crawls: Table = self._table("crawls")
        self.hosts: Table = self._table("hosts")
        self._agents()
        self.app.task(self.compact_changelogs)
        # Written behind every 0.1 s, and what changed since, before each commit: the
        # changelogs trail the tables by 0.1 s, and a commit rarely has anything left to
        # write. (The flush that once hung on a fresh worker's first writes was aiokafka
        # dropping a changelog topic from its producer's metadata: core/kafka_transport.py.)
        self.app.timer(0.1)(self.write_changed)
        self._pages()
        self._metrics_port()
        REGISTRY.register(CrawlGauges(self))

    def _table(self, name: str) -> Table:
        table = KeyPartitionedTable(
            self.app,
            name=name,
            beacon=self.app.tables.beacon,
            default=None,
            key_type=str,
            partitions=HOST_PARTITIONS,
            extra_topic_configs=CHANGELOG_CONFIG,
        )
        table.acks = self.app.changelog_acks
        self.app.before_commit.append(table.write_changed)
        return self.app.tables.add(table)

    async def write_changed(self) -> None:
        self.app.write_changed()

    def changelog_topics(self) -> list[str]:
        return [table.changelog_topic.get_topic_name() for table in (self.crawls, self.hosts)]

    async def compact_changelogs(self) -> None:
        """Give changelog topics created before CHANGELOG_CONFIG (or by hand) its settings;
        faust sets them only on the topics it creates. Not fatal: without them the tables
        are as right, only slower to recover."""
        admin = make_admin(self.settings)
        topics = self.changelog_topics()
        try:
            await admin.start()
            resources = [
                ConfigResource(ConfigResourceType.TOPIC, name, dict(CHANGELOG_CONFIG))
                for name in topics
            ]
            for response in await admin.alter_configs(resources):
                for code, message, _, name in response.resources:
                    if code:
                        log.warning("stats: changelog %s keeps its settings: %s", name, message)
        except Exception as exc:  # a task's exception would stop the worker: never for this
            log.warning("stats: changelog settings of %s not applied: %r", topics, exc)
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    def topic(self, suffix: str) -> Any:
        return self.app.topic(
            topic_name(self.settings.topic_prefix, suffix),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
        )

    # -- updating ----------------------------------------------------------------------

    def update(
        self, table: Table, key: str, offset: int, change: Callable[[logic.Entry], None]
    ) -> None:
        """Apply ``change`` to ``table[key]`` unless the record at ``offset`` was applied."""
        entry = logic.fresh(table.get(key), offset)
        if entry is None:
            RECORDS_SKIPPED.inc()
            return
        change(entry)
        table[key] = entry

    def on_tally(self, tally: Tally, partition: int, offset: int) -> None:
        key = logic.crawl_key(tally.crawl_id, EVENTS, partition)
        self.update(self.crawls, key, offset, lambda entry: logic.apply_tally(entry, tally))
        if tally.host is not None:
            hkey = logic.host_key(tally.crawl_id, tally.host, EVENTS, partition)
            self.update(
                self.hosts, hkey, offset, lambda entry: logic.apply_robots_host(entry, tally)
            )

    def on_fetched(self, view: logic.FetchedView, partition: int, offset: int) -> None:
        def crawl_change(entry: logic.Entry) -> None:
            logic.add(entry, logic.fetched_counts(view))
            logic.touch(entry, view.fetched_at)

        key = logic.crawl_key(view.crawl_id, FETCHED, partition)
        self.update(self.crawls, key, offset, crawl_change)
        hkey = logic.host_key(view.crawl_id, view.host, FETCHED, partition)
        self.update(self.hosts, hkey, offset, lambda entry: logic.apply_fetched_host(entry, view))

    def on_retry(self, view: logic.RetryView, partition: int, offset: int, at: float) -> None:
        def crawl_change(entry: logic.Entry) -> None:
            logic.add(entry, logic.retry_counts(view))
            logic.touch(entry, at)

        self.update(
            self.crawls, logic.crawl_key(view.crawl_id, RETRY, partition), offset, crawl_change
        )
        hkey = logic.host_key(view.crawl_id, view.host, RETRY, partition)
        self.update(self.hosts, hkey, offset, lambda entry: logic.apply_retry_host(entry, view, at))

    def on_dead_letter(self, dead: logic.DeadLetterView, partition: int, offset: int) -> None:
        source = logic.origin(dead)

        def crawl_change(entry: logic.Entry) -> None:
            logic.add(entry, logic.dead_letter_counts(dead))
            logic.touch(entry, dead.failed_at)

        self.update(
            self.crawls, logic.crawl_key(source.crawl_id, DLQ, partition), offset, crawl_change
        )
        if source.host is not None and dead.stage == "fetcher":
            hkey = logic.host_key(source.crawl_id, source.host, DLQ, partition)
            self.update(
                self.hosts, hkey, offset, lambda entry: logic.apply_dead_letter_host(entry, dead)
            )

    def _agents(self) -> None:
        handlers: dict[str, Callable[[bytes, int, int, float], None]] = {
            EVENTS: lambda value, p, o, at: self.on_tally(_tally.decode(value), p, o),
            FETCHED: lambda value, p, o, at: self.on_fetched(_fetched.decode(value), p, o),
            RETRY: lambda value, p, o, at: self.on_retry(_retry.decode(value), p, o, at),
            DLQ: lambda value, p, o, at: self.on_dead_letter(_dead.decode(value), p, o),
        }
        for suffix, handler in handlers.items():
            agent = _consume(suffix, handler, self.dead_letter)
            self.app.agent(self.topic(suffix), name=f"stats-{suffix}")(agent)

    async def dead_letter(self, message: Any, reason: str, detail: str) -> None:
        """A crawl.events record that is not a tally: to crawl.dlq with the reason (sent at
        least once: a restart before the commit may send it again)."""
        payload: bytes = message.value or b""
        try:
            text, encoding = payload.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(payload).decode("ascii"), "base64"
        record = DeadLetterRecord(
            stage="stats",
            reason=reason,
            detail=detail,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=None if message.key is None else message.key.decode("utf-8", "replace"),
            payload=text,
            payload_encoding=encoding,  # type: ignore[arg-type]
            failed_at=time.time(),
        )
        await self.topic(DLQ).send(key=message.key, value=encode(record))

    def _metrics_port(self) -> None:
        """/metrics, /healthz and /readyz also on the metrics port, as every stage has them
        (Prometheus scrapes every service there); the JSON API stays on the stats port."""
        port = self.settings.metrics_port
        if port <= 0 or port == self.settings.stats_port:
            return

        async def ready() -> bool:
            return not self.recovering()

        server = HealthServer(port, ready)

        async def serve_metrics() -> None:
            await server.start()  # stops with the process

        self.app.task(serve_metrics)

    # -- reading -----------------------------------------------------------------------

    def recovering(self) -> bool:
        recovery: Any = self.app.tables.recovery  # type: ignore[attr-defined]
        return not recovery.completed.is_set()

    def totals(self) -> dict[str, logic.CrawlTotals]:
        return logic.crawl_totals(list(self.crawls.items()))

    def crawl_list(self) -> dict[str, Any]:
        now = time.time()
        summaries = [totals.summary(now) for totals in self.totals().values()]
        summaries.sort(key=lambda row: row["first_activity"] or 0.0)
        return {"recovering": self.recovering(), "crawls": summaries}

    def one_crawl(self, crawl_id: str) -> dict[str, Any] | None:
        totals = self.totals().get(crawl_id)
        if totals is None:
            return None
        return {"recovering": self.recovering(), **totals.summary(time.time())}

    def hosts_of(self, crawl_id: str, sort: str, top: int) -> list[dict[str, Any]]:
        return logic.top_hosts(logic.host_rows(list(self.hosts.items()), crawl_id), sort, top)

    def _pages(self) -> None:
        app, stats = self.app, self

        @app.page("/crawls")
        async def crawls(view: View, request: Request) -> Response:
            return view.json(stats.crawl_list())

        @app.page("/crawls/{crawl_id}")
        async def crawl(view: View, request: Request, crawl_id: str) -> Response:
            found = stats.one_crawl(crawl_id)
            if found is None:
                return view.json({"error": f"no crawl {crawl_id!r}"}, status=404)
            return view.json(found)

        @app.page("/crawls/{crawl_id}/hosts")
        async def hosts(view: View, request: Request, crawl_id: str) -> Response:
            query = request.query
            try:
                top = int(query.get("top", "20"))
                rows = stats.hosts_of(crawl_id, query.get("sort", "errors"), top)
            except ValueError as exc:
                return view.json({"error": str(exc)}, status=400)
            return view.json({"crawl_id": crawl_id, "hosts": rows})

        @app.page("/metrics")
        async def metrics(view: View, request: Request) -> Response:
            return view.bytes(generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        @app.page("/healthz")
        async def healthz(view: View, request: Request) -> Response:
            return view.json({"ok": True, "app": app.conf.id})

        @app.page("/readyz")
        async def readyz(view: View, request: Request) -> Response:
            ready = not stats.recovering()
            return view.json({"ready": ready}, status=200 if ready else 503)


def _consume(
    suffix: str,
    handler: Callable[[bytes, int, int, float], None],
    dead_letter: Callable[[Any, str, str], Awaitable[None]],
) -> Any:
    async def consume(stream: Any) -> Any:
        async for event in stream.events():
            message = event.message
            try:
                handler(message.value, message.partition, message.offset, message.timestamp)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                reason = (
                    "schema_violation"
                    if isinstance(exc, msgspec.ValidationError)
                    else "invalid_json"
                )
                log.warning(
                    "stats: %s[%d]@%d not counted (%s): %s",
                    message.topic,
                    message.partition,
                    message.offset,
                    reason,
                    str(exc)[:300],
                )
                # Only crawl.events is first read here; a bad record of the other topics
                # was dead-lettered by the stage that consumes it.
                if suffix == EVENTS:
                    await dead_letter(message, reason, str(exc)[:4096])

    consume.__name__ = consume.__qualname__ = f"stats_{suffix}"
    return consume


class KeyPartitionedTable(faust.Table):  # type: ignore[type-arg]
    """A table whose key alone picks its changelog partition (a stable hash: no producer
    metadata needed), whatever partition the record that changed it came from.

    Written behind: a change marks its key, and the keys changed since they were last
    written go to the changelog, each once with its latest value, every 0.1 s and just
    before each commit (:class:`AckedCommitsApp`), their records tracked until acknowledged
    (:class:`ChangelogAcks`). faust writes one changelog record per change: two per page
    fetched, most of them for the same few keys. A value carries the offset of the last
    record applied, so whatever a crash leaves unwritten is applied again on restart."""

    acks: ChangelogAcks | None = None
    _changed: set[Any] | None = None

    def on_key_set(self, key: Any, value: Any) -> None:
        if self._changed is None:
            self._changed = set()
        self._changed.add(key)

    def write_changed(self) -> None:
        if not self._changed:
            return
        changed, self._changed = self._changed, set()
        for key in changed:
            self.send_changelog(self.partition_for_key(key), key, self.data[key])

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        future = super().send_changelog(*args, **kwargs)
        if self.acks is not None:
            self.acks.track(future)
        return future

    def partition_for_key(self, key: Any) -> int:
        return zlib.crc32(str(key).encode()) % (self.partitions or HOST_PARTITIONS)


class CrawlGauges(Collector):
    """Crawl-level gauges (:mod:`.gauges`), read from the tables at each scrape. Labelled
    by crawl id only: hosts are unbounded, so they stay in the JSON API."""

    def __init__(self, stats: StatsApp) -> None:
        self.stats = stats

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # names are not checked at registration; collect() needs a running app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from gauges.crawl_gauges(self.stats.totals(), time.time())
