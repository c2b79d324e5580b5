"""``streamcrawl recrawl CRAWL_ID``: revisit the pages stored for a crawl, conditionally.

The crawl's status documents (one per stored page, written by the sink beside it: what a
revisit needs, without the text and links) are read from MongoDB in batches (a cursor, so
memory stays flat whatever the crawl's size) and each becomes a crawl.discovered record
carrying a :class:`~streamcrawl.core.messages.Revisit`: the round, and the stored
``etag``, ``last_modified``, ``content_hash`` and ``_id``. They go straight to
crawl.discovered, keyed by host like the frontier's candidates (the stored URL is already
canonical and in scope), so dedup admits each once in this round, and the fetcher sends
``If-None-Match`` / ``If-Modified-Since``. A 304, or a 200 with the stored digest, only
moves its status document's ``checked_at`` (and schedule); a changed page is parsed, its
links followed (in the same round) and its document rewritten.

Dedup keys a revisit by crawl id and round, so each stored URL passes once per round; the
links of a changed page are plain candidates of the crawl, keyed by crawl id alone, so only
URLs the crawl never had get through (they are fetched unconditionally and stored). A link
to a stored URL is dropped whether it reaches dedup before or after that URL's revisit,
so no page is requested twice in a round, and none without its validators.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from pymongo import AsyncMongoClient

from ..core.config import Settings
from ..core.kafka import check_kafka_access, make_producer
from ..core.messages import Discovered, encode
from ..core.secrets import mongo_client_uri
from ..core.topics import DISCOVERED

# The fields of a stored document a revisit needs (the text and links stay in the database).
PROJECTION = {
    "url": 1,
    "host": 1,
    "depth": 1,
    "priority": 1,
    "scope": 1,
    "kind": 1,
    "meta": 1,
    "etag": 1,
    "last_modified": 1,
    "content_hash": 1,
    "revisit_interval": 1,
}
BATCH = 1000
# Documents per cursor batch: small, so the first revisits are fetched while the rest are
# read (a crawl stored before status documents is read from its pages, which the local
# FerretDB decodes whole: ~2 ms each for a 40 KiB page).
READ_BATCH = 100


def new_round(now: float | None = None) -> int:
    """A round id for a recrawl started now: its Unix second (rounds of one crawl id
    started a second or more apart are distinct, and ordered)."""
    return max(1, int(time.time() if now is None else now))


def revisit_candidate(
    document: Mapping[str, Any],
    crawl_id: str,
    round_id: int,
    now: float,
    due: float | None = None,
) -> Discovered | None:
    """The crawl.discovered record that revisits one stored document, or None for a
    document no stage could have written (it is skipped). It carries the document's
    ``revisit_interval`` (for the adaptive schedule) and, from the scheduler, ``due``."""
    fields: dict[str, Any] = {
        "url": document.get("url"),
        "host": document.get("host"),
        "crawl_id": crawl_id,
        "depth": document.get("depth", 0),
        "priority": document.get("priority", 5),
        "scope": document.get("scope"),
        "discovered_at": now,
        "kind": document.get("kind") or "page",
        "revisit": {
            "round": round_id,
            "etag": document.get("etag"),
            "last_modified": document.get("last_modified"),
            "digest": document.get("content_hash"),
            "stored_id": document.get("_id"),
            "interval": document.get("revisit_interval"),
            "due": due,
        },
    }
    if document.get("meta") is not None:
        fields["meta"] = document["meta"]
    try:
        return msgspec.convert(fields, Discovered)
    except msgspec.ValidationError:
        return None


async def stored_revisits(
    settings: Settings,
    crawl_id: str,
    round_id: int,
    batch: int = READ_BATCH,
    from_pages: bool = False,
) -> AsyncIterator[Discovered]:
    """The revisit records of ``crawl_id``'s stored documents, read ``batch`` at a time
    from their status documents (small: no text, no links), or from the pages themselves
    when ``from_pages`` is set or the crawl has no status document at all (stored before
    the sink wrote them). A crawl stored partly before status documents needs
    ``from_pages`` once: the sink writes the missing status documents as it checks them."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_client_uri(settings))
    try:
        database = client[settings.mongo_database]
        collection = database[settings.mongo_status_collection]
        if from_pages or await collection.find_one({"crawl_id": crawl_id}, {"_id": 1}) is None:
            collection = database[settings.mongo_collection]
        cursor = collection.find({"crawl_id": crawl_id}, PROJECTION, batch_size=batch)
        now = time.time()
        async for document in cursor:
            candidate = revisit_candidate(document, crawl_id, round_id, now)
            if candidate is not None:
                yield candidate
    finally:
        await client.close()


