"""Every stage of the pipeline, by name: the one list that ``streamcrawl run``, the local
crawl, docker-compose and the manifest tests read.

Adding a stage: write ``services/<name>/service.py`` with a class deriving from
:class:`streamcrawl.core.runtime.BatchStage` (or ``StreamStage``), then add one line here.
Classes are imported on demand, so running one stage never imports the others.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .core.config import Settings
    from .core.runtime import Stage


class SelfRunning(Protocol):
    """A registry entry that runs itself (the stats stage's faust worker)."""

    def __init__(self, settings: Settings) -> None: ...

    def run(self) -> None: ...


# Pipeline order: the local crawl starts them in this order.
STAGES: dict[str, str] = {
    "frontier": "streamcrawl.frontier.service:FrontierStage",
    "dedup": "streamcrawl.dedup.service:DedupStage",
    "fetcher": "streamcrawl.fetcher.service:FetcherStage",
    "delay": "streamcrawl.delay.service:DelayStage",
    "parser": "streamcrawl.parser.service:ParserStage",
    "sink": "streamcrawl.sink.service:SinkStage",
    "warc": "streamcrawl.warc.service:WarcStage",
    # A faust worker, not a runtime Stage: its class has run() (see runner.run_stage).
    "stats": "streamcrawl.stats.service:StatsWorker",
    # No consumer group either: it reads MongoDB and runs itself (idle unless enabled).
    "scheduler": "streamcrawl.scheduler.service:SchedulerStage",
}

STAGE_NAMES: tuple[str, ...] = tuple(STAGES)


def stage_class(name: str) -> type[Stage] | type[SelfRunning]:
    """The class that runs stage ``name`` (KeyError for an unknown name)."""
    module_name, _, class_name = STAGES[name].partition(":")
    stage: type[Stage] | type[SelfRunning] = getattr(import_module(module_name), class_name)
    return stage
