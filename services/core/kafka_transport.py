"""Two fixes to aiokafka's client, installed once per process (ours and faust's clients).

**A closed connection reported as aiokafka expects, under uvloop.**

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

**Every topic a producer sends to stays in its metadata.** A client starts by asking the
metadata of all topics; once a send meets a topic it does not know, it asks only for the
topics it was told to track (``add_topic``), and each answer *replaces* what it knew. A topic
known from the first answer was never added, so it drops out: a batch already queued for
it has no leader any more, and the producer's sender asks for metadata again and again,
thousands of times a second, until the batch expires (faust's 1,200 s request timeout).
Seen in the stats stage: ~2,500 METADATA requests a second to the broker, its changelog
writes stuck and a crawl's end delayed by a minute in 2 of 6 runs (bench/RESULTS.md).
:func:`install` makes ``_wait_on_metadata``, which every send awaits, track the topic first.
"""

from __future__ import annotations

from typing import Any

from aiokafka.client import AIOKafkaClient
from aiokafka.conn import AIOKafkaConnection, CloseReason
from aiokafka.errors import KafkaConnectionError

_MARK = "_streamcrawl_closed_transport_fix"


def install() -> None:
    """Both fixes, once per process."""
    _install_closed_transport_fix()
    _install_tracked_topics_fix()


def _install_tracked_topics_fix() -> None:
    original = AIOKafkaClient._wait_on_metadata
    if getattr(original, _MARK, False):
        return

    async def _wait_on_metadata(self: AIOKafkaClient, topic: str) -> Any:
        if topic not in self._topics:
            self.add_topic(topic)  # the next metadata answers include it
        return await original(self, topic)

    setattr(_wait_on_metadata, _MARK, True)
    AIOKafkaClient._wait_on_metadata = _wait_on_metadata


def _install_closed_transport_fix() -> None:
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
