"""How long the stats stage takes to start after a history of writes: its changelogs with
Kafka's default segments (what faust creates: nothing is compacted while the one segment
stays open) against the stage's CHANGELOG_CONFIG (segments rolled after 10 s, cleaned at
10 % dirty), side by side on one broker.

    python bench/stats_recovery.py [--records 20000] [--hosts 20]

Uses $STREAMCRAWL_KAFKA_BOOTSTRAP, or starts the local stack. For each variant, on fresh
topics of its own: a stats worker starts (the "default segments" one gets its changelogs
set back to cleanup.policy=compact alone), counts N crawl.fetched records of one crawl
over H hosts (every record rewrites a crawl entry and a host entry), waits 15 s, counts H
more (so each written changelog partition rolls its segment), waits 25 s for the log
cleaner, stops; then a new worker starts and the time to ready (its /readyz) is measured,
with the records its changelogs hold.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, create_topics, make_admin, make_producer
from streamcrawl.core.topics import FETCHED, STATS_GROUP, STATS_INPUTS
from streamcrawl.crawl.processes import child_env
from streamcrawl.localstack.stack import LocalStack, StackConfig
from streamcrawl.stats.app import app_id


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Variant:
    def __init__(self, name: str, compacted: bool, root: Path) -> None:
        self.name, self.compacted = name, compacted
        tag = uuid.uuid4().hex[:8]
        self.settings = Settings.from_env(
            {
                **os.environ,
                "STREAMCRAWL_TOPIC_PREFIX": f"rec{tag}.",
                "STREAMCRAWL_STATS_PORT": str(free_port()),
                "STREAMCRAWL_METRICS_PORT": "0",
                "STREAMCRAWL_STATE_DIR": str(root / tag),
            }
        )
        self.log = root / f"{name}-{tag}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def changelogs(self) -> list[str]:
        return [f"{app_id(self.settings)}-{table}-changelog" for table in ("crawls", "hosts")]

    async def start(self) -> float:
        """Start a worker; seconds until it answers ready."""
        started = time.monotonic()
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamcrawl.cli", "run", "stats"],
                env=child_env(self.settings),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{self.settings.stats_port}/readyz"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            assert self.process.poll() is None, f"stats exited; see {self.log}"
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=60)

    async def uncompact(self) -> None:
        admin = make_admin(self.settings)
        await admin.start()
        try:
            await admin.alter_configs(
                [
                    ConfigResource(ConfigResourceType.TOPIC, name, {"cleanup.policy": "compact"})
                    for name in self.changelogs()
                ]
            )
        finally:
            await admin.close()

    async def feed(self, count: int, hosts: int) -> None:
        await self.produce(count, hosts)
        await self.counted()

    async def produce(self, count: int, hosts: int) -> None:
        """``count`` crawl.fetched records of crawl "bench", over ``hosts`` hosts."""
        producer = make_producer(self.settings)
        await producer.start()
        try:
            topic = self.settings.topic_prefix + FETCHED
            for n in range(count):
                host = f"h{n % hosts}.example"
                value = (
                    f'{{"crawl_id": "bench", "host": "{host}", "status": 200, '
                    f'"fetched_at": {time.time()}, "body_bytes": 1000, '
                    f'"timings": {{"total_s": 0.01}}}}'
                )
                await producer.send(topic, value.encode(), key=host.encode())
            await producer.flush()
        finally:
            await producer.stop()

    async def counted(self) -> None:
        """Until the stats group has committed every record of its inputs."""
        probe = OffsetProbe(self.settings)
        await probe.start()
        try:
            topics = [self.settings.topic_prefix + suffix for suffix in STATS_INPUTS]
            while True:
                rows = await probe.lag(STATS_GROUP, topics)
                if rows and sum(row.lag for row in rows) == 0:
                    return
                await asyncio.sleep(0.2)
        finally:
            await probe.stop()

    async def changelog_records(self) -> int:
        consumer = AIOKafkaConsumer(
            *self.changelogs(),
            bootstrap_servers=self.settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        count, quiet = 0, 0
        try:
            while quiet < 3:
                batch = await consumer.getmany(timeout_ms=500)
                found = sum(len(records) for records in batch.values())
                count, quiet = count + found, 0 if found else quiet + 1
        finally:
            await consumer.stop()
        return count


async def history(variant: Variant, records: int, hosts: int) -> None:
    await create_topics(variant.settings)
    await variant.start()
    await asyncio.sleep(3)  # the worker's own changelog settings task has run
    if not variant.compacted:
        await variant.uncompact()
    await variant.feed(records, hosts)
    await asyncio.sleep(15)
    await variant.feed(hosts, hosts)
    await asyncio.sleep(25)
    variant.stop()


async def main_async(records: int, hosts: int) -> None:
    with tempfile.TemporaryDirectory(prefix="stats-recovery-") as root:
        variants = [
            Variant("default segments", False, Path(root)),
            Variant("CHANGELOG_CONFIG", True, Path(root)),
        ]
        await asyncio.gather(*(history(v, records, hosts) for v in variants))
        rows = []
        for variant in variants:  # one at a time: the start-up is what is timed
            held = await variant.changelog_records()
            ready = await variant.start()
            variant.stop()
            rows.append((variant.name, held, ready))
    print(f"{records:,} crawl.fetched records of one crawl over {hosts} hosts, then {hosts}")
    print("| changelogs | records they hold at the restart | restart to ready | vs default |")
    print("|---|---:|---:|---:|")
    base = rows[0][2]
    for name, held, ready in rows:
        print(f"| {name} | {held:,} | {ready:.1f} s | {ready / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--hosts", type=int, default=20)
    args = parser.parse_args()
    if not os.environ.get("STREAMCRAWL_KAFKA_BOOTSTRAP"):
        config = StackConfig.from_env()
        LocalStack(config).up()
        os.environ.update(config.connection_env())
    asyncio.run(main_async(args.records, args.hosts))


if __name__ == "__main__":
    main()
