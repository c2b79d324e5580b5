"""The parser stage: crawl.fetched in, crawl.pages out."""

from __future__ import annotations

from typing import Any

from ..core.messages import Fetched
from ..core.runtime import BatchStage, Input, Output, Received, json_input
from ..core.topics import FETCHED, PAGES, PARSER_GROUP
from .logic import Unparseable, page_from_fetched, read_body


class ParserStage(BatchStage):
    name = "parser"
    group = PARSER_GROUP

    def inputs(self) -> tuple[Input, ...]:
        return (json_input(FETCHED, Fetched),)

    async def process(self, batch: list[Received[Any]]) -> list[Output]:
        outputs = []
        pages_topic = self.topic(PAGES)
        limit = self.settings.max_body_bytes
        for item in batch:
            fetched: Fetched = item.message
            try:
                page = page_from_fetched(fetched, *read_body(fetched, limit))
            except Unparseable as exc:
                outputs.append(self.dead_letter(item.record, exc.reason, exc.detail))
                continue
            outputs.append(Output(pages_topic, page, key=page.url.encode()))
        return outputs
