"""Continuous crawling on the adaptive revisit schedule, end to end: a generated site served
by nginx is crawled once (every document gets ``REVISIT_INITIAL``), then the scheduler runs
beside the pipeline for a while with tiny bounds, while a known subset of the pages changes
all the time (new content and a new mtime every few tenths of a second). The scheduler is
stopped and started again half-way, as a restart would.

The intervals must move the right way, visit after visit (MongoDB is sampled every half
second): down to ``REVISIT_MIN`` for the changing pages, up for the others (a 304 is
unchanged) and for the 404s and redirects (answered again as before); never outside the
bounds. No due time may be queued twice (crawl.discovered, across the restart), dedup may
admit none twice (crawl.fetch), and nginx must have been asked for each URL exactly once per
admitted visit."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pymongo import AsyncMongoClient
from streamcrawl.core.kafka import create_topics
from streamcrawl.core.messages import Discovered, Fetch
from streamcrawl.crawl.local import free_port, running_pipeline
from streamcrawl.crawl.seeds import SeedOptions, produce_seeds, seed_payloads
from streamcrawl.crawl.watch import watch_until_drained
from streamcrawl.demo.nginx import page_requests
from streamcrawl.demo.revision import file_of, request_path
from streamcrawl.localstack.stack import StackConfig
from streamcrawl.scheduler.service import Scheduler

from ..support.crawl import KCAT, crawl_settings, kcat_consume, served_site, stored_documents

pytestmark = pytest.mark.integration

SITE_PAGES = 60
CHANGING = 8
CRAWL = "continuous"
INITIAL, MINIMUM, MAXIMUM = 4.0, 1.0, 60.0
# How long the scheduler runs after round one, and when it is restarted.
RUN_S = float(os.environ.get("SCHEDULE_RUN_S", "40"))
RESTART_AT_S = RUN_S / 2
DRAIN_TIMEOUT = 600.0


async def intervals(settings: Any) -> dict[str, tuple[float, float, float]]:
    """(revisit_interval, next_visit, checked_at) by URL, of the status documents (where
    the sink keeps the schedule, and which the scheduler reads and leases)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_status_collection]
        projection = {"url": 1, "revisit_interval": 1, "next_visit": 1, "checked_at": 1}
        return {
            doc["url"]: (doc["revisit_interval"], doc["next_visit"], doc["checked_at"])
            async for doc in collection.find({"crawl_id": CRAWL}, projection)
        }
    finally:
        await client.close()


async def keep_changing(files: list[Path], stop: asyncio.Event) -> None:
    """Give each file new content and a later mtime (so a new ETag) every 0.3 s."""
    originals = {file: file.read_text(encoding="utf-8") for file in files}
    mtime = time.time() + 1000
    version = 0
    while not stop.is_set():
        version += 1
        mtime += 1
        for file, text in originals.items():
            file.write_text(
                text.replace("</body>", f"<p>version {version}</p></body>"), encoding="utf-8"
            )
            os.utime(file, (mtime, mtime))
        await asyncio.sleep(0.3)


async def run_scheduler(settings: Any, stop: asyncio.Event) -> Scheduler:
    scheduler = Scheduler(settings, CRAWL)
    await scheduler.start()
    try:
        await scheduler.run(stop)
    finally:
        await scheduler.stop()
    return scheduler


def monotone(values: list[float], up: bool) -> bool:
    pairs = itertools.pairwise(values)
    return all((b >= a) if up else (b <= a) for a, b in pairs)


