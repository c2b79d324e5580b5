"""What a running pipeline costs while it has nothing to do, and how fast a crawl-control
command still reaches a stage.

    cd bench && python idle_cost.py [--seconds 20] [--commands 8]

On the local stack (``streamcrawl stack up``'s, started if needed): every stage as a
process, on topics of their own, left idle for ``--seconds`` after an 8 s start-up; the CPU
seconds each stage process and the stack's servers (the Kafka JVM, FerretDB) used meanwhile.
Then a :class:`ControlFollower` (what every stage runs) and ``--commands`` pause commands,
each sent after the follower's fetch has been parked at the broker for a while: the time
from the broker's acknowledgement of the command to the follower holding the new state.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from _procs import cpu_seconds
from streamcrawl.core.config import Settings
from streamcrawl.core.control import ControlFollower, send_control
from streamcrawl.core.kafka import create_topics
from streamcrawl.crawl.local import free_port, running_pipeline
from streamcrawl.localstack.stack import LocalStack, StackConfig

START_UP = 8.0


def settings_for(root: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings.from_env(
        {
            **os.environ,
            "STREAMCRAWL_TOPIC_PREFIX": f"i{tag}.",
            "STREAMCRAWL_MONGO_DATABASE": f"idle_{tag}",
            "STREAMCRAWL_WARC_DIR": str(root / "warc"),
            "STREAMCRAWL_STATS_PORT": str(free_port()),
        }
    )


async def idle_cpu(servers: dict[str, int], seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="idle-cost-") as temp:
        root = Path(temp)
        async with running_pipeline(settings_for(root), root / "logs") as (stages, _):
            await asyncio.sleep(START_UP)
            pids = {**{name: proc.pid for name, proc in stages.processes.items()}, **servers}
            before = {name: cpu_seconds(pid) or 0.0 for name, pid in pids.items()}
            await asyncio.sleep(seconds)
            return {name: (cpu_seconds(pid) or 0.0) - before[name] for name, pid in pids.items()}


async def command_latencies(commands: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="idle-cost-") as temp:
        settings = settings_for(Path(temp))
        await create_topics(settings)
        follower = ControlFollower(settings)
        await follower.start()
        latencies = []
        try:
            for number in range(commands):
                await asyncio.sleep(1.3)
                crawl_id = f"idle-{number}"
                await send_control(settings, [crawl_id], "paused")
                acknowledged = time.monotonic()
                while follower.states.state(crawl_id) != "paused":
                    await asyncio.sleep(0.001)
                latencies.append(time.monotonic() - acknowledged)
        finally:
            await follower.stop()
        return latencies


async def main_async(args: argparse.Namespace, servers: dict[str, int]) -> None:
    used = await idle_cpu(servers, args.seconds)
    stages = {name: value for name, value in used.items() if name not in servers}
    print(f"idle pipeline, {args.seconds:.0f} s (control POLL_MS {ControlFollower.POLL_MS}):")
    print("| process | CPU s | share of a core |")
    print("|---|---:|---:|")
    for name, value in sorted(used.items()):
        print(f"| {name} | {value:.2f} | {value / args.seconds:.3f} |")
    total = sum(used.values())
    print(
        f"| all stages | {sum(stages.values()):.2f} | {sum(stages.values()) / args.seconds:.3f} |"
    )
    print(f"| everything | {total:.2f} | {total / args.seconds:.3f} |")
    latencies = await command_latencies(args.commands)
    print(
        f"\ncontrol command, broker ack -> follower has it ({args.commands} commands): "
        f"median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--commands", type=int, default=8)
    args = parser.parse_args()
    config = StackConfig.from_env()
    if not os.environ.get("STREAMCRAWL_KAFKA_BOOTSTRAP"):
        LocalStack(config).up()
        os.environ.update(config.connection_env())
    # The stack's probes run an event loop of their own: read its processes before ours.
    servers = {part.name: part.pid for part in LocalStack(config).status() if part.pid}
    asyncio.run(main_async(args, servers))


if __name__ == "__main__":
    main()
