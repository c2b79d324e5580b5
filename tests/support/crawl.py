"""Helpers shared by the end-to-end and fault tests: the generated site served by nginx,
crawl settings, seeds produced with kcat, topics read back with kcat, stored documents."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from streamcrawl.core.config import Settings
from streamcrawl.crawl.local import free_port
from streamcrawl.demo.nginx import NginxSite
from streamcrawl.demo.site import SiteManifest, generate_site
from streamcrawl.localstack.stack import StackConfig

KCAT = shutil.which("kcat")

# Depth is counted along the path by which a URL was first discovered, which in a
# pipeline is not always the shortest one; the completeness tests must not cut the
# site by depth (depth limits are covered by the frontier's unit tests).
UNBOUNDED_DEPTH = 1000


@dataclass
class Site:
    manifest: SiteManifest
    nginx: NginxSite
    port: int
    # URLs that always answer 500: the site's real failures, which end in crawl.dlq.
    broken: frozenset[str] = field(default_factory=frozenset)
    crawl_id: str = ""  # the crawl it is seeded under, where tests run several at once

    def expected_urls(self) -> set[str]:
        """Every URL a complete crawl from the entry page stores, once."""
        return self.manifest.pages | self.manifest.missing | set(self.manifest.redirects)

    @property
    def expected(self) -> int:
        return len(self.expected_urls())

    def requests(self) -> list[tuple[float, str]]:
        """(time nginx logged it, path) of every page request (robots.txt aside)."""
        return [
            (entry.ts, entry.path)
            for entry in self.nginx.access_log_entries()
            if entry.path != "/robots.txt"
        ]

    def requested_after(self, moment: float) -> list[str]:
        return [path for ts, path in self.requests() if ts > moment]

    def served(self) -> Counter[int]:
        """Status of every page request nginx answered (robots.txt aside)."""
        return Counter(
            entry.status for entry in self.nginx.access_log_entries() if entry.path != "/robots.txt"
        )


def isolated_settings(stack: StackConfig, **extra: str) -> Settings:
    """Settings with their own topic prefix and database, so tests never share data;
    ``extra`` maps setting names (``max_depth=...``) to values."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "STREAMCRAWL_KAFKA_BOOTSTRAP": stack.bootstrap,
        "STREAMCRAWL_MONGO_URI": stack.mongo_uri,
        "STREAMCRAWL_TOPIC_PREFIX": f"t{tag}.",
        "STREAMCRAWL_MONGO_DATABASE": f"test_{tag}",
        "STREAMCRAWL_ALLOW_NETWORKS": "127.0.0.1/32",
        # The warc stage runs in every pipeline: its files go to a directory of the test's.
        "STREAMCRAWL_WARC_DIR": tempfile.mkdtemp(prefix=f"streamcrawl-warc-{tag}-"),
    }
    env.update({f"STREAMCRAWL_{name.upper()}": value for name, value in extra.items()})
    return Settings.from_env(env)


def crawl_settings(stack: StackConfig, max_depth: int = UNBOUNDED_DEPTH, **extra: str) -> Settings:
    options = {
        "max_depth": str(max_depth),
        "fetch_per_host_concurrency": "16",
        "crawl_delay": "0",  # our own nginx: politeness is tested against the hostile site
        "log_level": "INFO",
        **extra,
    }
    return isolated_settings(stack, **options)


def kcat_produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    assert KCAT is not None
    # One message per line: kcat's default delimiter.
    subprocess.run(
        [KCAT, "-P", "-b", settings.kafka_bootstrap, "-t", topic],
        input=b"\n".join(values) + b"\n",
        check=True,
        timeout=60,
    )


def kcat_read(bootstrap: str, topic: str, fmt: str) -> list[bytes]:
    """Every record of ``topic`` from the beginning, formatted by kcat's ``-f fmt``
    (which must end in a newline), one line each."""
    assert KCAT is not None
    out = subprocess.run(
        [KCAT, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-f", fmt],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout
    return [line for line in out.split(b"\n") if line]


def kcat_consume(bootstrap: str, topic: str) -> list[tuple[str, bytes]]:
    """Every record of ``topic`` as (key, value), read by Debian's kcat from the beginning."""
    rows = []
    for line in kcat_read(bootstrap, topic, "%k\t%s\n"):
        key, _, value = line.partition(b"\t")
        rows.append((key.decode(), value))
    return rows


async def stored_documents(settings: Settings, uri: str | None = None) -> list[dict[str, Any]]:
    """Every document in the crawl's collection, without its text (``uri`` where the
    client needs other credentials than the stages')."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri or settings.mongo_uri)
    try:
        collection = client[settings.mongo_database][settings.mongo_collection]
        return [doc async for doc in collection.find({}, {"text": 0})]
    finally:
        await client.close()


def add_broken_pages(root: Path, manifest: SiteManifest, count: int) -> frozenset[str]:
    """``count`` URLs on the site that always answer 500, as nginx locations beside the
    generated redirects (the site's config includes that file); reach them by seeding."""
    paths = [f"/broken/{number}.html" for number in range(count)]
    with (root / "redirects.conf").open("a", encoding="utf-8") as conf:
        conf.writelines(f"location = {path} {{ return 500; }}\n" for path in paths)
    base = manifest.base_url.rstrip("/")
    return frozenset(base + path for path in paths)


@contextmanager
def served_site(
    root: Path,
    pages: int,
    broken: int = 0,
    limit_rate: str | None = None,
    crawl_id: str = "",
) -> Iterator[Site]:
    """The generated site of ``pages`` pages (plus ``broken`` failing URLs) under ``root``,
    served by nginx on a free port while the block runs (at ``limit_rate`` per
    connection, when given)."""
    port = free_port()
    manifest = generate_site(root, pages=pages, port=port)
    failing = add_broken_pages(root, manifest, broken)
    with NginxSite(root, port, limit_rate=limit_rate) as nginx:
        yield Site(manifest, nginx, port, failing, crawl_id)


@contextmanager
def served_sites(root: Path, names: str, pages: int) -> Iterator[list[Site]]:
    """One site per letter of ``names``, seeded as crawl ``crawl-<letter>``, each served by
    its own nginx: several crawls on one pipeline at once."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(served_site(root / f"site{n}", pages, crawl_id=f"crawl-{name}"))
            for n, name in enumerate(names)
        ]
