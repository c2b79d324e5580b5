"""The warc stage's write cost per page, by gzip level (warcio's own writer uses 9).

Run from the repository root: ``python bench/warc_write.py [--pages N] [--levels 9,6]``.
It builds crawl.fetched records of generated HTML pages (18 KB of text each), then, for
each level, archives them through the stage's own ``Archive`` (records built, gzipped,
appended, fsynced per batch of 500) into a temporary directory, on one core, and reports
pages per second and WARC bytes per page; ``warcio check`` must pass on every file.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from streamcrawl.core.messages import Fetched, Scope, Timings
from streamcrawl.warc import logic
from streamcrawl.warc.files import Archive, Pending

WORDS = [
    "crawl",
    "kafka",
    "archive",
    "record",
    "header",
    "payload",
    "digest",
    "revisit",
    "partition",
    "offset",
]
BATCH = 500


def records(pages: int) -> list[Fetched]:
    rng = random.Random(1)
    found = []
    for number in range(pages):
        text = " ".join(rng.choice(WORDS) for _ in range(2500))
        body = f"<html><body>{text} {number}</body></html>".encode()
        found.append(
            Fetched(
                url=f"http://a.test/{number}",
                final_url=f"http://a.test/{number}",
                host="a.test",
                crawl_id="bench",
                depth=0,
                scope=Scope(allow_domains=["a.test"], max_depth=1),
                status=200,
                headers={},
                content_type="text/html",
                body=zlib.compress(body, 1),
                body_bytes=len(body),
                truncated=False,
                fetched_at=time.time(),
                timings=Timings(total_s=0.1),
                body_as_received=True,
                raw_headers=[("Content-Type", "text/html"), ("Content-Length", str(len(body)))],
                request_headers=[("Host", "a.test")],
            )
        )
    return found


def run(level: int, fetched: list[Fetched]) -> tuple[float, float]:
    logic.GZIP_LEVEL = level
    with tempfile.TemporaryDirectory() as directory:
        archive = Archive(Path(directory), 10**9, {}, logic.RevisitIndex(1000))
        archive.recover()
        started = time.perf_counter()
        for start in range(0, len(fetched), BATCH):
            archive.write(
                [
                    Pending("t", 0, n, logic.exchange_from(fetched[n], 10**7))
                    for n in range(start, min(start + BATCH, len(fetched)))
                ]
            )
        elapsed = time.perf_counter() - started
        archive.close()
        files = sorted(Path(directory).glob("*.warc.gz"))
        warcio = Path(sys.executable).parent / "warcio"
        subprocess.run([str(warcio), "check", *map(str, files)], check=True)
        size = sum(path.stat().st_size for path in files)
    return len(fetched) / elapsed, size / len(fetched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--levels", default="9,6")
    args = parser.parse_args()
    fetched = records(args.pages)
    print(f"{args.pages} pages of {fetched[0].body_bytes} bytes, batches of {BATCH}")
    for level in (int(item) for item in args.levels.split(",")):
        rate, per_page = run(level, fetched)
        print(f"gzip level {level}: {rate:6.0f} pages/s, {per_page:6.0f} WARC bytes/page")


if __name__ == "__main__":
    main()
