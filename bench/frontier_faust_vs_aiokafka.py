"""The frontier's work under faust-streaming and under the aiokafka stage loop, side by side.

    python bench/frontier_faust_vs_aiokafka.py [--messages 20000]

Needs a broker: uses $STREAMCRAWL_KAFKA_BOOTSTRAP, or starts the local stack. Both
contenders read the same pre-produced seeds topic, run the frontier's pure
``parse_seed`` on every record and write the candidates to an output topic keyed by
host; faust also keeps its natural per-host state (a changelog-backed Table counting
URLs per host), the use the issue names. Throughput = messages until the output
topic holds them all, divided by the time taken.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, make_producer
from streamcrawl.core.messages import Seed, decode_seed
from streamcrawl.core.runtime import BatchStage, Input, Output, Received, run_stage
from streamcrawl.frontier.logic import Rejected, seed_candidate
from streamcrawl.localstack.stack import LocalStack, StackConfig

FAUST_APP = textwrap.dedent("""
    import sys
    import faust
    from streamcrawl.core.config import Settings
    from streamcrawl.core.messages import encode
    from streamcrawl.frontier.logic import Rejected, parse_seed

    source, sink, broker, app_id = sys.argv[1:5]
    settings = Settings()
    app = faust.App(app_id, broker="kafka://" + broker, store="memory://",
                    topic_partitions=6, topic_replication_factor=1,
                    consumer_auto_offset_reset="earliest", web_enabled=False)
    seeds = app.topic(source, value_type=bytes, value_serializer="raw")
    out = app.topic(sink, value_type=bytes, value_serializer="raw")
    per_host = app.Table("per_host", default=int, partitions=6)

    @app.agent(seeds)
    async def frontier(stream):
        async for value in stream:
            try:
                candidate = parse_seed(value, settings)
            except Rejected:
                continue
            per_host[candidate.host] += 1
            await out.send(key=candidate.host.encode(), value=encode(candidate))

    if __name__ == "__main__":
        sys.argv = [sys.argv[0], "worker", "-l", "warn"]
        app.main()
""")


class FrontierOnly(BatchStage):
    """The frontier's seed step on the stage runtime, reading ``source`` (full topic names:
    the settings' topic prefix is emptied)."""

    name = "frontier"

    def __init__(self, settings: Settings, source: str, sink: str, group: str) -> None:
        super().__init__(dataclasses.replace(settings, topic_prefix=""))
        self.source, self.sink, self.group = source, sink, group

    def inputs(self) -> tuple[Input, ...]:
        return (Input(self.source, decode_seed),)

    async def process(self, batch: list[Received[Any]]) -> list[Output]:
        outputs = []
        for item in batch:
            seed: Seed = item.message
            try:
                candidate = seed_candidate(seed, self.settings)
            except Rejected:
                continue
            outputs.append(Output(self.sink, candidate, key=candidate.host.encode()))
        return outputs


async def make_topics(settings: Settings, *names: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 6, 1) for name in names])
    finally:
        await admin.close()


async def fill(settings: Settings, topic: str, count: int) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for n in range(count):
            await producer.send(topic, f"http://host{n % 500}.example/page/{n}".encode())
        await producer.flush()
    finally:
        await producer.stop()


async def wait_for(settings: Settings, topic: str, count: int, timeout: float) -> float:
    probe = OffsetProbe(settings)
    await probe.start()
    started = time.perf_counter()
    try:
        while (done := sum((await probe.end_offsets([topic])).values())) < count:
            if time.perf_counter() - started > timeout:
                print(f"{topic}: {done}/{count} after {timeout}s", file=sys.stderr)
                raise TimeoutError(f"{topic} did not reach {count} records")
            await asyncio.sleep(0.2)
        return time.perf_counter() - started
    finally:
        await probe.stop()


async def run_aiokafka(settings: Settings, count: int) -> float:
    tag = uuid.uuid4().hex[:6]
    source, sink = f"bench.{tag}.in", f"bench.{tag}.out"
    await make_topics(settings, source, sink)
    await fill(settings, source, count)
    stop = asyncio.Event()
    stage = FrontierOnly(settings, source, sink, f"bench-{tag}")
    task = asyncio.create_task(run_stage(stage, stop))
    try:
        return await wait_for(settings, sink, count, 300)
    finally:
        stop.set()
        await task


async def run_faust(settings: Settings, count: int) -> float:
    tag = uuid.uuid4().hex[:6]
    source, sink = f"bench.{tag}.in", f"bench.{tag}.out"
    await make_topics(settings, source, sink)
    await fill(settings, source, count)
    with tempfile.TemporaryDirectory() as work:
        app = os.path.join(work, "faust_frontier.py")
        with open(app, "w") as handle:
            handle.write(FAUST_APP)
        with open(os.path.join(work, "log"), "w") as log_file:
            worker = subprocess.Popen(
                [sys.executable, app, source, sink, settings.kafka_bootstrap, f"bench-faust-{tag}"],
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        try:
            return await wait_for(settings, sink, count, 300)
        except TimeoutError:
            with open(os.path.join(work, "log")) as log:
                print(log.read()[-3000:], file=sys.stderr)
            raise
        finally:
            worker.terminate()
            worker.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    if not os.environ.get("STREAMCRAWL_KAFKA_BOOTSTRAP"):
        config = StackConfig.from_env()
        LocalStack(config).up()
        os.environ.update(config.connection_env())
    settings = Settings.from_env()
    rows = []
    for name, runner in (
        ("aiokafka stage loop", run_aiokafka),
        ("faust-streaming agent", run_faust),
    ):
        print(f"running {name}", file=sys.stderr)
        seconds = asyncio.run(runner(settings, args.messages))
        rows.append((name, args.messages / seconds))
    base = rows[0][1]
    print("| frontier implementation | msgs/s (incl. start-up) | vs aiokafka |\n|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |")
    print(json.dumps({name: round(rate) for name, rate in rows}))


if __name__ == "__main__":
    main()
