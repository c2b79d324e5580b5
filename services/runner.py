"""``streamcrawl run <stage>``: one registered stage on uvloop until SIGTERM."""

from __future__ import annotations

import asyncio

import uvloop

from .core import runtime
from .core.config import Settings
from .core.kafka import check_kafka_access
from .registry import stage_class


async def serve(stage: type[runtime.Stage], settings: Settings) -> None:
    stop = asyncio.Event()
    runtime.install_stop_signals(stop)
    # A wrong password or a plaintext client on a secured cluster: one line, exit 2.
    await check_kafka_access(settings)
    # Built inside the loop: stages open loop-bound resources in __init__.
    await runtime.run_stage(stage(settings), stop)


def run_stage(stage: str, settings: Settings) -> None:
    kind = stage_class(stage)
    if issubclass(kind, runtime.Stage):
        uvloop.run(serve(kind, settings))
    else:  # it runs itself (the stats stage's faust worker)
        kind(settings).run()
