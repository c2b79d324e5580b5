"""The sink service: crawl.pages in, one MongoDB document per canonical URL out.

A page is stored under its URL, or under the rel=canonical URL it declares when that is
on its own host (see :func:`storage_id`), so spellings of one page share a document;
the document keeps the URL that was fetched in ``url``.

Each batch is written as delete-then-insert: what is stored under the batch's ``_id``s is
deleted (one delete by ``_id`` $in), then the batch is inserted in bulk (unordered). The
end state is that of an upsert per page, so a redelivered batch or a re-crawl rewrites the
same documents instead of adding new ones. A stored page costs a delete and an insert,
two to four times a new page on FerretDB, where replacing it cost ten to twenty times: FerretDB
inserts a batch in one transaction but replaces (or upserts) one document per transaction,
and a bulk insert that hits a stored ``_id`` falls back to one insert per document (see
bench/RESULTS.md). A crash
between the delete and the insert loses nothing: the offsets are not committed, so the
batch is written again. Documents whose insert still fails as duplicates (their URL is
stored under another ``_id``) are replaced one by one. Offsets are committed only after
the database acknowledged the batch; while it is down the sink retries and the pipeline
backs up behind it in Kafka, where nothing is lost. Beside each page the sink keeps its
status document (``<collection>_status``): when the URL was last checked, its validators
and its revisit schedule. A page a revisit found unchanged (``unchanged``: a 304, or the
stored digest) is not rewritten: only its status document gets ``checked_at`` (and the
validators of a 200), see "Keeping a crawl fresh" in the README.
A page the database refuses is
dead-lettered: by its write error, or before writing when it is known to be refused (a `$`
field name) or the driver cannot encode it; a failure of anything else is left to the
runtime's poison-record isolation.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from bson.errors import InvalidDocument
from pymongo import AsyncMongoClient, ReplaceOne, UpdateOne
from pymongo.errors import BulkWriteError, OperationFailure

from ..core import metrics
from ..core.config import PREFIX
from ..core.errors import StageCannotRun
from ..core.messages import Page
from ..core.poison import outlasting_outages
from ..core.runtime import BatchStage, Input, Output, Received, json_input
from ..core.schedule import schedule_fields
from ..core.secrets import mongo_client_uri
from ..core.topics import EVENTS, PAGES, SINK_GROUP
from .logic import (
    STATUS_FIELDS,
    check_update,
    checked_id,
    classify_failures,
    document_under,
    latest_documents,
    previous_interval,
    refusal_reason,
    split_unchanged,
    status_document,
    stored_tallies,
    unencodable,
    written_status,
)

log = logging.getLogger(__name__)

UPDATE_CHUNK = 50
DELETE_CHUNK = 500


# AuthenticationFailed, Unauthorized (no credentials where the server wants some).
_REFUSED_CREDENTIALS = (18, 13)


class MongoCredentialsRefused(StageCannotRun):
    """The database refused the sink's credentials: a one-line, user-facing reason."""


