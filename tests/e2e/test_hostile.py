"""End to end against the hostile site: robots.txt, politeness, retries, traps, limits, SSRF.

Every check reads the hostile server's own request log (arrival time of every
request), not the crawler's view of itself. The crawl must finish on its own.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner
from streamcrawl.core.config import Settings
from streamcrawl.core.topics import HOST_PARTITIONS
from streamcrawl.crawl.local import running_pipeline
from streamcrawl.crawl.processes import StageProcesses
from streamcrawl.crawl.seeds import SeedOptions, produce_seeds, seed_payloads
from streamcrawl.crawl.watch import watch_until_drained
from streamcrawl.localstack.stack import StackConfig

from ..conftest import free_port, isolated_settings, kcat_consume
from ..support.crawl import stored_documents
from ..support.hostile import HostileSite, LoggedRequest

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CONFIGURED_DELAY = 0.5  # STREAMCRAWL_CRAWL_DELAY
CRAWL_DELAY_A = 1.0  # robots.txt of host A: larger than ours, so it wins there
CRAWL_DELAY_B = 0.2  # robots.txt of host B: smaller, so ours wins there
RETRY_AFTER = 2
# Both clocks are this machine's, but the site stamps a request when its event loop gets to
# it: on a loaded 2-core machine that lags the arrival by up to ~0.12 s (seen in CI: 0.877 s
# between two requests sent 1.0 s apart). A politeness bug shows as gaps near 0.
CLOCK_TOLERANCE = 0.15
FORBIDDEN_HOSTS = ("169.254.169.254", "10.1.2.3")
FETCHER_RSS_LIMIT = 400 * 1024 * 1024
ROBOTS_READ = re.compile(r"robots.txt of (\S+) read")
ASSIGNED = re.compile(r"fetcher: assigned (\d+) partitions")


def partition_of(port: int) -> int:
    key = f"127.0.0.1:{port}".encode()
    return int(DefaultPartitioner()(key, list(range(HOST_PARTITIONS)), []))


def ports_for_two_fetchers() -> tuple[int, int]:
    """Ports whose hosts land on an even and an odd partition: with two members the
    round-robin assignor gives them to different fetchers."""
    port_a = free_port()
    while True:
        port_b = free_port()
        if port_b != port_a and (partition_of(port_a) + partition_of(port_b)) % 2 == 1:
            return port_a, port_b


@pytest.fixture()
def hostile(tmp_path: Path) -> Iterator[HostileSite]:
    port_a, port_b = ports_for_two_fetchers()
    with HostileSite(
        tmp_path / "requests.jsonl",
        port_a,
        port_b,
        crawl_delay_a=CRAWL_DELAY_A,
        crawl_delay_b=CRAWL_DELAY_B,
        retry_after=RETRY_AFTER,
    ) as site:
        yield site


def hostile_settings(stack: StackConfig) -> Settings:
    return isolated_settings(
        stack,
        crawl_delay=str(CONFIGURED_DELAY),
        fetch_per_host_concurrency="4",
        fetch_timeout="3",
        fetch_read_timeout="2",
        retry_max_attempts="3",
        retry_base_delay="0.5",
        retry_max_delay="10",
        robots_retry="2",
        max_calendar_pages="5",
        # Host A has more URLs than fit in 5 s at its Crawl-delay: the rest must wait in
        # crawl.retry instead of in the fetcher's memory.
        host_queue_horizon="5",
        max_depth="50",
        log_level="INFO",
    )


def seeds(site: HostileSite) -> list[bytes]:
    options = SeedOptions(
        crawl_id="hostile",
        # The forbidden addresses are in scope on purpose: only the fetcher's SSRF
        # check stands between them and a request.
        allow_domains=("127.0.0.1", *FORBIDDEN_HOSTS),
        max_depth=50,
    )
    return seed_payloads([site.base_a + "/"], options)


def fetcher_peak_rss(stages: StageProcesses) -> list[int]:
    """VmHWM (peak resident set) of every running fetcher process, in bytes."""
    peaks = []
    for name, process in stages.processes.items():
        if not name.startswith("fetcher"):
            continue
        status = Path(f"/proc/{process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        peaks.append(int(line.split()[1]) * 1024)
    return peaks


async def wait_for_stable_fetchers(log_dir: Path, count: int, timeout: float = 60) -> None:
    """Until ``count`` fetchers each logged an assignment and together own every partition."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = []
        for log_file in sorted(log_dir.glob("fetcher*.log")):
            counts = ASSIGNED.findall(log_file.read_text())
            if counts:
                latest.append(int(counts[-1]))
        if len(latest) == count and sum(latest) == 12:
            await asyncio.sleep(2.0)  # no rebalance right behind it
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{count} fetchers never shared the partitions")


