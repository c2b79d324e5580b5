"""Requests through a real (tiny) forward proxy on 127.0.0.1, and a dead proxy left out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from streamcrawl.fetcher.http import FetchFailed, FetchLimits, fetch
from streamcrawl.fetcher.proxies import ProxyPool
from streamcrawl.fetcher.safety import SafeResolver, parse_networks
from yarl import URL

from ..conftest import free_port


class ForwardProxy:
    """HTTP/1.1 forward proxy for absolute-form GETs; remembers what it relayed."""

    def __init__(self) -> None:
        self.relayed: list[str] = []
        self.port = free_port()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode("latin-1")
        headers = []
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if not line.lower().startswith((b"connection", b"proxy-")):
                headers.append(line)
        method, target, _ = request_line.split(" ", 2)
        self.relayed.append(target)
        url = URL(target)
        upstream_reader, upstream_writer = await asyncio.open_connection(url.host, url.port)
        upstream_writer.write(f"{method} {url.raw_path_qs} HTTP/1.1\r\n".encode())
        upstream_writer.write(b"".join(headers) + b"Connection: close\r\n\r\n")
        await upstream_writer.drain()
        while chunk := await upstream_reader.read(65536):
            writer.write(chunk)
        await writer.drain()
        upstream_writer.close()
        writer.close()


@pytest.fixture()
async def origin() -> AsyncIterator[str]:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=f"<title>{request.path}</title>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{name}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


LIMITS = FetchLimits(5.0, 2.0, 5.0, 1 << 20, parse_networks(["127.0.0.1/32"]))


async def test_requests_go_through_the_pool_and_a_dead_proxy_is_left_out(origin: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with ForwardProxy() as live, aiohttp.ClientSession() as session:
        alive = f"http://127.0.0.1:{live.port}"
        pool = ProxyPool([dead, alive], cooldown_s=60)
        # Find a host the pool puts on the dead proxy first.
        host = next(f"site{i}.test" for i in range(100) if pool.choose(f"site{i}.test", 0) == dead)
        proxy = pool.choose(host, 0)
        with pytest.raises(FetchFailed) as failure:
            await fetch(session, f"{origin}/a.html", LIMITS, proxy=proxy)
        assert failure.value.reason == "proxy_error"
        pool.failed(dead, 0)
        assert pool.choose(host, 1) == alive
        result = await fetch(session, f"{origin}/b.html", LIMITS, proxy=pool.choose(host, 1))
        assert result.status == 200 and b"/b.html" in result.body
        assert live.relayed == [f"{origin}/b.html"]
        assert pool.choose(host, 61) == dead  # back after its cooldown


async def test_a_private_target_is_refused_before_it_reaches_the_proxy() -> None:
    async with ForwardProxy() as live, aiohttp.ClientSession() as session:
        strict = FetchLimits(5.0, 2.0, 5.0, 1 << 20, ())
        resolver = SafeResolver(())
        with pytest.raises(FetchFailed) as failure:
            await fetch(
                session,
                "http://localhost:9/secret",
                strict,
                proxy=f"http://127.0.0.1:{live.port}",
                resolver=resolver,
            )
        assert failure.value.reason == "forbidden_address"
        assert live.relayed == []
