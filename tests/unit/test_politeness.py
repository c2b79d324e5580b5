"""Politeness, robots.txt, retries and the delay buffer: pure logic, no servers."""

from __future__ import annotations

import itertools
import random

import msgspec
from aiokafka import TopicPartition
from streamcrawl.core.messages import (
    Fetch,
    Retry,
    Scope,
    encode,
    fetch_from_retry,
    retry_from,
    with_attempt,
)
from streamcrawl.delay.logic import DelayBuffer
from streamcrawl.fetcher.politeness import HostScheduler
from streamcrawl.fetcher.retry import RetryPolicy, parse_retry_after
from streamcrawl.fetcher.robots import ALLOW_ALL, RobotsCache, RobotsState, rules_from_response

UA = "streamcrawl/0.1 (+https://github.com/streamcrawl/streamcrawl)"


def drain(
    scheduler: HostScheduler[str], until: float, step: float = 0.01
) -> list[tuple[float, str, str]]:
    """Simulate a dispatcher with instant requests; (start time, host, item) in order."""
    starts = []
    now = 0.0
    while now <= until:
        for host, item in scheduler.take_ready(now, limit=100):
            starts.append((now, host, item))
            scheduler.done(host, now)
        now = round(now + step, 6)
    return starts


def test_one_host_is_released_no_faster_than_its_delay() -> None:
    scheduler: HostScheduler[str] = HostScheduler(4, lambda host: 1.0)
    for i in range(5):
        scheduler.add("a", f"a{i}", now=0.0)
    starts = drain(scheduler, until=10)
    times = [t for t, _, _ in starts]
    assert [item for _, _, item in starts] == [f"a{i}" for i in range(5)]
    assert all(later - earlier >= 1.0 - 1e-9 for earlier, later in itertools.pairwise(times))
    assert times[-1] < 4.1  # and no slower than needed


def test_a_request_sent_late_counts_its_delay_from_when_it_was_sent() -> None:
    # Under load the task that sends a request can start well after its dispatch; the
    # server sees the send, so the next start must be a whole delay after it.
    scheduler: HostScheduler[str] = HostScheduler(2, lambda host: 1.0)
    for i in range(3):
        scheduler.add("a", f"a{i}", now=0.0)
    assert [item for _, item in scheduler.take_ready(0.0, limit=10)] == ["a0"]
    scheduler.started("a", 0.07)  # sent 70 ms after its dispatch
    scheduler.done("a", 0.08)
    assert scheduler.take_ready(1.0, limit=10) == []
    assert [item for _, item in scheduler.take_ready(1.07, limit=10)] == ["a1"]
    scheduler.started("a", 1.07)  # on time: nothing moves
    scheduler.done("a", 1.08)
    assert scheduler.take_ready(2.06, limit=10) == []
    assert [item for _, item in scheduler.take_ready(2.08, limit=10)] == ["a2"]


def test_a_delayed_host_does_not_hold_back_others() -> None:
    delays = {"slow": 5.0, "fast": 0.1}
    scheduler: HostScheduler[str] = HostScheduler(1, delays.__getitem__)
    for i in range(3):
        scheduler.add("slow", f"s{i}", now=0.0)
    for i in range(20):
        scheduler.add("fast", f"f{i}", now=0.0)
    starts = drain(scheduler, until=3)
    fast = [t for t, host, _ in starts if host == "fast"]
    assert len(fast) == 20 and fast[-1] < 2.5
    assert [item for _, host, item in starts if host == "slow"] == ["s0"]


def test_hold_and_refresh_delay_only_push_the_next_start_later() -> None:
    delay = {"a": 1.0}
    scheduler: HostScheduler[str] = HostScheduler(1, lambda host: delay["a"])
    scheduler.add("a", "first", now=0.0)
    scheduler.add("a", "second", now=0.0)
    assert scheduler.take_ready(0.0, 10) == [("a", "first")]
    scheduler.done("a", 0.1)
    scheduler.hold("a", until=3.0, now=0.1)  # Retry-After: 3
    assert scheduler.take_ready(2.9, 10) == []
    delay["a"] = 5.0  # robots.txt said Crawl-delay: 5
    scheduler.refresh_delay("a", now=2.9)
    assert scheduler.take_ready(4.9, 10) == []
    assert scheduler.take_ready(5.0, 10) == [("a", "second")]


def test_paused_host_waits_and_hand_over_delays_the_first_request() -> None:
    scheduler: HostScheduler[str] = HostScheduler(2, lambda host: 1.0)
    scheduler.add("a", "x", now=0.0, not_before=0.7)
    assert scheduler.take_ready(0.5, 10) == []
    scheduler.pause("a")
    assert scheduler.take_ready(1.0, 10) == []
    scheduler.resume("a", now=1.0)
    assert scheduler.take_ready(1.0, 10) == [("a", "x")]


