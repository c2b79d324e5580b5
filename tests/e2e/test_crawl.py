"""End to end: a generated site served by nginx, crawled through all five stages running
as separate processes over a real Kafka broker into a real MongoDB-wire server."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.crawl.autoscale import Autoscaler, ScalingPolicy
from streamcrawl.crawl.local import running_pipeline
from streamcrawl.crawl.processes import StageProcesses
from streamcrawl.crawl.watch import watch_until_drained
from streamcrawl.demo.nginx import NginxSite
from streamcrawl.demo.site import generate_site
from streamcrawl.localstack.stack import StackConfig
from warcio.archiveiterator import ArchiveIterator

from ..conftest import free_port
from ..support.crawl import (
    KCAT,
    Site,
    crawl_settings,
    kcat_consume,
    kcat_produce,
    served_site,
    stored_documents,
)

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
SITE_PAGES = 2000


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    with served_site(tmp_path / "site", SITE_PAGES) as served:
        yield served


async def run_crawl(
    settings: Settings,
    tmp_path: Path,
    seeds: list[bytes],
    timeout: float = 600,
    autoscaler: Autoscaler | None = None,
) -> StageProcesses:
    async with running_pipeline(settings, tmp_path / "logs") as (stages, watch):
        if autoscaler is not None:
            stages.scale("fetcher", autoscaler.current)
        kcat_produce(settings, settings.topic_prefix + "seeds", seeds)
        await watch_until_drained(
            watch, stages, io.StringIO(), timeout=timeout, autoscaler=autoscaler
        )
    return stages


def assert_complete_and_unique(site: Site, documents: list[dict[str, Any]]) -> None:
    urls = Counter(doc["url"] for doc in documents)
    assert [url for url, n in urls.items() if n > 1] == []
    ok = {doc["url"] for doc in documents if doc["status"] == 200}
    assert ok == site.manifest.pages, (
        f"missing {sorted(site.manifest.pages - ok)[:5]}, "
        f"extra {sorted(ok - site.manifest.pages)[:5]}"
    )
    assert {doc["url"] for doc in documents if doc["status"] == 404} == site.manifest.missing
    assert {
        doc["url"]: doc["redirect_to"] for doc in documents if doc["status"] == 301
    } == site.manifest.redirects
    assert set(urls) == site.expected_urls()


@pytest.mark.skipif(KCAT is None, reason="Debian's kcat is not installed")
async def test_crawl_from_one_kcat_seed_stores_every_page_once(
    stack: StackConfig, site: Site, tmp_path: Path
) -> None:
    settings = crawl_settings(stack)
    await run_crawl(settings, tmp_path, [site.manifest.entry_url.encode()])

    documents = await stored_documents(settings)
    assert_complete_and_unique(site, documents)
    titled = [doc for doc in documents if doc["status"] == 200 and doc["title"]]
    assert len(titled) == len(site.manifest.pages)
    assert all(doc["content_hash"] for doc in titled)

    # crawl.pages, read with kcat, holds every reachable page, keyed by URL.
    pages = kcat_consume(settings.kafka_bootstrap, settings.topic_prefix + "pages")
    assert {key for key, _ in pages} == site.expected_urls()
    assert {json.loads(value)["url"] for _, value in pages} == site.expected_urls()

    # nginx saw robots.txt once, every URL exactly once, and nothing outside the site.
    requests = Counter(entry.path for entry in site.nginx.access_log_entries())
    assert requests.pop("/robots.txt") == 1
    assert [path for path, n in requests.items() if n > 1] == []
    base = site.manifest.base_url.rstrip("/")
    assert {base + path for path in requests} == site.expected_urls()

    # The warc stage ran beside the others: every response archived once, files complete.
    archived = archived_responses(Path(settings.warc_dir))
    assert archived == Counter(site.expected_urls())


def archived_responses(directory: Path) -> Counter[str]:
    """Target URIs of the response and revisit records of the completed WARC files."""
    assert not list(directory.glob("*.open")), "a stopped warc stage completes its file"
    found: Counter[str] = Counter()
    for path in directory.glob("*.warc.gz"):
        with open(path, "rb") as stream:
            for record in ArchiveIterator(stream):
                if record.rec_type in ("response", "revisit"):
                    found[record.rec_headers.get_header("WARC-Target-URI")] += 1
    return found


@pytest.mark.skipif(KCAT is None, reason="Debian's kcat is not installed")
async def test_malformed_seeds_go_to_the_dlq_and_good_seeds_crawl(
    stack: StackConfig, tmp_path: Path
) -> None:
    port = free_port()
    manifest = generate_site(tmp_path / "site", pages=100, port=port)
    settings = crawl_settings(stack)
    bad = {
        b"not a url at all": "invalid_url",
        b"ftp://127.0.0.1/file.txt": "unsupported_scheme",
        b"\xff\xfe\x00\x81garbage": "undecodable",
        b'{"url": 12345}': "schema_violation",
        b'{"url": "http://127.0.0.1/", "depth": "zero"}': "schema_violation",
        b'{"url": "http://127.0.0.1/", "crawl_id"': "invalid_json",
    }
    with NginxSite(tmp_path / "site", port):
        await run_crawl(settings, tmp_path, [*bad, manifest.entry_url.encode()], timeout=300)
    dead = [
        json.loads(value)
        for _, value in kcat_consume(settings.kafka_bootstrap, settings.topic_prefix + "dlq")
    ]
    by_payload = {}
    for record in dead:
        payload = (
            record["payload"].encode()
            if record["payload_encoding"] == "utf-8"
            else base64.b64decode(record["payload"])
        )
        by_payload[payload] = record
    for payload, reason in bad.items():
        assert payload in by_payload, payload
        assert by_payload[payload]["reason"] == reason
        assert by_payload[payload]["stage"] == "frontier"
        assert by_payload[payload]["topic"] == settings.topic_prefix + "seeds"
    stored = {doc["url"] for doc in await stored_documents(settings) if doc["status"] == 200}
    assert stored == manifest.pages


@pytest.mark.skipif(KCAT is None, reason="Debian's kcat is not installed")
@pytest.mark.parametrize("only_lagging_partitions", [False, True])
async def test_autoscaled_fetchers_share_the_group_and_lose_nothing(
    stack: StackConfig, site: Site, tmp_path: Path, only_lagging_partitions: bool
) -> None:
    """The test site is one host, so all of crawl.fetch's lag sits in one partition. Counting
    every partition (KEDA's default) scales out, and the fetchers share the group without
    losing or repeating a page; counting only partitions with lag (limitToPartitionsWithLag,
    our default) never adds a fetcher that could get no work."""
    settings = crawl_settings(stack)
    policy = ScalingPolicy(
        1,
        3,
        lag_threshold=50,
        polling_interval=1.0,
        cooldown=4.0,
        limit_to_partitions_with_lag=only_lagging_partitions,
    )
    autoscaler = Autoscaler(policy)
    await run_crawl(settings, tmp_path, [site.manifest.entry_url.encode()], autoscaler=autoscaler)
    assert_complete_and_unique(site, await stored_documents(settings))
    peaks = [after for _, _, _, after in autoscaler.events]
    logs = sorted(p.name for p in (tmp_path / "logs").glob("fetcher*.log"))
    if only_lagging_partitions:
        assert peaks == [] and logs == ["fetcher.log"], autoscaler.events
        return
    assert peaks and max(peaks) > 1, autoscaler.events  # the lag made it scale out
    assert len(logs) == max(peaks)  # each replica ran as its own process
