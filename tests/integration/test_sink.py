"""The sink against the real MongoDB-wire server: fresh pages insert, redelivered pages
replace, and a URL is never stored twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from streamcrawl.core.config import Settings
from streamcrawl.sink.service import SinkStage, document_for

pytestmark = pytest.mark.integration


def page(url: str, title: str) -> dict[str, Any]:
    return {"url": url, "title": title, "status": 200, "crawl_id": "c"}


async def test_redelivery_replaces_and_never_duplicates(settings: Settings) -> None:
    sink = SinkStage(settings)
    await sink.start()
    try:
        first = [document_for(page(f"http://a.example/{n}", "v1"), 1.0) for n in range(300)]
        await sink._store(first)
        # A redelivered batch overlapping the first, with newer content, plus new pages;
        # stored twice, the second time as 150 replacements (FerretDB needs them chunked).
        second = [document_for(page(f"http://a.example/{n}", "v2"), 2.0) for n in range(250, 400)]
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
        hostile = {**page("http://a.example/hostile", "x"), "meta": {"$where": "1"}}
        documents = [
            document_for(page("http://a.example/ok", "ok"), 1.0),
            document_for(hostile, 1.0),
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
    def spelling(url: str, canonical: str | None, title: str) -> dict[str, Any]:
        return {**page(url, title), "canonical": canonical, "redirect_to": None}

    a, b = "http://a.example/a", "http://a.example/b"
    sink = SinkStage(settings)
    await sink.start()
    try:
        # One batch: /a is inserted, /a?x=1 with it falls back to a replacement.
        await sink._store(
            [
                document_for(spelling(a, a, "a"), 1.0),
                document_for(spelling(a + "?x=1", a, "a?x=1"), 1.0),
            ]
        )
        # /b?x=1 is first stored under its own URL, then declares /b: the stale document
        # goes (the unique URL index would refuse a second document with its URL).
        await sink._store([document_for(spelling(b + "?x=1", None, "old"), 1.0)])
        await sink._store([document_for(spelling(b, b, "b"), 2.0)])
        await asyncio.wait_for(
            sink._store([document_for(spelling(b + "?x=1", b, "b?x=1"), 3.0)]), 30
        )
        # And back: no canonical any more, stored under its own URL again.
        await asyncio.wait_for(
            sink._store([document_for(spelling(a + "?x=1", None, "own"), 4.0)]), 30
        )
    finally:
        await sink.stop()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        docs = {doc["_id"]: (doc["url"], doc["title"]) async for doc in collection.find({})}
    finally:
        await client.close()
    assert docs == {b: (b + "?x=1", "b?x=1"), a + "?x=1": (a + "?x=1", "own")}
