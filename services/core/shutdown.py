"""A stage's shutdown deadline: after SIGTERM it has ``SHUTDOWN_GRACE`` seconds to finish
or hand back its work, commit, leave its group and close; past that it exits anyway.
What it had not committed is read again by the partitions' next owner, so nothing is
lost, and a Kubernetes pod is never SIGKILLed at the end of its termination grace period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)


class Deadline:
    """The shutdown deadline: ``grace`` seconds from :meth:`start` (at SIGTERM)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._at: float | None = None

    def start(self) -> None:
        if self._at is None:
            self._at = time.monotonic() + self.grace

    def left(self, reserve: float = 0.0) -> float:
        """Seconds left before the deadline less ``reserve`` (the clock starts now if it
        has not: an error rather than a SIGTERM ended the stage)."""
        self.start()
        assert self._at is not None
        return max(0.0, self._at - time.monotonic() - reserve)

    async def bounded(self, what: str, work: Coroutine[Any, Any, Any]) -> None:
        """Await ``work``, but give it up at the deadline: a closing step that hangs on a
        broker that is down must not keep the process alive past its grace."""
        try:
            await asyncio.wait_for(work, max(0.1, self.left()))
        except TimeoutError:
            log.warning("%s: cut short at the shutdown deadline", what)
        except (KafkaError, OSError) as exc:
            log.warning("%s: %r", what, exc)


async def run_until_deadline(
    name: str,
    run: Coroutine[Any, Any, None],
    stop: asyncio.Event,
    deadline: Deadline,
    last_commit: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    """Run the stage's loop; once ``stop`` is set, give it until the deadline less a
    reserve (to commit, leave the group and close), then cut it short and commit what
    is finished."""
    runner = asyncio.create_task(run)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({runner, stopping}, return_when=asyncio.FIRST_COMPLETED)
        deadline.start()
        reserve = min(5.0, deadline.grace / 4)
        await asyncio.wait({runner}, timeout=deadline.left(reserve))
        if not runner.done():
            log.warning(
                "%s: shutdown grace of %.0fs nearly spent; stopping what is in flight",
                name,
                deadline.grace,
            )
            runner.cancel()
            await asyncio.wait({runner})
            await deadline.bounded(f"{name}: last commit", last_commit())
        elif not runner.cancelled():
            runner.result()
    finally:
        stopping.cancel()
        runner.cancel()
