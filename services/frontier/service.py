"""The frontier service: crawl.seeds and crawl.pages in, crawl.discovered out."""

from __future__ import annotations

from collections.abc import Sequence

from ..core import metrics
from ..core.stage import BatchStage, DeadLetter, Output, Record, decode_json
from ..core.topics import DISCOVERED, FRONTIER_GROUP, PAGES, SEEDS
from .logic import Rejected, candidates_from_page, parse_seed

# A redirect that cannot be followed is a failed fetch, not a scope decision: it is
# dead-lettered so the user sees it.
FAILED_REDIRECTS = frozenset({"redirect_loop", "too_many_redirects"})


class FrontierStage(BatchStage):
    name = "frontier"
    group = FRONTIER_GROUP

    def input_topics(self) -> tuple[str, ...]:
        return (self.topic(SEEDS), self.topic(PAGES))

    async def process(self, records: Sequence[Record]) -> list[Output]:
        outputs: list[Output] = []
        seeds_topic = self.topic(SEEDS)
        for record in records:
            if record.topic == seeds_topic:
                outputs.extend(self._from_seed(record))
            else:
                outputs.extend(self._from_page(record))
        return outputs

    def _from_seed(self, record: Record) -> list[Output]:
        try:
            candidate = parse_seed(record.value, self.settings)
        except Rejected as exc:
            metrics.MESSAGES_FAILED.labels(self.name, exc.reason).inc()
            return [self.dead_letter(record, exc.reason, exc.detail)]
        return [self._discovered(candidate)]

    def _from_page(self, record: Record) -> list[Output]:
        try:
            page = decode_json(record, "page")
        except DeadLetter as exc:
            return [self.dead_letter(record, exc.reason, exc.detail)]
        candidates, drops = candidates_from_page(page, self.settings)
        outputs = [self._discovered(candidate) for candidate in candidates]
        for drop in drops:
            metrics.URLS_FILTERED.labels(self.name, drop.reason).inc()
            if drop.reason in FAILED_REDIRECTS:
                chain = " -> ".join([*page.get("redirect_chain", []), page["url"]])
                detail = f"{chain} -> {page.get('redirect_to')}"
                outputs.append(self.dead_letter(record, drop.reason, detail))
        return outputs

    def _discovered(self, candidate: dict[str, object]) -> Output:
        host = str(candidate["host"])
        return Output(self.topic(DISCOVERED), candidate, key=host.encode())
