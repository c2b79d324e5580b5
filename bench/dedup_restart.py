"""How long dedup takes to do useful work after a start, with crawl.fetch holding N records:
without a snapshot (the whole topic is replayed) and with one (only the tail is).

    python bench/dedup_restart.py --records 1000000

Uses $STREAMCRAWL_KAFKA_BOOTSTRAP, or starts the local stack. Fresh topics (their own
prefix) are filled with N crawl.fetch records over 1,000 hosts (all 12 partitions), then:
1. a dedup with an empty state directory starts; one new candidate waits on
   crawl.discovered; "useful work" = that candidate admitted onto crawl.fetch; the stage
   is then stopped (SIGTERM-like: it snapshots what it rebuilt);
2. a second dedup starts on the same state directory with one more candidate waiting.
Each time is measured from the stage's start to the admitted candidate, in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, create_topics, make_producer
from streamcrawl.core.messages import Discovered, Fetch, Scope, encode
from streamcrawl.core.runtime import run_stage
from streamcrawl.core.topics import DISCOVERED, FETCH
from streamcrawl.dedup.service import DedupStage
from streamcrawl.localstack.stack import LocalStack, StackConfig

HOSTS = [f"h{n}.example" for n in range(1000)]
SCOPE = Scope(allow_domains=HOSTS, max_depth=5)


def fill(settings: Settings, count: int) -> float:
    """Produce ``count`` crawl.fetch records with kcat (a Python producer would take
    minutes for a million), keyed by host with Kafka's own partitioner (murmur2)."""
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("wb", suffix=".txt") as lines:
        for n in range(count):
            host = HOSTS[n % len(HOSTS)]
            value = Fetch(
                url=f"http://{host}/old/{n}",
                host=host,
                crawl_id="history",
                depth=1,
                priority=5,
                scope=SCOPE,
                discovered_at=1.0,
                admitted_at=2.0,
            )
            lines.write(host.encode() + b"\t" + encode(value) + b"\n")
        lines.flush()
        subprocess.run(
            [
                "kcat",
                "-P",
                "-b",
                settings.kafka_bootstrap,
                "-t",
                settings.topic_prefix + FETCH,
                "-K",
                "\t",
                "-X",
                "partitioner=murmur2_random",
                "-z",
                "lz4",
                "-l",
                lines.name,
            ],
            check=True,
        )
    return time.monotonic() - started


async def offer(settings: Settings, path: str) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        value = Discovered(
            url=f"http://{HOSTS[0]}/{path}",
            host=HOSTS[0],
            crawl_id="history",
            depth=1,
            priority=5,
            scope=SCOPE,
            discovered_at=time.time(),
        )
        await producer.send_and_wait(
            settings.topic_prefix + DISCOVERED, encode(value), key=HOSTS[0].encode()
        )
    finally:
        await producer.stop()


async def time_to_admission(settings: Settings) -> tuple[float, int]:
    probe = OffsetProbe(settings)
    await probe.start()
    topic = settings.topic_prefix + FETCH
    before = sum((await probe.end_offsets([topic])).values())
    stage = DedupStage(settings)
    stop = asyncio.Event()
    started = time.monotonic()
    running = asyncio.create_task(run_stage(stage, stop))
    try:
        while sum((await probe.end_offsets([topic])).values()) <= before:
            if running.done():
                running.result()
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        await running
        await probe.stop()
    return elapsed, stage.replayed_records


async def main_async(records: int) -> None:
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="dedup-state-") as state:
        env = {
            **os.environ,
            "STREAMCRAWL_TOPIC_PREFIX": f"restart{tag}.",
            "STREAMCRAWL_STATE_DIR": state,
            "STREAMCRAWL_LOG_LEVEL": "WARNING",
        }
        settings = Settings.from_env(env)
        await create_topics(settings)
        print(f"filling crawl.fetch with {records:,} records ...", file=sys.stderr)
        filled = fill(settings, records)
        print(f"filled in {filled:.1f}s", file=sys.stderr)
        await offer(settings, "first-new")
        cold, cold_replayed = await time_to_admission(settings)
        size = sum(path.stat().st_size for path in Path(state).glob("*.dedup"))
        await offer(settings, "second-new")
        warm, warm_replayed = await time_to_admission(settings)
    print("| start | crawl.fetch records | replayed | time to first admission | vs cold |")
    print("|---|---:|---:|---:|---:|")
    print(f"| no snapshot (cold) | {records:,} | {cold_replayed:,} | {cold:.2f} s | 1.00x |")
    print(
        f"| from snapshots ({size / 2**20:.1f} MiB) | {records + 1:,} | {warm_replayed:,} | "
        f"{warm:.2f} s | {warm / cold:.3f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    if not os.environ.get("STREAMCRAWL_KAFKA_BOOTSTRAP"):
        config = StackConfig.from_env()
        LocalStack(config).up()
        os.environ.update(config.connection_env())
    asyncio.run(main_async(args.records))


if __name__ == "__main__":
    main()
