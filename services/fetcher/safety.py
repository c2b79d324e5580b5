"""Refuse private, loopback, link-local and metadata addresses after DNS resolution.

The check sits in the resolver aiohttp connects through, so the address that was
checked is the address that is dialled (no DNS-rebinding gap between the two).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForbiddenAddress(OSError):
    """The host resolves only to addresses the configuration does not allow."""


def parse_networks(networks: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(network, strict=False) for network in networks)


def is_allowed(address: str, allowed: tuple[IPNetwork, ...]) -> bool:
    ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in allowed):
        return True
    return ip.is_global and not ip.is_multicast


class SafeResolver(AbstractResolver):
    """Resolves with the system resolver, keeping only addresses that may be fetched."""

    def __init__(self, allowed: tuple[IPNetwork, ...], inner: AbstractResolver | None = None):
        self._allowed = allowed
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        permitted = [answer for answer in answers if is_allowed(answer["host"], self._allowed)]
        if not permitted:
            shown = ", ".join(sorted({answer["host"] for answer in answers}))
            raise ForbiddenAddress(
                f"{host} resolves to {shown}: not a public address "
                "(allow it with STREAMCRAWL_ALLOW_NETWORKS)"
            )
        return permitted

    async def close(self) -> None:
        await self._inner.close()
