"""crawl.seeds records: the one builder behind ``streamcrawl seed`` and ``streamcrawl crawl``.

A seed without options goes out as plain text, exactly what ``kcat`` would send. With any
option it is a JSON :class:`~streamcrawl.core.messages.Seed`, its limits in a
:class:`~streamcrawl.core.messages.SeedScope`, checked against the contract before it is
sent: a bad option fails here, not later as a dead letter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from ..core.config import Settings
from ..core.kafka import make_producer
from ..core.messages import Seed, SeedScope, decoder, encode
from ..core.topics import SEEDS

_check = decoder(Seed)


@dataclass(frozen=True)
class SeedOptions:
    """What a seed may say besides its URL; ``None`` (or no domain) leaves it to the
    frontier's defaults. Zero is a value like any other (``max_depth=0``: the seed only)."""

    crawl_id: str | None = None
    priority: int | None = None
    max_depth: int | None = None
    max_pages: int | None = None
    allow_domains: tuple[str, ...] = ()

    def scope(self) -> SeedScope | None:
        if self.max_depth is None and self.max_pages is None and not self.allow_domains:
            return None
        return SeedScope(
            allow_domains=list(self.allow_domains) or None,
            max_depth=self.max_depth,
            max_pages=self.max_pages,
        )

    @property
    def plain(self) -> bool:
        """No option at all: the seed can go out as plain text."""
        return self.crawl_id is None and self.priority is None and self.scope() is None


def build_seed(url: str, options: SeedOptions) -> Seed:
    """The seed record for ``url``; ValueError if it breaks the contract (schemas/seed.json)."""
    fields: dict[str, Any] = {}
    if options.crawl_id is not None:
        fields["crawl_id"] = options.crawl_id
    if options.priority is not None:
        fields["priority"] = options.priority
    seed = Seed(url=url, scope=options.scope(), **fields)
    # msgspec checks constraints when it decodes, not when a struct is built.
    try:
        return _check.decode(encode(seed))
    except msgspec.ValidationError as exc:
        raise ValueError(f"seed {url!r}: {exc}") from exc


def seed_payloads(urls: Iterable[str], options: SeedOptions | None = None) -> list[bytes]:
    """The crawl.seeds values for ``urls``: plain text without options, JSON with any."""
    options = options or SeedOptions()
    if options.plain:
        return [url.encode() for url in urls]
    return [encode(build_seed(url, options)) for url in urls]


async def produce_seeds(
    settings: Settings, payloads: Iterable[bytes], topic: str | None = None
) -> int:
    """Send ``payloads`` as they are to crawl.seeds (or ``topic``); the number sent."""
    producer = make_producer(settings)
    await producer.start()
    sent = 0
    try:
        for payload in payloads:
            await producer.send_and_wait(topic or settings.topic_prefix + SEEDS, payload)
            sent += 1
    finally:
        await producer.stop()
    return sent
