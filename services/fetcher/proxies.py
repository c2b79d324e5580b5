"""An optional proxy pool, pure: one proxy per host, a failing proxy left out a while.

Rendezvous hashing keeps each host on the same proxy (a site sees one address,
as a person's browser would) and moves only that proxy's hosts when it fails.
When every proxy is cooling down the pool still answers with the one that
recovers first: going direct would show the crawler's own address, which is
what the pool exists to avoid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _score(host: str, proxy: str) -> int:
    digest = hashlib.blake2b(f"{host}\0{proxy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ProxyPool:
    def __init__(self, proxies: Sequence[str], cooldown_s: float) -> None:
        self._proxies = tuple(proxies)
        self._cooldown = cooldown_s
        self._failed_until: dict[str, float] = {}

    def choose(self, host: str, now: float) -> str | None:
        """The proxy for ``host`` (None: no pool configured, connect directly)."""
        if not self._proxies:
            return None
        healthy = [p for p in self._proxies if self._failed_until.get(p, 0.0) <= now]
        if not healthy:
            return min(self._proxies, key=lambda p: self._failed_until.get(p, 0.0))
        return max(healthy, key=lambda proxy: _score(host, proxy))

    def failed(self, proxy: str, now: float) -> None:
        self._failed_until[proxy] = now + self._cooldown

    def succeeded(self, proxy: str) -> None:
        self._failed_until.pop(proxy, None)
