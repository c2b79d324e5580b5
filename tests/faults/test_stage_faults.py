"""Stage faults during a crawl, every stage a separate process as in production: a
SIGKILL of each stage in turn (restarted a second later, as a crash-looping pod is), and a
rolling restart (each stage's new process started, then the old one sent SIGTERM, as a
Kubernetes rollout with maxSurge 1 and maxUnavailable 0 does).

A SIGKILLed fetcher may have requested pages whose offsets it had not committed: those,
and only those, may be requested again. Any other fault must not cause a second request.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
from streamcrawl.localstack.stack import StackConfig
from streamcrawl.registry import STAGE_NAMES, stage_class

from ..support.crawl import KCAT, Site, crawl_settings
from ..support.faults import (
    Fault,
    FaultContext,
    Recorder,
    assert_recovered,
    crawl_through_fault,
)
from .conftest import RETRY_BASE_DELAY

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RESTART_AFTER = 1.0  # seconds between a SIGKILL and the new process
GRACE = 30.0  # terminationGracePeriodSeconds of every stage in deploy/
# Their Deployments use strategy Recreate (one writer per WARC volume; one stats worker per
# pipeline holds every table partition): the old pod stops before the new one starts.
RECREATED = frozenset({"warc", "stats", "scheduler"})
# What a new process logs once it does useful work.
READY_LINE = {"stats": "Recovery complete", "scheduler": "scheduler: running"}
ROLLOUT_CRAWL_DELAY = "0.05"


def sigkill(stage: str) -> Fault:
    async def fault(context: FaultContext) -> None:
        context.victim_group = stage_class(stage).group
        context.stages.kill(stage)
        await asyncio.sleep(RESTART_AFTER)
        context.stages.start_one(stage)
        context.restarted()

    return fault


async def wait_for_log(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not log {text!r} in {timeout:.0f}s")
        await asyncio.sleep(0.2)


async def rolling_restart(context: FaultContext) -> None:
    stages = context.stages
    began_rollout = time.monotonic()
    for stage in STAGE_NAMES:
        old = stages.processes[stage]
        replacement = f"{stage}-1"
        if stage not in RECREATED:
            stages.start_one(stage, replacement)
            await _ready(context, stage, replacement)
        stages.retire(stage)
        began = time.monotonic()
        try:
            code: int | None = await asyncio.to_thread(old.wait, GRACE)
        except subprocess.TimeoutExpired:
            code = None  # Kubernetes would SIGKILL it now; count it as a failure
        context.retired.append((stage, code))
        context.notes[f"{stage}_shutdown_s"] = round(time.monotonic() - began, 1)
        if stage in RECREATED:
            stages.start_one(stage, replacement)
            await _ready(context, stage, replacement)
        context.restarted()
    context.notes["rollout_s"] = round(time.monotonic() - began_rollout, 1)


async def _ready(context: FaultContext, stage: str, process: str) -> None:
    await wait_for_log(context.log_dir / f"{process}.log", READY_LINE.get(stage, "consuming"), 120)


@pytest.mark.skipif(KCAT is None, reason="Debian's kcat is not installed")
@pytest.mark.parametrize("stage", STAGE_NAMES)
async def test_sigkill_of_a_stage(
    stack: StackConfig,
    site: Site,
    tmp_path: Path,
    stage: str,
    fault_report: Recorder,
) -> None:
    settings = crawl_settings(stack, retry_base_delay=RETRY_BASE_DELAY)
    figures, _ = await crawl_through_fault(
        f"sigkill-{stage}", settings, site, tmp_path / "logs", sigkill(stage)
    )
    fault_report(figures)
    assert_recovered(figures, refetch_may_happen=stage == "fetcher")


@pytest.mark.skipif(KCAT is None, reason="Debian's kcat is not installed")
async def test_rolling_restart(
    stack: StackConfig,
    site: Site,
    tmp_path: Path,
    fault_report: Recorder,
) -> None:
    # Paced (at most 20 pages a second, 84 s for the site) so that the crawl outlasts the
    # whole rollout, six process starts and shutdowns, even on a loaded machine.
    settings = crawl_settings(
        stack, retry_base_delay=RETRY_BASE_DELAY, crawl_delay=ROLLOUT_CRAWL_DELAY
    )
    figures, context = await crawl_through_fault(
        "rolling-restart", settings, site, tmp_path / "logs", rolling_restart, kill_at=0.1
    )
    fault_report(figures)
    assert figures.restart_to_stored_s is not None, (
        f"the crawl ended before the rollout did: {figures.notes}"
    )
    assert [name for name, _ in context.retired] == list(STAGE_NAMES)
    assert_recovered(figures, refetch_may_happen=False)