class SinkStage(BatchStage):
    name = "sink"
    group = SINK_GROUP
    client: AsyncMongoClient[dict[str, Any]]

    def inputs(self) -> tuple[Input, ...]:
        return (json_input(PAGES, Page),)

    async def start(self) -> None:
        self.client = AsyncMongoClient(
            mongo_client_uri(self.settings), serverSelectionTimeoutMS=10000
        )
        database = self.client[self.settings.mongo_database]
        self.collection = database[self.settings.mongo_collection]
        self.status = database[self.settings.mongo_status_collection]
        await self._retry("creating indexes", self._create_indexes)

    async def _create_indexes(self) -> None:
        await self.collection.create_index("url", unique=True, name="url_unique")
        await self.collection.create_index("crawl_id", name="crawl_id")
        # recrawl reads a crawl's status documents; the scheduler stage reads them in
        # next_visit order.
        await self.status.create_index("crawl_id", name="crawl_id")
        await self.status.create_index("next_visit", name="next_visit")

    async def stop(self) -> None:
        await self.client.close()

    async def ready(self) -> bool:
        await self.client.admin.command("ping")
        return True

    async def process(self, batch: list[Received[Any]]) -> list[Output]:
        stored_at = time.time()
        pages: list[Page] = [item.message for item in batch]
        latest, unchanged = split_unchanged(pages, latest_documents(pages, self.settings))
        if unchanged:
            # A revisit found these current: their status documents get checked_at, no rewrite.
            checks = [(checked_id(pages[i], self.settings), pages[i]) for i in unchanged]
            began = time.monotonic()
            await self._retry(
                f"checking {len(checks)} pages", lambda: self._check(checks, stored_at)
            )
            metrics.PAGES_UNCHANGED.inc(len(unchanged))
            log.debug(
                "sink: %d unchanged pages checked in %.2fs", len(checks), time.monotonic() - began
            )
        if not latest:
            return self._tallies(batch, [], stored_at, unchanged) if unchanged else []
        chosen = list(latest.values())
        documents = [document_under(_id, pages[i], stored_at) for _id, i in latest.items()]
        rejected: dict[int, str] = await self._retry(
            f"writing {len(documents)} pages", lambda: self._store(documents)
        )
        dead = [
            self.dead_letter(batch[chosen[index]].record, "rejected_by_database", reason)
            for index, reason in rejected.items()
        ]
        metrics.PAGES_STORED.inc(len(documents) - len(rejected))
        statuses = [
            written_status(doc, pages[chosen[i]], stored_at, self.settings)
            for i, doc in enumerate(documents)
            if i not in rejected
        ]
        if statuses:
            await self._retry(
                f"writing {len(statuses)} status documents", lambda: self._write_status(statuses)
            )
        written = [index for position, index in enumerate(chosen) if position not in rejected]
        return [*dead, *self._tallies(batch, written, stored_at, unchanged)]

    async def _check(self, checks: list[tuple[str, Page]], checked_at: float) -> None:
        """Record unchanged pages on their status documents: ``checked_at`` for each (one
        update for all the 304s), the validators a 200 with the same content brought, and
        the next visit. The page documents are not touched: their content, and the
        response it came with, did not change (and rewriting a page document to move one
        field costs the local FerretDB about what storing it did)."""
        # The 304s share their $set but for the previous interval: one update per interval
        # (a round's pages mostly share one).
        not_modified: dict[float | None, list[str]] = {}
        for _id, page in checks:
            if page.status == 304:
                not_modified.setdefault(previous_interval(page), []).append(_id)
        for previous, ids_of in not_modified.items():
            fields = {
                "checked_at": checked_at,
                **schedule_fields(previous, False, checked_at, self.settings),
            }
            for start in range(0, len(ids_of), DELETE_CHUNK):
                ids = ids_of[start : start + DELETE_CHUNK]
                found = await self.status.update_many({"_id": {"$in": ids}}, {"$set": fields})
                if found.matched_count < len(ids):
                    added = await self._add_missing_status(ids)
                    if added:
                        await self.status.update_many({"_id": {"$in": added}}, {"$set": fields})
        touched = [(_id, page) for _id, page in checks if page.status != 304]
        for start in range(0, len(touched), UPDATE_CHUNK):
            chunk = touched[start : start + UPDATE_CHUNK]
            updates = {
                _id: UpdateOne(
                    {"_id": _id}, {"$set": check_update(page, checked_at, self.settings)}
                )
                for _id, page in chunk
            }
            written = await self.status.bulk_write(list(updates.values()), ordered=False)
            if written.matched_count < len(updates):
                added = await self._add_missing_status(list(updates))
                if added:
                    again = [updates[_id] for _id in added]
                    await self.status.bulk_write(again, ordered=False)

    async def _add_missing_status(self, ids: list[str]) -> list[str]:
        """Status documents for those of these stored pages that have none (pages stored
        before status documents were written), from the pages; their ``_id``s."""
        having = {doc["_id"] async for doc in self.status.find({"_id": {"$in": ids}}, {"_id": 1})}
        missing = [_id for _id in ids if _id not in having]
        projection = dict.fromkeys(STATUS_FIELDS, 1)
        pages = self.collection.find({"_id": {"$in": missing}}, projection)
        statuses = [status_document(page) async for page in pages]
        if statuses:
            await self._write_status(statuses)
        return [status["_id"] for status in statuses]

    async def _write_status(self, statuses: list[dict[str, Any]]) -> None:
        """Write the status documents of pages just stored (delete by ``_id``, insert, as
        for the pages: FerretDB writes a batch insert in one transaction, a replacement
        in one each). The page is the record: a status lost to a crash between the two is
        written again when the batch is (its offsets are committed after this)."""
        await _delete_ids(self.status, [status["_id"] for status in statuses])
        try:
            await self.status.insert_many(statuses, ordered=False)
        except BulkWriteError as error:
            # Another sink wrote one of these _ids in between (pages sharing a canonical
            # _id across partitions): replace those; anything else is raised.
            duplicates, rejected = classify_failures(error)
            if rejected:
                raise
            by_position = [statuses[i] for i in sorted(duplicates)]
            requests = [ReplaceOne({"_id": doc["_id"]}, doc) for doc in by_position]
            for start in range(0, len(requests), UPDATE_CHUNK):
                await self.status.bulk_write(requests[start : start + UPDATE_CHUNK], ordered=False)

    def _tallies(
        self,
        batch: list[Received[Any]],
        written: list[int],
        stored_at: float,
        unchanged: list[int] | None = None,
    ) -> list[Output]:
        """For the stats stage: per crawl id and crawl.pages partition, the offsets this
        batch read and wrote (offsets, not counts: a batch written again after a crash
        is then counted once)."""
        return [
            Output(self.topic(EVENTS), tally, key=tally.crawl_id.encode())
            for tally in stored_tallies(batch, written, stored_at, unchanged or ())
        ]

    async def _store(self, documents: list[dict[str, Any]]) -> dict[int, str]:
        """Store the documents; return the positions refused, with why. A document known
        to be refused is not written, so its stored version stays."""
        refused = {i: why for i, doc in enumerate(documents) if (why := refusal_reason(doc))}
        writable = [i for i in range(len(documents)) if i not in refused]
        if writable:
            rejected = await self._write([documents[i] for i in writable])
            refused.update({writable[i]: why for i, why in rejected.items()})
        return refused

    async def _write(self, documents: list[dict[str, Any]]) -> dict[int, str]:
        """Delete what is stored under the documents' ``_id``s, then insert them; return
        the positions the database refused, with why."""
        await _delete_ids(self.collection, [doc["_id"] for doc in documents])
        try:
            await self.collection.insert_many(documents, ordered=False)
            return {}
        except BulkWriteError as error:
            duplicates, rejected = classify_failures(error)
        except (InvalidDocument, OverflowError):
            # pymongo refused to encode a document (a NUL in a meta key, an integer past
            # 64 bits) before the database saw it: refuse those, store the others.
            return await self._store_encodable(documents)
        replacements = [documents[i] for i in sorted(duplicates)]
        # FerretDB 1.24 stops answering a bulk write of 100 or more updates (each holds a
        # pooled connection until the command ends); 50 at a time is safe and costs little.
        for start in range(0, len(replacements), UPDATE_CHUNK):
            await self._replace(replacements[start : start + UPDATE_CHUNK])
        return rejected

    async def _store_encodable(self, documents: list[dict[str, Any]]) -> dict[int, str]:
        refused = unencodable(documents)
        if not refused:
            raise RuntimeError("pymongo refused a batch whose documents all encode")
        kept = [index for index in range(len(documents)) if index not in refused]
        rejected = await self._store([documents[index] for index in kept])
        return {**refused, **{kept[index]: reason for index, reason in rejected.items()}}

    async def _replace(self, documents: list[dict[str, Any]]) -> None:
        """Replace the stored documents with these, by ``_id``.

        Their insert failed because the ``_id`` exists (another writer stored it between
        the delete and the insert) or because the URL is stored under another ``_id``
        (its page declared another canonical, or none, when it was stored). That rare
        second case breaks the unique index on ``url``: then the stale documents are
        deleted and the write repeated. Only then, because FerretDB 1.24 scans the whole
        collection for a delete by URL.
        """
        # No upsert: FerretDB 1.24 answers an upsert that breaks a unique index with a
        # reply pymongo cannot read. A document no _id matched is inserted below.
        requests = [ReplaceOne({"_id": doc["_id"]}, doc) for doc in documents]
        try:
            result = await self.collection.bulk_write(requests, ordered=False)
            if result.matched_count == len(requests):
                return
        except BulkWriteError as error:  # MongoDB: code 11000 for each refused document
            if classify_failures(error)[1]:
                raise
        except OperationFailure as error:  # FerretDB 1.24 refuses the whole command
            log.info("sink: replacement refused (%s); removing stale URLs", str(error)[:300])
        # Every document this finds holds one of these URLs under an _id none of these
        # documents has, so it is stale. (An $or of per-document pairs would be exact
        # but FerretDB runs it about six times slower.)
        urls = [doc["url"] for doc in documents]
        ids = [doc["_id"] for doc in documents]
        stale = {"url": {"$in": urls}, "_id": {"$nin": ids}}
        await self.collection.delete_many(stale)
        await self.status.delete_many(stale)  # their status documents go with them
        await self.collection.bulk_write(requests, ordered=False)
        try:
            await self.collection.insert_many(documents, ordered=False)
        except BulkWriteError as error:
            if classify_failures(error)[1]:
                raise  # code 11000 only means the replacement above took care of it

    async def _retry(self, what: str, action: Any) -> Any:
        """``action()``, retried while the database is unreachable. Anything else (a
        document refused on the replace path, a reply the driver cannot read, a document
        the driver cannot encode) is raised: the runtime isolates the page at fault and
        dead-letters it, instead of this partition retrying it forever. Refused
        credentials stop the sink with one line: no page is to blame, and no wait helps."""
        return await outlasting_outages(f"sink: {what}", partial(_credentials_checked, action))


async def _delete_ids(collection: Any, ids: list[Any]) -> None:
    """Delete the documents of these ``_id``s; chunked, because FerretDB pushes an ``_id``
    ``$in`` of at most 1,000 values down to its index."""
    for start in range(0, len(ids), DELETE_CHUNK):
        await collection.delete_many({"_id": {"$in": ids[start : start + DELETE_CHUNK]}})


async def _credentials_checked(action: Any) -> Any:
    try:
        return await action()
    except OperationFailure as exc:
        if exc.code not in _REFUSED_CREDENTIALS:
            raise
        reason = (exc.details or {}).get("errmsg", "authentication required")
        raise MongoCredentialsRefused(
            f"MongoDB refused the sink ({reason}): check the user in "
            f"{PREFIX}MONGO_URI and {PREFIX}MONGO_PASSWORD_FILE"
        ) from None
