"""Frontier rules, pure: seeds and parsed pages in, in-scope canonical candidates out."""

from __future__ import annotations

import time

from ..core.config import Settings
from ..core.errors import ReasonedError
from ..core.messages import Discovered, Kind, Page, Scope, Seed, SeedScope, decode_seed
from ..core.scope import Drop, Origin, candidate_for, canonical_url
from ..core.urls import InvalidURL, canonical_domain, host_of, hostname_of, in_scope

__all__ = [
    "Drop",
    "RecentlySent",
    "Rejected",
    "candidates_from_page",
    "parse_seed",
    "seed_candidate",
]


class Rejected(ReasonedError):
    """A seed that cannot enter the crawl; ``reason`` is machine-readable."""


def seed_candidate(seed: Seed, settings: Settings, now: float | None = None) -> Discovered:
    """A seed as a ``discovered`` candidate, its scope completed from the settings."""
    try:
        url = canonical_url(seed.url, settings)
    except InvalidURL as exc:
        raise Rejected(exc.reason, str(exc)) from exc
    given = seed.scope or SeedScope()
    try:
        # In the form of canonical hosts: a seed may name "bücher.example" for its
        # IDNA-encoded URLs, or "Example.COM."
        domains = [canonical_domain(d) for d in given.allow_domains or settings.allow_domains]
    except InvalidURL as exc:
        raise Rejected("invalid_scope", f"allow_domains: {exc.detail}") from exc
    scope = Scope(
        allow_domains=domains or [hostname_of(url)],
        max_depth=settings.max_depth if given.max_depth is None else given.max_depth,
        max_pages=settings.max_pages if given.max_pages is None else given.max_pages,
    )
    if not in_scope(url, scope.allow_domains):
        raise Rejected("out_of_scope", f"{url} is outside {scope.allow_domains}")
    return Discovered(
        url=url,
        host=host_of(url),
        crawl_id=seed.crawl_id,
        depth=seed.depth,
        priority=seed.priority,
        scope=scope,
        discovered_at=time.time() if now is None else now,
        meta=seed.meta,
        revisit=seed.revisit,
    )


def parse_seed(value: bytes | None, settings: Settings, now: float | None = None) -> Discovered:
    """A raw crawl.seeds value as a candidate: the runtime's decoding, then
    :func:`seed_candidate` (for tests and benchmarks that start from bytes)."""
    try:
        seed = decode_seed(value)
    except ReasonedError as exc:
        raise Rejected(exc.reason, exc.detail) from exc
    return seed_candidate(seed, settings, now)


def candidates_from_page(
    page: Page,
    settings: Settings,
    now: float | None = None,
    recent: RecentlySent | RecentBatch | None = None,
) -> tuple[list[Discovered], list[Drop]]:
    """The in-scope candidates a parsed page leads to: its links, or its redirect target.

    A sitemap's links are pages one level deeper than the sitemap; the sitemaps it lists
    keep its depth (an index does not make its children deeper) and are candidates of
    kind "sitemap", as is the target of a sitemap's redirect. With ``recent``, a link this
    frontier decided lately for the same crawl (sent, or left out of scope) is skipped
    before any further work, and dropped as ``recently_sent``.
    """
    stamp = time.time() if now is None else now
    if page.unchanged:
        return [], []  # a revisit found it unchanged: its links were followed before
    sitemap = page.kind == "sitemap"
    priority = max(0, page.priority - 1)
    # (targets, their depth, their kind)
    groups: list[tuple[list[str], int, Kind]]
    if page.redirect_to:
        # A redirect hop keeps the depth of the link that led to it; whether it loops
        # depends on its chain, so it is always decided afresh.
        chain = (*page.redirect_chain, page.url)
        groups = [([page.redirect_to], page.depth, "sitemap" if sitemap else "page")]
        recent = None
    else:
        chain, groups = (), [(page.links, page.depth + 1, "page")]
        if sitemap:
            groups.append((page.sitemaps, page.depth, "sitemap"))
    # The links of a page changed in a revisit round are plain candidates of its crawl:
    # dedup drops those the crawl already had (the round revisits every stored URL on
    # its own, with its validators) and admits only the new ones, whatever the order in
    # which links and revisits reach it.
    origin = Origin(page.crawl_id, page.scope, priority, page.url, chain)
    kept: list[Discovered] = []
    drops: list[Drop] = []
    for targets, depth, kind in groups:
        if depth > page.scope.max_depth:
            drops.extend([Drop("max_depth")] * len(targets))
            continue
        for target in targets:
            try:
                url = canonical_url(target, settings)
            except InvalidURL as exc:
                drops.append(Drop(exc.reason))
                continue
            if recent is not None and not recent.first_time(page.crawl_id, url):
                drops.append(RECENTLY_SENT)
                continue
            outcome = candidate_for(url, origin, depth, settings, stamp, kind)
            if isinstance(outcome, Drop):
                drops.append(outcome)
            else:
                kept.append(outcome)
    return kept, drops


RECENTLY_SENT = Drop("recently_sent")


class RecentlySent:
    """The (crawl id, URL) pairs this frontier decided lately (sent to dedup, or left out of
    scope), in bounded memory.

    Pages of one site repeat the same navigation links; dedup would drop every repeat, but
    each one would still be a Kafka message through two stages. Two generations of at
    most ``capacity`` keys each: when the current one is full it becomes the old one and
    the oldest is forgotten, so memory stays under ``2 * capacity`` keys. Forgetting is
    harmless (dedup still decides); it only costs a message.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._current: set[tuple[str, str]] = set()
        self._previous: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def sent_lately(self, crawl_id: str, url: str) -> bool:
        key = (crawl_id, url)
        return self.capacity > 0 and (key in self._current or key in self._previous)

    def batch(self) -> RecentBatch:
        return RecentBatch(self)

    def first_time(self, crawl_id: str, url: str) -> bool:
        """True (and remembered) unless the pair was sent lately."""
        if self.capacity <= 0:
            return True
        if self.sent_lately(crawl_id, url):
            return False
        key = (crawl_id, url)
        if len(self._current) >= self.capacity:
            self._previous, self._current = self._current, set()
        self._current.add(key)
        return True


class RecentBatch:
    """What one batch adds to a :class:`RecentlySent`, applied only by :meth:`apply`.

    If processing a batch raises, the runtime runs its records again one by one: links
    remembered by the failed run would then be dropped as ``recently_sent`` although they
    were never sent. So a batch marks its links here, and they reach the shared memory
    only once the whole batch has produced its outputs.
    """

    def __init__(self, recent: RecentlySent) -> None:
        self._recent = recent
        self._added: dict[tuple[str, str], None] = {}  # in order, for apply

    def first_time(self, crawl_id: str, url: str) -> bool:
        """True (and remembered for this batch) unless the pair was sent lately."""
        if self._recent.capacity <= 0:
            return True
        key = (crawl_id, url)
        if key in self._added or self._recent.sent_lately(crawl_id, url):
            return False
        self._added[key] = None
        return True

    def apply(self) -> None:
        for crawl_id, url in self._added:
            self._recent.first_time(crawl_id, url)
        self._added.clear()