def test_wait_estimate_counts_the_queue_and_limits_are_respected() -> None:
    scheduler: HostScheduler[str] = HostScheduler(1, lambda host: 2.0)
    for i in range(10):
        scheduler.add("a", str(i), now=0.0)
    assert scheduler.wait_estimate("a", 0.0) == 20.0
    assert scheduler.wait_estimate("unknown", 0.0) == 0.0
    scheduler.add("b", "b", now=0.0)
    scheduler.add("c", "c", now=0.0)
    assert len(scheduler.take_ready(0.0, limit=2)) == 2
    assert scheduler.pending == 10


def test_idle_hosts_are_forgotten_and_revoked_items_removed() -> None:
    scheduler: HostScheduler[str] = HostScheduler(1, lambda host: 1.0)
    for host in ("a", "b", "c"):
        scheduler.add(host, host + "1", now=0.0)
        scheduler.add(host, host + "2", now=0.0)
    removed = scheduler.remove_where(lambda item: item.startswith("b"))
    assert sorted(removed) == ["b1", "b2"] and scheduler.pending == 4
    drain(scheduler, until=5)
    assert scheduler.pending == 0 and scheduler.hosts == 0


def test_unstarted_slot_does_not_spend_the_delay() -> None:
    scheduler: HostScheduler[str] = HostScheduler(1, lambda host: 10.0)
    scheduler.add("a", "disallowed", now=0.0)
    scheduler.add("a", "allowed", now=0.0)
    assert scheduler.take_ready(0.0, 10) == [("a", "disallowed")]
    scheduler.unstarted("a", now=0.0)
    assert scheduler.take_ready(0.0, 10) == [("a", "allowed")]


ROBOTS = b"""User-agent: streamcrawl
Disallow: /private/
Allow: /private/open.html
Crawl-delay: 1.5
Sitemap: http://example.com/sitemap.xml

User-agent: *
Disallow: /
"""


def test_robots_rules_pick_our_group_delay_and_sitemaps() -> None:
    rules = rules_from_response(200, ROBOTS)
    assert rules is not None
    assert not rules.allows("http://example.com/private/secret.html", UA)
    assert rules.allows("http://example.com/private/open.html", UA)
    assert rules.allows("http://example.com/page.html", UA)
    assert not rules.allows("http://example.com/page.html", "otherbot/1.0")
    assert rules.crawl_delay(UA) == 1.5
    assert rules.sitemaps == ("http://example.com/sitemap.xml",)
    rate = rules_from_response(200, b"User-agent: *\nRequest-rate: 1/4\n")
    assert rate is not None and rate.crawl_delay(UA) == 4.0


def test_robots_status_semantics() -> None:
    assert rules_from_response(404, b"") is ALLOW_ALL
    assert rules_from_response(403, b"") is ALLOW_ALL
    assert ALLOW_ALL.allows("http://example.com/anything", UA)
    assert rules_from_response(503, b"") is None
    assert rules_from_response(500, b"") is None
    assert rules_from_response(429, b"") is None


def test_robots_cache_ttl_unavailable_and_bound() -> None:
    cache = RobotsCache(ttl_s=100, retry_s=10, max_hosts=3)
    assert cache.state("a", 0) is RobotsState.UNKNOWN
    cache.fetching("a")
    assert cache.state("a", 0) is RobotsState.FETCHING
    cache.store("a", None, now=0)
    assert cache.state("a", 5) is RobotsState.UNAVAILABLE
    assert cache.unavailable_until("a") == 10
    assert cache.state("a", 10) is RobotsState.UNKNOWN  # try again
    cache.store("a", ALLOW_ALL, now=10)
    assert cache.state("a", 109) is RobotsState.KNOWN
    assert cache.state("a", 110) is RobotsState.UNKNOWN  # TTL over
    for host in ("b", "c", "d", "e"):
        cache.store(host, ALLOW_ALL, now=0)
    assert len(cache) == 3


def test_backoff_grows_with_jitter_and_retry_after_wins() -> None:
    policy = RetryPolicy(max_attempts=4, base_s=2.0, cap_s=60.0)
    rng = random.Random(7)
    for attempt, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)):
        waits = {policy.backoff(attempt, rng) for _ in range(50)}
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits)
        assert len(waits) > 40  # jittered
    assert policy.wait(1, retry_after=30.0, rng=rng) == 30.0
    assert policy.wait(1, retry_after=10_000.0, rng=rng) == 60.0  # capped
    assert not policy.exhausted(3) and policy.exhausted(4)


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_attempts_are_recorded_and_the_retry_message_validates() -> None:
    request = Fetch(
        url="http://example.com/a",
        host="example.com",
        crawl_id="c",
        depth=1,
        priority=5,
        scope=Scope(allow_domains=["example.com"], max_depth=3, max_pages=0),
        discovered_at=1.0,
        admitted_at=2.0,
    )
    once = with_attempt(request, "http_503", 10.0, 503, "")
    twice = with_attempt(once, "timeout", 20.0, None, "slow")
    assert twice.attempt == 2 and request.attempt == 0  # the request itself is unchanged
    assert [h.outcome for h in twice.history] == ["http_503", "timeout"]
    assert [(h.at, h.status, h.detail) for h in twice.history] == [
        (10.0, 503, ""),
        (20.0, None, "slow"),
    ]
    retry = retry_from(twice, 30.0, "timeout")
    assert (retry.due_at, retry.retry_reason) == (30.0, "timeout")
    assert msgspec.json.decode(encode(retry), type=Retry) == retry
    back = fetch_from_retry(retry)
    assert msgspec.json.decode(encode(back), type=Fetch) == back == twice


