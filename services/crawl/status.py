"""``streamcrawl status [CRAWL_ID]``: the stats stage's numbers, as a terminal table or JSON,
and the client the crawl command's progress line reads them with."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
from aiokafka.errors import KafkaError

from ..core.config import Settings
from ..core.control import read_states
from ..core.kafka import OffsetProbe
from ..core.topics import STATS_GROUP, STATS_INPUTS

log = logging.getLogger(__name__)


class StatsUnavailable(Exception):
    """The stats stage did not answer (not running, starting, or recovering)."""


def stats_url(settings: Settings) -> str:
    return (settings.stats_url or f"http://127.0.0.1:{settings.stats_port}").rstrip("/")


class StatsClient:
    """Reads the stats stage's HTTP API."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StatsClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, path: str, **query: str | int) -> Any:
        assert self._session is not None, "use StatsClient as an async context manager"
        params = {key: str(value) for key, value in query.items()}
        try:
            async with self._session.get(self.base_url + path, params=params) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise StatsUnavailable(f"{self.base_url}{path}: HTTP {response.status}")
                return await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StatsUnavailable(f"{self.base_url}{path}: {exc or type(exc).__name__}") from exc

    async def crawls(self) -> dict[str, Any]:
        found: dict[str, Any] = await self.get("/crawls")
        return found

    async def crawl(self, crawl_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self.get(f"/crawls/{crawl_id}")
        return found

    async def hosts(self, crawl_id: str, top: int = 20, sort: str = "errors") -> list[Any]:
        found = await self.get(f"/crawls/{crawl_id}/hosts", top=top, sort=sort)
        return [] if found is None else list(found["hosts"])


async def stats_caught_up(probe: OffsetProbe, settings: Settings) -> bool:
    """The stats group has committed every record of its inputs (faust commits every 0.25 s
    and only after the changelog holds what those records changed)."""
    topics = [settings.topic_prefix + suffix for suffix in STATS_INPUTS]
    rows = await probe.lag(STATS_GROUP, topics)
    return bool(rows) and all(row.lag == 0 for row in rows)


# How often final_numbers asks whether the stats stage has caught up: a crawl's end waits
# on it, and a poll is two small broker requests.
FINAL_POLL_S = 0.1


async def final_numbers(
    settings: Settings, crawl_id: str, probe: OffsetProbe, timeout: float = 60.0
) -> dict[str, Any] | None:
    """The crawl's numbers once the stats stage has read everything (None if it never
    caught up in ``timeout`` seconds, or has nothing for the crawl)."""
    deadline = time.monotonic() + timeout
    async with StatsClient(stats_url(settings)) as client:
        while time.monotonic() < deadline:
            if await stats_caught_up(probe, settings):
                try:
                    return await client.crawl(crawl_id)
                except StatsUnavailable:
                    pass
            await asyncio.sleep(FINAL_POLL_S)
    return None


# -- rendering ---------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)
    ]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _state(crawl: dict[str, Any]) -> str:
    """A paused or cancelled crawl (crawl.control) shows that; others running or idle."""
    control = crawl.get("control", "active")
    return str(crawl["state"] if control == "active" else control)


def crawls_table(listing: dict[str, Any]) -> str:
    rows = [
        [
            crawl["crawl_id"],
            _state(crawl),
            str(crawl["stored"]),
            f"{crawl['pages_per_s']:.1f}",
            str(crawl["errors"]),
            _age(crawl["age_s"]),
        ]
        for crawl in listing["crawls"]
    ]
    headers = ["CRAWL", "STATE", "STORED", "PAGES/S", "ERRORS", "AGE"]
    note = "\n(the stats stage is still recovering its tables)" if listing["recovering"] else ""
    return (_table(headers, rows) if rows else "no crawls yet") + note


def crawl_report(crawl: dict[str, Any], hosts: list[dict[str, Any]]) -> str:
    def reasons(named: dict[str, int]) -> str:
        return ", ".join(f"{name} {count}" for name, count in named.items()) or "-"

    lines = [
        f"crawl {crawl['crawl_id']}: {_state(crawl)}, age {_age(crawl['age_s'])}, "
        f"{crawl['pages_per_s']:.1f} pages/s",
        f"  discovered {crawl['discovered']}  admitted {crawl['admitted']}  "
        f"fetched {crawl['fetched']}  parsed {crawl['parsed']}  stored {crawl['stored']}  "
        f"bytes {crawl['bytes']}  cancelled {crawl.get('cancelled', 0)}",
        f"  status    {reasons(crawl['status'])}",
        f"  filtered  {reasons(crawl['filtered'])}",
        f"  failed    {reasons(crawl['failed'])}",
        f"  deferred  {reasons(crawl['deferred'])}",
        "",
    ]
    rows = [
        [
            host["host"],
            str(host["fetched"]),
            str(host["errors"]),
            "-" if host["latency_mean_s"] is None else f"{host['latency_mean_s'] * 1000:.0f}",
            "-" if host["latency_p95_s"] is None else f"{host['latency_p95_s'] * 1000:.0f}",
            "-" if host["interval_s"] is None else f"{host['interval_s']:.2f}",
            host["robots"],
        ]
        for host in hosts
    ]
    headers = ["HOST", "FETCHED", "ERRORS", "MEAN MS", "P95 MS", "INTERVAL S", "ROBOTS"]
    lines.append(_table(headers, rows) if rows else "no hosts fetched yet")
    return "\n".join(lines)


async def _control_states(settings: Settings) -> dict[str, str]:
    """Each controlled crawl's state from crawl.control; nothing when it cannot be read."""
    try:
        return dict((await read_states(settings, timeout=10.0)).states())
    except (TimeoutError, KafkaError, OSError) as exc:
        log.warning("crawl.control could not be read (%r); states not shown", exc)
        return {}


async def status_report(
    settings: Settings, crawl_id: str | None, top: int, sort: str, as_json: bool
) -> tuple[int, str]:
    """(exit code, text) of ``streamcrawl status``."""
    states = await _control_states(settings)
    async with StatsClient(stats_url(settings)) as client:
        try:
            if crawl_id is None:
                listing = await client.crawls()
                for row in listing["crawls"]:
                    row["control"] = states.get(row["crawl_id"], "active")
                return 0, json.dumps(listing, indent=2) if as_json else crawls_table(listing)
            crawl = await client.crawl(crawl_id)
            if crawl is None:
                return 1, f"no crawl {crawl_id!r} in the stats stage"
            crawl["control"] = states.get(crawl_id, "active")
            hosts = await client.hosts(crawl_id, top=top, sort=sort)
        except StatsUnavailable as exc:
            return 3, f"the stats stage does not answer ({exc}); is `streamcrawl run stats` up?"
    if as_json:
        return 0, json.dumps({**crawl, "hosts": hosts}, indent=2)
    return 0, crawl_report(crawl, hosts)
