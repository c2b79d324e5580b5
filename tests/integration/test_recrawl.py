"""Conditional re-crawls end to end: a generated site served by nginx (which sends ETag and
Last-Modified for its files and answers 304 to a conditional request that still matches) is
crawled once; then a known subset of its files is changed, another subset only touched (a new
ETag over the same content), one new page is linked from a changed one, and the crawl is
revisited with ``queue_revisits`` (what ``streamcrawl recrawl`` runs).

Round two must ask for every stored URL once, conditionally: nginx's log shows 304 for the
untouched pages and 200 for the changed and touched ones, nothing twice; MongoDB then holds
the new content of the changed pages, the touched and untouched ones keep their page
documents as stored in round one while their status documents get a later ``checked_at``
(and the touched ones the new ETag), and the new page is stored. Both rounds run on one
warm pipeline, and round two's time is compared with round one's (the ratio is printed and
written to ``recrawl-ratio.txt`` under the test's directory)."""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pymongo import AsyncMongoClient
from streamcrawl.core.messages import Fetched
from streamcrawl.crawl.local import free_port, running_pipeline
from streamcrawl.crawl.recrawl import queue_revisits
from streamcrawl.crawl.seeds import SeedOptions, produce_seeds, seed_payloads
from streamcrawl.crawl.watch import watch_until_drained
from streamcrawl.demo.nginx import page_requests
from streamcrawl.demo.revision import pad_pages, request_path, revise_site
from streamcrawl.localstack.stack import StackConfig
from streamcrawl.sink.logic import status_document

from ..support.crawl import KCAT, crawl_settings, kcat_consume, served_site

pytestmark = pytest.mark.integration

SITE_PAGES = int(os.environ.get("RECRAWL_SITE_PAGES", "1000"))
# Text added to every generated page, in KiB: the generated pages are small (a few KiB), real
# HTML pages weigh tens of KiB, and what a conditional revisit saves grows with them.
PAD_KIB = int(os.environ.get("RECRAWL_PAD_KIB", "40"))
# nginx's send rate per connection ("" for none). On loopback a body costs no transfer time,
# so a 304 saves nothing there but the work behind it; across a network the body is what a
# conditional request saves. 1 MB/s per connection (16 at a time) stands for that network.
LIMIT_RATE = os.environ.get("RECRAWL_LIMIT_RATE", "1m") or None
CHANGED = 30
TOUCHED = 20
CRAWL = "fresh"
MARK = "changed in round two"
# Generous for a loaded two-core machine; a crawl that does not drain still fails.
DRAIN_TIMEOUT = 600.0


def cpu_seconds(stages: Any) -> dict[str, float]:
    """CPU time (user + system) each stage process has used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, process in stages.processes.items():
        with open(f"/proc/{process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / ticks
    return used


async def documents(settings: Any, collection_name: str = "") -> dict[str, dict[str, Any]]:
    """The crawl's stored pages by URL (or its status documents, from ``collection_name``)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
    try:
        name = collection_name or settings.mongo_collection
        collection = client[settings.mongo_database][name]
        found = [doc async for doc in collection.find({"crawl_id": CRAWL})]
    finally:
        await client.close()
    by_url = {doc["url"]: doc for doc in found}
    assert len(by_url) == len(found), "a URL stored twice"
    return by_url


