"""FerretDB's write paths for the sink's revisit updates, on one private server.

    python bench/ferretdb_update.py [--docs 2000] [--kib 8]

Starts the project's FerretDB build (SQLite backend) on a free port and times, per document,
in batches of 500 ``_id``s: ``insert_many``, ``update_many({_id: {$in}}, {$set: ...})`` (what
the sink does for a batch of 304s) and ``delete_many`` + ``insert_many`` (its rewrite path),
on a plain collection and on one with the sink's indexes.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from sink_writes import private_ferretdb

BATCH = 500


def document(n: int, kib: int) -> dict[str, Any]:
    return {
        "_id": f"http://x.example/p{n}",
        "url": f"http://x.example/p{n}",
        "crawl_id": "bench",
        "text": (f"w{n} " * (kib * 1024 // 6)),
        "links": [f"http://x.example/p{k}" for k in range(30)],
        "checked_at": 0.0,
        "next_visit": 0.0,
    }


def per_document(count: int, action: Any) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--kib", type=int, default=8)
    args = parser.parse_args()
    n, kib = args.docs, args.kib
    batches = [range(start, min(n, start + BATCH)) for start in range(0, n, BATCH)]
    with private_ferretdb("ferretdb-update-") as client:
        print("| collection | insert ms/doc | update_many $set ms/doc | delete + insert ms/doc |")
        print("|---|---:|---:|---:|")
        for name, indexed in (("plain", False), ("indexed", True)):
            collection = client.bench[name]
            if indexed:
                collection.create_index("url", unique=True)
                collection.create_index("crawl_id")
                collection.create_index("next_visit")

            def insert(c: Any = collection) -> None:
                for batch in batches:
                    c.insert_many([document(i, kib) for i in batch], ordered=False)

            def update(c: Any = collection) -> None:
                for batch in batches:
                    ids = [f"http://x.example/p{i}" for i in batch]
                    fields = {"checked_at": 1.0, "next_visit": 2.0, "revisit_interval": 3.0}
                    c.update_many({"_id": {"$in": ids}}, {"$set": fields})

            def rewrite(c: Any = collection) -> None:
                for batch in batches:
                    ids = [f"http://x.example/p{i}" for i in batch]
                    c.delete_many({"_id": {"$in": ids}})
                    c.insert_many([document(i, kib) for i in batch], ordered=False)

            inserted = per_document(n, insert)
            updated = per_document(n, update)
            assert collection.count_documents({"revisit_interval": 3.0}) == n
            rewritten = per_document(n, rewrite)
            print(
                f"| {name} ({n} x {kib} KiB) | {inserted:.2f} | {updated:.2f} | {rewritten:.2f} |"
            )


if __name__ == "__main__":
    main()
