"""The stats stage's crawl-level Prometheus gauges, built from crawl totals (no faust
needed, so a test can collect them into a plain registry).

Every series is labelled by crawl id and labels from small fixed sets only (step,
activity state, the failing stage and its reason): hosts are unbounded, so they stay in
the JSON API.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.core import GaugeMetricFamily

from . import logic

# The steps of streamcrawl_crawl_urls; "cancelled": URLs of a cancelled crawl dropped
# (the frontier's, dedup's, the fetcher's and the delay service's "cancelled" tallies).
STEPS = ("discovered", "admitted", "fetched", "parsed", "stored", "failed", "filtered", "cancelled")
# The values of streamcrawl_crawl_state's state label (logic.crawl_state).
STATES = ("running", "idle", "empty")


def crawl_gauges(totals: Mapping[str, logic.CrawlTotals], now: float) -> list[GaugeMetricFamily]:
    """The gauge families for ``totals`` at ``now`` (families without samples when there
    are no crawls)."""
    urls = GaugeMetricFamily(
        "streamcrawl_crawl_urls",
        "URLs of a crawl by step (discovered, admitted, fetched, parsed, stored, failed, "
        "filtered, cancelled).",
        labels=["crawl_id", "step"],
    )
    size = GaugeMetricFamily(
        "streamcrawl_crawl_bytes", "Body bytes fetched for a crawl.", labels=["crawl_id"]
    )
    rate = GaugeMetricFamily(
        "streamcrawl_crawl_pages_per_second",
        "Pages stored per second (last full minute).",
        labels=["crawl_id"],
    )
    last = GaugeMetricFamily(
        "streamcrawl_crawl_last_activity_seconds",
        "Unix time of a crawl's last record.",
        labels=["crawl_id"],
    )
    state = GaugeMetricFamily(
        "streamcrawl_crawl_state",
        "1 for a crawl's activity state in the stats tables (running: a record in the last "
        f"{logic.ACTIVE_WITHIN:g} s; idle; empty), 0 for the others. Paused and cancelled "
        "are crawl.control's, not read here.",
        labels=["crawl_id", "state"],
    )
    failed = GaugeMetricFamily(
        "streamcrawl_crawl_failed",
        "URLs of a crawl dead-lettered, by the stage that gave up and its reason.",
        labels=["crawl_id", "stage", "reason"],
    )
    for crawl_id, crawl in totals.items():
        summary = crawl.summary(now)
        for step in ("discovered", "admitted", "fetched", "parsed", "stored", "cancelled"):
            urls.add_metric([crawl_id, step], summary[step])
        urls.add_metric([crawl_id, "failed"], summary["errors"])
        urls.add_metric([crawl_id, "filtered"], sum(summary["filtered"].values()))
        size.add_metric([crawl_id], summary["bytes"])
        rate.add_metric([crawl_id], summary["pages_per_s"])
        if summary["last_activity"] is not None:
            last.add_metric([crawl_id], summary["last_activity"])
        for name in STATES:
            state.add_metric([crawl_id, name], 1.0 if summary["state"] == name else 0.0)
        for stage_reason, count in summary["failed"].items():
            stage, _, reason = stage_reason.partition(":")
            failed.add_metric([crawl_id, stage, reason], count)
    return [urls, size, rate, last, state, failed]