@dataclass
class Queued:
    round: int
    queued: int = 0
    with_validators: int = 0


async def queue_revisits(
    settings: Settings,
    crawl_id: str,
    round_id: int | None = None,
    batch: int = BATCH,
    from_pages: bool = False,
) -> Queued:
    """Put a revisit of every stored page of ``crawl_id`` on crawl.discovered; how many
    (read from the pages themselves with ``from_pages``, see :func:`stored_revisits`)."""
    result = Queued(new_round() if round_id is None else round_id)
    topic = settings.topic_prefix + DISCOVERED
    producer = make_producer(settings)
    await producer.start()
    try:
        pending = []
        revisits = stored_revisits(
            settings, crawl_id, result.round, READ_BATCH, from_pages=from_pages
        )
        async for candidate in revisits:
            pending.append(
                await producer.send(topic, encode(candidate), key=candidate.host.encode())
            )
            result.queued += 1
            revisit = candidate.revisit
            if revisit is not None and (revisit.etag or revisit.last_modified):
                result.with_validators += 1
            if len(pending) >= batch:  # bounded: wait for the broker every batch
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return result


async def revisit_counts(settings: Settings, crawl_id: str, since: float) -> tuple[int, int]:
    """(documents rewritten, documents only checked) for ``crawl_id`` since ``since``,
    counted on the status documents (each carries its page's ``stored_at`` and when the
    URL was last ``checked_at``)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_client_uri(settings))
    try:
        collection = client[settings.mongo_database][settings.mongo_status_collection]
        rewritten = await collection.count_documents(
            {"crawl_id": crawl_id, "stored_at": {"$gte": since}}
        )
        checked = await collection.count_documents(
            {"crawl_id": crawl_id, "stored_at": {"$lt": since}, "checked_at": {"$gte": since}}
        )
        return rewritten, checked
    finally:
        await client.close()


def recrawl_command(args: argparse.Namespace) -> int:
    from .local import _connection_env

    extra = _connection_env() if args.run else {}
    settings = Settings.from_env({**os.environ, **extra})
    asyncio.run(check_kafka_access(settings))
    if not args.run:
        queuing = queue_revisits(settings, args.crawl_id, args.round, from_pages=args.from_pages)
        queued = asyncio.run(queuing)
        _print_queued(args.crawl_id, queued)
        return 0
    log_dir = Path(tempfile.mkdtemp(prefix="streamcrawl-logs-"))
    started = time.time()
    queued, elapsed, fetched = asyncio.run(_recrawl(settings, args, log_dir))
    rewritten, checked = asyncio.run(revisit_counts(settings, args.crawl_id, started))
    print(
        f"\nrecrawl {args.crawl_id} round {queued.round} drained in {elapsed:.1f}s\n"
        f"  queued     {queued.queued} stored pages ({queued.with_validators} with validators)\n"
        f"  fetched    {fetched} responses (304s included)\n"
        f"  unchanged  {checked} documents: content kept, status checked_at updated\n"
        f"  rewritten  {rewritten} documents (changed or new pages)\n"
        f"  logs       {log_dir}"
    )
    return 0


def _print_queued(crawl_id: str, queued: Queued) -> None:
    print(
        f"recrawl {crawl_id} round {queued.round}: queued {queued.queued} stored pages "
        f"({queued.with_validators} with validators) on crawl.discovered"
    )


async def _recrawl(
    settings: Settings, args: argparse.Namespace, log_dir: Path
) -> tuple[Queued, float, int]:
    from .local import running_pipeline
    from .watch import watch_until_drained

    async with running_pipeline(settings, log_dir) as (stages, watch):
        print(f"recrawl {args.crawl_id}: stage logs in {log_dir}", file=sys.stderr)
        queued = await queue_revisits(
            settings, args.crawl_id, args.round, from_pages=args.from_pages
        )
        _print_queued(args.crawl_id, queued)
        progress = await watch_until_drained(watch, stages, sys.stderr, timeout=args.timeout)
        return queued, progress.elapsed, progress.fetched