async def test_revisit_intervals_move_the_right_way(stack: StackConfig, tmp_path: Path) -> None:
    settings = crawl_settings(
        stack,
        stats_port=str(free_port()),
        revisit_initial=str(INITIAL),
        revisit_min=str(MINIMUM),
        revisit_max=str(MAXIMUM),
        revisit_shrink="0.5",
        revisit_grow="2",
        schedule_poll="0.2",
    )
    with served_site(tmp_path / "site", SITE_PAGES) as site:
        manifest, nginx = site.manifest, site.nginx
        www = tmp_path / "site" / "www"
        async with running_pipeline(settings, tmp_path / "logs") as (stages, watch):
            # -- round one: the crawl ----------------------------------------------------
            seeds = seed_payloads([manifest.entry_url], SeedOptions(crawl_id=CRAWL))
            await produce_seeds(settings, seeds)
            await watch_until_drained(watch, stages, io.StringIO(), timeout=DRAIN_TIMEOUT)
            first = await intervals(settings)
            assert set(first) == site.expected_urls()
            assert {interval for interval, _, _ in first.values()} == {INITIAL}
            assert all(due == checked + INITIAL for _, due, checked in first.values())
            before = len(nginx.access_log_entries())

            # -- continuous: the scheduler, pages changing, a restart half-way -------------
            content = sorted(manifest.pages - {manifest.entry_url})
            changing = set(content[:CHANGING])
            stop_changes = asyncio.Event()
            changer = asyncio.create_task(
                keep_changing([file_of(www, request_path(u)) for u in changing], stop_changes)
            )
            samples: dict[str, list[float]] = defaultdict(list)
            started = time.monotonic()
            restarted = False
            stop = asyncio.Event()
            scheduler = asyncio.create_task(run_scheduler(settings, stop))
            queued = 0
            while time.monotonic() - started < RUN_S:
                await asyncio.sleep(0.5)
                for url, (interval, _, _) in (await intervals(settings)).items():
                    if not samples[url] or samples[url][-1] != interval:
                        samples[url].append(interval)
                if not restarted and time.monotonic() - started >= RESTART_AT_S:
                    stop.set()
                    queued += (await scheduler).queued_total
                    stop = asyncio.Event()
                    scheduler = asyncio.create_task(run_scheduler(settings, stop))
                    restarted = True
            stop.set()
            queued += (await scheduler).queued_total
            stop_changes.set()
            await changer
            await watch_until_drained(watch, stages, io.StringIO(), timeout=DRAIN_TIMEOUT)
            last = await intervals(settings)
            pages = await stored_documents(settings)
            log = page_requests(nginx.access_log_entries()[before:])

    steady = manifest.pages - changing
    others = set(manifest.missing) | set(manifest.redirects)
    steps = {url: len(samples[url]) for url in last}
    report = (
        f"continuous crawl of {len(last)} documents for {RUN_S:.0f}s (restart at "
        f"{RESTART_AT_S:.0f}s): {queued} revisits queued, {len(log)} requests; intervals "
        f"seen per changing page {sorted(steps[u] for u in changing)}, per steady page "
        f"{dict(Counter(steps[u] for u in steady))}; last intervals: changing "
        f"{sorted({last[u][0] for u in changing})}, steady {sorted({last[u][0] for u in steady})}"
    )
    print(report)
    (tmp_path / "schedule-report.txt").write_text(report + "\n", encoding="utf-8")

    for url, seen in samples.items():
        assert all(MINIMUM <= value <= MAXIMUM for value in seen), (url, seen)
    # Changing pages: every visit found a change, so the interval only shrank, to the bottom.
    for url in changing:
        assert samples[url][0] == INITIAL and monotone(samples[url], up=False), samples[url]
        assert last[url][0] == MINIMUM, (url, samples[url])
    # Unchanged pages (304s), and 404s and redirects answered as before: it only grew.
    for url in steady | others:
        assert samples[url][0] == INITIAL and monotone(samples[url], up=True), samples[url]
        assert last[url][0] >= INITIAL * 4, (url, samples[url])  # two revisits at least
    # Drained, no lease is left: each status document holds the schedule its last visit set.
    assert all(due == checked + interval for interval, due, checked in last.values())
    # The page documents hold the content as stored; the schedule lives beside them only.
    assert {doc["url"] for doc in pages if doc["crawl_id"] == CRAWL} == set(last)
    assert all({"revisit_interval", "next_visit", "checked_at"}.isdisjoint(d) for d in pages)

    by_path = Counter(e.path for e in log)
    if KCAT is None:
        return
    # crawl.discovered: the scheduler queued no (URL, due time) twice, restart included.
    discovered = msgspec.json.Decoder(Discovered)
    queued_rounds = [
        (record.url, record.revisit.round, record.revisit.due)
        for _, value in kcat_consume(settings.kafka_bootstrap, settings.topic_prefix + "discovered")
        if (record := discovered.decode(value)).revisit is not None
    ]
    assert all(due is not None for _, _, due in queued_rounds)
    twice = [key for key, n in Counter((u, r) for u, r, _ in queued_rounds).items() if n > 1]
    assert twice == [], twice
    assert len(queued_rounds) == queued
    # crawl.fetch: dedup admitted each revisit once; nginx saw each URL once per admission.
    fetch = msgspec.json.Decoder(Fetch)
    rounds = {
        (record.url, record.revisit.round)
        for _, value in kcat_consume(settings.kafka_bootstrap, settings.topic_prefix + "fetch")
        if (record := fetch.decode(value)).revisit is not None
    }
    admitted = Counter(url for url, _ in rounds)
    assert {request_path(url): n for url, n in admitted.items()} == dict(by_path), report


class CrashAfterLease(Scheduler):
    """A scheduler that stops between leasing a batch and sending it."""

    def _candidate(self, document: Any, now: float) -> Any:
        raise RuntimeError("stopped after the lease")


