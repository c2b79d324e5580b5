"""The parser's extraction at an earlier commit against the working tree, side by side.

Run from the repository root: ``python bench/extract_ab.py [--before REV] [--rounds N]``.
It loads ``services/parser/extract.py`` as it was at REV (default HEAD~1) next to the
current one, checks both give the same result on every page of the python3.11 docs
(Debian's python3.11-doc), then times them in alternating order on CPU time and prints
the median milliseconds per page of each and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from streamcrawl.parser import extract as current

DOCS = Path("/usr/share/doc/python3.11/html")


def module_at(revision: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{revision}:services/parser/extract.py"],
        check=True,
        capture_output=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "extract_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("extract_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cpu_ms_per_page(module: ModuleType, pages: list[tuple[bytes, str]]) -> float:
    started = time.process_time()
    for body, url in pages:
        module.extract_page(body, url, "text/html")
    return (time.process_time() - started) / len(pages) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", default="HEAD~1")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    before = module_at(args.before)
    pages = [
        (path.read_bytes(), f"http://127.0.0.1:8000/{path.relative_to(DOCS)}")
        for path in sorted(DOCS.rglob("*.html"))
    ]
    for body, url in pages:
        old = dataclasses.astuple(before.extract_page(body, url, "text/html"))
        new = dataclasses.astuple(current.extract_page(body, url, "text/html"))
        if old != new:
            print(f"results differ on {url}", file=sys.stderr)
            return 1
    timings: dict[str, list[float]] = {"before": [], "after": []}
    for round_number in range(args.rounds):
        order = [("before", before), ("after", current)]
        for name, module in order if round_number % 2 == 0 else order[::-1]:
            timings[name].append(cpu_ms_per_page(module, pages))
    old_ms, new_ms = statistics.median(timings["before"]), statistics.median(timings["after"])
    print(f"{len(pages)} pages, identical results; median of {args.rounds} rounds (CPU time):")
    print(f"  before ({args.before}): {old_ms:.2f} ms/page")
    print(f"  after (working tree): {new_ms:.2f} ms/page")
    print(f"  before/after: {old_ms / new_ms:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
