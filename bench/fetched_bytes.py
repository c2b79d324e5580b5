"""Bytes per crawl.fetched record, before and after it carried what a WARC needs.

Run from the repository root: ``python bench/fetched_bytes.py [--pages N]``. It generates
the demo site, serves it with nginx, fetches every page with the fetcher's own downloader
and builds each crawl.fetched record with the fetcher's own builder. "before" is the same
record without the fields added for the warc stage (protocol, reason, raw and request
headers, body_as_received); "after" is the record as the fetcher now sends it. Both are
given as encoded JSON per record and as a zstd-compressed batch of all records (what the
producer sends: the topic's records are zstd-compressed in batches).

nginx here sends bodies without Content-Encoding, so the body is the same both ways. For
gzip-encoded responses the body changes too: it is then carried as received (gzip, then
zlib for the message) instead of inflated and zlib-compressed at level 1; the last lines
measure that on the same pages, gzip level 6 standing in for the server.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import tempfile
import time
import zlib
from pathlib import Path

import cramjam
import msgspec
from streamcrawl.core.config import Settings
from streamcrawl.core.messages import Discovered, Fetched, Scope, encode, fetch_from
from streamcrawl.crawl.local import free_port
from streamcrawl.demo.nginx import NginxSite
from streamcrawl.demo.site import generate_site
from streamcrawl.fetcher.downloader import Downloader
from streamcrawl.fetcher.retry import fetched_from


def without_warc_fields(record: Fetched) -> Fetched:
    return msgspec.structs.replace(
        record,
        body_as_received=False,
        protocol="HTTP/1.1",
        reason="",
        raw_headers=[],
        request_headers=[],
    )


async def fetch_all(urls: list[str]) -> list[Fetched]:
    downloader = Downloader(Settings(allow_networks=("127.0.0.1/32",)))
    await downloader.start()
    records = []
    try:
        for url in urls:
            result = await downloader.page(url, "127.0.0.1")
            scope = Scope(allow_domains=["127.0.0.1"], max_depth=5)
            candidate = Discovered(
                url=url,
                host="127.0.0.1",
                crawl_id="bench",
                depth=1,
                priority=5,
                scope=scope,
                discovered_at=time.time(),
            )
            records.append(fetched_from(fetch_from(candidate, time.time()), result, time.time()))
    finally:
        await downloader.close()
    return records


def sizes(records: list[Fetched]) -> tuple[float, float]:
    encoded = [encode(record) for record in records]
    batch = bytes(cramjam.zstd.compress(b"".join(encoded)))
    return sum(map(len, encoded)) / len(encoded), len(batch) / len(encoded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root, port = Path(directory) / "site", free_port()
        manifest = generate_site(root, pages=args.pages, port=port)
        with NginxSite(root, port):
            records = asyncio.run(fetch_all(sorted(manifest.pages)))
        bodies = [zlib.decompress(record.body) for record in records]
    before, after = sizes([without_warc_fields(r) for r in records]), sizes(records)
    print(f"{len(records)} pages, mean body {sum(map(len, bodies)) / len(bodies):.0f} bytes")
    print(f"before: {before[0]:8.0f} B/record JSON, {before[1]:8.0f} B/record zstd batch")
    print(f"after:  {after[0]:8.0f} B/record JSON, {after[1]:8.0f} B/record zstd batch")
    inflated = sum(len(zlib.compress(body, 1)) for body in bodies) / len(bodies)
    as_received = sum(len(zlib.compress(gzip.compress(body, 6), 1)) for body in bodies)
    print(
        f"gzip-encoded responses, body field before (inflated, zlib 1): {inflated:.0f} B; "
        f"after (gzip 6 as received, zlib 1): {as_received / len(bodies):.0f} B"
    )


if __name__ == "__main__":
    main()
