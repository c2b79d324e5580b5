"""Which requests a crawl sends the broker: counted by API and client from Kafka's request log.

Run from the repository root: ``python bench/kafka_requests.py [--pages 300] [--runs 3]``.
It starts a private local stack whose broker logs every request it completes
(``kafka.request.logger`` at DEBUG), runs ``streamcrawl crawl --demo --demo-pages N`` on it
``--runs`` times (each a new crawl on the same topics), and prints, per run, the crawl's wall
time and the requests by API, then the METADATA requests by client id. A client asking for
metadata in a loop shows up here first (bench/RESULTS.md, "METADATA storm").
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from streamcrawl.localstack import stack as local

_REQUEST_LOG = """logger.req.name = kafka.request.logger
logger.req.level = DEBUG
"""
_API = re.compile(r'"clientId":"([^"]*)","requestApiKeyName":"(\w+)"')


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _crawl(env: dict[str, str], pages: int) -> float:
    started = time.monotonic()
    command = ["streamcrawl", "crawl", "--demo", "--demo-pages", str(pages)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"crawl failed ({result.returncode}): {result.stderr[-2000:]}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    local._LOG4J += _REQUEST_LOG  # this process's stack only
    work = Path(tempfile.mkdtemp(prefix="streamcrawl-kafka-requests-"))
    config = local.StackConfig(
        data_dir=work / "stack",
        kafka_port=_free_port(),
        controller_port=_free_port(),
        mongo_port=_free_port(),
    )
    stack = local.LocalStack(config)
    stack.up()
    env = {
        **os.environ,
        "STREAMCRAWL_KAFKA_BOOTSTRAP": config.bootstrap,
        "STREAMCRAWL_MONGO_URI": config.mongo_uri,
        "STREAMCRAWL_CRAWL_DELAY": "0",
        "STREAMCRAWL_STATS_PORT": str(_free_port()),
        "STREAMCRAWL_STATE_DIR": str(work / "state"),
    }
    log = config.data_dir / "kafka" / "server.log"
    try:
        for run in range(1, args.runs + 1):
            before = len(log.read_text().splitlines())
            wall = _crawl(env, args.pages)
            requests = [_API.search(line) for line in log.read_text().splitlines()[before:]]
            found = [match.groups() for match in requests if match is not None]
            by_api = collections.Counter(api for _, api in found)
            metadata = collections.Counter(client for client, api in found if api == "METADATA")
            print(
                f"run {run}: crawl of {args.pages} pages, wall {wall:.1f} s, {len(found)} requests"
            )
            print("  by API: " + ", ".join(f"{api} {n}" for api, n in by_api.most_common()))
            print("  METADATA by client: " + ", ".join(f"{c} {n}" for c, n in metadata.items()))
    finally:
        stack.down(purge=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
