"""The sink service: crawl.pages in, one MongoDB document per canonical URL out.

Each batch is first inserted in bulk (unordered), and only the documents whose
URL is already stored are then replaced with upserts: the end state is that of an
upsert per page, so a redelivered batch rewrites the same documents instead of
adding new ones, while fresh pages take the fast path (FerretDB inserts about a
hundred times faster than it upserts; see bench/RESULTS.md). Offsets are committed only after
the database acknowledged the batch; while it is down the sink retries and the
pipeline backs up behind it in Kafka, where nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from pymongo import AsyncMongoClient, ReplaceOne
from pymongo.errors import BulkWriteError, PyMongoError

from ..core import metrics
from ..core.stage import BatchStage, Output, Record
from ..core.topics import PAGES, SINK_GROUP

log = logging.getLogger(__name__)


DUPLICATE_KEY = 11000
UPDATE_CHUNK = 50


def document_for(page: dict[str, Any], stored_at: float) -> dict[str, Any]:
    return {"_id": page["url"], **page, "stored_at": stored_at}


def classify_failures(error: BulkWriteError) -> tuple[set[int], dict[int, str]]:
    """Positions that failed only because the URL exists, and positions the database
    rejected for good (a document-level write error is not cured by retrying)."""
    duplicates: set[int] = set()
    rejected: dict[int, str] = {}
    for failure in error.details.get("writeErrors", []):
        index = int(failure["index"])
        if failure.get("code") == DUPLICATE_KEY:
            duplicates.add(index)
        else:
            rejected[index] = f"code {failure.get('code')}: {failure.get('errmsg', '')[:500]}"
    return duplicates, rejected


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
        pages, dead = self.decode_all(records, "page")
        # The last version of a URL in a batch wins.
        entries = list({page["url"]: (record, page) for record, page in pages}.values())
        if entries:
            documents = [document_for(page, time.time()) for _, page in entries]
            rejected: dict[int, str] = await self._retry(
                f"writing {len(documents)} pages", lambda: self._store(documents)
            )
            for index, reason in rejected.items():
                dead.append(self.dead_letter(entries[index][0], "rejected_by_database", reason))
            metrics.PAGES_STORED.inc(len(documents) - len(rejected))
        return dead

    async def _store(self, documents: list[dict[str, Any]]) -> dict[int, str]:
        """Store the documents; return the positions the database refused, with why."""
        try:
            await self.collection.insert_many(documents, ordered=False)
            return {}
        except BulkWriteError as error:
            duplicates, rejected = classify_failures(error)
        replacements = [
            ReplaceOne({"_id": documents[i]["_id"]}, documents[i], upsert=True)
            for i in sorted(duplicates)
        ]
        # FerretDB 1.24 (SQLite) stops answering a bulk write of 100 or more updates
        # of existing documents; 50 at a time is safe and costs little.
        for start in range(0, len(replacements), UPDATE_CHUNK):
            await self.collection.bulk_write(
                replacements[start : start + UPDATE_CHUNK], ordered=False
            )
        return rejected

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
