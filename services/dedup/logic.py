"""Bloom-filter dedup, pure: one filter per partition, keyed by crawl id and URL.

Prefixing the key with the crawl id gives every crawl a fresh filter in effect (a
new crawl id refetches a site; resuming an id continues it) without keeping one
filter object per crawl.

Each partition also counts its admitted URLs per host and per date-shaped pattern
(:func:`~streamcrawl.core.urls.calendar_pattern`) in one fixed-size count-min sketch,
for ``max_pages_per_host`` and ``max_calendar_pages``. Partitions are keyed by host,
so a host's counts all live in one partition.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from hashlib import blake2b

from pybloom_live import ScalableBloomFilter

from ..core.messages import SCHEDULED
from ..core.urls import calendar_pattern, host_of


def dedup_key(crawl_id: str, url: str) -> str:
    return f"{crawl_id}\x00{url}"


def counted_key(crawl_key: str) -> str:
    """The key a partition counts an admission under: the crawl key, but one key per crawl
    for all the scheduler's revisits (each has a round of its own, its due time, so
    counting per round would keep a key per revisit, for ever)."""
    crawl_id, scheduled, _ = crawl_key.partition(SCHEDULED)
    return crawl_id + scheduled if scheduled else crawl_key


_COUNTER_MAX = 0xFFFFFFFF


class CountMinSketch:
    """Approximate counts of any number of keys in fixed memory (``width * depth`` uint32).

    A key's estimate is the smallest of its ``depth`` counters. Collisions only ever add,
    so an estimate is never below the true count: a limit checked against it cuts
    slightly early, never late. Increments are conservative (only the counters at the
    minimum are raised), which keeps the over-count far below the classic bound of
    ``e / width * total`` (with probability ``1 - e**-depth``): with width 2**16 and
    depth 4 (1 MiB) and a million increments in the partition (one per admitted URL for
    its host, one more if it is date-shaped), at most about 41 with probability 98 %.
    """

    def __init__(self, width: int = 2**16, depth: int = 4) -> None:
        if width < 1 or depth < 1 or depth > 16:
            raise ValueError("a count-min sketch needs width >= 1 and 1 <= depth <= 16")
        self.width = width
        self.depth = depth
        self._table = array("I", bytes(array("I").itemsize * width * depth))
        self._rows = [(row * width, 32 * row) for row in range(depth)]

    @property
    def nbytes(self) -> int:
        """Memory held by the counters: fixed, whatever is counted."""
        return self._table.itemsize * len(self._table)

    def _slots(self, key: str) -> list[int]:
        # One hash, cut into ``depth`` independent 32-bit words: one column per row.
        digest = blake2b(key.encode("utf-8", "surrogatepass"), digest_size=4 * self.depth)
        value = int.from_bytes(digest.digest(), "little")
        width = self.width
        return [offset + ((value >> shift) & 0xFFFFFFFF) % width for offset, shift in self._rows]

    def to_bytes(self) -> bytes:
        return self._table.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, width: int, depth: int) -> CountMinSketch:
        sketch = cls(width, depth)
        if len(data) != sketch.nbytes:
            raise ValueError(f"a {width}x{depth} sketch is {sketch.nbytes} bytes, got {len(data)}")
        sketch._table = array("I", data)
        return sketch

    def estimate(self, key: str) -> int:
        table = self._table
        return min([table[slot] for slot in self._slots(key)])

    def add(self, key: str) -> int:
        """Count ``key`` once more; returns its new estimate."""
        table = self._table
        slots = self._slots(key)
        new = min(min([table[slot] for slot in slots]) + 1, _COUNTER_MAX)
        for slot in slots:
            if table[slot] < new:
                table[slot] = new
        return new


def host_key(crawl_id: str, url: str) -> str:
    return f"{crawl_id}\x00{host_of(url)}"


def pattern_key(crawl_id: str, pattern: str) -> str:
    # A pattern is host + path, so it never equals a host: one sketch holds both.
    return f"{crawl_id}\x00{pattern}"


class PartitionFilter:
    """The URLs admitted from one partition, how many per crawl, and (approximately)
    how many per crawl and host and per crawl and calendar pattern."""

    def __init__(
        self, capacity: int, error_rate: float, sketch_width: int = 2**16, sketch_depth: int = 4
    ) -> None:
        self.bloom = ScalableBloomFilter(
            initial_capacity=capacity,
            error_rate=error_rate,
            mode=ScalableBloomFilter.LARGE_SET_GROWTH,
        )
        self.admitted: Counter[str] = Counter()
        self.counts = CountMinSketch(sketch_width, sketch_depth)

    @classmethod
    def restore(
        cls, bloom: ScalableBloomFilter, admitted: Counter[str], counts: CountMinSketch
    ) -> PartitionFilter:
        """A filter read back from a snapshot."""
        restored = cls.__new__(cls)
        restored.bloom, restored.admitted, restored.counts = bloom, admitted, counts
        return restored

    def seen(self, crawl_id: str, url: str) -> bool:
        return dedup_key(crawl_id, url) in self.bloom

    def remember(self, crawl_id: str, url: str) -> None:
        """Record an admitted URL; live admission and the replay of crawl.fetch both
        come through here, so a rebuilt partition has the same counts."""
        # ScalableBloomFilter.add returns True when the key was (probably) present.
        if not self.bloom.add(dedup_key(crawl_id, url)):
            self.admitted[counted_key(crawl_id)] += 1
            self.counts.add(host_key(crawl_id, url))
            pattern = calendar_pattern(url)
            if pattern is not None:
                self.counts.add(pattern_key(crawl_id, pattern))

    def host_pages(self, crawl_id: str, url: str) -> int:
        """URLs admitted for ``url``'s host in this crawl (may over-count, never under)."""
        return self.counts.estimate(host_key(crawl_id, url))

    def pattern_pages(self, crawl_id: str, pattern: str) -> int:
        """URLs admitted with this calendar pattern in this crawl (may over-count)."""
        return self.counts.estimate(pattern_key(crawl_id, pattern))

    def __len__(self) -> int:
        return len(self.bloom)

    @property
    def fill_ratio(self) -> float:
        return float(len(self.bloom)) / max(1, int(self.bloom.capacity))

    def estimated_false_positive_rate(self) -> float:
        """Probability that a new key is reported as seen, from each slice's real fill."""
        miss = 1.0
        for bloom in self.bloom.filters:
            k, m = bloom.num_slices, bloom.bits_per_slice
            fp = (1.0 - math.exp(-bloom.count / m)) ** k
            miss *= 1.0 - fp
        return 1.0 - miss


