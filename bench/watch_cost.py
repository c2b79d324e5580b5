"""What one poll of the crawl's progress watch costs the broker and the crawl command.

    python bench/watch_cost.py [--polls 400]

The `crawl` command polls every consumer group's lag four times a second to see the
pipeline drained (services/crawl/watch.py). This runs that poll back to back on fresh,
empty topics of the local stack (or $STREAMCRAWL_KAFKA_BOOTSTRAP) and prints, per poll:
the Kafka requests sent by type (counted at aiokafka's connection), the CPU of this
process and the broker JVM's CPU (from /proc; only on the local stack). Run it at two
commits one after the other on the same stack to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
import uuid
from collections import Counter
from typing import Any

from _procs import cpu_seconds
from aiokafka.conn import AIOKafkaConnection
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import create_topics
from streamcrawl.crawl.watch import PipelineWatch
from streamcrawl.localstack.stack import LocalStack, StackConfig

SENT: Counter[str] = Counter()


def count_requests() -> None:
    send = AIOKafkaConnection.send

    def counting(self: AIOKafkaConnection, request: Any, *args: Any, **kwargs: Any) -> Any:
        SENT[type(request).__name__.split("_")[0]] += 1
        return send(self, request, *args, **kwargs)

    AIOKafkaConnection.send = counting  # type: ignore[method-assign]


async def measure(settings: Settings, polls: int, broker_pid: int | None) -> None:
    await create_topics(settings)
    watch = PipelineWatch(settings)
    await watch.start()
    try:
        for _ in range(20):  # warm: topic metadata cached, connections open
            await watch.progress()
        SENT.clear()
        broker_before = cpu_seconds(broker_pid) if broker_pid else None
        started, cpu = time.monotonic(), time.process_time()
        for _ in range(polls):
            await watch.progress()
        wall, cpu = time.monotonic() - started, time.process_time() - cpu
        broker_after = cpu_seconds(broker_pid) if broker_pid else None
    finally:
        await watch.stop()
    revision = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    ).stdout.strip()
    per_poll = ", ".join(f"{name} {count / polls:.2f}" for name, count in sorted(SENT.items()))
    broker = (
        f"{(broker_after - broker_before) / polls * 1000:.2f}"
        if broker_before is not None and broker_after is not None
        else "-"
    )
    print(
        f"| {revision} | {polls} | {sum(SENT.values()) / polls:.1f} | {per_poll} | "
        f"{wall / polls * 1000:.2f} | {cpu / polls * 1000:.2f} | {broker} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--polls", type=int, default=400)
    args = parser.parse_args()
    broker_pid = None
    if not os.environ.get("STREAMCRAWL_KAFKA_BOOTSTRAP"):
        config = StackConfig.from_env()
        stack = LocalStack(config)
        stack.up()
        os.environ.update(config.connection_env())
        broker_pid = next(s.pid for s in stack.status() if s.name.startswith("kafka"))
    env = {**os.environ, "STREAMCRAWL_TOPIC_PREFIX": f"watch{uuid.uuid4().hex[:8]}."}
    count_requests()
    print(
        "| commit | polls | requests / poll | by type / poll | wall ms / poll | "
        "watch CPU ms / poll | broker CPU ms / poll |"
    )
    print("|---|---:|---:|---|---:|---:|---:|")
    asyncio.run(measure(Settings.from_env(env), args.polls, broker_pid))


if __name__ == "__main__":
    main()
