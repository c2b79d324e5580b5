"""The frontier stage: crawl.seeds and crawl.pages in, crawl.discovered out."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ..core import metrics
from ..core.config import Settings
from ..core.messages import Discovered, Page, Seed, decode_seed, tallies
from ..core.runtime import BatchStage, Input, Output, Received, json_input
from ..core.topics import DISCOVERED, EVENTS, FRONTIER_GROUP, PAGES, SEEDS
from .logic import RecentBatch, RecentlySent, Rejected, candidates_from_page, seed_candidate

# A redirect that cannot be followed is a failed fetch, not a scope decision: it is
# dead-lettered so the user sees it.
FAILED_REDIRECTS = frozenset({"redirect_loop", "too_many_redirects"})


class FrontierStage(BatchStage):
    name = "frontier"
    group = FRONTIER_GROUP

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.recent = RecentlySent(settings.frontier_recent_urls)
        self.counts: Counter[tuple[str, str]] = Counter()

    def inputs(self) -> tuple[Input, ...]:
        return (Input(SEEDS, decode_seed), json_input(PAGES, Page))

    async def process(self, batch: list[Received[Any]]) -> list[Output]:
        # The links this batch sends are remembered only once all of it succeeded: a
        # batch that raises is run again record by record, and must find them unsent.
        recent = self.recent.batch()
        outputs: list[Output] = []
        # (crawl id, what): URLs discovered and links filtered, for the stats stage.
        self.counts = Counter()
        for item in batch:
            if self.crawls.verdict(item.message.crawl_id) == "drop":  # crawl.control
                # A cancelled crawl: no seed of it starts, no link of its pages is followed.
                metrics.URLS_CANCELLED.labels(self.name).inc()
                if isinstance(item.message, Seed):
                    self.counts[item.message.crawl_id, "cancelled"] += 1
                continue
            if isinstance(item.message, Seed):
                outputs.extend(self._from_seed(item))
            else:
                outputs.extend(self._from_page(item, recent))
        recent.apply()
        outputs.extend(
            Output(self.topic(EVENTS), tally, key=tally.crawl_id.encode())
            for tally in tallies("frontier", self.counts, time.time())
        )
        return outputs

    def _from_seed(self, item: Received[Seed]) -> list[Output]:
        try:
            candidate = seed_candidate(item.message, self.settings)
        except Rejected as exc:
            metrics.MESSAGES_FAILED.labels(self.name, exc.reason).inc()
            return [self.dead_letter(item.record, exc.reason, exc.detail)]
        self.counts[candidate.crawl_id, "discovered"] += 1
        return [self._discovered(candidate)]

    def _from_page(self, item: Received[Page], recent: RecentBatch) -> list[Output]:
        page = item.message
        candidates, drops = candidates_from_page(page, self.settings, recent=recent)
        outputs = [self._discovered(candidate) for candidate in candidates]
        self.counts[page.crawl_id, "discovered"] += len(candidates)
        # One increment per reason, not per link: labels() is a dict lookup under a lock.
        for reason, count in Counter(drop.reason for drop in drops).items():
            metrics.URLS_FILTERED.labels(self.name, reason).inc(count)
            if reason not in FAILED_REDIRECTS:  # those are dead letters, counted as failed
                self.counts[page.crawl_id, "filtered:" + reason] += count
        for drop in drops:
            if drop.reason in FAILED_REDIRECTS:
                chain = " -> ".join([*page.redirect_chain, page.url])
                detail = f"{chain} -> {page.redirect_to}"
                outputs.append(self.dead_letter(item.record, drop.reason, detail))
        return outputs

    def _discovered(self, candidate: Discovered) -> Output:
        return Output(self.topic(DISCOVERED), candidate, key=candidate.host.encode())
