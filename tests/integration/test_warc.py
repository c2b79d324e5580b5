"""The warc stage against the real broker: the real fetcher fetches pages of a generated
site served by nginx (and of the hostile site), the warc stage archives crawl.fetched, and
the files are checked with the tools a web archive uses: ``warcio check`` (digests),
``cdxj-indexer`` (every capture indexed), and the bodies read back equal to what was
served. Then the stage is SIGKILLed mid-run: every completed file stays valid and no
response is lost or archived twice across files."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, create_topics, make_producer
from streamcrawl.core.messages import Discovered, Scope, encode, fetch_from
from streamcrawl.core.topics import FETCH, FETCHED, WARC_GROUP
from streamcrawl.crawl.processes import StageProcesses, child_env
from streamcrawl.demo.nginx import NginxSite
from streamcrawl.demo.site import SiteManifest, generate_site
from streamcrawl.localstack.stack import StackConfig
from warcio.archiveiterator import ArchiveIterator

from ..conftest import free_port, isolated_settings
from ..support.hostile import HostileSite, _Pages

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@dataclass
class Capture:
    """One response or revisit record read back."""

    file: str
    kind: str
    status: int
    content: bytes
    truncated: str | None
    refers_to: str | None
    headers: list[tuple[str, str]]


@dataclass
class DemoSite:
    manifest: SiteManifest
    www: Path


@pytest.fixture()
def demo(tmp_path: Path) -> Iterator[DemoSite]:
    port = free_port()
    manifest = generate_site(tmp_path / "site", pages=150, port=port)
    with NginxSite(tmp_path / "site", port):
        yield DemoSite(manifest, tmp_path / "site" / "www")


def served_file(site: DemoSite, url: str) -> Path:
    path = urlsplit(url).path
    return site.www / (path.lstrip("/") + ("index.html" if path.endswith("/") else ""))


def warc_settings(stack: StackConfig, tmp_path: Path, **extra: str) -> Settings:
    return isolated_settings(
        stack,
        warc_dir=str(tmp_path / "warc"),
        crawl_delay="0",
        fetch_per_host_concurrency="8",
        **extra,
    )


async def produce_fetches(settings: Settings, urls: list[str]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for url in urls:
            host = urlsplit(url).netloc
            candidate = Discovered(
                url=url,
                host=host,
                crawl_id="warc-test",
                depth=0,
                priority=5,
                scope=Scope(allow_domains=["127.0.0.1"], max_depth=5),
                discovered_at=time.time(),
            )
            value = encode(fetch_from(candidate, time.time()))
            await producer.send(settings.topic_prefix + FETCH, value, key=host.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def archived_offsets(probe: OffsetProbe, settings: Settings) -> tuple[int, int]:
    """(records on crawl.fetched, of them committed by the warc group)."""
    rows = await probe.lag(WARC_GROUP, [settings.topic_prefix + FETCHED])
    return sum(r.end_offset for r in rows), sum(r.committed or 0 for r in rows)


async def wait_archived(
    settings: Settings, expected: int, timeout: float = 240, at_least: int | None = None
) -> None:
    """Until ``expected`` responses are on crawl.fetched and the warc group committed them
    all (or, with ``at_least``, that many)."""
    probe = OffsetProbe(settings)
    await probe.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ends, committed = await archived_offsets(probe, settings)
            target = expected if at_least is None else at_least
            if (at_least is not None or ends == expected) and committed >= target:
                return
            assert time.monotonic() < deadline, f"{ends} fetched, {committed} archived"
            await asyncio.sleep(0.3)
    finally:
        await probe.stop()


def read_captures(directory: Path) -> dict[str, list[Capture]]:
    """Every response/revisit of every completed file, by target URI."""
    captures: dict[str, list[Capture]] = defaultdict(list)
    for path in sorted(directory.glob("*.warc.gz")):
        with open(path, "rb") as stream:
            for record in ArchiveIterator(stream):
                if record.rec_type not in ("response", "revisit"):
                    continue
                warc = record.rec_headers
                captures[warc.get_header("WARC-Target-URI")].append(
                    Capture(
                        file=path.name,
                        kind=record.rec_type,
                        status=int(record.http_headers.get_statuscode()),
                        content=record.content_stream().read(),
                        truncated=warc.get_header("WARC-Truncated"),
                        refers_to=warc.get_header("WARC-Refers-To-Target-URI"),
                        headers=list(record.http_headers.headers),
                    )
                )
    return captures


def check_with_tools(directory: Path) -> list[dict[str, str]]:
    """``warcio check`` passes on every file; ``cdxj-indexer`` indexes them all."""
    files = sorted(directory.glob("*.warc.gz"))
    assert files and not list(directory.glob("*.open*")), sorted(directory.iterdir())
    for path in files:
        result = subprocess.run(
            [str(BIN / "warcio"), "check", "-v", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "digest pass" in result.stdout and "failed" not in result.stdout
    index = subprocess.run(
        [str(BIN / "cdxj-indexer"), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line.split(" ", 2)[2]) for line in index.splitlines() if line.strip()]


async def test_a_demo_site_is_archived_as_nginx_served_it(
    stack: StackConfig, tmp_path: Path, demo: DemoSite
) -> None:
    settings = warc_settings(stack, tmp_path)
    await create_topics(settings)
    manifest = demo.manifest
    urls = sorted(manifest.pages) + sorted(manifest.missing)[:3] + sorted(manifest.redirects)[:3]
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    stages.start(["fetcher", "warc"])
    started = time.monotonic()
    try:
        await produce_fetches(settings, urls)
        await wait_archived(settings, len(urls))
    finally:
        stages.stop()
    print(f"{len(urls)} responses fetched and archived in {time.monotonic() - started:.1f}s")
    index = check_with_tools(tmp_path / "warc")
    captures = read_captures(tmp_path / "warc")
    assert set(captures) == set(urls)
    assert all(len(found) == 1 for found in captures.values())
    assert {entry["url"] for entry in index} == set(urls) and len(index) == len(urls)
    for url in manifest.pages:
        (capture,) = captures[url]
        assert capture.status == 200
        body = capture.content
        if capture.kind == "revisit":  # the same bytes as another page: read them there
            body = captures[capture.refers_to or ""][0].content
        assert body == served_file(demo, url).read_bytes(), url
        assert ("Content-Length", str(len(body))) in capture.headers
        assert ("Server", "nginx") in [(n, v.split("/")[0]) for n, v in capture.headers]
    for url in sorted(manifest.redirects)[:3]:
        (capture,) = captures[url]
        location = dict(capture.headers)["Location"]
        assert capture.status == 301 and manifest.redirects[url].endswith(location)
    for url in sorted(manifest.missing)[:3]:
        assert captures[url][0].status == 404


async def test_the_hostile_site_is_archived_as_received(stack: StackConfig, tmp_path: Path) -> None:
    settings = warc_settings(stack, tmp_path)
    await create_topics(settings)
    with HostileSite(
        tmp_path / "requests.jsonl", free_port(), free_port(), crawl_delay_a=0.2
    ) as site:
        a = site.base_a
        paths = [
            "/charset/latin1.html",
            "/charset/sjis.html",
            "/charset/cp1251.html",
            "/bomb.html",
            "/huge.html",
            "/redirect/1",
        ]
        stages = StageProcesses(child_env(settings), tmp_path / "logs")
        stages.start(["fetcher", "warc"])
        try:
            await produce_fetches(settings, [a + path for path in paths])
            await wait_archived(settings, len(paths))
        finally:
            stages.stop()
        pages = _Pages(site.config)
    check_with_tools(tmp_path / "warc")
    captures = read_captures(tmp_path / "warc")
    assert set(captures) == {a + path for path in paths}
    # Wrong charsets: the bytes as served, whatever they claim to be.
    for path, body in pages.charset_bodies.items():
        (capture,) = captures[a + path]
        assert capture.content == body and capture.truncated is None
    # The gzip bomb is kept compressed, exactly as sent: warcio inflates it for readers,
    # so its first bytes are the page's.
    (bomb,) = captures[a + "/bomb.html"]
    assert ("Content-Encoding", "gzip") in bomb.headers and bomb.truncated is None
    assert bomb.content.startswith(b"<html><head><title>bomb</title>")
    # 50 MB announced, cut at the body cap while streaming, and marked so.
    (huge,) = captures[a + "/huge.html"]
    prefix = b"<html><head><title>huge</title></head><body>\n"
    expected = (prefix + pages.huge_block * 60)[: settings.max_body_bytes]
    assert huge.truncated == "length" and huge.content == expected
    assert ("Content-Length", str(50 * 1024 * 1024)) in huge.headers
    (moved,) = captures[a + "/redirect/1"]
    assert moved.status == 301 and dict(moved.headers)["Location"] == a + "/redirect/2"


async def wait_started_twice(log: Path, timeout: float = 120.0) -> None:
    """Until the warc stage's log shows a second start (it logs once its recovery ran)."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count("warc: writing under") < 2:
        assert time.monotonic() < deadline, "the restarted warc stage did not start"
        await asyncio.sleep(0.2)


