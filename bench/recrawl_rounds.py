"""A conditional re-crawl (round two) against the crawl it revisits (round one), end to end.

    cd bench && python recrawl_rounds.py [--pages 1000] [--runs 3] [--pad-kib 40] [--limit-rate 1m]

What ``tests/integration/test_recrawl.py`` checks, timed over several runs. Each run: a
generated site (``streamcrawl.demo.site``, pages padded with ``--pad-kib`` KiB of text, as
real pages weigh tens of KiB) served by nginx at ``--limit-rate`` per connection (on
loopback a body costs no transfer time; across a network the body is what a 304 saves),
its own topics and database on one local stack (``streamcrawl stack up``'s, started when
``STREAMCRAWL_KAFKA_BOOTSTRAP`` is not set), every stage as a process. A warm-up crawl of
the entry page, then round one (the crawl from its seed), then 30 pages changed, 20 touched
(new ETag, same content) and one new page linked, then round two (``queue_revisits``, what
``streamcrawl recrawl`` runs). Each round is timed from its first record produced until the
pipeline is drained. Reported per run: both times and their ratio, the span of each round's
requests in nginx's log, the bytes nginx served, the CPU seconds of every process (the
stages, the Kafka JVM, FerretDB), and the URLs requested twice within a round (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _procs import cpu_seconds
from streamcrawl.core.config import Settings
from streamcrawl.crawl.local import free_port, running_pipeline
from streamcrawl.crawl.recrawl import queue_revisits
from streamcrawl.crawl.seeds import SeedOptions, produce_seeds, seed_payloads
from streamcrawl.crawl.watch import watch_until_drained
from streamcrawl.demo.nginx import NginxSite, page_requests
from streamcrawl.demo.revision import pad_pages, revise_site
from streamcrawl.demo.site import generate_site
from streamcrawl.localstack.stack import LocalStack, StackConfig

CHANGED, TOUCHED = 30, 20
CRAWL = "rounds"
DRAIN_TIMEOUT = 600.0


@dataclass
class Round:
    seconds: float = 0.0
    span: float = 0.0
    bytes_served: int = 0
    requests: int = 0
    twice: int = 0
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    one: Round
    two: Round

    @property
    def ratio(self) -> float:
        return self.two.seconds / self.one.seconds


def settings_for(root: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings.from_env(
        {
            **os.environ,
            "STREAMCRAWL_TOPIC_PREFIX": f"b{tag}.",
            "STREAMCRAWL_MONGO_DATABASE": f"bench_{tag}",
            "STREAMCRAWL_ALLOW_NETWORKS": "127.0.0.1/32",
            "STREAMCRAWL_WARC_DIR": str(root / "warc"),
            "STREAMCRAWL_MAX_DEPTH": "1000",
            "STREAMCRAWL_FETCH_PER_HOST_CONCURRENCY": "16",
            "STREAMCRAWL_CRAWL_DELAY": "0",
            "STREAMCRAWL_STATS_PORT": str(free_port()),
        }
    )


def server_pids() -> dict[str, int]:
    """The local stack's processes: the Kafka JVM(s) and FerretDB (read outside the event
    loop: the stack's probes run their own)."""
    found = LocalStack(StackConfig.from_env()).status()
    return {part.name: part.pid for part in found if part.pid is not None}


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) or 0.0 for name, pid in pids.items()}


Step = Callable[[], Awaitable[Any]]


async def timed_round(
    nginx: NginxSite, pids: Callable[[], dict[str, int]], start: Step, drain: Step
) -> Round:
    """Run one round (``start`` produces its records, ``drain`` waits for the pipeline) and
    measure it from nginx's log and /proc."""
    before = len(nginx.access_log_entries())
    processes = pids()
    cpu = cpu_of(processes)
    started = time.monotonic()
    await start()
    await drain()
    seconds = time.monotonic() - started
    used = {name: value - cpu[name] for name, value in cpu_of(processes).items()}
    log = page_requests(nginx.access_log_entries()[before:])
    per_path = Counter(entry.path for entry in log)
    return Round(
        seconds=seconds,
        span=log[-1].ts - log[0].ts if log else 0.0,
        bytes_served=sum(entry.bytes for entry in log),
        requests=len(log),
        twice=sum(1 for count in per_path.values() if count > 1),
        cpu=used,
    )


