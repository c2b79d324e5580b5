"""End-to-end pages/s of two streamcrawl installs on the same generated site, side by side.

    python bench/demo_compare.py --pages 2000 --rounds 3 \
        before=/tmp/before/.venv/bin/python after=.venv/bin/python

Each NAME=PYTHON is an interpreter with a streamcrawl installed (for example a worktree of
an older commit with its own virtualenv). The site is generated and served by nginx once;
the installs then crawl it in turn, ``--rounds`` times each, alternating. Each run gets a
fresh collection and fresh topics (its own ``STREAMCRAWL_MONGO_COLLECTION`` and
``STREAMCRAWL_TOPIC_PREFIX``) of one local stack, or with ``--reuse-topics`` the topics of its
install, kept across its rounds (a stack with history, where dedup's replays matter), always
with the settings of ``crawl --demo``. Every run's pages/s is read from the crawl command's
summary, and the pages requested more than once are counted from nginx's access log (must
be 0).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

from streamcrawl.demo.nginx import NginxSite
from streamcrawl.demo.site import generate_site
from streamcrawl.localstack.stack import LocalStack, StackConfig

_RATE = re.compile(r"rate\s+([0-9.]+) pages/s")
_STORED = re.compile(r"stored\s+(\d+) documents")


def crawl_once(
    python: str, url: str, env: dict[str, str], prefix: str | None = None
) -> tuple[float, int]:
    # A fresh collection, and fresh topics unless ``prefix`` says which to reuse: by default
    # a run never pays for the ones before it.
    tag = uuid.uuid4().hex[:8]
    run_env = {
        **env,
        "STREAMCRAWL_TOPIC_PREFIX": prefix or f"bench{tag}.",
        "STREAMCRAWL_MONGO_COLLECTION": f"bench_{tag}",
    }
    done = subprocess.run(
        [python, "-m", "streamcrawl.cli", "crawl", url],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = done.stdout + done.stderr
    rate, stored = _RATE.search(output), _STORED.search(output)
    if done.returncode != 0 or rate is None or stored is None:
        raise RuntimeError(f"{python} crawl failed ({done.returncode}):\n{output[-3000:]}")
    return float(rate.group(1)), int(stored.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("installs", nargs="+", help="NAME=PYTHON")
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--reuse-topics",
        action="store_true",
        help="each install crawls on its own topics kept across its rounds (a new crawl id "
        "each time), with a dedup state directory of its own: a stack with history",
    )
    args = parser.parse_args()
    installs = [item.split("=", 1) for item in args.installs]
    config = StackConfig.from_env()
    LocalStack(config).up()
    env = {
        **os.environ,
        **config.connection_env(),
        "STREAMCRAWL_ALLOW_NETWORKS": "127.0.0.1/32",
        "STREAMCRAWL_CRAWL_DELAY": "0",
        "STREAMCRAWL_FETCH_PER_HOST_CONCURRENCY": "32",
    }
    results: dict[str, list[float]] = {name: [] for name, _ in installs}
    duplicates: dict[str, int] = dict.fromkeys(results, 0)
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as work:
        root = Path(work)
        port = _free_port()
        manifest = generate_site(root, pages=args.pages, port=port)
        stamp = uuid.uuid4().hex[:6]
        with NginxSite(root, port) as site:
            for round_number in range(args.rounds):
                for name, python in installs:
                    seen = len(site.access_log_entries())
                    prefix = f"history{name}{stamp}." if args.reuse_topics else None
                    run_env = {**env, "STREAMCRAWL_STATE_DIR": str(root / f"state-{name}")}
                    rate, stored = crawl_once(python, manifest.entry_url, run_env, prefix)
                    paths = Counter(e.path for e in site.access_log_entries()[seen:])
                    twice = sum(count - 1 for count in paths.values() if count > 1)
                    duplicates[name] += twice
                    results[name].append(rate)
                    print(
                        f"round {round_number + 1} {name}: {rate:.1f} pages/s, {stored} stored, "
                        f"{sum(paths.values())} requests, {twice} duplicate",
                        file=sys.stderr,
                    )
    base = statistics.median(results[installs[0][0]])
    print(
        f"| install | pages/s per run ({args.pages}-page demo site) | median | vs "
        f"{installs[0][0]} | duplicate requests |"
    )
    print("|---|---|---:|---:|---:|")
    for name, rates in results.items():
        median = statistics.median(rates)
        runs = ", ".join(f"{rate:.1f}" for rate in rates)
        print(f"| {name} | {runs} | {median:.1f} | {median / base:.2f}x | {duplicates[name]} |")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
