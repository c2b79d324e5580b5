"""A write to a connection the broker closed is reported as aiokafka expects under uvloop
(a KafkaConnectionError, the connection closed), not as the RuntimeError uvloop raises,
which killed aiokafka's metadata task (aio-libs/aiokafka#1038)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import streamcrawl.core.kafka  # noqa: F401 (installs the fix, as every stage does)
import uvloop
from aiokafka.conn import AIOKafkaConnection
from aiokafka.errors import KafkaConnectionError
from aiokafka.protocol.metadata import MetadataRequest


async def _writer_the_peer_closed() -> asyncio.StreamWriter:
    """A real uvloop TCP connection the server reset (as a killed broker's kernel does),
    once this side has seen it."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = writer.get_extra_info("socket")
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with pytest.raises(ConnectionResetError):
        await reader.read()
    server.close()
    await server.wait_closed()
    return writer


def test_uvloop_raises_on_a_closed_transport_where_aiokafka_expects_oserror() -> None:
    """The premise: without the fix the write raises RuntimeError under uvloop."""

    async def write() -> None:
        writer = await _writer_the_peer_closed()
        writer.write(b"x")

    with pytest.raises(RuntimeError, match="closed"):
        uvloop.run(write())


def test_a_send_on_a_connection_the_broker_closed_is_a_connection_error() -> None:
    async def send() -> AIOKafkaConnection:
        conn = AIOKafkaConnection("127.0.0.1", 9)
        conn._writer = await _writer_the_peer_closed()  # as connect() leaves it
        conn._versions = {MetadataRequest.API_KEY: (0, 0)}
        with pytest.raises(KafkaConnectionError, match="broken"):
            conn.send(MetadataRequest([]))
        return conn

    conn = uvloop.run(send())
    assert not conn.connected()
