"""The warc stage's write cost per page, by gzip level (warcio's own writer uses 9), and
with the bodies spliced in as the fetcher deflated them (``STREAMCRAWL_WARC_SPLICE_BODIES``).

Run from the repository root: ``python bench/warc_write.py [--pages N] [--levels 9,6]
[--docs]``. It builds crawl.fetched records as the fetcher makes them, of generated HTML
pages (18 KB of text each) or, with ``--docs``, of the Python 3.11 docs' HTML files (Debian
python3.11-doc), then, for each level and for the spliced bodies (their records' heads at
level 6), archives them through the stage's own ``Archive`` (records built, gzipped,
appended, fsynced per batch of 500; no revisits) into a temporary directory, on one core,
and reports pages per second and WARC bytes per page; ``warcio check`` must pass on every file.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from streamcrawl.core.content import carried_body_stream
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


DOCS = Path("/usr/share/doc/python3.11/html")


def generated_bodies(pages: int) -> list[bytes]:
    rng = random.Random(1)
    bodies = []
    for number in range(pages):
        text = " ".join(rng.choice(WORDS) for _ in range(2500))
        bodies.append(f"<html><body>{text} {number}</body></html>".encode())
    return bodies


def docs_bodies(pages: int) -> list[bytes]:
    files = sorted(DOCS.rglob("*.html"))
    if not files:
        raise SystemExit(f"{DOCS} not found: apt-get install -y python3.11-doc")
    return [files[number % len(files)].read_bytes() for number in range(pages)]


def records(pages: int, docs: bool = False) -> list[Fetched]:
    found = []
    bodies = docs_bodies(pages) if docs else generated_bodies(pages)
    for number, body in enumerate(bodies):
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
                body=carried_body_stream(body),
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


def run(level: int, fetched: list[Fetched], splice: bool) -> tuple[float, float]:
    logic.GZIP_LEVEL = level
    with tempfile.TemporaryDirectory() as directory:
        archive = Archive(Path(directory), 10**9, {}, logic.RevisitIndex(0))
        archive.recover()
        started = time.perf_counter()
        for start in range(0, len(fetched), BATCH):
            archive.write(
                [
                    Pending("t", 0, n, logic.exchange_from(fetched[n], 10**7, splice))
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
    parser.add_argument("--docs", action="store_true", help="the Python docs' pages")
    args = parser.parse_args()
    fetched = records(args.pages, args.docs)
    size = sum(item.body_bytes for item in fetched) // len(fetched)
    print(f"{args.pages} pages of {size} bytes on average, batches of {BATCH}")
    runs = [(f"gzip level {level}", int(level), False) for level in args.levels.split(",")]
    runs.append(("spliced bodies", 6, True))
    for name, level, splice in runs:
        rate, per_page = run(level, fetched, splice)
        print(f"{name:>15}: {rate:6.0f} pages/s, {per_page:6.0f} WARC bytes/page")


if __name__ == "__main__":
    main()
