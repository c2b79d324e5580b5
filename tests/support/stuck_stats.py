"""``streamcrawl run stats`` whose crawl.fetched agent stops at its first record and never
returns (as a faust worker stuck inside itself does: no commit, no log line), with the
commit watch's grace shortened. Run as a script; the watch's restart runs it again."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from streamcrawl import cli
from streamcrawl.core.topics import FETCHED
from streamcrawl.stats import app, service

service.STALL_AFTER_S = 6.0
service.STALL_CHECK_S = 1.0
_consume = app._consume


def stuck_consume(suffix: str, handler: Any, dead_letter: Any) -> Any:
    if suffix != FETCHED:
        return _consume(suffix, handler, dead_letter)

    async def consume(stream: Any) -> Any:
        async for _ in stream.events():
            await asyncio.Event().wait()  # never set

    consume.__name__ = consume.__qualname__ = f"stats_{suffix}"
    return consume


app._consume = stuck_consume

if __name__ == "__main__":
    sys.exit(cli.main(["run", "stats"]))
