"""One HTTP request with hard limits: timeouts, a streamed body cap, safe addresses."""

from __future__ import annotations

import functools
import ipaddress
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from ..core.errors import ReasonedError
from ..core.messages import Revisit
from .safety import ForbiddenAddress, IPNetwork, is_allowed

_MAX_HEADERS = 200
_MAX_REQUEST_HEADERS = 64
_MAX_HEADER_VALUE = 8192
_MAX_HEADER_NAME = 1024  # crawl.fetched's limits: a longer one would fail its schema
_MAX_REASON = 256
_CHUNK = 64 * 1024


Header = tuple[str, str]


@dataclass(frozen=True)
class FetchResult:
    """One HTTP response. ``body`` is as received: transfer coding undone, Content-Encoding
    kept (the parser and the robots reader inflate it; the warc stage archives it as is).
    ``raw_headers`` are the response headers in the order received, names in their own
    case, each byte one character (ISO-8859-1), so they turn back into the same bytes."""

    status: int
    final_url: str
    headers: dict[str, str]
    content_type: str
    body: bytes
    truncated: bool
    total_s: float
    ttfb_s: float
    protocol: str = "HTTP/1.1"
    reason: str = ""
    raw_headers: tuple[Header, ...] = ()
    request_headers: tuple[Header, ...] = ()


class FetchFailed(ReasonedError):
    """The request produced no HTTP response; ``reason`` is machine-readable."""


@dataclass(frozen=True)
class FetchLimits:
    total_s: float
    connect_s: float
    read_s: float
    max_body_bytes: int
    allowed_networks: tuple[IPNetwork, ...]

    def timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=self.total_s, sock_connect=self.connect_s, sock_read=self.read_s
        )


def check_literal_address(url: str, allowed: tuple[IPNetwork, ...]) -> None:
    """aiohttp skips the resolver for IP literals, so they are checked here."""
    host = urlsplit(url).hostname or ""
    if literal_allowed(host, allowed) is False:
        raise FetchFailed("forbidden_address", f"{host} is not a public address")


@functools.lru_cache(maxsize=4096)
def literal_allowed(host: str, allowed: tuple[IPNetwork, ...]) -> bool | None:
    """Whether an IP literal may be fetched; None for a name (the resolver checks it).
    Cached: parsing the host (a ValueError for every name) ran for every request."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return is_allowed(host, allowed)


async def check_through_proxy(url: str, resolver: AbstractResolver) -> None:
    """Through a proxy our connector never resolves the target, so it is resolved
    (and refused if private) here first."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        await resolver.resolve(host, parts.port or 0, socket.AF_INET)


def conditional_headers(revisit: Revisit | None) -> dict[str, str]:
    """The validators of a revisit as a conditional request's headers (RFC 9110 13.1):
    ``If-None-Match`` from the stored ETag, ``If-Modified-Since`` from the stored
    Last-Modified. A server that honours them answers 304 without a body when the page is
    unchanged. None without a revisit or without stored validators."""
    if revisit is None:
        return {}
    headers: dict[str, str] = {}
    if revisit.etag:
        headers["If-None-Match"] = revisit.etag
    if revisit.last_modified:
        headers["If-Modified-Since"] = revisit.last_modified
    return headers


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    limits: FetchLimits,
    proxy: str | None = None,
    resolver: AbstractResolver | None = None,
    headers: dict[str, str] | None = None,
) -> FetchResult:
    check_literal_address(url, limits.allowed_networks)
    started = time.monotonic()
    try:
        if proxy is not None and resolver is not None:
            await check_through_proxy(url, resolver)
        async with session.get(
            url, allow_redirects=False, timeout=limits.timeout(), proxy=proxy, headers=headers
        ) as response:
            ttfb = time.monotonic() - started
            body, truncated = await _read_capped(response, limits.max_body_bytes)
            return FetchResult(
                status=response.status,
                final_url=str(response.url),
                headers=_flatten_headers(response.headers),
                content_type=response.headers.get("Content-Type", "")[:256],
                body=body,
                truncated=truncated,
                total_s=time.monotonic() - started,
                ttfb_s=ttfb,
                protocol=_protocol(response.version),
                reason=(response.reason or "")[:_MAX_REASON],
                raw_headers=_header_list(response.raw_headers, _MAX_HEADERS),
                request_headers=_header_list(
                    (
                        (name.encode("latin-1", "replace"), value.encode("latin-1", "replace"))
                        for name, value in response.request_info.headers.items()
                    ),
                    _MAX_REQUEST_HEADERS,
                ),
            )
    except TimeoutError as exc:
        raise FetchFailed("timeout", f"no complete answer within the limits ({exc!r})") from exc
    except (aiohttp.ClientProxyConnectionError, aiohttp.ClientHttpProxyError) as exc:
        raise FetchFailed("proxy_error", f"proxy {proxy}: {exc}") from exc
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ForbiddenAddress):
            raise FetchFailed("forbidden_address", str(exc.os_error)) from exc
        if isinstance(exc, aiohttp.ClientConnectorDNSError):
            raise FetchFailed("dns_error", str(exc)) from exc
        raise FetchFailed("connection_error", str(exc)) from exc
    except ForbiddenAddress as exc:
        raise FetchFailed("forbidden_address", str(exc)) from exc
    except aiohttp.ClientPayloadError as exc:
        raise FetchFailed("payload_error", str(exc)) from exc
    except aiohttp.InvalidURL as exc:
        raise FetchFailed("invalid_url", str(exc)) from exc
    except (aiohttp.ClientError, ValueError, OSError) as exc:
        raise FetchFailed("http_error", f"{type(exc).__name__}: {exc}") from exc


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> tuple[bytes, bool]:
    # Chunks are as received (the session does not decompress): the cap bounds what is
    # kept; whoever inflates the body caps the inflated bytes too (core/content.py).
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        room = cap - size
        if len(chunk) > room:
            parts.append(chunk[:room])
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts), False


def _protocol(version: aiohttp.HttpVersion | None) -> str:
    return "HTTP/1.1" if version is None else f"HTTP/{version.major}.{version.minor}"


def _header_list(raw: Iterable[tuple[bytes, bytes]], most: int) -> tuple[Header, ...]:
    """Headers as received (bounded), each byte one character so they round-trip."""
    return tuple(
        (name[:_MAX_HEADER_NAME].decode("latin-1"), value[:_MAX_HEADER_VALUE].decode("latin-1"))
        for name, value in islice(raw, most)
    )


def _flatten_headers(headers: aiohttp.typedefs.LooseHeaders) -> dict[str, str]:
    flat: dict[str, str] = {}
    for name, value in headers.items():  # type: ignore[union-attr]
        key = str(name).lower()
        if key in flat:
            flat[key] = f"{flat[key]}, {value}"[:_MAX_HEADER_VALUE]
        elif len(flat) < _MAX_HEADERS:
            flat[key] = str(value)[:_MAX_HEADER_VALUE]
    return flat