Intervention = Callable[[StageProcesses, HostileSite, Path], Awaitable[None]]


async def crawl_hostile(
    settings: Settings,
    site: HostileSite,
    log_dir: Path,
    fetchers: int,
    during: Intervention | None = None,
) -> list[int]:
    async with running_pipeline(settings, log_dir) as (stages, watch):
        if fetchers > 1:
            stages.scale("fetcher", fetchers)
            await wait_for_stable_fetchers(log_dir, fetchers)
        await produce_seeds(settings, seeds(site))
        if during is not None:
            await during(stages, site, log_dir)
        await watch_until_drained(watch, stages, io.StringIO(), timeout=420)
        return fetcher_peak_rss(stages)


def by_host(requests: list[LoggedRequest]) -> dict[int, list[LoggedRequest]]:
    hosts: dict[int, list[LoggedRequest]] = defaultdict(list)
    for request in requests:
        hosts[request.port].append(request)
    return hosts


def assert_polite(site: HostileSite, requests: list[LoggedRequest]) -> dict[int, float]:
    """Per host, no two requests closer than the delay that applies; returns the minima."""
    required = {
        site.port_a: max(CONFIGURED_DELAY, CRAWL_DELAY_A),
        site.port_b: max(CONFIGURED_DELAY, CRAWL_DELAY_B),
    }
    minima = {}
    for port, seen in by_host(requests).items():
        times = sorted(request.t for request in seen)
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert gaps, f"port {port}: only {len(times)} request"
        minima[port] = min(gaps)
        assert minima[port] >= required[port] - CLOCK_TOLERANCE, (
            f"port {port}: requests {minima[port]:.3f}s apart, delay is {required[port]}s"
        )
    return minima


def dead_letters(settings: Settings) -> list[dict[str, Any]]:
    return [
        json.loads(value)
        for _, value in kcat_consume(settings.kafka_bootstrap, settings.topic_prefix + "dlq")
    ]


def failed_url(record: dict[str, Any]) -> str:
    payload = json.loads(record["payload"])
    return str(payload.get("redirect_to") or payload["url"])


