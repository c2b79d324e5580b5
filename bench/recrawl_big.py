"""Re-crawling a site into a big collection against crawling it fresh: the sink's part.

    python bench/recrawl_big.py --preload 1000000 --site 20000

Drives the sink stage alone (``SinkStage.process``, the code the sink process runs on each
consumed batch), in this process, on prepared crawl.pages records: no broker, fetcher or
parser, so the time measured is the sink's and the database's. One local FerretDB (the
project's build; ``--backend`` as in ``_servers.py``) holds two databases:
1. ``fresh``: the site's pages written into an empty collection (a first crawl);
2. ``big``: ``--preload`` page documents of other sites inserted directly (insert_many of
   the documents the sink would write), then the site crawled once into it (new pages into
   a big collection), then again with new fetch times (the re-crawl: every page exists).
Reports the time and pages/s of each write and the re-crawl against the fresh crawl.

Pages are page-sized: ~4 KB of text, 30 same-host links, the fields the parser fills.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _servers import ferretdb
from aiokafka import ConsumerRecord
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import Page, Scope
from streamcrawl.core.runtime import Received
from streamcrawl.sink.logic import document_for
from streamcrawl.sink.service import SinkStage

WORDS = ["kafka", "stream", "crawl", "page", "frontier", "fetch", "parse", "store", "bloom"]
# Texts drawn once: a million preloaded pages must not cost a million random texts.
TEXTS = [" ".join(random.Random(n).choices(WORDS, k=650)) for n in range(64)]


def make_page(host: str, number: int, pages: int, fetched_at: float, rng: random.Random) -> Page:
    url = f"http://{host}/p/{number}.html"
    return Page(
        url=url,
        final_url=url,
        host=host,
        status=200,
        fetched_at=fetched_at,
        content_type="text/html",
        title=f"{host} page {number}",
        text=f"{number} {TEXTS[number % len(TEXTS)]}",
        links=[f"http://{host}/p/{rng.randrange(pages)}.html" for _ in range(30)],
        canonical=None,
        content_hash=f"{rng.getrandbits(64):016x}",
        depth=min(number, 5),
        crawl_id="recrawl-bench",
        scope=Scope(allow_domains=[host], max_depth=10),
        redirect_chain=[],
        redirect_to=None,
        noindex=False,
        nofollow=False,
        body_bytes=16_000,
    )


def received(pages: list[Page]) -> list[Received[Any]]:
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic="crawl.pages",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=None,
        value=b"",
        checksum=None,
        serialized_key_size=-1,
        serialized_value_size=0,
        headers=(),
    )
    return [Received(record, page) for page in pages]


def site_batches(pages: int, batch: int, fetched_at: float) -> list[list[Received[Any]]]:
    rng = random.Random(7)
    site = [make_page("site.example", n, pages, fetched_at, rng) for n in range(pages)]
    return [received(site[first : first + batch]) for first in range(0, pages, batch)]


async def crawl(settings: Settings, batches: list[list[Received[Any]]]) -> float:
    """Seconds the sink takes to store every batch (started and stopped outside)."""
    sink = SinkStage(settings)
    await sink.start()
    try:
        started = time.perf_counter()
        for batch in batches:
            dead = await sink.process(batch)
            assert not dead, dead
        return time.perf_counter() - started
    finally:
        await sink.stop()


def other_sites(settings: Settings, first: int, count: int, total: int) -> list[dict[str, Any]]:
    """Documents ``first`` .. ``first + count`` of the preload: the sink's document of one
    generated page, copied with each page's own URL, host, title, text and links (building
    each through ``document_for`` would make the preload CPU-bound in this process)."""
    template = document_for(
        make_page("other0.example", 0, total, 1.0, random.Random(0)), 1.0, settings
    )
    docs = []
    for n in range(first, first + count):
        host = f"other{n % 997}.example"
        url = f"http://{host}/p/{n}.html"
        links = [f"http://{host}/p/{(n * 31 + k * 7919) % total}.html" for k in range(30)]
        docs.append(
            {
                **template,
                "_id": url,
                "url": url,
                "final_url": url,
                "host": host,
                "title": f"{host} page {n}",
                "text": f"{n} {TEXTS[n % len(TEXTS)]}",
                "links": links,
                "scope": {**template["scope"], "allow_domains": [host]},
            }
        )
    return docs


async def preload(settings: Settings, count: int) -> float:
    """Insert ``count`` documents of other sites directly, with the sink's indexes; the next
    thousand are built while the server stores the last."""
    sink = SinkStage(settings)
    await sink.start()  # creates the indexes first, so the preload maintains them
    started = time.perf_counter()
    pending: asyncio.Task[Any] | None = None
    try:
        for first in range(0, count, 1000):
            docs = other_sites(settings, first, min(1000, count - first), count)
            if pending is not None:
                await pending
            pending = asyncio.create_task(sink.collection.insert_many(docs, ordered=False))
            await asyncio.sleep(0)  # let it send before building the next thousand
            if (first // 1000) % 100 == 99:
                done = first + 1000
                rate = done / (time.perf_counter() - started)
                print(f"  preloaded {done:,} ({rate:,.0f} docs/s)", flush=True)
        if pending is not None:
            await pending
        return time.perf_counter() - started
    finally:
        await sink.stop()


async def count_site(settings: Settings, database: str, pages: int) -> int:
    """How many of the site's pages are stored, looked up by ``_id`` (a count of the
    whole collection would make FerretDB read every document back)."""
    sink = SinkStage(settings)
    await sink.start()
    try:
        collection = sink.client[database][settings.mongo_collection]
        urls = [f"http://site.example/p/{n}.html" for n in range(pages)]
        total = 0
        for first in range(0, pages, 500):
            query = {"_id": {"$in": urls[first : first + 500]}}
            total += await collection.count_documents(query)
        return total
    finally:
        await sink.stop()


async def compare(fresh: Settings, big: Settings, pages: int, batch: int) -> dict[str, float]:
    """The site's pages through the sink into ``fresh`` (empty), then twice into ``big``."""
    first = site_batches(pages, batch, 1.0)
    again = site_batches(pages, batch, 2.0)
    result = {"fresh_s": await crawl(fresh, first)}
    print(
        f"sink alone, fresh crawl into an empty collection: {result['fresh_s']:.1f} s", flush=True
    )
    result["first_big_s"] = await crawl(big, first)
    print(f"sink alone, first crawl into the big one: {result['first_big_s']:.1f} s", flush=True)
    result["recrawl_big_s"] = await crawl(big, again)
    print(f"sink alone, re-crawl into the big one: {result['recrawl_big_s']:.1f} s", flush=True)
    result["ratio"] = result["recrawl_big_s"] / result["fresh_s"]
    return result


