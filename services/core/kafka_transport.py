"""A closed connection reported as aiokafka expects, under uvloop.

uvloop raises ``RuntimeError("unable to perform operation on <TCPTransport closed=True>;
the handler is closed")`` when something is written to a transport whose peer has gone
(a broker killed or restarted); the standard event loop raises ``OSError`` there or drops
the write. aiokafka only catches ``OSError`` around its writes (aio-libs/aiokafka#1038), so
the RuntimeError escaped from its metadata synchronizer task, which died; every later
metadata refresh then waited on a future nothing would complete, and a producer waiting
for a new partition leader after a broker restart hung for good (seen in
tests/faults/test_server_faults.py). :func:`install` makes the connection's ``send``
report that error as the ``KafkaConnectionError`` aiokafka handles (the connection is
closed and the request retried elsewhere or later).
"""

from __future__ import annotations

from typing import Any

from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.errors import KafkaConnectionError

_MARK = "_streamcrawl_closed_transport_fix"


def install() -> None:
    """Wrap ``AIOKafkaConnection.send`` once per process."""
    original = AIOKafkaConnection.send
    if getattr(original, _MARK, False):
        return

    def send(self: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        try:
            return original(self, request, expect_response)
        except RuntimeError as exc:
            if "closed" not in str(exc):
                raise
            self.close(reason=CloseReason.CONNECTION_BROKEN)
            raise KafkaConnectionError(
                f"Connection at {self.host}:{self.port} broken: {exc}"
            ) from exc

    setattr(send, _MARK, True)
    AIOKafkaConnection.send = send
