"""The sink against the real MongoDB-wire server: fresh pages insert, redelivered pages
replace, and a URL is never stored twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from pymongo import AsyncMongoClient
from pymongo.errors import WriteError
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import DeadLetterRecord, Page, Revisit, Scope, Tally, encode
from streamcrawl.core.runtime import Received
from streamcrawl.sink.logic import document_for, status_document
from streamcrawl.sink.service import SinkStage

pytestmark = pytest.mark.integration


def page(url: str, title: str, **changes: Any) -> Page:
    fields: dict[str, Any] = {
        "url": url,
        "final_url": url,
        "host": "a.example",
        "status": 200,
        "fetched_at": 1.0,
        "content_type": "text/html",
        "title": title,
        "text": "",
        "links": [],
        "canonical": None,
        "content_hash": None,
        "depth": 0,
        "crawl_id": "c",
        "scope": Scope(allow_domains=["a.example"], max_depth=1),
        "redirect_chain": [],
        "redirect_to": None,
        "noindex": False,
        "nofollow": False,
    }
    fields.update(changes)
    return Page(**fields)


async def test_redelivery_replaces_and_never_duplicates(settings: Settings) -> None:
    sink = SinkStage(settings)
    await sink.start()
    try:
        first = [
            document_for(page(f"http://a.example/{n}", "v1"), 1.0, settings) for n in range(300)
        ]
        await sink._store(first)
        # A redelivered batch overlapping the first, with newer content, plus new pages;
        # stored twice, the second time as 150 replacements (FerretDB needs them chunked).
        second = [
            document_for(page(f"http://a.example/{n}", "v2"), 2.0, settings)
            for n in range(250, 400)
        ]
        await sink._store(second)
        await sink._store(second)
    finally:
        await sink.stop()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        docs = {doc["url"]: doc["title"] async for doc in collection.find({})}
        assert await collection.count_documents({}) == 400 == len(docs)
        assert {url for url, title in docs.items() if title == "v2"} == {
            f"http://a.example/{n}" for n in range(250, 400)
        }
        indexes = await collection.index_information()
        assert indexes["url_unique"]["unique"] is True
    finally:
        await client.close()


async def test_a_document_the_database_refuses_is_reported_not_retried(settings: Settings) -> None:
    sink = SinkStage(settings)
    await sink.start()
    try:
        hostile = page("http://a.example/hostile", "x", meta={"$where": "1"})
        documents = [
            document_for(page("http://a.example/ok", "ok"), 1.0, settings),
            document_for(hostile, 1.0, settings),
        ]
        rejected = await asyncio.wait_for(sink._store(documents), 30)
    finally:
        await sink.stop()
    assert list(rejected) == [1]
    assert "$where" in rejected[1]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        assert [doc["url"] async for doc in collection.find({})] == ["http://a.example/ok"]
    finally:
        await client.close()


async def test_spellings_declaring_one_canonical_are_one_document(settings: Settings) -> None:
    def spelling(url: str, canonical: str | None, title: str, at: float) -> dict[str, Any]:
        return document_for(page(url, title, canonical=canonical), at, settings)

    a, b = "http://a.example/a", "http://a.example/b"
    sink = SinkStage(settings)
    await sink.start()
    try:
        # One batch: /a is inserted, /a?x=1 with it falls back to a replacement.
        await sink._store(
            [
                spelling(a, a, "a", 1.0),
                spelling(a + "?x=1", a, "a?x=1", 1.0),
            ]
        )
        # /b?x=1 is first stored under its own URL, then declares /b: the stale document
        # goes (the unique URL index would refuse a second document with its URL).
        await sink._store([spelling(b + "?x=1", None, "old", 1.0)])
        await sink._store([spelling(b, b, "b", 2.0)])
        await asyncio.wait_for(sink._store([spelling(b + "?x=1", b, "b?x=1", 3.0)]), 30)
        # And back: no canonical any more, stored under its own URL again.
        await asyncio.wait_for(sink._store([spelling(a + "?x=1", None, "own", 4.0)]), 30)
    finally:
        await sink.stop()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        docs = {doc["_id"]: (doc["url"], doc["title"]) async for doc in collection.find({})}
    finally:
        await client.close()
    assert docs == {b: (b + "?x=1", "b?x=1"), a + "?x=1": (a + "?x=1", "own")}


def page_record(topic: str, offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=topic,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=value,
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=len(value),
        headers=(),
    )


async def test_the_stage_stores_a_batch_and_dead_letters_what_the_database_refuses(
    settings: Settings,
) -> None:
    """SinkStage.process on records decoded by its own input: the last version of a URL
    in a batch wins, and a refused document is one dead letter naming its record."""
    sink = SinkStage(settings)
    (spec,) = sink.inputs()
    values = [
        encode(page("http://a.example/1", "old")),
        encode(page("http://a.example/2", "two")),
        encode(page("http://a.example/1", "new")),
        encode(page("http://a.example/bad", "x", meta={"$where": "1"})),
    ]
    records = [page_record(sink.topic(spec.suffix), n, value) for n, value in enumerate(values)]
    batch = [Received(record, spec.decode(record.value)) for record in records]
    await sink.start()
    try:
        outputs = await asyncio.wait_for(sink.process(batch), 60)
    finally:
        await sink.stop()
    dead = [out for out in outputs if out.topic == settings.topic_prefix + "dlq"]
    (tally,) = [out.value for out in outputs if out.topic == settings.topic_prefix + "events"]
    assert len(outputs) == 2
    # For the stats stage: all four read; written: /2 and the newer /1 (the older /1 was
    # superseded in its batch, /bad refused).
    assert isinstance(tally, Tally)
    assert (tally.stage, tally.partition, tally.read, tally.offsets) == (
        "sink",
        0,
        [0, 1, 2, 3],
        [1, 2],
    )
    assert len(dead) == 1
    (letter,) = dead
    assert letter.topic == settings.topic_prefix + "dlq"
    assert isinstance(letter.value, DeadLetterRecord)
    assert (letter.value.stage, letter.value.reason, letter.value.offset) == (
        "sink",
        "rejected_by_database",
        3,
    )
    assert letter.value.payload == values[3].decode()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        docs = {doc["_id"]: doc["title"] async for doc in collection.find({})}
    finally:
        await client.close()
    assert docs == {"http://a.example/1": "new", "http://a.example/2": "two"}


async def test_a_refused_replacement_of_a_stored_page_is_reported_not_retried(
    settings: Settings,
) -> None:
    """A page already stored comes again with a document the database refuses (a seed's
    meta with a $-key): it is dead-lettered like a refused insert, and the sink moves on."""
    url = "http://a.example/again"
    sink = SinkStage(settings)
    await sink.start()
    try:
        assert await sink._store([document_for(page(url, "first"), 1.0, settings)]) == {}
        hostile = page(url, "second", meta={"$where": "1"})
        rejected = await asyncio.wait_for(
            sink._retry("storing", lambda: sink._store([document_for(hostile, 2.0, settings)])),
            60,
        )
    finally:
        await sink.stop()
    assert list(rejected) == [0] and "$where" in rejected[0]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        assert [doc["title"] async for doc in collection.find({})] == ["first"]
    finally:
        await client.close()


async def test_a_replacement_the_database_refuses_is_raised_not_retried(settings: Settings) -> None:
    """The replace path: a stored page's new version that the database refuses. FerretDB
    1.24.2 refuses it already on the insert (it validates a document before looking for a
    duplicate), so through ``_store`` such a page never gets here; called directly, the
    replacement gets an answer pymongo cannot read (KeyError 'nModified'). Whatever the
    database answers on this path (a BulkWriteError, which the sink used to retry forever,
    stopping its partition, or this), anything but an outage is raised at once, for the
    runtime to dead-letter the page."""
    sink = SinkStage(settings)
    await sink.start()
    try:
        stored = document_for(page("http://a.example/r", "v1"), 1.0, settings)
        await sink._store([stored])
        refused = {**stored, "meta": {"$where": "1"}}
        started = asyncio.get_running_loop().time()
        with pytest.raises(Exception) as raised:
            await asyncio.wait_for(sink._retry("replacing", lambda: sink._replace([refused])), 30)
        assert not isinstance(raised.value, TimeoutError)
        assert asyncio.get_running_loop().time() - started < 10
    finally:
        await sink.stop()


async def test_the_local_server_finds_stored_pages_by_id_through_its_index(
    settings: Settings,
) -> None:
    """The sink's lookups by ``_id`` (one, and a batch with $in) must not scan: the query
    plans of the stack's FerretDB build search the ``_id`` index, and a mixed $in (which
    cannot be pushed down) still answers right."""
    sink = SinkStage(settings)
    await sink.start()
    try:
        urls = [f"http://a.example/{n}" for n in range(5)]
        await sink._store([document_for(page(url, "t"), 1.0, settings) for url in urls])
        database = sink.client[settings.mongo_database]
        for filter_ in ({"_id": urls[0]}, {"_id": {"$in": urls[:3]}}):
            explained = await database.command(
                "explain", {"find": settings.mongo_collection, "filter": filter_}
            )
            (plan,) = explained["queryPlanner"]["Plan"]
            assert "USING INDEX" in plan and "__id_" in plan, (filter_, plan)
        found = sink.collection.find({"_id": {"$in": [urls[1], urls[4], 7, "nope"]}}, {"_id": 1})
        assert sorted([doc["_id"] async for doc in found]) == [urls[1], urls[4]]
    finally:
        await sink.stop()


async def test_status_documents_follow_their_pages(settings: Settings) -> None:
    """Each page the stage stores gets a status document with its fields, checked_at and
    schedule; a 304 moves the status document and leaves the page as stored; a stale
    document dropped when its URL declares a canonical takes its status."""
    sink = SinkStage(settings)
    (spec,) = sink.inputs()
    b = "http://a.example/b"

    async def process(*pages: Page) -> None:
        records = [page_record(sink.topic(spec.suffix), n, encode(p)) for n, p in enumerate(pages)]
        await sink.process([Received(r, spec.decode(r.value)) for r in records])

    await sink.start()
    try:
        await process(page("http://a.example/a", "a"), page(b + "?x=1", "own"))
        await process(page(b, "b", canonical=b))
        await process(page(b + "?x=1", "b?x=1", canonical=b))  # the stale /b?x=1 goes
        revisit = Revisit(round=2, stored_id="http://a.example/a", interval=86400.0)
        not_modified = page("http://a.example/a", "", status=304, unchanged=True, revisit=revisit)
        before = await stored(settings)
        await process(not_modified)
    finally:
        await sink.stop()
    pages, statuses = await stored(settings)
    assert set(pages) == {"http://a.example/a", b}
    assert set(statuses) == set(pages)
    moved = {"checked_at", "revisit_interval", "next_visit"}
    for _id, doc in pages.items():
        status = statuses[_id]
        assert {k: v for k, v in status.items() if k not in moved} == status_document(doc)
        assert moved <= set(status) and moved.isdisjoint(doc)
    checked = statuses["http://a.example/a"]
    assert checked["checked_at"] > checked["stored_at"] == pages["http://a.example/a"]["stored_at"]
    assert checked["revisit_interval"] == 1.5 * 86400.0
    assert pages == before[0]  # the page document is not rewritten by a 304
    assert statuses[b] == before[1][b]


async def stored(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The page documents and the status documents, by ``_id``."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        database = client[settings.mongo_database]
        pages = {doc["_id"]: doc async for doc in database[settings.mongo_collection].find({})}
        statuses = {
            doc["_id"]: doc async for doc in database[settings.mongo_status_collection].find({})
        }
    finally:
        await client.close()
    return pages, statuses


async def test_the_local_server_updates_many_documents_in_batches(settings: Settings) -> None:
    """The project's FerretDB build writes an update_many 500 documents per transaction:
    every match is written, and an error part-way keeps what was modified before it."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database]["update_many_batches"]
        await collection.insert_many(
            [{"_id": n, "v": n, "s": "text" if n == 1200 else 0} for n in range(1500)]
        )
        result = await collection.update_many({}, {"$set": {"t": 1}})
        assert (result.matched_count, result.modified_count) == (1500, 1500)
        assert await collection.count_documents({"t": 1}) == 1500
        with pytest.raises(WriteError):
            await collection.update_many({}, {"$inc": {"s": 1}})  # fails on _id 1200
        assert await collection.count_documents({"s": 1}) == 1200
        assert await collection.count_documents({"s": 0}) == 299
    finally:
        await client.close()