async def test_recrawl_downloads_only_what_changed(stack: StackConfig, tmp_path: Path) -> None:
    settings = crawl_settings(stack, stats_port=str(free_port()))
    with served_site(tmp_path / "site", SITE_PAGES, limit_rate=LIMIT_RATE) as site:
        manifest, nginx = site.manifest, site.nginx
        www = tmp_path / "site" / "www"
        pad_pages(www, PAD_KIB)
        async with running_pipeline(settings, tmp_path / "logs") as (stages, watch):
            # Warm-up: the stages join their groups and read robots.txt, so both rounds are
            # timed on a running pipeline.
            warm = seed_payloads([manifest.entry_url], SeedOptions(crawl_id="warm-up", max_depth=0))
            await produce_seeds(settings, warm)
            await watch_until_drained(watch, stages, io.StringIO(), timeout=DRAIN_TIMEOUT)
            warmed = len(nginx.access_log_entries())

            # -- round one ------------------------------------------------------------
            cpu_one = cpu_seconds(stages)
            started = time.monotonic()
            seeds = seed_payloads([manifest.entry_url], SeedOptions(crawl_id=CRAWL))
            await produce_seeds(settings, seeds)
            await watch_until_drained(watch, stages, io.StringIO(), timeout=DRAIN_TIMEOUT)
            round_one = time.monotonic() - started
            cpu_one = {n: t - cpu_one[n] for n, t in cpu_seconds(stages).items()}
            first = await documents(settings)
            first_status = await documents(settings, settings.mongo_status_collection)
            first_log = page_requests(nginx.access_log_entries()[warmed:])
            assert {u for u, d in first.items() if d["status"] == 200} == manifest.pages
            repeated = [p for p, n in Counter(e.path for e in first_log).items() if n > 1]
            assert repeated == []
            for url in manifest.pages:
                assert first[url]["etag"] and first[url]["last_modified"], url
                assert first_status[url]["checked_at"] == first[url]["stored_at"]

            # -- between rounds: change, touch, add -----------------------------------
            later = time.time() + 120  # nginx's ETag is mtime and size: a new second
            revision = revise_site(www, manifest, CHANGED, TOUCHED, MARK, later)
            changed, touched, fresh_url = revision.changed, revision.touched, revision.fresh_url

            # -- round two ------------------------------------------------------------
            before = len(nginx.access_log_entries())
            cpu_two = cpu_seconds(stages)
            checked_from = time.time()
            started = time.monotonic()
            queued = await queue_revisits(settings, CRAWL)
            queuing = time.monotonic() - started
            await watch_until_drained(watch, stages, io.StringIO(), timeout=DRAIN_TIMEOUT)
            round_two = time.monotonic() - started
            cpu_two = {n: t - cpu_two[n] for n, t in cpu_seconds(stages).items()}
            second = await documents(settings)
            second_status = await documents(settings, settings.mongo_status_collection)
            second_log = page_requests(nginx.access_log_entries()[before:])

        ratio = round_two / round_one
        # The requests themselves: first to last, from nginx's log.
        span_one = first_log[-1].ts - first_log[0].ts
        span_two = second_log[-1].ts - second_log[0].ts
        bytes_one = sum(e.bytes for e in first_log)
        bytes_two = sum(e.bytes for e in second_log)
        report = (
            f"recrawl of {len(first)} stored documents ({len(manifest.pages)} pages"
            f"{f' of about {PAD_KIB} KiB more text' if PAD_KIB else ''}"
            f"{f', served at {LIMIT_RATE}B/s per connection' if LIMIT_RATE else ''}, "
            f"{CHANGED} changed, {TOUCHED} touched): round one {round_one:.1f}s, "
            f"round two {round_two:.1f}s (queued in {queuing:.1f}s, first request after "
            f"{second_log[0].ts - checked_from:.1f}s, last request after "
            f"{second_log[-1].ts - checked_from:.1f}s, last document written after "
            f"{max(d['checked_at'] for d in second_status.values()) - checked_from:.1f}s), "
            f"ratio {ratio:.2f}; "
            f"requests from first to last: {span_one:.1f}s and {span_two:.1f}s, "
            f"ratio {span_two / span_one:.2f}; bytes served: {bytes_one} and {bytes_two}, "
            f"ratio {bytes_two / bytes_one:.2f}"
        )
        print(report)
        print(
            "CPU seconds, round one:", " ".join(f"{n} {t:.1f}" for n, t in sorted(cpu_one.items()))
        )
        print(
            "CPU seconds, round two:", " ".join(f"{n} {t:.1f}" for n, t in sorted(cpu_two.items()))
        )
        (tmp_path / "recrawl-ratio.txt").write_text(report + "\n", encoding="utf-8")

    # Every stored URL queued once, with validators for every page.
    assert queued.queued == len(first)
    assert queued.with_validators >= len(manifest.pages)

    # nginx: every URL once in round two; 304 for the untouched pages, 200 for the rest.
    statuses = Counter(e.path for e in second_log)
    assert [p for p, n in statuses.items() if n > 1] == []
    by_path = {e.path: e.status for e in second_log}
    expected = {request_path(url): 304 for url in manifest.pages}
    expected.update({request_path(url): 200 for url in changed | touched | {fresh_url}})
    expected.update({request_path(url): 404 for url in manifest.missing})
    expected.update({request_path(url): 301 for url in manifest.redirects})
    assert by_path == expected
    assert sum(e.bytes for e in second_log if e.status == 304) == 0  # nothing downloaded

    # MongoDB: new content where it changed; elsewhere the page documents are as stored in
    # round one and only their status documents moved (checked_at, schedule, validators).
    assert set(second) == set(first) | {fresh_url}
    assert set(second_status) == set(second)
    for url in changed:
        now, then = second[url], first[url]
        assert MARK in now["text"], url
        assert now["content_hash"] != then["content_hash"]
        assert now["etag"] != then["etag"]
        assert now["stored_at"] >= checked_from
        assert second_status[url]["checked_at"] == now["stored_at"]
        assert second_status[url]["revisit_interval"] < first_status[url]["revisit_interval"]
    for url in touched:
        assert second[url] == first[url], url  # same content: the page is not rewritten
        now, then = second_status[url], first_status[url]
        assert now["checked_at"] >= checked_from and now["stored_at"] == then["stored_at"]
        assert now["etag"] != then["etag"]  # the next round sends the new validator
    for url in manifest.pages - changed - touched:
        assert second[url] == first[url], url
        now, then = second_status[url], first_status[url]
        moved = {"checked_at", "revisit_interval", "next_visit"}  # the schedule moves too
        assert {k: v for k, v in now.items() if k not in moved} == {
            k: v for k, v in then.items() if k not in moved
        }, url
        assert now["revisit_interval"] > then["revisit_interval"], url  # unchanged: grows
        assert now["checked_at"] >= checked_from
    assert second[fresh_url]["status"] == 200 and second[fresh_url]["title"] == "Fresh"
    assert second[fresh_url]["stored_at"] >= checked_from
    # Beside each page, its status document (what recrawl read): the page's fields, but the
    # validators a touched page answered with, and when it was checked.
    for url, doc in second.items():
        expected_status = status_document(doc)
        if url in touched:
            expected_status.update(etag=second_status[url]["etag"])
            expected_status.update(last_modified=second_status[url]["last_modified"])
        moved = {"checked_at", "revisit_interval", "next_visit"}
        assert {k: v for k, v in second_status[url].items() if k not in moved} == (
            expected_status
        ), url

    # The fetcher asked conditionally for every page it had validators for.
    if KCAT is not None:
        decoder = msgspec.json.Decoder(Fetched)
        revisits = [
            fetched
            for _, value in kcat_consume(
                settings.kafka_bootstrap, settings.topic_prefix + "fetched"
            )
            if (fetched := decoder.decode(value)).revisit is not None
        ]
        asked = {
            f.url: {name.lower() for name, _ in f.request_headers}
            for f in revisits
            if f.revisit is not None and f.revisit.etag
        }
        assert set(asked) == manifest.pages
        assert all({"if-none-match", "if-modified-since"} <= names for names in asked.values())

    # Round two downloads only what changed: a small part of round one's bytes.
    assert bytes_two / bytes_one < 0.3, report
    # Its requests (conditional, mostly 304s) take less time than round one's. End to end,
    # round two also waits for the sink's checked_at updates of the (large) page documents,
    # and the times of both rounds move with the load of the machine: that ratio is
    # reported, not asserted.
    assert span_two < span_one, report


