"""``streamcrawl run <stage>``: one stage on uvloop until SIGTERM."""

from __future__ import annotations

import asyncio

import uvloop

from .core.config import Settings
from .core.stage import BatchStage, install_stop_signals, run_batch_stage
from .dedup.service import DedupStage
from .delay.service import DelayService
from .fetcher.service import Fetcher
from .frontier.service import FrontierStage
from .parser.service import ParserStage
from .sink.service import SinkStage

BATCH_STAGES: dict[str, type[BatchStage]] = {
    "frontier": FrontierStage,
    "dedup": DedupStage,
    "parser": ParserStage,
    "sink": SinkStage,
}


async def serve(stage: str, settings: Settings) -> None:
    stop = asyncio.Event()
    install_stop_signals(stop)
    if stage == "fetcher":
        await Fetcher(settings).run(stop)
    elif stage == "delay":
        await DelayService(settings).run(stop)
    else:
        await run_batch_stage(BATCH_STAGES[stage](settings), stop)


def run_stage(stage: str, settings: Settings) -> None:
    uvloop.run(serve(stage, settings))
