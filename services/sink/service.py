"""The sink service: crawl.pages in, one MongoDB document per canonical URL out.

Writes are bulk, unordered upserts keyed by URL, so a redelivered batch rewrites
the same documents instead of adding new ones. Offsets are committed only after
the database acknowledged the batch; while it is down the sink retries and the
pipeline backs up behind it in Kafka, where nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from pymongo import AsyncMongoClient, UpdateOne
from pymongo.errors import BulkWriteError, PyMongoError

from ..core import metrics
from ..core.stage import BatchStage, DeadLetter, Output, Record, decode_json
from ..core.topics import PAGES, SINK_GROUP

log = logging.getLogger(__name__)


def upsert(page: dict[str, Any], stored_at: float) -> UpdateOne:
    document = {**page, "stored_at": stored_at}
    return UpdateOne({"_id": page["url"]}, {"$set": document}, upsert=True)


class SinkStage(BatchStage):
    name = "sink"
    group = SINK_GROUP
    client: AsyncMongoClient[dict[str, Any]]

    def input_topics(self) -> tuple[str, ...]:
        return (self.topic(PAGES),)

    async def start(self) -> None:
        self.client = AsyncMongoClient(self.settings.mongo_uri, serverSelectionTimeoutMS=10000)
        self.collection = self.client[self.settings.mongo_database][self.settings.mongo_collection]
        await self._retry("creating indexes", self._create_indexes)

    async def _create_indexes(self) -> None:
        await self.collection.create_index("url", unique=True, name="url_unique")
        await self.collection.create_index("crawl_id", name="crawl_id")

    async def stop(self) -> None:
        await self.client.close()

    async def ready(self) -> bool:
        await self.client.admin.command("ping")
        return True

    async def process(self, records: Sequence[Record]) -> list[Output]:
        latest: dict[str, dict[str, Any]] = {}
        dead: list[Output] = []
        for record in records:
            try:
                page = decode_json(record, "page")
            except DeadLetter as exc:
                dead.append(self.dead_letter(record, exc.reason, exc.detail))
                continue
            latest[page["url"]] = page  # the last version of a URL in a batch wins
        if latest:
            stored_at = time.time()
            operations = [upsert(page, stored_at) for page in latest.values()]
            await self._retry(
                f"writing {len(operations)} pages",
                lambda: self.collection.bulk_write(operations, ordered=False),
            )
            metrics.PAGES_STORED.inc(len(operations))
        return dead

    async def _retry(self, what: str, action: Any) -> Any:
        delay = 0.5
        while True:
            try:
                return await action()
            except BulkWriteError as exc:
                log.error(
                    "sink: %s: bulk write error %s; retrying",
                    what,
                    str(exc.details.get("writeErrors", []))[:500],
                )
            except PyMongoError as exc:
                log.error("sink: %s failed (%s); retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