async def run(args: argparse.Namespace, uri: str) -> dict[str, Any]:
    fresh = Settings.from_env({"STREAMCRAWL_MONGO_URI": uri, "STREAMCRAWL_MONGO_DATABASE": "fresh"})
    big = Settings.from_env({"STREAMCRAWL_MONGO_URI": uri, "STREAMCRAWL_MONGO_DATABASE": "big"})
    result: dict[str, Any] = {"site_pages": args.site, "preload": args.preload}
    result["preload_s"] = await preload(big, args.preload)
    result.update(await compare(fresh, big, args.site, args.batch))
    result["site_documents"] = await count_site(big, "big", args.site)
    assert result["site_documents"] == args.site, result["site_documents"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preload", type=int, default=1_000_000)
    parser.add_argument("--site", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="the sink's batch size")
    parser.add_argument("--backend", default="sqlite")
    parser.add_argument("--tmp", default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="recrawl-big-", dir=args.tmp))
    try:
        with ferretdb(args.backend, root) as client:
            host, port = client.address or ("127.0.0.1", 0)
            result = asyncio.run(run(args, f"mongodb://{host}:{port}/"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["backend"] = args.backend
    print(json.dumps(result))
    site = args.site
    print("| write | documents in the collection before | seconds | pages/s |")
    print("|---|---:|---:|---:|")
    for label, key, before in (
        ("fresh crawl (empty collection)", "fresh_s", 0),
        ("first crawl into the big collection", "first_big_s", args.preload),
        ("re-crawl (every page stored)", "recrawl_big_s", args.preload + site),
    ):
        print(f"| {label} | {before:,} | {result[key]:.1f} | {site / result[key]:,.0f} |")
    print(f"re-crawl into {args.preload:,} documents vs fresh crawl: {result['ratio']:.2f}x")


if __name__ == "__main__":
    main()