class Admission:
    """Decides, per candidate, whether it is new and within its crawl's page budget."""

    def __init__(self) -> None:
        self.filters: dict[int, PartitionFilter] = {}

    def admitted_in_crawl(self, crawl_id: str) -> int:
        return sum(f.admitted[crawl_id] for f in self.filters.values())

    def decide(
        self,
        partition: int,
        crawl_id: str,
        url: str,
        max_pages: int,
        max_pages_per_host: int = 0,
        max_calendar_pages: int = 0,
    ) -> str | None:
        """One candidate decided and, if admitted, remembered at once (see
        :class:`BatchAdmission` for the rules)."""
        batch = self.batch()
        verdict = batch.decide(
            partition, crawl_id, url, max_pages, max_pages_per_host, max_calendar_pages
        )
        batch.apply()
        return verdict

    def batch(self) -> BatchAdmission:
        return BatchAdmission(self)


class BatchAdmission:
    """The decisions of one batch, remembered in the filters only by :meth:`apply`.

    If processing a batch raises, the runtime runs its records again one by one: URLs
    the failed run had put into a filter would then be dropped as duplicates although
    they were never sent, and lost. So every step that can fail on a URL (splitting it
    for its host and calendar pattern) runs before the decision, the batch's admissions
    count here until it succeeded, and :meth:`apply` (which cannot fail) writes them.
    """

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._admitted: list[tuple[int, str, str]] = []
        self._keys: set[tuple[int, str]] = set()
        self._per_crawl: Counter[str] = Counter()
        self._counts: Counter[tuple[int, str]] = Counter()

    def decide(
        self,
        partition: int,
        crawl_id: str,
        url: str,
        max_pages: int,
        max_pages_per_host: int = 0,
        max_calendar_pages: int = 0,
    ) -> str | None:
        """None to admit the URL, else the reason it is dropped: ``duplicate``,
        ``max_pages``, ``max_pages_per_host`` or ``calendar_trap``.

        A limit of 0 is no limit. The per-host and calendar counts are count-min
        estimates: a limit may cut a little early, never late.
        """
        bloom = self._admission.filters[partition]
        key = dedup_key(crawl_id, url)
        host = host_key(crawl_id, url)  # raises here, not in apply(), on a bad URL
        pattern = calendar_pattern(url)
        if (partition, key) in self._keys or bloom.seen(crawl_id, url):
            return "duplicate"
        budget_key = counted_key(crawl_id)
        admitted = self._admission.admitted_in_crawl(budget_key) + self._per_crawl[budget_key]
        # A scheduled revisit is of a page the crawl stored: the page budget is not for it.
        if max_pages and admitted >= max_pages and SCHEDULED not in crawl_id:
            return "max_pages"
        if max_pages_per_host and (
            bloom.host_pages(crawl_id, url) + self._counts[(partition, host)] >= max_pages_per_host
        ):
            return "max_pages_per_host"
        if max_calendar_pages and pattern is not None:
            counted = bloom.pattern_pages(crawl_id, pattern)
            if counted + self._counts[(partition, pattern_key(crawl_id, pattern))] >= (
                max_calendar_pages
            ):
                return "calendar_trap"
        self._admitted.append((partition, crawl_id, url))
        self._keys.add((partition, key))
        self._per_crawl[budget_key] += 1
        self._counts[(partition, host)] += 1
        if pattern is not None:
            self._counts[(partition, pattern_key(crawl_id, pattern))] += 1
        return None

    def apply(self) -> None:
        """Remember the batch's admissions (after its outputs were produced)."""
        filters = self._admission.filters
        for partition, crawl_id, url in self._admitted:
            bloom = filters.get(partition)
            if bloom is not None:  # a partition revoked since cannot be: the batch holds
                bloom.remember(crawl_id, url)  # the rebalance lock; kept safe anyway
        self._admitted.clear()