async def test_sigkill_mid_file_loses_nothing_and_repeats_nothing(
    stack: StackConfig, tmp_path: Path, demo: DemoSite
) -> None:
    # Small batches and small files: many fsyncs and rotations before the kill.
    settings = warc_settings(stack, tmp_path, batch_size="10", warc_max_bytes="65536")
    await create_topics(settings)
    urls = sorted(demo.manifest.pages)
    stages = StageProcesses(child_env(settings), tmp_path / "logs")
    stages.start(["fetcher", "warc"])
    try:
        # Half the fetches before the kill, half after the restart: the restarted stage
        # writes to the file it took over however fast the first half was archived.
        half = len(urls) // 2
        await produce_fetches(settings, urls[:half])
        await wait_archived(settings, half, at_least=half // 2)
        stages.kill("warc")  # SIGKILL: mid-file, perhaps mid-batch
        left_open = sorted(p.name for p in (tmp_path / "warc").glob("*.open"))
        stages.start_one("warc")
        await wait_started_twice(tmp_path / "logs" / "warc.log")
        await produce_fetches(settings, urls[half:])
        await wait_archived(settings, len(urls))
    finally:
        stages.stop()
    log = (tmp_path / "logs" / "warc.log").read_text()
    # The restarted stage takes the killed one's .open file over: cut back to its last
    # fsynced batch, or removed when the kill came before its first batch (just rotated).
    assert left_open, "the kill left no .open file"
    assert "recovered" in log or "has no complete batch; removed" in log, log[-2000:]
    check_with_tools(tmp_path / "warc")
    captures = read_captures(tmp_path / "warc")
    assert set(captures) == set(urls)
    twice = {url: [c.file for c in found] for url, found in captures.items() if len(found) > 1}
    assert not twice
    assert len(list((tmp_path / "warc").glob("*.warc.gz"))) > 2  # it rotated
    for url in urls:
        (capture,) = captures[url]
        if capture.kind == "response":
            assert capture.content == served_file(demo, url).read_bytes(), url