async def one_run(pages: int, pad_kib: int, limit_rate: str | None, servers: dict[str, int]) -> Run:
    with tempfile.TemporaryDirectory(prefix="recrawl-rounds-") as temp:
        root = Path(temp)
        port = free_port()
        manifest = generate_site(root / "site", pages=pages, port=port)
        www = root / "site" / "www"
        pad_pages(www, pad_kib)
        settings = settings_for(root)
        with NginxSite(root / "site", port, limit_rate=limit_rate) as nginx:
            async with running_pipeline(settings, root / "logs") as (stages, watch):

                def pids() -> dict[str, int]:
                    found = {name: proc.pid for name, proc in stages.processes.items()}
                    return {**found, **servers}

                def drained() -> Awaitable[Any]:
                    return watch_until_drained(watch, stages, io.StringIO(), timeout=DRAIN_TIMEOUT)

                def seed(options: SeedOptions) -> Step:
                    payloads = seed_payloads([manifest.entry_url], options)
                    return lambda: produce_seeds(settings, payloads)

                warm_up = SeedOptions(crawl_id="warm-up", max_depth=0)
                await timed_round(nginx, pids, seed(warm_up), drained)
                one = await timed_round(nginx, pids, seed(SeedOptions(crawl_id=CRAWL)), drained)
                revise_site(www, manifest, CHANGED, TOUCHED, "changed", time.time() + 120)

                async def revisits() -> object:
                    return await queue_revisits(settings, CRAWL)

                two = await timed_round(nginx, pids, revisits, drained)
    return Run(one, two)


def cpu_line(used: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in sorted(used.items()) if value >= 0.01)


async def main_async(args: argparse.Namespace, servers: dict[str, int]) -> None:
    runs = []
    for number in range(args.runs):
        run = await one_run(args.pages, args.pad_kib, args.limit_rate or None, servers)
        runs.append(run)
        print(f"run {number + 1}: ratio {run.ratio:.2f}", flush=True)
    rate = f"{args.limit_rate}B/s per connection" if args.limit_rate else "no rate limit"
    print(
        f"\n{args.pages} generated pages (+{args.pad_kib} KiB of text each, {rate}), "
        f"{CHANGED} changed and {TOUCHED} touched between the rounds; {args.runs} runs\n"
    )
    print(
        "| run | round one s | round two s | two / one | request spans s | bytes two / one "
        "| requests one, two | URLs requested twice in a round | CPU s all processes one, two |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for number, run in enumerate(runs, 1):
        one, two = run.one, run.two
        print(
            f"| {number} | {one.seconds:.1f} | {two.seconds:.1f} | {run.ratio:.2f} | "
            f"{one.span:.1f}, {two.span:.1f} | {two.bytes_served / one.bytes_served:.2f} | "
            f"{one.requests}, {two.requests} | {one.twice + two.twice} | "
            f"{sum(one.cpu.values()):.1f}, {sum(two.cpu.values()):.1f} |"
        )
    ratios = [run.ratio for run in runs]
    print(f"\nround two / round one: median {statistics.median(ratios):.2f}, ", end="")
    print(f"min {min(ratios):.2f}, max {max(ratios):.2f}")
    middle = sorted(runs, key=lambda run: run.ratio)[len(runs) // 2]
    print(f"CPU s of the median run, round one: {cpu_line(middle.one.cpu)}")
    print(f"CPU s of the median run, round two: {cpu_line(middle.two.cpu)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pad-kib", type=int, default=40)
    parser.add_argument("--limit-rate", default="1m", help='nginx limit_rate ("" for none)')
    args = parser.parse_args()
    if not os.environ.get("STREAMCRAWL_KAFKA_BOOTSTRAP"):
        config = StackConfig.from_env()
        LocalStack(config).up()
        os.environ.update(config.connection_env())
    asyncio.run(main_async(args, server_pids()))


if __name__ == "__main__":
    main()
