"""Graceful shutdown with a deadline, against a real broker: a fetcher SIGTERMed while its
requests hang exits within SHUTDOWN_GRACE, and nothing it had is lost: what it handed
back or did not commit is fetched by the next fetcher."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from streamcrawl.core.kafka import create_topics
from streamcrawl.core.messages import Fetched, encode
from streamcrawl.core.topics import FETCH, FETCHED, PAGES, SINK_GROUP
from streamcrawl.crawl.local import free_port
from streamcrawl.crawl.processes import StageProcesses, child_env
from streamcrawl.localstack.stack import StackConfig

from ..conftest import isolated_settings
from ..unit.test_stages import fetch, page
from .test_poison import PrivateFerretDB, produce, read_topic, stored_ids, wait_committed

pytestmark = pytest.mark.integration

GRACE = 6.0
HOSTS = 4
URLS_PER_HOST = 15


class HangingSite:
    """Answers nothing until released (a stalled server), then robots.txt 404 and small
    pages. Counts the requests it holds."""

    def __init__(self, hosts: int = HOSTS) -> None:
        self.released = asyncio.Event()
        self.held = 0
        self.ports = [free_port() for _ in range(hosts)]
        self.requests: list[tuple[float, str]] = []  # (monotonic time, URL)
        self._runners: list[web.AppRunner] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.held += 1
        self.requests.append((time.monotonic(), f"http://{request.host}{request.path}"))
        await self.released.wait()
        if request.path == "/robots.txt":
            return web.Response(status=404)
        return web.Response(
            text=f"<html><title>{request.path}</title></html>", content_type="text/html"
        )

    async def start(self) -> None:
        for port in self.ports:
            app = web.Application()
            app.router.add_get("/{tail:.*}", self.handle)
            runner = web.AppRunner(app, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self._runners.append(runner)

    async def stop(self) -> None:
        self.released.set()
        for runner in self._runners:
            await runner.cleanup()


async def test_a_sigtermed_fetcher_exits_within_its_grace_and_loses_nothing(
    stack: StackConfig, tmp_path: Path
) -> None:
    settings = isolated_settings(
        stack, shutdown_grace=str(GRACE), crawl_delay="0.01", fetch_read_timeout="120"
    )
    await create_topics(settings)
    site = HangingSite()
    await site.start()
    urls = [f"http://127.0.0.1:{port}/p{n}" for port in site.ports for n in range(URLS_PER_HOST)]
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    try:
        for index, url in enumerate(urls):
            await produce(settings, FETCH, [encode(fetch(url))], partition=index % 12)
        stages.start(["fetcher", "delay"])
        deadline = time.monotonic() + 90
        while site.held < HOSTS:  # every host's robots.txt request is in flight, stalled
            assert time.monotonic() < deadline, "the fetcher never reached the site"
            await asyncio.sleep(0.2)
        fetcher = stages.processes.pop("fetcher")
        terminated = time.monotonic()
        fetcher.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(fetcher.wait, GRACE + 30)
        exited = time.monotonic() - terminated
        print(f"\nSIGTERM to exit: {exited:.2f}s (grace {GRACE:.0f}s, requests stalled)")
        assert code == 0
        assert exited <= GRACE + 2.0
        # The next fetcher (same slot: the old one left the group) finds every URL.
        site.released.set()
        stages.start_one("fetcher")
        fetched: set[str] = set()
        deadline = time.monotonic() + 150
        decoder = msgspec.json.Decoder(Fetched)
        while fetched != set(urls):
            assert time.monotonic() < deadline, sorted(set(urls) - fetched)[:10]
            await asyncio.sleep(1.0)
            fetched = {decoder.decode(v).url for v in await read_topic(settings, FETCHED)}
        assert not stages.dead()
    finally:
        stages.stop()
        await site.stop()
    log = (tmp_path / "logs" / "fetcher.log").read_text()
    assert "left group" in log


async def test_a_sink_stuck_in_a_database_outage_exits_at_its_deadline_and_loses_nothing(
    stack: StackConfig, tmp_path: Path
) -> None:
    """The hard deadline: a batch that cannot finish (the database is down, so the sink
    waits it out) is cut at the deadline; its offsets were not committed, so the next
    sink stores it."""
    database = PrivateFerretDB(stack, tmp_path / "ferretdb")
    database.start()
    settings = isolated_settings(stack, mongo_uri=database.uri, shutdown_grace=str(GRACE))
    await create_topics(settings)
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    pages = [page(url=f"http://a.example/{n}") for n in range(5)]
    try:
        stages.start_one("sink")
        await produce(settings, PAGES, [encode(p) for p in pages[:2]], partition=0)
        await wait_committed(settings, SINK_GROUP, PAGES, timeout=90)
        database.stop()
        await produce(settings, PAGES, [encode(p) for p in pages[2:]], partition=0)
        await asyncio.sleep(3.0)  # the sink has the batch and waits for the database
        sink = stages.processes.pop("sink")
        terminated = time.monotonic()
        sink.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(sink.wait, GRACE + 30)
        exited = time.monotonic() - terminated
        print(f"\nSIGTERM to exit, database down: {exited:.2f}s (grace {GRACE:.0f}s)")
        assert code == 0
        assert exited <= GRACE + 2.0
        database.start()
        stages.start_one("sink")
        await wait_committed(settings, SINK_GROUP, PAGES, timeout=90)
        assert await stored_ids(database.uri, settings) == sorted(p.url for p in pages)
    finally:
        stages.stop()
        database.stop()
    assert "shutdown grace" in (tmp_path / "logs" / "sink.log").read_text()
