"""FerretDB write strategies for the sink, side by side on one local server.

    python bench/sink_writes.py [--docs 2000]

Starts its own FerretDB (the project's cached build) on a free port and writes the
same page-sized documents with: insert_many (the sink's path for new pages),
bulk UpdateOne($set, upsert) of new documents (the obvious idempotent write), and
ReplaceOne(upsert) of existing documents in chunks of 50 (the sink's redelivery path).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymongo import MongoClient, ReplaceOne, UpdateOne
from streamcrawl.localstack.provision import ensure_ferretdb


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def page(n: int, version: int) -> dict[str, Any]:
    return {
        "_id": f"http://bench.example/p{n}",
        "url": f"http://bench.example/p{n}",
        "title": f"page {n}",
        "text": "lorem ipsum " * 200,
        "status": 200,
        "links": [f"http://bench.example/p{k}" for k in range(n, n + 10)],
        "crawl_id": "bench",
        "version": version,
    }


def start_ferretdb(root: Path, port: int) -> subprocess.Popen[bytes]:
    """The project's cached FerretDB build (SQLite backend) on 127.0.0.1:``port``; the
    binary at ``$FERRETDB_BINARY`` instead when set (to compare two builds side by side)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            os.environ.get("FERRETDB_BINARY") or str(ensure_ferretdb()),
            "--handler=sqlite",
            f"--sqlite-url=file:{root / 'data'}/",
            f"--listen-addr=127.0.0.1:{port}",
            "--telemetry=disable",
            f"--state-dir={root}",
            "--debug-addr=-",
            "--log-level=error",
        ]
    )


@contextmanager
def private_ferretdb(prefix: str) -> Iterator[MongoClient[dict[str, Any]]]:
    """A client of the project's FerretDB build started on a free port in a temporary
    directory, both gone after the block."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    server = start_ferretdb(root, port)
    try:
        yield MongoClient(f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=20000)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)


def timed(label: str, count: int, action: Any) -> tuple[str, float]:
    started = time.perf_counter()
    action()
    return label, count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=2000)
    args = parser.parse_args()
    with private_ferretdb("sink-bench-") as client:
        db = client.bench
        n = args.docs
        rows = [
            timed(
                "insert_many, new pages (sink fast path)",
                n,
                lambda: db.a.insert_many([page(i, 1) for i in range(n)], ordered=False),
            ),
            timed(
                "UpdateOne $set upsert, new pages (batches of 50)",
                n,
                lambda: [
                    db.b.bulk_write(
                        [
                            UpdateOne({"_id": p["_id"]}, {"$set": p}, upsert=True)
                            for p in (page(i, 1) for i in range(s, min(n, s + 50)))
                        ],
                        ordered=False,
                    )
                    for s in range(0, n, 50)
                ],
            ),
            timed(
                "ReplaceOne upsert, existing pages (sink redelivery path)",
                n,
                lambda: [
                    db.a.bulk_write(
                        [
                            ReplaceOne({"_id": p["_id"]}, p, upsert=True)
                            for p in (page(i, 2) for i in range(s, min(n, s + 50)))
                        ],
                        ordered=False,
                    )
                    for s in range(0, n, 50)
                ],
            ),
        ]
        assert db.a.count_documents({"version": 2}) == n
        base = rows[1][1]
        print("| write | docs/s | vs upsert of new pages |\n|---|---:|---:|")
        for label, rate in rows:
            print(f"| {label} | {rate:,.0f} | {rate / base:.1f}x |")


if __name__ == "__main__":
    main()
