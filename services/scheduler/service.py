"""The scheduler: continuous crawling on the adaptive revisit schedule.

Every stored page has a status document (``<collection>_status``, beside the page) that
carries ``next_visit``: the sink writes it with ``revisit_interval`` at each visit (see
:mod:`streamcrawl.core.schedule`); the page document itself holds the content as stored.
The scheduler reads and leases the status documents (small: no text, no links). It reads
those due
(``next_visit <= now``, oldest first, ``SCHEDULE_BATCH`` at a time, at most
``SCHEDULE_PER_HOST`` of one host per batch) and puts a revisit of each on
crawl.discovered, like ``streamcrawl recrawl`` does for a whole crawl: dedup, the
fetcher's per-host politeness and its conditional requests apply as to any revisit, and the
sink then sets the next ``next_visit`` on the status document.

Never twice for one due time, across restarts: a batch is first *leased* in MongoDB (its
status documents' ``next_visit`` moved to now + ``SCHEDULE_LEASE``, ``queued_at`` set),
and only then sent. A scheduler stopped between the two steps leaves the batch leased, not
due, so a restart does not send it again (those pages come due again when the lease ends,
for that new due time). Each revisit's round is its due time (in milliseconds), so dedup,
which admits a revisit once per crawl id, round and URL, also drops a second send for one
due time. The visit's sink write replaces the lease with the page's next due time; a
revisit lost on the way (a failed fetch dead-lettered) is thus retried after the lease.
A page stored before status documents existed has none, so it is not scheduled until
``streamcrawl recrawl CRAWL_ID --from-pages`` has visited it once.

Run one scheduler per collection (``streamcrawl schedule``): two would lease separate
batches, but could read the same due page between one's read and its lease (dedup then
drops the second send).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient

from ..core.config import PREFIX, Settings
from ..core.kafka import make_producer
from ..core.messages import encode
from ..core.poison import outlasting_outages
from ..core.secrets import mongo_client_uri
from ..core.topics import DISCOVERED
from ..crawl.recrawl import PROJECTION, revisit_candidate
from .logic import due_round, polite_batch

log = logging.getLogger(__name__)

SCHEDULE_PROJECTION = {**PROJECTION, "crawl_id": 1, "next_visit": 1}
# FerretDB pushes an _id $in of at most 1,000 values down to its index.
LEASE_CHUNK = 500


@dataclass
class Pass:
    """One scheduling pass: pages read due, pages queued (leased and sent)."""

    due: int = 0
    queued: int = 0


class Scheduler:
    name = "scheduler"

    def __init__(self, settings: Settings, crawl_id: str | None = None) -> None:
        self.settings = settings
        self.crawl_id = crawl_id
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            mongo_client_uri(settings), serverSelectionTimeoutMS=10000
        )
        database = self.client[settings.mongo_database]
        self.collection = database[settings.mongo_status_collection]
        self.producer = make_producer(settings)
        self.topic = settings.topic_prefix + DISCOVERED
        self.queued_total = 0

    async def start(self) -> None:
        await self.collection.create_index("next_visit", name="next_visit")
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()
        await self.client.close()

    def _due_filter(self, now: float) -> dict[str, Any]:
        query: dict[str, Any] = {"next_visit": {"$lte": now}}
        if self.crawl_id is not None:
            query["crawl_id"] = self.crawl_id
        return query

    async def run_once(self, now: float | None = None) -> Pass:
        """Queue one batch of due pages; how many were due and queued."""
        now = time.time() if now is None else now
        cursor = (
            self.collection.find(self._due_filter(now), SCHEDULE_PROJECTION)
            .sort("next_visit", 1)
            .limit(self.settings.schedule_batch)
        )
        documents = [document async for document in cursor]
        chosen = polite_batch(documents, self.settings.schedule_per_host)
        if not chosen:
            return Pass(due=len(documents))
        await self._lease(chosen, now)
        pending = []
        for document in chosen:
            candidate = self._candidate(document, now)
            if candidate is None:
                continue
            pending.append(
                await self.producer.send(self.topic, encode(candidate), key=candidate.host.encode())
            )
        await asyncio.gather(*pending)
        self.queued_total += len(pending)
        return Pass(due=len(documents), queued=len(pending))

    async def _lease(self, documents: list[Mapping[str, Any]], now: float) -> None:
        """Move the pages out of the due set before sending them: until the lease ends,
        or the sink writes their next due time at the visit. Only pages still due are
        leased (a visit may have rescheduled one since it was read)."""
        ids = [document["_id"] for document in documents]
        for start in range(0, len(ids), LEASE_CHUNK):
            await self.collection.update_many(
                {"_id": {"$in": ids[start : start + LEASE_CHUNK]}, "next_visit": {"$lte": now}},
                {"$set": {"next_visit": now + self.settings.schedule_lease, "queued_at": now}},
            )

    def _candidate(self, document: Mapping[str, Any], now: float) -> Any:
        due = float(document["next_visit"])
        return revisit_candidate(
            document, str(document.get("crawl_id")), due_round(due), now, due=due
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until ``stop``: at once while full batches are due, else after
        ``SCHEDULE_POLL`` seconds."""
        while not stop.is_set():
            # An outage of the database or of Kafka is waited out. Pages leased before a
            # send failed are not sent on the retry: they come due again at the lease's end.
            done = await outlasting_outages("scheduler: queuing due pages", self.run_once)
            if done.queued:
                log.info("scheduler: queued %d due pages (%d read)", done.queued, done.due)
            if done.due < self.settings.schedule_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.schedule_poll)


class SchedulerStage:
    """The registered ``scheduler`` stage (``streamcrawl run scheduler``): no consumer
    group, so it runs itself, like the stats stage. It serves /metrics, /healthz and
    /readyz (MongoDB answers) on ``METRICS_PORT`` and queues due pages while
    ``SCHEDULE_ENABLED`` is 1; at 0 (the default) it runs idle, so a pipeline keeps its
    behaviour until continuous crawling is switched on."""

    name = "scheduler"
    group: str | None = None  # no consumer group: it reads MongoDB

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self) -> None:
        import uvloop

        uvloop.run(serve(self.settings, enabled=bool(self.settings.schedule_enabled)))


async def serve(settings: Settings, crawl_id: str | None = None, enabled: bool = True) -> None:
    """``streamcrawl schedule``: the scheduler until SIGTERM / SIGINT."""
    from ..core.kafka import check_kafka_access
    from ..core.runtime import install_stop_signals

    stop = asyncio.Event()
    install_stop_signals(stop)
    await check_kafka_access(settings)
    from ..core.metrics import HealthServer

    scheduler = Scheduler(settings, crawl_id)
    await outlasting_outages("scheduler: starting", scheduler.start)

    async def ready() -> bool:
        await scheduler.client.admin.command("ping")
        return True

    health = HealthServer(settings.metrics_port, ready)
    await health.start()
    state = "running" if enabled else f"running idle ({PREFIX}SCHEDULE_ENABLED=0)"
    log.info("scheduler: %s", state)
    try:
        if enabled:
            await scheduler.run(stop)
        else:
            await stop.wait()
    finally:
        await health.stop()
        await scheduler.stop()
        log.info("scheduler: stopped")
