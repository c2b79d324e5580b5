"""Fetcher autoscaling as KEDA's Kafka scaler and the HPA would do it, for local processes.

``streamcrawl lag`` prints what :func:`keda_replicas` says; ``streamcrawl crawl --autoscale``
lets an :class:`Autoscaler` start and stop fetcher processes on crawl.fetch lag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..core.topics import HOST_PARTITIONS


def keda_replicas(
    total_lag: int,
    partitions: int,
    lag_threshold: int,
    activation_threshold: int,
    min_replicas: int,
    max_replicas: int,
    allow_idle_consumers: bool = False,
    partitions_with_lag: int | None = None,
) -> int:
    """The replica count KEDA's Kafka scaler and the HPA would settle on.

    The scaler caps the metric at partitions x lagThreshold (unless idle consumers
    are allowed), or with ``limitToPartitionsWithLag`` (``partitions_with_lag`` given) at
    partitions-with-lag x lagThreshold, so a backlog in one partition asks for one
    replica; the HPA asks for ceil(metric / lagThreshold), clamped to [max(1, min), max];
    0 <-> 1 is decided by the activation threshold alone.
    """
    useful = partitions if partitions_with_lag is None else partitions_with_lag
    metric = total_lag if allow_idle_consumers else min(total_lag, useful * lag_threshold)
    if metric <= activation_threshold and min_replicas == 0:
        return 0
    wanted = math.ceil(metric / lag_threshold) if lag_threshold > 0 else max_replicas
    return max(max(1, min_replicas), min(wanted, max_replicas))


@dataclass(frozen=True)
class ScalingPolicy:
    """KEDA's Kafka trigger and the HPA's scale-down stabilisation, for local processes."""

    min_replicas: int
    max_replicas: int
    lag_threshold: int = 100
    activation_lag_threshold: int = 1
    polling_interval: float = 5.0
    cooldown: float = 30.0
    partitions: int = HOST_PARTITIONS
    # KEDA's limitToPartitionsWithLag: only partitions with work can use a replica (one
    # host's backlog sits in one partition; more fetchers could not help it).
    limit_to_partitions_with_lag: bool = True

    @classmethod
    def parse(cls, spec: str, **options: Any) -> ScalingPolicy:
        low, _, high = spec.partition(":")
        try:
            policy = cls(int(low), int(high or low), **options)
        except ValueError as exc:
            raise ValueError(f"--autoscale wants MIN:MAX, got {spec!r}") from exc
        if not 1 <= policy.min_replicas <= policy.max_replicas:
            raise ValueError(f"--autoscale wants 1 <= MIN <= MAX, got {spec!r}")
        return policy


@dataclass
class Autoscaler:
    """Scales up at once; scales down to the highest recommendation of the last
    ``cooldown`` seconds, as the HPA's stabilisation window does."""

    policy: ScalingPolicy
    current: int = 0
    history: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.current = self.current or self.policy.min_replicas

    def recommend(self, lag: int, partitions_with_lag: int | None = None) -> int:
        p = self.policy
        return keda_replicas(
            lag,
            p.partitions,
            p.lag_threshold,
            p.activation_lag_threshold,
            p.min_replicas,
            p.max_replicas,
            partitions_with_lag=partitions_with_lag if p.limit_to_partitions_with_lag else None,
        )

    def decide(self, lag: int, now: float, partitions_with_lag: int | None = None) -> int:
        wanted = self.recommend(lag, partitions_with_lag)
        self.history = [(t, r) for t, r in self.history if now - t < self.policy.cooldown]
        self.history.append((now, wanted))
        target = wanted if wanted >= self.current else max(r for _, r in self.history)
        if target != self.current:
            self.events.append((now, lag, self.current, target))
            self.current = target
        return target
