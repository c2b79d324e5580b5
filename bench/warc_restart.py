"""The warc stage's start on a directory with history: the revisit index read back out of
the newest WARC files (gzip, warcio parsing) against the index a clean stop saved.

Run from the repository root: ``python bench/warc_restart.py [--pages N] [--rounds R]``.
It archives N generated pages (bench/warc_write.py's) through the stage's own ``Archive``
with a revisit index of N entries, stops cleanly, then times ``read_back`` (what every
start runs in a thread beside the crawl) R times each way, alternating: from the saved
index, and from the files (the saved index moved aside). CPU seconds of this process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from streamcrawl.warc import logic
from streamcrawl.warc.files import SNAPSHOT_NAME, Archive, Pending
from warc_write import BATCH, records


def archive(directory: Path, pages: int) -> None:
    fetched = records(pages)
    written = Archive(directory, 10**9, {}, logic.RevisitIndex(pages))
    written.recover()
    for start in range(0, pages, BATCH):
        written.write(
            [
                Pending("t", 0, n, logic.exchange_from(fetched[n], 10**7))
                for n in range(start, min(start + BATCH, pages))
            ]
        )
    written.close()


def timed_read_back(directory: Path, capacity: int) -> tuple[float, int]:
    began = time.process_time()
    index = Archive(directory, 10**9, {}, logic.RevisitIndex(capacity)).read_back()
    return time.process_time() - began, len(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        archive(directory, args.pages)
        saved = directory / SNAPSHOT_NAME
        aside = directory / "aside"
        size = sum(path.stat().st_size for path in directory.glob("*.warc.gz"))
        print(f"{args.pages} pages archived: {size / 2**20:.0f} MiB of WARC")
        times: dict[str, list[float]] = {"saved index": [], "read back from files": []}
        for _ in range(args.rounds):
            for way in times:
                if way == "saved index":
                    aside.rename(saved) if aside.exists() else None
                else:
                    saved.rename(aside) if saved.exists() else None
                cpu, found = timed_read_back(directory, args.pages)
                assert found == args.pages, (way, found)
                times[way].append(cpu)
        for way, seconds in times.items():
            runs = ", ".join(f"{s:.3f}" for s in seconds)
            print(f"{way}: median {statistics.median(seconds):.3f} CPU s ({runs})")
        ratio = statistics.median(times["read back from files"]) / statistics.median(
            times["saved index"]
        )
        print(f"read back / saved index: {ratio:.0f}x")


if __name__ == "__main__":
    main()
