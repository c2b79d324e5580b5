"""The stats stage's crawl-level Prometheus gauges, collected into a real registry: every
step (cancelled too), the activity state as 1/0 per state, failures by stage and reason,
labelled by crawl id and small fixed sets only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from streamcrawl.stats import gauges, logic
from streamcrawl.stats.app import CrawlGauges

NOW = 10_000.0
NAMES = {
    "streamcrawl_crawl_urls",
    "streamcrawl_crawl_bytes",
    "streamcrawl_crawl_pages_per_second",
    "streamcrawl_crawl_last_activity_seconds",
    "streamcrawl_crawl_state",
    "streamcrawl_crawl_failed",
}


def _totals() -> dict[str, logic.CrawlTotals]:
    """Two crawls as the tables hold them: "shop" running (a record 5 s ago, two table
    entries: crawl.events and crawl.dlq), "blog" idle (last record 100 s ago)."""
    shop_events = {
        "o": 7,
        "c": {
            "discovered": 40,
            "admitted": 30,
            "stored": 20,
            "parsed": 21,
            "cancelled": 6,
            "filtered:scope": 4,
            "filtered:duplicate": 5,
        },
        "f": NOW - 300,
        "l": NOW - 5,
        "m": {str(int(NOW // 60) - 1): 12},
    }
    shop_fetched = {"o": 3, "c": {"fetched": 25, "bytes": 5000, "status:2xx": 25}}
    shop_dlq = {
        "o": 1,
        "c": {"failed:fetcher:gave_up": 2, "failed:parser:invalid_json": 1},
        "f": NOW - 50,
        "l": NOW - 50,
    }
    blog = {"o": 0, "c": {"discovered": 3, "stored": 1}, "f": NOW - 200, "l": NOW - 100}
    return logic.crawl_totals(
        [
            (logic.crawl_key("shop", "crawl.events", 0), shop_events),
            (logic.crawl_key("shop", "crawl.fetched", 1), shop_fetched),
            (logic.crawl_key("shop", "crawl.dlq", 0), shop_dlq),
            (logic.crawl_key("blog", "crawl.events", 2), blog),
        ]
    )


class _Fixed(Collector):
    def __init__(self, totals: dict[str, logic.CrawlTotals]) -> None:
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        yield from gauges.crawl_gauges(self.totals, NOW)


def _registry(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_every_crawl_gauge_with_its_values() -> None:
    registry = _registry(_Fixed(_totals()))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    shop = {
        "discovered": 40,
        "admitted": 30,
        "fetched": 25,
        "parsed": 21,
        "stored": 20,
        "failed": 3,
        "filtered": 9,
        "cancelled": 6,
    }
    assert set(shop) == set(gauges.STEPS)
    for step, count in shop.items():
        assert value("streamcrawl_crawl_urls", crawl_id="shop", step=step) == count, step
    assert value("streamcrawl_crawl_urls", crawl_id="blog", step="stored") == 1
    assert value("streamcrawl_crawl_urls", crawl_id="blog", step="cancelled") == 0
    assert value("streamcrawl_crawl_bytes", crawl_id="shop") == 5000
    assert value("streamcrawl_crawl_pages_per_second", crawl_id="shop") == 0.2  # 12 / 60
    assert value("streamcrawl_crawl_last_activity_seconds", crawl_id="shop") == NOW - 5
    # state: 1 for the crawl's state, 0 for the others
    for crawl_id, current in (("shop", "running"), ("blog", "idle")):
        for state in gauges.STATES:
            expected = 1.0 if state == current else 0.0
            assert value("streamcrawl_crawl_state", crawl_id=crawl_id, state=state) == expected
    assert (
        value("streamcrawl_crawl_failed", crawl_id="shop", stage="fetcher", reason="gave_up") == 2
    )
    assert (
        value("streamcrawl_crawl_failed", crawl_id="shop", stage="parser", reason="invalid_json")
        == 1
    )
    assert (
        value("streamcrawl_crawl_failed", crawl_id="blog", stage="fetcher", reason="gave_up")
        is None
    )


def test_the_exposition_text_parses_with_bounded_labels() -> None:
    text = generate_latest(_registry(_Fixed(_totals()))).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert set(families) == NAMES
    allowed = {"crawl_id", "step", "state", "stage", "reason"}
    for family in families.values():
        assert family.type == "gauge"
        for sample in family.samples:
            assert set(sample.labels) <= allowed and "crawl_id" in sample.labels
            assert sample.labels["crawl_id"] in ("shop", "blog")


def test_no_crawls_no_series() -> None:
    families = gauges.crawl_gauges({}, NOW)
    assert {family.name for family in families} == NAMES
    assert all(not family.samples for family in families)


class _Stats:
    """What CrawlGauges reads of the app: its crawl totals."""

    def __init__(self, totals: dict[str, logic.CrawlTotals]) -> None:
        self._totals = totals

    def totals(self) -> dict[str, logic.CrawlTotals]:
        return self._totals


def test_the_app_collector_exports_them() -> None:
    stats: Any = _Stats(_totals())
    registry = _registry(CrawlGauges(stats))
    # read at the time of the scrape: long after NOW, so idle
    assert (
        registry.get_sample_value("streamcrawl_crawl_state", {"crawl_id": "shop", "state": "idle"})
        == 1.0
    )
    assert (
        registry.get_sample_value(
            "streamcrawl_crawl_urls", {"crawl_id": "shop", "step": "cancelled"}
        )
        == 6
    )
    text = generate_latest(registry).decode()
    assert {family.name for family in text_string_to_metric_families(text)} == NAMES
