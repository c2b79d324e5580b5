"""How the MongoDB-wire server's cost per page grows with the collection: the sink's writes
and the crawl command's count, at growing collection sizes, on one local FerretDB.

    python bench/sink_scaling.py --sizes 2000,20000,60000

Starts its own FerretDB (the project's cached build, SQLite backend) on a free port, with
the sink's indexes (unique ``url``, ``crawl_id``), grows one collection of page-sized
documents to each size in turn and measures there, side by side:
- insert_many of 200 new pages (the sink's fast path);
- ReplaceOne by ``_id`` of 200 stored pages, 50 per bulk write, three rounds (the sink's
  path for pages already stored: redeliveries and re-crawls);
- delete_many(``_id`` $in) + insert_many of 200 stored pages (an alternative to replacing);
- count_documents by ``crawl_id`` (what the crawl command's summary asks).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pymongo import MongoClient, ReplaceOne
from pymongo.collection import Collection
from sink_writes import free_port, page, start_ferretdb

BATCH = 200


def rate(action: Any, count: int = BATCH) -> float:
    started = time.perf_counter()
    action()
    return count / (time.perf_counter() - started)


def measure(pages: Collection[dict[str, Any]], size: int) -> dict[str, Any]:
    replaced = []
    for round_number in range(3):
        docs = [
            page(i, 10 + round_number)
            for i in range(round_number * BATCH, (round_number + 1) * BATCH)
        ]

        def replace(docs: list[dict[str, Any]] = docs) -> None:
            for start in range(0, BATCH, 50):
                chunk = docs[start : start + 50]
                pages.bulk_write([ReplaceOne({"_id": d["_id"]}, d) for d in chunk], ordered=False)

        replaced.append(rate(replace))
    again = [page(i, 20) for i in range(5 * BATCH, 6 * BATCH)]

    def delete_insert() -> None:
        pages.delete_many({"_id": {"$in": [d["_id"] for d in again]}})
        pages.insert_many(again, ordered=False)

    fresh = [page(i, 1) for i in range(10**7 + size, 10**7 + size + BATCH)]
    inserted = rate(lambda: pages.insert_many(fresh, ordered=False))
    pages.delete_many({"_id": {"$in": [d["_id"] for d in fresh]}})
    started = time.perf_counter()
    pages.count_documents({"crawl_id": "bench"})
    return {
        "size": size,
        "insert": inserted,
        "replace": replaced,
        "delete_insert": rate(delete_insert),
        "count_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="2000,20000,60000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="sink-scaling-"))
    port = free_port()
    server = start_ferretdb(root, port)
    rows = []
    try:
        client: MongoClient[dict[str, Any]] = MongoClient(
            f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=20000
        )
        pages = client.bench.pages
        pages.create_index("url", unique=True)
        pages.create_index("crawl_id")
        stored = 0
        for size in sizes:
            for start in range(stored, size, 1000):
                pages.insert_many([page(i, 1) for i in range(start, min(size, start + 1000))])
            stored = size
            rows.append(measure(pages, size))
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)
    print(
        "| stored docs | insert new, docs/s | replace by _id, docs/s (3 rounds) | "
        "delete $in + insert, docs/s | count by crawl_id |"
    )
    print("|---:|---:|---|---:|---:|")
    for row in rows:
        replaced = ", ".join(f"{value:,.0f}" for value in row["replace"])
        print(
            f"| {row['size']:,} | {row['insert']:,.0f} | {replaced} | "
            f"{row['delete_insert']:,.0f} | {row['count_s']:.2f} s |"
        )


if __name__ == "__main__":
    main()