async def check_hostile_crawl(
    settings: Settings,
    site: HostileSite,
    tmp_path: Path,
    fetchers: int,
    during: Intervention | None = None,
) -> None:
    peaks = await crawl_hostile(settings, site, tmp_path / "logs", fetchers, during)
    requests = site.requests()
    expected = site.expectations()
    requested = Counter(r.url for r in requests)

    # Nothing disallowed, nofollowed or too long was ever requested.
    assert not set(requested) & expected.never_request, set(requested) & expected.never_request
    assert not set(requested) & expected.out_of_scope
    # Every URL that should be crawled was requested, and stored with its 200.
    assert expected.must_fetch <= set(requested), sorted(expected.must_fetch - set(requested))
    documents = await stored_documents(settings)
    stored_ok = {doc["url"] for doc in documents if doc["status"] == 200}
    pages = {url for url in expected.must_fetch if not url.endswith("/robots.txt")}
    assert pages <= stored_ok, sorted(pages - stored_ok)
    for url, title in expected.charset_titles.items():
        assert next(doc["title"] for doc in documents if doc["url"] == url) == title
    truncated = {doc["url"] for doc in documents if doc.get("truncated")}
    assert expected.oversized <= truncated

    # Traps were cut after a bounded number of requests.
    def under(prefix: str) -> int:
        return sum(n for url, n in requested.items() if url.startswith(site.base_a + prefix))

    assert under("/calendar/") <= 5  # STREAMCRAWL_MAX_CALENDAR_PAGES
    assert under("/session/") <= 2  # session ids stripped: page.html and other.html once
    assert under("/loopdir/") <= 2  # /loopdir/x/ and /loopdir/x/x/; the third x is cut

    minima = assert_polite(site, requests)

    # Retry-After waited: the retry of the 429 came at least RETRY_AFTER seconds later.
    limited = sorted(r.t for r in requests if r.path == "/rate-limited.html")
    assert len(limited) == 2 and limited[1] - limited[0] >= RETRY_AFTER - CLOCK_TOLERANCE

    # robots.txt: B's first answer was a 503, so B was retried later, then crawled.
    robots_b = [r.t for r in requests if r.port == site.port_b and r.path == "/robots.txt"]
    assert len(robots_b) >= 2

    # Every failure is in crawl.dlq with its reason.
    failures = {failed_url(record): record["reason"] for record in dead_letters(settings)}
    for url, reason in expected.dlq_urls.items():
        if reason == "redirect_loop":
            loop = [u for u, r in failures.items() if r == reason]
            assert loop and all(u.startswith(url.rsplit("/", 1)[0]) for u in loop), failures
        else:
            assert failures.get(url, "").startswith(reason), (url, failures.get(url))
    always = next(r for r in dead_letters(settings) if r["reason"] == "http_503")
    assert len(always["history"]) == 3

    # What waited went through crawl.retry: backoffs, the 429, B's robots.txt outage, and
    # the URLs of busy host A beyond the 5 s horizon.
    reasons = Counter(
        json.loads(value)["retry_reason"]
        for _, value in kcat_consume(settings.kafka_bootstrap, settings.topic_prefix + "retry")
    )
    assert {"host_busy", "http_429", "http_503", "timeout", "robots_unavailable"} <= set(reasons)

    # Memory stayed bounded with a 50 MB page and a gzip bomb on the site.
    assert peaks and max(peaks) < FETCHER_RSS_LIMIT, peaks
    print(
        f"\nhostile crawl, {fetchers} fetcher(s): {len(requests)} requests, "
        f"min per-host gaps {minima}, fetcher peak RSS {[p // 2**20 for p in peaks]} MiB, "
        f"crawl.retry {dict(reasons)}"
    )


async def test_hostile_site_one_fetcher(
    stack: StackConfig, hostile: HostileSite, tmp_path: Path
) -> None:
    await check_hostile_crawl(hostile_settings(stack), hostile, tmp_path, fetchers=1)


async def test_hostile_site_two_fetchers(
    stack: StackConfig, hostile: HostileSite, tmp_path: Path
) -> None:
    await check_hostile_crawl(hostile_settings(stack), hostile, tmp_path, fetchers=2)
    # Each fetcher owned one of the two hosts: both did real work, politely.
    readers = {
        log_file.name: ROBOTS_READ.findall(log_file.read_text())
        for log_file in (tmp_path / "logs").glob("fetcher*.log")
    }
    assert sorted(len(set(hosts)) for hosts in readers.values()) == [1, 1], readers


def robots_readers(log_dir: Path, host: str) -> list[str]:
    """Fetcher logs (names) that read ``host``'s robots.txt, in name order."""
    return sorted(
        log_file.name
        for log_file in log_dir.glob("fetcher*.log")
        if host in ROBOTS_READ.findall(log_file.read_text())
    )


async def retire_owner_of_host_a(stages: StageProcesses, site: HostileSite, log_dir: Path) -> None:
    """Mid-crawl, gracefully stop the fetcher that owns host A (a scale-in or a rollout)."""
    host_a = f"127.0.0.1:{site.port_a}"
    while sum(r.port == site.port_a for r in site.requests()) < 10:
        await asyncio.sleep(0.2)
    (owner,) = robots_readers(log_dir, host_a)
    stages.retire(owner.removesuffix(".log"))


async def test_hostile_site_host_handed_over_mid_crawl(
    stack: StackConfig, hostile: HostileSite, tmp_path: Path
) -> None:
    # The politeness checks include the gap across the hand-over of host A, whose
    # Crawl-delay (1.0 s) the new owner has not read when it takes A over.
    await check_hostile_crawl(
        hostile_settings(stack), hostile, tmp_path, fetchers=2, during=retire_owner_of_host_a
    )
    readers = robots_readers(tmp_path / "logs", f"127.0.0.1:{hostile.port_a}")
    assert len(readers) == 2, readers  # the other fetcher took host A over
