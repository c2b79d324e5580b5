"""``streamcrawl crawl``: the local stack, every stage as its own process, the seeds, a
progress line and a summary; and :func:`running_pipeline`, the same for the end-to-end tests.

The stages run exactly as pods would (``streamcrawl run <stage>``), so a local crawl
exercises the same code, topics and consumer groups as production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import PREFIX, Settings
from ..core.kafka import check_kafka_access, create_topics
from ..core.topics import STATS_GROUP, group_id
from ..localstack.stack import LocalStack, StackConfig
from ..registry import STAGE_NAMES
from .autoscale import Autoscaler, ScalingPolicy
from .processes import (
    StageProcesses,
    child_env,
    stop_stage_processes_server,
    warm_up_stage_processes,
)
from .seeds import SeedOptions, produce_seeds, seed_payloads
from .status import StatsClient, StatsUnavailable
from .watch import PipelineWatch, Progress, count_stored, watch_until_drained


@dataclass(frozen=True)
class CrawlRequest:
    urls: tuple[str, ...]
    crawl_id: str = field(default_factory=lambda: "crawl-" + uuid.uuid4().hex[:12])
    max_pages: int = 0
    max_depth: int | None = None
    allow_domains: tuple[str, ...] = ()

    def seed_values(self) -> list[bytes]:
        """One crawl.seeds record per URL, all under this crawl id and scope."""
        options = SeedOptions(
            crawl_id=self.crawl_id,
            max_pages=self.max_pages,
            max_depth=self.max_depth,
            allow_domains=self.allow_domains,
        )
        return seed_payloads(self.urls, options)


@asynccontextmanager
async def running_pipeline(
    settings: Settings,
    log_dir: Path,
    crawl_id: str | None = None,
    stage_names: Iterable[str] = STAGE_NAMES,
) -> AsyncIterator[tuple[StageProcesses, PipelineWatch]]:
    """Topics created, the stages (every one by default) running as processes and a
    progress watch (of ``crawl_id``'s numbers when given), for a block; the stages are
    stopped (drained, committed) when it ends."""
    warm_up_stage_processes()  # the fork server imports while the topics are created
    await create_topics(settings)
    settings = dataclasses.replace(settings, stats_port=await stats_port_for(settings))
    stages = StageProcesses(child_env(settings), log_dir)
    stages.start(stage_names)  # they import and join while the watch reads its baseline
    watch = PipelineWatch(settings, crawl_id)
    try:
        await watch.start()
    except BaseException:
        await asyncio.to_thread(stages.stop)
        raise
    try:
        yield stages, watch
    finally:
        await watch.stop()
        await asyncio.to_thread(stages.stop)


async def stats_port_for(settings: Settings) -> int:
    """The stats port of this pipeline: the configured one when it is free or when this
    pipeline's stats worker already serves there (a second crawl on the same stack: its
    own worker waits for that one's lock and reads the same tables); another free port
    when something else holds it (another pipeline's stats, in tests)."""
    port = settings.stats_port
    if port_is_free(port):
        return port
    url = settings.stats_url or f"http://127.0.0.1:{port}"
    with contextlib.suppress(StatsUnavailable):
        async with StatsClient(url, timeout=2.0) as client:
            health = await client.get("/healthz")
            if isinstance(health, dict) and health.get("app") == group_id(
                settings.topic_prefix, STATS_GROUP
            ):
                return port
    return free_port()


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _connection_env() -> dict[str, str]:
    """Use the configured cluster, or start (or reuse) the local stack."""
    if os.environ.get(PREFIX + "KAFKA_BOOTSTRAP"):
        return {}
    config = StackConfig.from_env()
    print(
        f"no {PREFIX}KAFKA_BOOTSTRAP set: starting the local stack in {config.data_dir}",
        file=sys.stderr,
    )
    stack = LocalStack(config)
    stack.up()
    env = stack.config.connection_env()  # as the data directory's stack was made (--secure)
    # The local stack outlives a crawl: dedup keeps its snapshots beside it, so the next
    # crawl's start replays only what came after them.
    if not os.environ.get(PREFIX + "STATE_DIR"):
        env[PREFIX + "STATE_DIR"] = str(config.data_dir / "dedup")
    # The warc stage's files too: under the stack's data directory, not where it was run.
    if not os.environ.get(PREFIX + "WARC_DIR"):
        env[PREFIX + "WARC_DIR"] = str(config.data_dir / "warc")
    return env


def crawl_command(args: argparse.Namespace) -> int:
    warm_up_stage_processes()  # imports in the background from here on
    extra = _connection_env()
    with ExitStack() as cleanup:
        urls = tuple(args.urls)
        if args.demo:
            urls, demo_env = _serve_demo_site(cleanup, args.demo_pages)
            extra.update(demo_env)
        if not urls:
            print("streamcrawl: error: give at least one URL, or --demo", file=sys.stderr)
            return 2
        settings = Settings.from_env({**os.environ, **extra})
        asyncio.run(check_kafka_access(settings))
        request = CrawlRequest(
            urls=urls,
            max_pages=args.max_pages or 0,
            max_depth=args.max_depth,
            allow_domains=tuple(args.allow_domain),
            **({"crawl_id": args.crawl_id} if args.crawl_id else {}),
        )
        log_dir = Path(tempfile.mkdtemp(prefix="streamcrawl-logs-"))
        autoscaler = None
        if args.autoscale:
            autoscaler = Autoscaler(
                ScalingPolicy.parse(
                    args.autoscale,
                    lag_threshold=args.lag_threshold,
                    polling_interval=args.polling_interval,
                    cooldown=args.cooldown,
                )
            )
        progress = asyncio.run(_crawl(settings, request, log_dir, args.timeout, autoscaler))
        stop_stage_processes_server()
        counted = None
        if args.count_stored:
            counted = asyncio.run(count_stored(settings, request.crawl_id))
        _print_summary(request, progress, counted, log_dir, settings.warc_dir)
    return 0


async def _crawl(
    settings: Settings,
    request: CrawlRequest,
    log_dir: Path,
    timeout: float | None,
    autoscaler: Autoscaler | None = None,
) -> Progress:
    async with running_pipeline(settings, log_dir, request.crawl_id, crawl_stages(settings)) as (
        stages,
        watch,
    ):
        print(
            f"crawl {request.crawl_id}: {len(request.urls)} seed(s); stage logs in {log_dir}",
            file=sys.stderr,
        )
        await produce_seeds(settings, request.seed_values())
        if autoscaler is not None:
            stages.scale("fetcher", autoscaler.current)
        progress = await watch_until_drained(
            watch, stages, sys.stderr, timeout=timeout, autoscaler=autoscaler
        )
        return await watch.final_progress(progress)


def crawl_stages(settings: Settings) -> list[str]:
    """The stages a crawl runs: all but the scheduler while continuous crawling is off
    (``SCHEDULE_ENABLED`` 0, the default), where it would only idle (a process, its imports
    and ~70 MB for nothing)."""
    return [name for name in STAGE_NAMES if name != "scheduler" or settings.schedule_enabled]


def _serve_demo_site(cleanup: ExitStack, pages: int) -> tuple[tuple[str, ...], dict[str, str]]:
    from ..demo.nginx import NginxSite
    from ..demo.site import generate_site

    root = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="streamcrawl-demo-")))
    port = free_port()
    started = time.monotonic()
    manifest = generate_site(root, pages=pages, port=port)
    cleanup.enter_context(NginxSite(root, port))
    print(
        f"demo site: {len(manifest.pages)} pages generated in "
        f"{time.monotonic() - started:.1f}s, served by nginx at {manifest.base_url}",
        file=sys.stderr,
    )
    # The demo site lives on loopback, which the fetcher refuses unless allowed.
    # It is our own server, so no politeness delay unless the user asks for one.
    env = {
        PREFIX + "ALLOW_NETWORKS": "127.0.0.1/32",
        PREFIX + "CRAWL_DELAY": os.environ.get(PREFIX + "CRAWL_DELAY", "0"),
        PREFIX + "FETCH_PER_HOST_CONCURRENCY": os.environ.get(
            PREFIX + "FETCH_PER_HOST_CONCURRENCY", "32"
        ),
    }
    return (manifest.entry_url,), env


def _print_summary(
    request: CrawlRequest,
    progress: Progress,
    counted: int | None,
    log_dir: Path,
    warc_dir: str = "",
) -> None:
    # Counting by crawl id in MongoDB is a scan on FerretDB/SQLite (28 s at 60,000 documents):
    # by default the summary reports what the sink committed, read from Kafka offsets.
    stored = (
        f"{counted} documents in MongoDB for this crawl id"
        if counted is not None
        else f"{progress.stored} pages the sink wrote for this crawl (--count-stored: MongoDB)"
    )
    print(
        f"\ncrawl {request.crawl_id} drained in {progress.elapsed:.1f}s\n"
        f"  fetched  {progress.fetched}\n"
        f"  parsed   {progress.parsed}\n"
        f"  stored   {stored}\n"
        f"  errors   {progress.errors} dead letters of this crawl (topic crawl.dlq)\n"
        f"  rate     {progress.rate:.1f} pages/s end to end\n"
        f"  logs     {log_dir}"
        + (f"\n  archive  {warc_dir} (WARC files of the warc stage)" if warc_dir else "")
    )