def test_delay_buffer_releases_in_due_order_and_drops_revoked() -> None:
    buffer: DelayBuffer[tuple[TopicPartition, int]] = DelayBuffer(capacity=3)
    p0, p1 = TopicPartition("r", 0), TopicPartition("r", 1)
    buffer.add(30.0, (p0, 0))
    buffer.add(10.0, (p0, 1))
    buffer.add(20.0, (p1, 0))
    assert buffer.room == 0 and buffer.next_due() == 10.0
    assert buffer.pop_due(25.0) == [(p0, 1), (p1, 0)]
    assert buffer.drop_where(lambda held: held[0] == p0) == 1
    assert len(buffer) == 0 and buffer.next_due() is None


def test_proxy_pool_keeps_a_host_on_one_proxy_and_skips_failed_ones() -> None:
    from streamcrawl.fetcher.proxies import ProxyPool

    assert ProxyPool([], 60).choose("a", 0) is None
    pool = ProxyPool(["http://p1:8080", "http://p2:8080", "http://p3:8080"], cooldown_s=60)
    hosts = [f"host{i}.example" for i in range(300)]
    first = {host: pool.choose(host, 0) for host in hosts}
    assert first == {host: pool.choose(host, 5) for host in hosts}  # sticky
    assert len(set(first.values())) == 3  # spread over the pool
    pool.failed("http://p1:8080", now=0)
    moved = {host: pool.choose(host, 1) for host in hosts}
    assert "http://p1:8080" not in moved.values()
    # Only the failed proxy's hosts moved.
    assert all(moved[h] == first[h] for h in hosts if first[h] != "http://p1:8080")
    for proxy in ("http://p2:8080", "http://p3:8080"):
        pool.failed(proxy, now=2)
    assert pool.choose("x", 3) == "http://p1:8080"  # all cooling: the one back first
    assert pool.choose(hosts[0], 70) == first[hosts[0]]


def test_readme_documents_every_setting_and_host_delays_parse() -> None:
    from pathlib import Path

    import pytest
    from streamcrawl.core.config import Settings, settings_doc

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_doc() in readme  # regenerate the table when a setting changes
    settings = Settings.from_env({"STREAMCRAWL_HOST_DELAYS": "slow.example=5, a.test:8080=0"})
    assert settings.host_delay_map() == {"slow.example": 5.0, "a.test:8080": 0.0}
    with pytest.raises(ValueError, match="HOST_DELAYS"):
        Settings.from_env({"STREAMCRAWL_HOST_DELAYS": "slow.example"})


def test_body_cap_must_fit_the_topic_message_limit() -> None:
    import base64
    import os
    import zlib

    import pytest
    from streamcrawl.core.config import MAX_BODY_CAP, Settings
    from streamcrawl.core.topics import MAX_MESSAGE_BYTES

    worst = base64.b64encode(zlib.compress(os.urandom(MAX_BODY_CAP), 1))
    assert len(worst) + 200 * 8192 < MAX_MESSAGE_BYTES
    assert Settings.from_env({"STREAMCRAWL_MAX_BODY_BYTES": str(MAX_BODY_CAP)})
    with pytest.raises(ValueError, match="MAX_BODY_BYTES"):
        Settings.from_env({"STREAMCRAWL_MAX_BODY_BYTES": str(MAX_BODY_CAP + 1)})


def test_handover_waits_until_only_the_configured_delay_is_left() -> None:
    crawl_delay = {"a": 10.0, "b": 1.0}
    scheduler: HostScheduler[str] = HostScheduler(1, crawl_delay.__getitem__)
    scheduler.add("a", "a1", now=0.0)
    scheduler.add("b", "b1", now=0.0)
    assert len(scheduler.take_ready(0.0, 10)) == 2
    # a may start again at 10, b at 1; the next owner waits 2 s (configured) by itself.
    assert scheduler.handover_wait(0.0, lambda host: 2.0) == 8.0
    assert scheduler.handover_wait(9.0, lambda host: 2.0) == 0.0
    assert HostScheduler(1, crawl_delay.__getitem__).handover_wait(0.0, lambda h: 0.0) == 0.0
