"""Server faults during a crawl, on a stack of this module's own (the session's stack must
not lose its broker under the other tests): SIGKILL of the Kafka broker, restarted 10 s
later, and of the MongoDB-wire server (FerretDB), restarted 20 s later, both with
``LocalStack.up()`` as ``streamcrawl stack up`` does. Every stage keeps running through
the outage: it must back off and resume, not exit.

A lost broker may make a second request unavoidable (a fetcher whose commits failed
during the outage, or a group that rebalanced when the coordinator came back): only URLs
uncommitted in crawl.fetch when the broker died may be requested again. A lost database
may not cause any: the sink retries its batch and commits only once it is written.

Where the three-broker cluster fault goes (SIGKILL one broker of three, never brought
back): a module beside this one, ``test_cluster_faults.py``, with a module-scoped
three-broker stack fixture in place of ``private_stack``, whose fault kills a broker and
marks ``context.restarted()`` at the kill; ``crawl_through_fault`` and ``assert_recovered``
(``refetch_may_happen=True``) apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamcrawl.core.topics import SINK_GROUP
from streamcrawl.localstack.stack import LocalStack

from ..support.crawl import KCAT, Site, crawl_settings
from ..support.faults import Fault, FaultContext, Recorder, assert_recovered, crawl_through_fault
from ..support.stack import running_stack
from .conftest import RETRY_BASE_DELAY

pytestmark = [pytest.mark.faults, pytest.mark.integration]

BROKER_DOWN = 10.0
DATABASE_DOWN = 20.0


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(tmp_path_factory.mktemp("fault-stack")) as local:
        yield local


def sigkill_server(local: LocalStack, component: str) -> None:
    """SIGKILL the stack's ``kafka`` or ``mongo`` process, as a crash or an OOM kill would."""
    (pid,) = [status.pid for status in local.status() if status.name == component]
    assert pid is not None, f"{component} is not running"
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # started by this process: reap it, so it is gone, not a zombie


def server_outage(local: LocalStack, component: str, down: float) -> Fault:
    async def fault(context: FaultContext) -> None:
        context.victim_group = SINK_GROUP  # every group waits for the broker; the sink stores
        try:
            # status() probes the servers with asyncio.run: off this event loop.
            await asyncio.to_thread(sigkill_server, local, component)
            await asyncio.sleep(down)
        finally:
            context.restarted()
            began = time.monotonic()
            await asyncio.to_thread(local.up, 180)
            context.notes["server_up_s"] = round(time.monotonic() - began, 1)

    return fault


@pytest.mark.skipif(KCAT is None, reason="Debian's kcat is not installed")
async def test_broker_sigkill_restarted_after_10s(
    private_stack: LocalStack, site: Site, tmp_path: Path, fault_report: Recorder
) -> None:
    settings = crawl_settings(private_stack.config, retry_base_delay=RETRY_BASE_DELAY)
    figures, _ = await crawl_through_fault(
        "sigkill-broker-10s",
        settings,
        site,
        tmp_path / "logs",
        server_outage(private_stack, "kafka", BROKER_DOWN),
    )
    fault_report(figures)
    assert_recovered(figures, refetch_may_happen=True)


@pytest.mark.skipif(KCAT is None, reason="Debian's kcat is not installed")
async def test_database_sigkill_restarted_after_20s(
    private_stack: LocalStack, site: Site, tmp_path: Path, fault_report: Recorder
) -> None:
    settings = crawl_settings(private_stack.config, retry_base_delay=RETRY_BASE_DELAY)
    figures, _ = await crawl_through_fault(
        "sigkill-ferretdb-20s",
        settings,
        site,
        tmp_path / "logs",
        server_outage(private_stack, "mongo", DATABASE_DOWN),
    )
    fault_report(figures)
    assert_recovered(figures, refetch_may_happen=False)