def test_recrawl_command_runs_a_round_and_reports_it(
    stack: StackConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """``streamcrawl recrawl ID --run`` on an unchanged site: every page answers 304, only
    the redirects and missing pages (which have no validators) are written again."""
    import asyncio

    from streamcrawl.cli import main

    settings = crawl_settings(stack, stats_port=str(free_port()))
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)
    with served_site(tmp_path / "site", 60) as site:
        manifest = site.manifest

        async def first_round() -> None:
            async with running_pipeline(settings, tmp_path / "logs") as (stages, watch):
                seeds = seed_payloads([manifest.entry_url], SeedOptions(crawl_id="cli"))
                await produce_seeds(settings, seeds)
                await watch_until_drained(watch, stages, io.StringIO(), timeout=DRAIN_TIMEOUT)

        asyncio.run(first_round())
        before = len(site.nginx.access_log_entries())
        assert main(["recrawl", "cli", "--run", "--timeout", str(DRAIN_TIMEOUT)]) == 0
        second_log = page_requests(site.nginx.access_log_entries()[before:])
    out = capsys.readouterr().out
    stored = len(manifest.pages) + len(manifest.missing) + len(manifest.redirects)
    assert f"queued {stored} stored pages ({len(manifest.pages)} with validators)" in out, out
    assert f"unchanged  {len(manifest.pages)} documents" in out, out
    assert f"rewritten  {stored - len(manifest.pages)} documents" in out, out
    assert sorted(e.status for e in second_log if e.status in (200, 304)) == [304] * len(
        manifest.pages
    )