async def test_a_restarted_scheduler_does_not_queue_a_due_time_twice(
    stack: StackConfig,
) -> None:
    """On the database alone: a batch leased but not sent (the scheduler stopped between)
    is not sent by the next scheduler for that due time; it comes due again when the lease
    ends, for a new due time. A second pass over what was sent sends nothing; a batch takes
    at most SCHEDULE_PER_HOST pages of one host."""
    settings = crawl_settings(stack, schedule_lease="100", schedule_per_host="3")
    scope = {"allow_domains": ["a.example", "b.example"], "max_depth": 5}

    def document(host: str, n: int, due: float) -> dict[str, Any]:
        url = f"http://{host}/{n}"
        return {"_id": url, "url": url, "host": host, "crawl_id": CRAWL, "depth": 1,
                "scope": scope, "revisit_interval": 10.0, "next_visit": due}  # fmt: skip

    await create_topics(settings)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    # The scheduler reads and leases the pages' status documents.
    collection = client[settings.mongo_database][settings.mongo_status_collection]
    try:
        await collection.insert_many(
            [document("a.example", n, 1000.0 + n) for n in range(5)]
            + [document("b.example", n, 1000.5 + n) for n in range(2)]
        )
        crashed = CrashAfterLease(settings, CRAWL)
        await crashed.start()
        try:
            with pytest.raises(RuntimeError):
                await crashed.run_once(now=2000.0)
        finally:
            await crashed.stop()
        leased = {d["_id"]: d["next_visit"] async for d in collection.find({})}
        assert sorted(leased.values()).count(2100.0) == 5  # 3 of a.example, 2 of b.example

        scheduler = Scheduler(settings, CRAWL)
        await scheduler.start()
        try:
            restarted = await scheduler.run_once(now=2000.0)
            assert (restarted.due, restarted.queued) == (2, 2)  # a.example's last two only
            assert (await scheduler.run_once(now=2000.0)).queued == 0  # nothing due twice
            after_lease = await scheduler.run_once(now=2100.0)
            assert after_lease.queued == 5  # the stopped batch, due again: at the lease's end
        finally:
            await scheduler.stop()
    finally:
        await client.drop_database(settings.mongo_database)
        await client.close()
    if KCAT is None:
        return
    decoder = msgspec.json.Decoder(Discovered)
    sent = [
        (record.url, record.revisit.due)
        for _, value in kcat_consume(settings.kafka_bootstrap, settings.topic_prefix + "discovered")
        if (record := decoder.decode(value)).revisit is not None
    ]
    assert len(sent) == len(set(sent)) == 7
    assert sorted(due for _, due in sent if due == 2100.0) == [2100.0] * 5


def test_the_schedule_command_runs_until_sigterm(stack: StackConfig, tmp_path: Path) -> None:
    """``streamcrawl schedule``: starts, queues what is due, and stops cleanly on SIGTERM."""
    import signal
    import subprocess
    import sys

    settings = crawl_settings(stack)
    asyncio.run(create_topics(settings))
    env = {**os.environ, **settings.as_env()}
    command = [sys.executable, "-c", "from streamcrawl.cli import main; raise SystemExit(main())"]
    with (tmp_path / "schedule.log").open("w+") as log:
        process = subprocess.Popen(
            [*command, "schedule", "--crawl-id", CRAWL], env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 60
            while "scheduler: running" not in (tmp_path / "schedule.log").read_text():
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_the_registered_stage_queues_due_pages_when_enabled(
    stack: StackConfig, tmp_path: Path
) -> None:
    """``streamcrawl run scheduler`` with SCHEDULE_ENABLED=1: ready on /readyz, leases and
    queues a due page, stops cleanly on SIGTERM."""
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    settings = crawl_settings(stack, schedule_enabled="1", metrics_port=str(port))
    asyncio.run(create_topics(settings))
    url = "http://a.example/due"
    scope = {"allow_domains": ["a.example"], "max_depth": 5}

    async def store_due() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
        try:
            await client[settings.mongo_database][settings.mongo_status_collection].insert_one(
                {
                    "_id": url,
                    "url": url,
                    "host": "a.example",
                    "crawl_id": CRAWL,
                    "depth": 0,
                    "scope": scope,
                    "revisit_interval": 5.0,
                    "next_visit": 1.0,
                }
            )
        finally:
            await client.close()

    async def next_visit() -> float:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
        try:
            collection = client[settings.mongo_database][settings.mongo_status_collection]
            document = await collection.find_one({"_id": url})
            assert document is not None
            return float(document["next_visit"])
        finally:
            await client.close()

    asyncio.run(store_due())
    env = {**os.environ, **settings.as_env()}
    command = [sys.executable, "-m", "streamcrawl.cli", "run", "scheduler"]
    with (tmp_path / "scheduler.log").open("w+") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while asyncio.run(next_visit()) == 1.0:  # leased: moved to now + SCHEDULE_LEASE
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as reply:
                assert reply.status == 200
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
    assert asyncio.run(next_visit()) > time.time() + settings.schedule_lease - 120
    if KCAT is not None:
        decoder = msgspec.json.Decoder(Discovered)
        sent = [
            decoder.decode(value)
            for _, value in kcat_consume(
                settings.kafka_bootstrap, settings.topic_prefix + "discovered"
            )
        ]
        assert [(d.url, d.revisit.due if d.revisit else None) for d in sent] == [(url, 1.0)]
