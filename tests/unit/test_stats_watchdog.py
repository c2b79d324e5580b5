"""The stats worker's loop watchdog: a thread that sees the event loop stop turning."""

from __future__ import annotations

import asyncio
import time

from streamcrawl.stats.service import LoopWatchdog


def block_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a blocking call inside the worker does to its loop


def test_a_turning_loop_is_left_alone_and_a_blocked_one_is_reported_with_its_stack() -> None:
    loop = asyncio.new_event_loop()
    reports: list[str] = []
    watchdog = LoopWatchdog(loop, after_s=0.5, on_blocked=reports.append)
    watchdog.TICK_S = 0.05
    try:
        watchdog.start()
        loop.run_until_complete(asyncio.sleep(1.0))  # twice the limit, turning all along
        assert reports == []
        loop.call_soon(block_the_loop, 1.5)
        loop.run_until_complete(asyncio.sleep(0.1))
        assert len(reports) == 1
        assert "block_the_loop" in reports[0]  # the main thread's stack says where
        loop.run_until_complete(asyncio.sleep(0.8))
        assert len(reports) == 1  # reported once: the process is started again then
    finally:
        loop.close()


def test_no_verdict_before_the_loop_first_turned() -> None:
    loop = asyncio.new_event_loop()
    watchdog = LoopWatchdog(loop, after_s=0.5, on_blocked=lambda stack: None)
    try:
        assert watchdog.blocked_for(time.monotonic() + 100.0) == 0.0
        loop.call_soon(watchdog._tick)
        loop.run_until_complete(asyncio.sleep(0))
        assert watchdog.blocked_for(time.monotonic() + 100.0) >= 100.0
    finally:
        loop.close()
