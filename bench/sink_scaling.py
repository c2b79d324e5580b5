"""How the MongoDB-wire server's cost per page grows with the collection: the sink's writes
and a count by crawl, at growing collection sizes, side by side on several backends.

    python bench/sink_scaling.py --backends sqlite,postgresql --sizes 1000,100000,1000000

For each backend in turn it starts its own server (see ``_servers.py``: ``sqlite`` is the
project's FerretDB build, ``sqlite-stock`` an unpatched v1.24.2 binary, ``postgresql``
FerretDB on a private Debian PostgreSQL), creates the sink's indexes (unique ``url``,
``crawl_id``), grows one collection of page-sized documents to each size and measures there:
- write new: the sink's write of a batch of 200 new pages (delete by ``_id`` $in, which
  finds nothing, then insert_many unordered);
- write stored: the same for 200 pages already stored (spread over the collection);
- replace: ReplaceOne by ``_id``, 50 per bulk write, 200 other stored pages (the sink's
  earlier path for stored pages, and MongoDB's usual one; not run on PostgreSQL);
- count crawl: the ``_id``s of one crawl's 200 pages (find by ``crawl_id``, counted);
- delete by URL: the sink's rare stale-URL delete (``url`` $in, ``_id`` $nin), 10 URLs; only
  up to ``--scan-limit`` documents, since FerretDB scans for it.
A measurement stops after ``--cap`` seconds and reports the rate of what it finished.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _servers import ferretdb
from pymongo import ReplaceOne
from pymongo.collection import Collection
from pymongo.errors import ExecutionTimeout
from sink_writes import page

BATCH = 200
CHUNK = 50

Pages = Collection[dict[str, Any]]


def grow(pages: Pages, start: int, size: int) -> None:
    began = time.perf_counter()
    for first in range(start, size, 1000):
        docs = [page(i, 1) for i in range(first, min(size, first + 1000))]
        pages.insert_many(docs, ordered=False)
        if (first // 1000) % 100 == 99:
            done = first + 1000 - start
            print(
                f"  grown by {done:,} ({done / (time.perf_counter() - began):,.0f} docs/s)",
                flush=True,
            )


def chunked(docs: list[dict[str, Any]], write: Any, cap: float) -> float:
    """Docs per second writing ``docs`` CHUNK at a time, stopping after ``cap`` seconds."""
    started = time.perf_counter()
    done = 0
    for first in range(0, len(docs), CHUNK):
        write(docs[first : first + CHUNK])
        done += len(docs[first : first + CHUNK])
        if time.perf_counter() - started > cap:
            break
    return done / (time.perf_counter() - started)


def replace(pages: Pages, docs: list[dict[str, Any]]) -> None:
    pages.bulk_write([ReplaceOne({"_id": d["_id"]}, d) for d in docs], ordered=False)


def sink_write(pages: Pages, docs: list[dict[str, Any]]) -> None:
    """As the sink (services/sink/service.py ``_write``): delete what is stored under the
    batch's ``_id``s, then insert the batch."""
    pages.delete_many({"_id": {"$in": [doc["_id"] for doc in docs]}})
    pages.insert_many(docs, ordered=False)


def backend_replaces(backend: str) -> bool:
    """FerretDB 1.24 on PostgreSQL hung for minutes on 50 ReplaceOne in one bulk write (each
    update holds a pooled connection until the command ends): not measured there."""
    return backend != "postgresql"


def measure(pages: Pages, size: int, args: argparse.Namespace) -> dict[str, Any]:
    sample = random.Random(size).sample(range(size), 2 * BATCH)
    stored = [page(i, 2) for i in sample[:BATCH]]
    for doc in stored:
        doc["crawl_id"] = "bench"
    others = [page(i, 3) for i in sample[BATCH:]]
    fresh = [page(i, 1) for i in range(10**8 + size, 10**8 + size + BATCH)]
    crawl = f"fresh-{size}"
    for doc in fresh:
        doc["crawl_id"] = crawl
    row: dict[str, Any] = {"size": size}
    started = time.perf_counter()
    sink_write(pages, fresh)
    row["write_new"] = BATCH / (time.perf_counter() - started)
    started = time.perf_counter()
    sink_write(pages, stored)
    row["write_stored"] = BATCH / (time.perf_counter() - started)
    row["replace"] = None
    if backend_replaces(args.backend):
        row["replace"] = chunked(others, lambda docs: replace(pages, docs), args.cap)
    started = time.perf_counter()
    try:
        cursor = pages.find({"crawl_id": crawl}, {"_id": 1}).max_time_ms(int(args.cap * 1000))
        found = len(list(cursor))
        assert found == BATCH, found
        row["count_s"] = time.perf_counter() - started
    except ExecutionTimeout:
        row["count_s"] = None
    row["delete_s"] = None
    if size <= args.scan_limit:
        urls = [doc["url"] for doc in stored[:10]]
        started = time.perf_counter()
        pages.delete_many({"url": {"$in": urls}, "_id": {"$nin": [doc["_id"] for doc in stored]}})
        row["delete_s"] = time.perf_counter() - started
    return row


def run_backend(backend: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix=f"sink-scaling-{backend}-", dir=args.tmp))
    rows = []
    try:
        args.backend = backend
        with ferretdb(backend, root) as client:
            pages: Pages = client.bench.pages  # type: ignore[assignment]
            pages.create_index("url", unique=True, name="url_unique")
            pages.create_index("crawl_id", name="crawl_id")
            stored = 0
            for size in args.sizes:
                began = time.perf_counter()
                grow(pages, stored, size)
                grown = time.perf_counter() - began
                row = {"backend": backend, "grow_docs_s": (size - stored) / grown if grown else 0}
                stored = size
                row.update(measure(pages, size, args))
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--sizes", default="1000,100000,1000000")
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per measurement")
    parser.add_argument("--scan-limit", type=int, default=100_000)
    parser.add_argument("--tmp", default=None, help="where the servers keep their data")
    args = parser.parse_args()
    args.sizes = [int(size) for size in args.sizes.split(",")]
    rows = [row for backend in args.backends.split(",") for row in run_backend(backend, args)]
    print(
        "| backend | stored docs | write new (sink), docs/s | write stored (sink), docs/s | "
        "stored vs new | replace by _id, docs/s | find a 200-page crawl by crawl_id, s | "
        "delete by URL (10 URLs), s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        count = "> cap" if row["count_s"] is None else f"{row['count_s']:.3f}"
        delete = "not run" if row["delete_s"] is None else f"{row['delete_s']:.2f}"
        replaced = "not run" if row["replace"] is None else fmt_rate(row["replace"])
        print(
            f"| {row['backend']} | {row['size']:,} | {fmt_rate(row['write_new'])} | "
            f"{fmt_rate(row['write_stored'])} | {row['write_new'] / row['write_stored']:.2f}x | "
            f"{replaced} | {count} | {delete} |"
        )


if __name__ == "__main__":
    main()