def test_recrawl_from_pages_reaches_pages_stored_before_status_documents(
    stack: StackConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crawl stored partly before the sink wrote status documents (simulated: half of them
    deleted) is only partly read from its status documents; ``recrawl --from-pages`` reads
    the pages, revisits every one conditionally, and leaves each with its status document."""
    import asyncio

    from streamcrawl.cli import main
    from streamcrawl.crawl.recrawl import stored_revisits

    crawl = "older"
    settings = crawl_settings(stack, stats_port=str(free_port()))
    for name, value in settings.as_env().items():
        monkeypatch.setenv(name, value)

    async def status_ids() -> list[str]:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
        try:
            status = client[settings.mongo_database][settings.mongo_status_collection]
            return [doc["_id"] async for doc in status.find({"crawl_id": crawl}, {"_id": 1})]
        finally:
            await client.close()

    async def forget_status(ids: list[str]) -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongo_uri)
        try:
            status = client[settings.mongo_database][settings.mongo_status_collection]
            await status.delete_many({"_id": {"$in": ids}})
        finally:
            await client.close()

    async def revisits(from_pages: bool) -> int:
        read = stored_revisits(settings, crawl, 1, from_pages=from_pages)
        return len([candidate async for candidate in read])

    with served_site(tmp_path / "site", 60) as site:
        manifest = site.manifest

        async def first_round() -> None:
            async with running_pipeline(settings, tmp_path / "logs") as (stages, watch):
                seeds = seed_payloads([manifest.entry_url], SeedOptions(crawl_id=crawl))
                await produce_seeds(settings, seeds)
                await watch_until_drained(watch, stages, io.StringIO(), timeout=DRAIN_TIMEOUT)

        asyncio.run(first_round())
        stored = len(manifest.pages) + len(manifest.missing) + len(manifest.redirects)
        ids = asyncio.run(status_ids())
        assert len(ids) == stored
        asyncio.run(forget_status(ids[::2]))
        assert asyncio.run(revisits(from_pages=False)) == stored - len(ids[::2])
        assert asyncio.run(revisits(from_pages=True)) == stored
        before = len(site.nginx.access_log_entries())
        command = ["recrawl", crawl, "--run", "--from-pages", "--timeout", str(DRAIN_TIMEOUT)]
        assert main(command) == 0
        second_log = page_requests(site.nginx.access_log_entries()[before:])
    assert sorted(e.status for e in second_log if e.status in (200, 304)) == [304] * len(
        manifest.pages
    )
    assert sorted(asyncio.run(status_ids())) == sorted(ids)
