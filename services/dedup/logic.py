"""Bloom-filter dedup, pure: one filter per partition, keyed by crawl id and URL.

Prefixing the key with the crawl id gives every crawl a fresh filter in effect (a
new crawl id refetches a site; resuming an id continues it) without keeping one
filter object per crawl.
"""

from __future__ import annotations

import math
from collections import Counter

from pybloom_live import ScalableBloomFilter


def dedup_key(crawl_id: str, url: str) -> str:
    return f"{crawl_id}\x00{url}"


class PartitionFilter:
    """The URLs admitted from one partition, and how many per crawl."""

    def __init__(self, capacity: int, error_rate: float) -> None:
        self._filter = ScalableBloomFilter(
            initial_capacity=capacity,
            error_rate=error_rate,
            mode=ScalableBloomFilter.LARGE_SET_GROWTH,
        )
        self.admitted: Counter[str] = Counter()

    def seen(self, crawl_id: str, url: str) -> bool:
        return dedup_key(crawl_id, url) in self._filter

    def remember(self, crawl_id: str, url: str) -> None:
        # ScalableBloomFilter.add returns True when the key was (probably) present.
        if not self._filter.add(dedup_key(crawl_id, url)):
            self.admitted[crawl_id] += 1

    def __len__(self) -> int:
        return len(self._filter)

    @property
    def fill_ratio(self) -> float:
        return float(len(self._filter)) / max(1, int(self._filter.capacity))

    def estimated_false_positive_rate(self) -> float:
        """Probability that a new key is reported as seen, from each slice's real fill."""
        miss = 1.0
        for bloom in self._filter.filters:
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

    def decide(self, partition: int, crawl_id: str, url: str, max_pages: int) -> str | None:
        """None to admit (and remember) the URL, else the reason it is dropped."""
        bloom = self.filters[partition]
        if bloom.seen(crawl_id, url):
            return "duplicate"
        if max_pages and self.admitted_in_crawl(crawl_id) >= max_pages:
            return "max_pages"
        bloom.remember(crawl_id, url)
        return None
