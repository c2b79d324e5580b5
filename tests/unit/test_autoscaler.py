"""Fetcher autoscaling: KEDA's replica formula and the local HPA-like scaler."""

from __future__ import annotations

import pytest
from streamcrawl.crawl.autoscale import Autoscaler, ScalingPolicy, keda_replicas


@pytest.mark.parametrize(
    ("lag", "expected"), [(0, 1), (1, 1), (100, 1), (101, 2), (550, 6), (10_000, 12), (10**9, 12)]
)
def test_keda_formula(lag: int, expected: int) -> None:
    assert (
        keda_replicas(
            lag,
            partitions=12,
            lag_threshold=100,
            activation_threshold=1,
            min_replicas=1,
            max_replicas=20,
        )
        == expected
    )


def test_keda_scales_to_zero_only_below_activation() -> None:
    assert keda_replicas(0, 12, 100, 5, 0, 12) == 0
    assert keda_replicas(5, 12, 100, 5, 0, 12) == 0
    assert keda_replicas(6, 12, 100, 5, 0, 12) == 1
    assert keda_replicas(5000, 12, 100, 5, 0, 4) == 4


def test_scales_up_at_once_and_down_only_after_the_window() -> None:
    scaler = Autoscaler(ScalingPolicy(1, 4, lag_threshold=100, cooldown=30, partitions=12))
    assert scaler.current == 1
    assert scaler.decide(lag=50, now=0) == 1
    assert scaler.decide(lag=350, now=5) == 4  # ceil(350/100)=4, at once
    assert scaler.decide(lag=10_000, now=10) == 4  # capped at max
    assert scaler.decide(lag=150, now=15) == 4  # wants 2, but 4 was wanted < 30 s ago
    assert scaler.decide(lag=150, now=41) == 2  # window now holds 2, 2 (and 4 at t=10 expired)
    assert scaler.decide(lag=0, now=50) == 2
    assert scaler.decide(lag=0, now=72) == 1
    assert [(before, after) for _, _, before, after in scaler.events] == [(1, 4), (4, 2), (2, 1)]


def test_partitions_cap_the_recommendation() -> None:
    scaler = Autoscaler(ScalingPolicy(1, 50, lag_threshold=10, partitions=3))
    assert scaler.decide(lag=10**6, now=0) == 3


@pytest.mark.parametrize("spec", ["0:3", "3:1", "x:2", ""])
def test_bad_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="--autoscale"):
        ScalingPolicy.parse(spec)


def test_spec_parsing() -> None:
    policy = ScalingPolicy.parse("2:5", lag_threshold=7, polling_interval=1.0, cooldown=3.0)
    assert (policy.min_replicas, policy.max_replicas, policy.lag_threshold) == (2, 5, 7)
    assert ScalingPolicy.parse("3").max_replicas == 3


def test_limit_to_partitions_with_lag_caps_replicas_at_the_partitions_that_have_work() -> None:
    # A one-host crawl: all of crawl.fetch's lag sits in the host's partition.
    assert keda_replicas(10_000, 12, 100, 1, 1, 12) == 12
    assert keda_replicas(10_000, 12, 100, 1, 1, 12, partitions_with_lag=1) == 1
    assert keda_replicas(10_000, 12, 100, 1, 1, 12, partitions_with_lag=3) == 3
    assert keda_replicas(150, 12, 100, 1, 1, 12, partitions_with_lag=3) == 2
    assert keda_replicas(0, 12, 100, 1, 0, 12, partitions_with_lag=0) == 0


def test_the_local_autoscaler_never_scales_out_a_single_host_crawl() -> None:
    scaler = Autoscaler(ScalingPolicy(1, 12, lag_threshold=100, cooldown=30, partitions=12))
    for second in range(0, 60, 5):
        assert scaler.decide(lag=20_000, now=second, partitions_with_lag=1) == 1
    assert scaler.decide(lag=20_000, now=60, partitions_with_lag=4) == 4
    assert scaler.events == [(60, 20_000, 1, 4)]
