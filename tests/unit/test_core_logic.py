from __future__ import annotations

import msgspec
import pytest
from aiokafka import TopicPartition
from streamcrawl.core.config import Settings, settings_doc
from streamcrawl.core.messages import DeadLetterRecord, Seed
from streamcrawl.core.offsets import OffsetTracker
from streamcrawl.core.schemas import SCHEMA_NAMES, load_schema
from streamcrawl.dedup.logic import Admission, PartitionFilter
from streamcrawl.fetcher.safety import is_allowed, parse_networks


def test_offsets_commit_only_the_finished_prefix() -> None:
    tracker = OffsetTracker()
    tp = TopicPartition("t", 0)
    for offset in (10, 11, 12, 13):
        tracker.started(tp, offset)
    assert tracker.committable() == {tp: 10}
    tracker.mark_committed({tp: 10})
    tracker.finished(tp, 12)
    tracker.finished(tp, 13)
    assert tracker.committable() == {}  # 10 is still in flight: nothing new to commit
    tracker.finished(tp, 10)
    assert tracker.committable() == {tp: 11}
    tracker.finished(tp, 11)
    assert tracker.committable() == {tp: 14}
    assert tracker.pending() == 0


def test_dedup_admits_once_per_crawl_and_respects_max_pages() -> None:
    admission = Admission()
    admission.filters[0] = PartitionFilter(1000, 1e-6)
    admission.filters[1] = PartitionFilter(1000, 1e-6)
    assert admission.decide(0, "c1", "http://a/1", 0) is None
    assert admission.decide(0, "c1", "http://a/1", 0) == "duplicate"
    assert admission.decide(0, "c2", "http://a/1", 0) is None  # a new crawl id refetches
    assert admission.decide(1, "c3", "http://b/1", 2) is None
    assert admission.decide(0, "c3", "http://a/1", 2) is None
    assert admission.decide(1, "c3", "http://b/2", 2) == "max_pages"  # counted across partitions
    assert admission.admitted_in_crawl("c3") == 2


def test_bloom_false_positive_rate_measured_below_configured_bound() -> None:
    bloom = PartitionFilter(20_000, 1e-4)
    for n in range(20_000):
        bloom.remember("c", f"http://example.com/page/{n}")
    assert all(bloom.seen("c", f"http://example.com/page/{n}") for n in range(20_000))
    probes = 200_000
    false_positives = sum(bloom.seen("c", f"http://other.example/{n}") for n in range(probes))
    measured = false_positives / probes
    assert measured <= 1e-3  # a generous bound over the 1e-4 target, so noise cannot fail it
    assert 0 < bloom.estimated_false_positive_rate() <= 2e-4
    assert bloom.fill_ratio == pytest.approx(1.0)


def test_safe_addresses_by_default_and_explicit_allowances() -> None:
    nothing = parse_networks([])
    for address in (
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "172.16.5.5",
        "169.254.169.254",
        "::1",
        "fd00::1",
        "fe80::1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "100.64.0.1",
    ):
        assert not is_allowed(address, nothing), address
    assert is_allowed("93.184.216.34", nothing)
    assert is_allowed("2606:2800:220:1:248:1893:25c8:1946", nothing)
    loopback = parse_networks(["127.0.0.1/32"])
    assert is_allowed("127.0.0.1", loopback)
    assert not is_allowed("127.0.0.2", loopback)
    assert not is_allowed("169.254.169.254", loopback)


def test_settings_from_env_are_typed_and_validated() -> None:
    settings = Settings.from_env(
        {
            "STREAMCRAWL_MAX_DEPTH": "3",
            "STREAMCRAWL_ALLOW_NETWORKS": "127.0.0.1/32, 10.0.0.0/8",
            "STREAMCRAWL_BLOOM_ERROR_RATE": "0.001",
            "STREAMCRAWL_WARC_SPLICE_BODIES": "false",
        }
    )
    assert settings.max_depth == 3
    assert settings.warc_splice_bodies is False
    assert Settings.from_env({"STREAMCRAWL_WARC_SPLICE_BODIES": " Yes"}).warc_splice_bodies
    assert Settings().warc_splice_bodies is True
    assert settings.allow_networks == ("127.0.0.1/32", "10.0.0.0/8")
    assert Settings.from_env(settings.as_env()) == settings
    with pytest.raises(ValueError, match="MAX_DEPTH"):
        Settings.from_env({"STREAMCRAWL_MAX_DEPTH": "deep"})
    with pytest.raises(ValueError, match="ALLOW_NETWORKS"):
        Settings.from_env({"STREAMCRAWL_ALLOW_NETWORKS": "localhost"})
    with pytest.raises(ValueError, match="WARC_SPLICE_BODIES='maybe': expected bool"):
        Settings.from_env({"STREAMCRAWL_WARC_SPLICE_BODIES": "maybe"})
    assert "STREAMCRAWL_KAFKA_BOOTSTRAP" in settings_doc()


def test_every_schema_is_valid_and_rejects_unknown_fields() -> None:
    for name in SCHEMA_NAMES:
        assert load_schema(name)["$schema"].endswith("2020-12/schema")
    # Validation is decoding into the topic's type: a missing field and an unknown one
    # are both refused, naming the field.
    with pytest.raises(msgspec.ValidationError, match="missing required field `reason`"):
        msgspec.json.decode(b'{"stage": "fetcher"}', type=DeadLetterRecord)
    with pytest.raises(msgspec.ValidationError, match="unknown field `surprise`"):
        msgspec.json.decode(b'{"url": "http://a/", "surprise": true}', type=Seed)
