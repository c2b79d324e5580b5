"""Per-host politeness, pure: which queued request may start now, and when the next may.

Each host has its own FIFO queue, a count of requests in flight and the earliest
time its next request may start (``delay`` after the previous start). A heap of
hosts ordered by that time means a host that must wait costs nothing while it
waits, so a slow or delayed host never holds back the other hosts of its
partition. Crawl-delay and Retry-After only move a host's next start later.

Hosts are Kafka partition keys, so one fetcher process owns a host at a time:
the delay holds across any number of fetcher processes.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Host(Generic[T]):
    queue: deque[T] = field(default_factory=deque)
    in_flight: int = 0
    next_start: float = 0.0
    last_start: float = -math.inf
    paused: bool = False
    heap_at: float | None = None


class HostScheduler(Generic[T]):
    """Per-host queues released no faster than ``delay_for(host)`` apart, start to start."""

    def __init__(self, per_host_concurrency: int, delay_for: Callable[[str], float]) -> None:
        self._cap = per_host_concurrency
        self._delay_for = delay_for
        self._hosts: dict[str, _Host[T]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._sequence = itertools.count()
        self.pending = 0

    @property
    def hosts(self) -> int:
        return len(self._hosts)

    def add(self, host: str, item: T, now: float, not_before: float = 0.0) -> None:
        """Queue ``item``; a host first seen waits until ``not_before`` (a rebalance hand-over)."""
        state = self._hosts.get(host)
        if state is None:
            state = self._hosts[host] = _Host(next_start=not_before)
        state.queue.append(item)
        self.pending += 1
        self._schedule(host, state, now)

    def push_front(self, host: str, item: T, now: float) -> None:
        state = self._hosts.setdefault(host, _Host())
        state.queue.appendleft(item)
        self.pending += 1
        self._schedule(host, state, now)

    def wait_estimate(self, host: str, now: float) -> float:
        """Seconds until one more request for ``host`` could start, queue included."""
        state = self._hosts.get(host)
        if state is None:
            return 0.0
        ahead = len(state.queue) / self._cap
        return max(0.0, state.next_start - now) + ahead * self._delay_for(host)

    def take_ready(self, now: float, limit: int) -> list[tuple[str, T]]:
        """Items whose host may start a request now, at most ``limit``; their slots are taken."""
        ready: list[tuple[str, T]] = []
        while self._heap and self._heap[0][0] <= now and len(ready) < limit:
            at, _, host = heapq.heappop(self._heap)
            state = self._hosts.get(host)
            if state is None or state.heap_at != at:
                continue  # superseded by an earlier entry for the same host
            state.heap_at = None
            while (
                state.queue
                and not state.paused
                and state.in_flight < self._cap
                and state.next_start <= now
                and len(ready) < limit
            ):
                ready.append((host, state.queue.popleft()))
                self.pending -= 1
                state.in_flight += 1
                state.last_start = now
                state.next_start = now + self._delay_for(host)
            self._schedule(host, state, now)
        return ready

    def started(self, host: str, now: float) -> None:
        """The request taken for ``host`` is really being sent now: under load a task can
        start well after it was dispatched, and the delay counts from what the server sees."""
        state = self._hosts.get(host)
        if state is None or now <= state.last_start:
            return
        state.last_start = now
        state.next_start = max(state.next_start, now + self._delay_for(host))
        self._schedule(host, state, now)

    def done(self, host: str, now: float) -> None:
        """A request of ``host`` finished: its slot is free (the delay still applies)."""
        state = self._hosts.get(host)
        if state is None:
            return
        state.in_flight = max(0, state.in_flight - 1)
        self._schedule(host, state, now)

    def unstarted(self, host: str, now: float) -> None:
        """A slot was taken but no request was sent: free it without spending the delay."""
        state = self._hosts.get(host)
        if state is None:
            return
        state.in_flight = max(0, state.in_flight - 1)
        state.next_start = now
        self._schedule(host, state, now)

    def hold(self, host: str, until: float, now: float) -> None:
        """No request to ``host`` before ``until`` (Retry-After, a robots.txt outage)."""
        state = self._hosts.setdefault(host, _Host())
        state.next_start = max(state.next_start, until)
        self._schedule(host, state, now)

    def refresh_delay(self, host: str, now: float) -> None:
        """The host's delay changed (robots.txt read): apply it from its last start."""
        state = self._hosts.get(host)
        if state is None:
            return
        state.next_start = max(state.next_start, state.last_start + self._delay_for(host))
        self._schedule(host, state, now)

    def pause(self, host: str) -> None:
        self._hosts.setdefault(host, _Host()).paused = True

    def resume(self, host: str, now: float) -> None:
        state = self._hosts.get(host)
        if state is not None:
            state.paused = False
            self._schedule(host, state, now)

    def drain_host(self, host: str) -> list[T]:
        """Every queued item of ``host``, removed (to wait elsewhere)."""
        state = self._hosts.get(host)
        if state is None:
            return []
        items = list(state.queue)
        state.queue.clear()
        self.pending -= len(items)
        return items

    def remove_where(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove queued items matching ``predicate`` (partitions revoked); returns them."""
        removed: list[T] = []
        for state in self._hosts.values():
            kept: deque[T] = deque()
            for item in state.queue:
                (removed if predicate(item) else kept).append(item)
            state.queue = kept
        self.pending -= len(removed)
        return removed

    def handover_wait(self, now: float, allowance: Callable[[str], float]) -> float:
        """How long to keep the hosts before another process may take them over.

        The next owner knows only ``allowance(host)`` (the configured delay), not a
        Crawl-delay read here, and waits that long after its assignment; so the hosts are
        let go only once every host's next start is at most its allowance away.
        """
        waits = (state.next_start - now - allowance(host) for host, state in self._hosts.items())
        return max(0.0, max(waits, default=0.0))

    def next_ready_at(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def _schedule(self, host: str, state: _Host[T], now: float) -> None:
        if state.paused:
            return
        if state.queue and state.in_flight < self._cap:
            self._push(host, state, max(state.next_start, now))
        elif not state.queue and state.in_flight == 0:
            if state.next_start <= now:
                # Idle and its delay has passed: nothing to remember about it.
                del self._hosts[host]
            else:
                self._push(host, state, state.next_start)

    def _push(self, host: str, state: _Host[T], at: float) -> None:
        if state.heap_at is not None and state.heap_at <= at:
            return
        state.heap_at = at
        heapq.heappush(self._heap, (at, next(self._sequence), host))


class HostDelays:
    """How long apart two requests to a host start: the larger of the configured delay
    (``HOST_DELAYS`` for that host, else ``CRAWL_DELAY``) and its robots.txt Crawl-delay,
    capped at ``MAX_CRAWL_DELAY``."""

    def __init__(
        self,
        default: float,
        per_host: dict[str, float],
        cap: float,
        crawl_delay: Callable[[str], float | None],
    ) -> None:
        self._default = default
        self._per_host = per_host
        self._cap = cap
        self._crawl_delay = crawl_delay

    def configured(self, host: str) -> float:
        hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        configured = self._per_host.get(host, self._per_host.get(hostname, self._default))
        return min(self._cap, configured)

    def __call__(self, host: str) -> float:
        return min(self._cap, max(self.configured(host), self._crawl_delay(host) or 0.0))
