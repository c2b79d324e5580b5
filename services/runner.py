"""``streamcrawl run <stage>``: one registered stage on uvloop until SIGTERM."""

from __future__ import annotations

import asyncio

import uvloop

from .core import runtime
from .core.config import Settings
from .core.kafka import check_kafka_access
from .registry import stage_class


async def serve(stage: str, settings: Settings) -> None:
    stop = asyncio.Event()
    runtime.install_stop_signals(stop)
    # A wrong password or a plaintext client on a secured cluster: one line, exit 2.
    await check_kafka_access(settings)
    await runtime.run_stage(stage_class(stage)(settings), stop)


def run_stage(stage: str, settings: Settings) -> None:
    uvloop.run(serve(stage, settings))
