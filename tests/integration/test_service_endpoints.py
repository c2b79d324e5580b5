"""A stage run as a pod runs it: /healthz, /readyz and /metrics over HTTP, consumer lag
exported, and SIGTERM drains and exits cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import create_topics
from streamcrawl.core.messages import Page, Scope, encode
from streamcrawl.crawl.processes import child_env
from streamcrawl.crawl.seeds import produce_seeds
from streamcrawl.crawl.watch import count_stored

from ..conftest import free_port

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


def page(n: int) -> Page:
    return Page(
        url=f"http://a.example/{n}",
        final_url=f"http://a.example/{n}",
        host="a.example",
        status=200,
        fetched_at=1.0,
        content_type="text/html",
        title=f"t{n}",
        text="x",
        links=[],
        canonical=None,
        content_hash=None,
        depth=0,
        crawl_id="endpoints",
        scope=Scope(allow_domains=["a.example"], max_depth=1),
        redirect_chain=[],
        redirect_to=None,
        noindex=False,
        nofollow=False,
    )


async def test_sink_serves_health_metrics_and_lag(settings: Settings, tmp_path: Path) -> None:
    await create_topics(settings)
    port = free_port()
    env = child_env(settings, {"STREAMCRAWL_METRICS_PORT": str(port)})
    log = open(tmp_path / "sink.log", "wb")  # noqa: SIM115 - closed below, after the process
    sink = subprocess.Popen(
        [sys.executable, "-m", "streamcrawl.cli", "run", "sink"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while get(base + "/readyz")[0] != 200:
            assert sink.poll() is None, (tmp_path / "sink.log").read_text()
            assert time.monotonic() < deadline, "the sink never became ready"
            await asyncio.sleep(0.5)
        assert get(base + "/healthz") == (200, "ok\n")

        # Pages produced straight to crawl.pages (the sink's input), as raw JSON.
        pages = [encode(page(n)) for n in range(5)]
        await produce_seeds(settings, pages, topic=settings.topic_prefix + "pages")
        while await count_stored(settings, "endpoints") < 5:
            assert time.monotonic() < deadline + 60, "pages were not stored"
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        status, text = get(base + "/metrics")
        assert status == 200
        assert "streamcrawl_pages_stored_total 5.0" in text
        lag_lines = [
            line for line in text.splitlines() if line.startswith("streamcrawl_consumer_lag{")
        ]
        assert lag_lines, "no consumer lag exported"
        assert all('group="streamcrawl-sink"' in line for line in lag_lines)
        assert all(line.endswith(" 0.0") for line in lag_lines)  # everything committed
        assert "a.example" not in text  # never a host or URL as a label value

        sink.send_signal(signal.SIGTERM)
        assert sink.wait(30) == 0
        assert "sink: stopped" in (tmp_path / "sink.log").read_text()
    finally:
        if sink.poll() is None:
            sink.kill()
        log.close()
