"""Re-crawling a site into a big collection against crawling it fresh, end to end.

    python bench/recrawl_e2e.py --preload 1000000 --pages 10000

One private local stack (Kafka + the project's FerretDB build, as ``streamcrawl stack up``
starts them) and a generated site served by nginx (``_site.generate``, as ``bench/compare``).
Runs ``streamcrawl crawl`` (every stage as a process) three times, each with its own
topics, so every page is fetched, parsed and stored each time:
1. fresh: into the empty collection ``fresh``;
2. first: into the collection ``big`` after ``--preload`` page documents of other sites were
   inserted into it directly (the sink's documents, insert_many, the sink's indexes);
3. again: into ``big`` once more, where every page of the site is now stored (the re-crawl).
Wall time runs from the crawl command's start to its exit (start-up, drain and shut-down
included), as in ``bench/compare``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import _site
from _systems import Bench, Loop, RunResult, Stack
from compare import free_ports
from recrawl_big import compare, preload
from streamcrawl.core.config import Settings
from streamcrawl.demo.nginx import NginxSite
from streamcrawl.localstack.stack import StackError


def crawl(bench: Bench, collection: str) -> RunResult:
    prefix = f"recrawl{uuid.uuid4().hex[:8]}."
    env = bench._stream_env(prefix, collection)
    command = [bench.python, "-m", "streamcrawl.cli", "crawl", bench.site.entry_url]
    result = bench._measure("e2e", command, env, servers=("Kafka JVM", "FerretDB"), prefix=prefix)
    if result.error:
        raise RuntimeError(f"crawl into {collection} failed: {result.error}")
    return result


def stored(stack: Stack, collection: str, urls: list[str]) -> int:
    """How many of ``urls`` are stored, looked up by ``_id`` (a count of the whole
    collection would make FerretDB read every document back)."""
    from pymongo import MongoClient

    client: MongoClient[dict[str, object]] = MongoClient(stack.config.mongo_uri)
    try:
        pages = client[Settings().mongo_database][collection]
        return sum(
            pages.count_documents({"_id": {"$in": urls[first : first + 500]}})
            for first in range(0, len(urls), 500)
        )
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preload", type=int, default=1_000_000)
    parser.add_argument("--pages", type=int, default=10_000)
    parser.add_argument("--links", type=int, default=30)
    parser.add_argument("--page-kb", type=float, default=16)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, help="write every run's measurements here")
    parser.add_argument(
        "--sink-pages",
        type=int,
        default=0,
        help="then also drive the sink alone (recrawl_big.py) with this many pages, fresh "
        "into an empty collection and twice into the big one",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recrawl-e2e-"))
    loop = Loop()
    stack = Stack(work / "stack", tuple(free_ports(3)))  # type: ignore[arg-type]
    rows: list[tuple[str, int, RunResult]] = []
    try:
        try:
            stack.up()
        except StackError as error:  # Kafka's start-up has failed on a loaded machine
            print(f"stack up failed ({error}); once more", flush=True)
            stack.down()
            stack.up()
        port = free_ports(1)[0]
        info = _site.generate(work / "site", port, args.pages, args.links, int(args.page_kb * 1024))
        print(f"site: {info.description}", flush=True)
        with NginxSite(work / "site", port) as server:
            bench = Bench(info, server, work, args.concurrency, stack, args.timeout)
            rows.append(("fresh crawl (empty collection)", 0, crawl(bench, "fresh")))
            print(f"fresh: {rows[-1][2].wall_s:.1f} s", flush=True)
            env = bench._stream_env("unused.", "big")
            began = time.monotonic()
            asyncio.run(preload(Settings.from_env(env), args.preload))
            print(f"preloaded {args.preload:,} in {time.monotonic() - began:.0f} s", flush=True)
            rows.append(("first crawl into the big collection", args.preload, crawl(bench, "big")))
            print(f"first: {rows[-1][2].wall_s:.1f} s", flush=True)
            site = stored(stack, "big", info.page_urls)
            assert site == len(info.page_urls), (site, len(info.page_urls))
            before = args.preload + site
            rows.append(("re-crawl (every page stored)", before, crawl(bench, "big")))
            print(f"again: {rows[-1][2].wall_s:.1f} s", flush=True)
            assert stored(stack, "big", info.page_urls) == site
        sink_alone = {}
        if args.sink_pages:
            uri = stack.config.mongo_uri
            fresh_sink = Settings.from_env(
                {"STREAMCRAWL_MONGO_URI": uri, "STREAMCRAWL_MONGO_DATABASE": "sinkfresh"}
            )
            sink_alone = asyncio.run(
                compare(fresh_sink, Settings.from_env(env), args.sink_pages, 500)
            )
    finally:
        loop.close()
        stack.down()
        shutil.rmtree(work, ignore_errors=True)
    fresh = rows[0][2].wall_s
    if args.json:
        runs = [{"run": label, "before": n, **r.as_dict()} for label, n, r in rows]
        args.json.write_text(json.dumps(runs, indent=1))
    print("| crawl | documents in the collection before | pages | wall s | pages/s | vs fresh |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, before_count, result in rows:
        print(
            f"| {label} | {before_count:,} | {result.pages:,} | {result.wall_s:.1f} | "
            f"{result.wall_rate:,.0f} | {result.wall_s / fresh:.2f}x |"
        )
    if sink_alone:
        print(f"sink alone, {args.sink_pages:,} pages: {json.dumps(sink_alone)}")
        print(
            f"sink alone: re-crawl into {args.preload:,} documents vs fresh: "
            f"{sink_alone['ratio']:.2f}x"
        )
    cpu = {p.name: p.cpu_s for p in rows[-1][2].procs}
    print(f"re-crawl CPU by process: {json.dumps(cpu)}")


if __name__ == "__main__":
    main()
