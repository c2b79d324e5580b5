"""What the stats stage costs per 1,000 fetched pages, by its producer's linger
(STREAMCRAWL_STATS_LINGER_MS): the worker's CPU, the broker's CPU and wall time.

    python bench/stats_linger.py [--records 20000] [--lingers 0,50,0,50]

Uses the local stack (started if needed; the broker's CPU is read from /proc). For each
linger in turn, on fresh topics: a stats worker starts, N crawl.fetched records of one
crawl over 20 hosts are produced beforehand, and the time from the worker's ready to its
group having committed them all is measured, with the CPU its process and the broker used
in that window. Every record is two table writes, each a changelog record.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from _procs import cpu_seconds
from stats_recovery import Variant
from streamcrawl.core.kafka import create_topics
from streamcrawl.localstack.stack import LocalStack, StackConfig


async def measure(linger: int, records: int, root: Path, broker: int) -> tuple[float, ...]:
    os.environ["STREAMCRAWL_STATS_LINGER_MS"] = str(linger)
    variant = Variant(f"linger-{linger}", True, root)
    await create_topics(variant.settings)
    # Records first: the worker then reads a backlog, as after a crawl's burst.
    await variant.produce(records, 20)
    await variant.start()
    assert variant.process is not None
    pid = variant.process.pid
    cpu0, broker0, started = cpu_seconds(pid) or 0.0, cpu_seconds(broker) or 0.0, time.monotonic()
    await variant.counted()
    wall = time.monotonic() - started
    cpu, broker_cpu = (cpu_seconds(pid) or 0.0) - cpu0, (cpu_seconds(broker) or 0.0) - broker0
    variant.stop()
    per_1k = 1000 / records
    return wall, cpu * per_1k, broker_cpu * per_1k


async def main_async(records: int, lingers: list[int], broker: int) -> None:
    print(f"{records:,} crawl.fetched records of one crawl over 20 hosts, read as a backlog")
    print("| linger ms | wall s | records/s | stats CPU s / 1k | broker CPU s / 1k |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="stats-linger-") as root:
        for linger in lingers:
            wall, cpu, broker_cpu = await measure(linger, records, Path(root), broker)
            print(
                f"| {linger} | {wall:.1f} | {records / wall:,.0f} | {cpu:.3f} | {broker_cpu:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--lingers", default="0,50,0,50")
    args = parser.parse_args()
    config = StackConfig.from_env()
    stack = LocalStack(config)
    stack.up()  # outside the event loop: it probes with its own
    os.environ.update(config.connection_env())
    broker = next(s.pid for s in stack.status() if s.name.startswith("kafka"))
    assert broker is not None
    asyncio.run(main_async(args.records, [int(x) for x in args.lingers.split(",")], broker))


if __name__ == "__main__":
    main()
