"""The two bare aiohttp + uvloop baselines of ``bench/compare``, each run as its own process.

    python bench/_loops.py ceiling URL_FILE CONCURRENCY   # GET every URL of the file, no parsing
    python bench/_loops.py crawl ENTRY_URL CONCURRENCY    # the twenty-line crawl loop

Each prints one JSON line: requests made and pages (2xx HTML) seen.
"""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import urldefrag, urljoin, urlsplit

import aiohttp
import uvloop
from selectolax.lexbor import LexborHTMLParser

USER_AGENT = "bench-bare-loop"


async def ceiling(urls: list[str], concurrency: int) -> dict[str, int]:
    """The server's ceiling: C workers GET the URLs and read each body, nothing else."""
    queue = iter(urls)
    counts = {"requests": 0, "pages": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT}) as s:

        async def worker() -> None:
            for url in queue:
                async with s.get(url, allow_redirects=False) as response:
                    await response.read()
                counts["requests"] += 1
                counts["pages"] += 200 <= response.status < 300

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


# ---- the twenty-line crawl loop that streamcrawl industrialises ------------------------
async def crawl(start: str, concurrency: int) -> dict[str, int]:
    host, seen, sem = urlsplit(start).netloc, {start}, asyncio.Semaphore(concurrency)
    counts = {"requests": 0, "pages": 0}
    connector = aiohttp.TCPConnector(limit=concurrency)
    session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT})
    async with session as s, asyncio.TaskGroup() as tasks:

        async def visit(url: str) -> None:
            async with sem, s.get(url, allow_redirects=False) as response:
                body = await response.read()
            counts["requests"] += 1
            hrefs = [response.headers.get("Location", "")]  # a redirect is one more link
            if response.status == 200 and response.content_type == "text/html":
                counts["pages"] += 1
                nodes = LexborHTMLParser(body).css("a[href]")
                hrefs += [node.attributes.get("href") or "" for node in nodes]
            for href in hrefs:
                link = urldefrag(urljoin(url, href.strip())).url
                if href and urlsplit(link).netloc == host and link not in seen:
                    seen.add(link)
                    tasks.create_task(visit(link))

        tasks.create_task(visit(start))
    return counts


def main() -> None:
    mode, target, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "ceiling":
        with open(target, encoding="utf-8") as file:
            urls = file.read().split()
        result = uvloop.run(ceiling(urls, concurrency))
    elif mode == "crawl":
        result = uvloop.run(crawl(target, concurrency))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({**result, "vmhwm_kib": vmhwm_kib()}))


def vmhwm_kib() -> int:
    """Peak RSS of this process since its exec (wait4's ru_maxrss also counts what the
    parent's pages weighed before the exec)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


if __name__ == "__main__":
    main()
