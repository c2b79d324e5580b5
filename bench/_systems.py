"""The five systems of ``bench/compare``, each run once against a served site, measured from
outside: nginx's access log for what was requested, /proc and wait4 for CPU and memory, the
broker's log directories for the bytes that went through Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from _procs import Sampler, cmdline, comm, cpu_seconds, descendants, kafka_log_bytes, wait_child
from _site import SiteInfo, is_html_path
from aiokafka.partitioner import DefaultPartitioner
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import OffsetProbe, create_topics, make_producer
from streamcrawl.core.messages import Fetch, Scope, encode
from streamcrawl.core.scope import canonical_url
from streamcrawl.core.topics import DLQ, FETCH, FETCHED, HOST_PARTITIONS, RETRY
from streamcrawl.core.urls import host_of, hostname_of
from streamcrawl.crawl.local import crawl_stages
from streamcrawl.demo.nginx import NginxSite
from streamcrawl.localstack.stack import LocalStack, StackConfig
from streamcrawl.registry import STAGES

BENCH = Path(__file__).resolve().parent
SYSTEMS = ("ceiling", "bare", "scrapy", "fetcher", "e2e")
LABELS = {
    "ceiling": "ceiling: bare aiohttp GET loop, page list, no parsing",
    "bare": "bare aiohttp crawl loop (selectolax, set of seen URLs)",
    "scrapy": "Scrapy CrawlSpider",
    "fetcher": "streamcrawl fetcher alone (prepared crawl.fetch)",
    "e2e": f"streamcrawl crawl, end to end ({len(crawl_stages(Settings()))} stages)",
}
T = TypeVar("T")


@dataclass
class ProcUse:
    name: str
    cpu_s: float
    peak_rss_kib: int
    how: str  # where the numbers come from


@dataclass
class RunResult:
    site: str
    system: str
    expected_pages: int
    pages: int = 0  # 2xx HTML requests in nginx's log
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    window_s: float = 0.0  # first to last request in nginx's log
    wall_s: float = 0.0  # process start to done (fetcher: to the last crawl.fetched record)
    kafka_bytes: int | None = None
    procs: list[ProcUse] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.pages / self.window_s if self.window_s > 0 else 0.0

    @property
    def wall_rate(self) -> float:
        return self.pages / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pages_per_s": self.rate, "pages_per_s_wall": self.wall_rate}


class Loop:
    """One asyncio loop in a thread, for Kafka calls from synchronous code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


class Stack:
    """A private local stack (its own data dir and ports), so the Kafka and FerretDB CPU
    measured belongs to this benchmark and not to a test suite sharing the default one."""

    def __init__(
        self, data_dir: Path, ports: tuple[int, int, int], kafka_heap: str = "512m"
    ) -> None:
        self.warmed = False  # set once an unmeasured crawl has run on it (bench/compare)
        self.config = StackConfig(
            data_dir=data_dir,
            kafka_port=ports[0],
            controller_port=ports[1],
            mongo_port=ports[2],
            kafka_heap=kafka_heap,
            # The default, or what STREAMCRAWL_STACK_KAFKA_JVM_OPTIONS says.
            kafka_jvm_options=StackConfig.from_env().kafka_jvm_options,
        )
        self.stack = LocalStack(self.config)
        self.pids: dict[str, int] = {}

    def up(self) -> None:
        self.stack.up()
        for status in self.stack.status():
            if status.pid is None:
                raise RuntimeError(f"{status.name} of the bench stack is not running")
            self.pids["Kafka JVM" if status.name == "kafka" else "FerretDB"] = status.pid

    def down(self) -> None:
        self.stack.down(purge=True)

    @property
    def kafka_data(self) -> Path:
        return self.config.data_dir / "kafka" / "data"

    def env(self) -> dict[str, str]:
        return self.config.connection_env()


class Bench:
    """Runs the systems against one served site."""

    def __init__(
        self,
        site: SiteInfo,
        server: NginxSite,
        work: Path,
        concurrency: int,
        stack: Stack | None,
        timeout: float,
    ) -> None:
        self.site = site
        self.server = server
        self.work = work
        self.concurrency = concurrency
        self.stack = stack
        self.timeout = timeout
        self.python = sys.executable

    # ---- the measuring frame common to all ---------------------------------------------

    def _nginx_pids(self) -> dict[int, str]:
        master = int((self.server.root / "nginx.pid").read_text().strip())
        return {master: "nginx master", **{pid: "nginx worker" for pid in descendants(master)}}

    def _measure(
        self,
        system: str,
        command: list[str],
        env: dict[str, str],
        *,
        servers: tuple[str, ...] = (),
        poll: Callable[[], bool] | None = None,
        prefix: str | None = None,
    ) -> RunResult:
        result = RunResult(self.site.name, system, len(self.site.page_urls))
        fixed = self._nginx_pids()
        if self.stack is not None:
            fixed.update({pid: name for name, pid in self.stack.pids.items() if name in servers})
        before = {pid: cpu_seconds(pid) or 0.0 for pid in fixed}
        mark = len(self.server.access_log_entries())
        out = self.work / f"{self.site.name}-{system}.out"
        child: list[int] = []
        sampler = Sampler(fixed, root=lambda: child[0] if child else None, label=_stage_label)
        sampler.start()
        started = time.monotonic()
        started_epoch = time.time()  # nginx logs wall-clock times
        with open(out, "wb") as sink:
            process = subprocess.Popen(
                command, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        child.append(process.pid)
        code, usage, done_at = wait_child(process.pid, poll, self.timeout, every=0.25)
        process.returncode = code  # reaped by wait4 above
        ended = time.monotonic() - started
        sampler.stop()
        after = {pid: cpu_seconds(pid) or 0.0 for pid in fixed}
        result.wall_s = done_at if done_at is not None else ended
        result.detail["process_s"] = ended
        result.detail["exit_code"] = code
        result.detail["output_tail"] = out.read_text(errors="replace")[-2000:]
        if code != 0 and not (done_at is not None and code == -15):
            result.error = f"exit {code}: {result.detail['output_tail'][-600:]}"
        elif poll is not None and done_at is None:
            result.error = "did not finish"
        self._read_log(result, mark)
        self._phases(result, started_epoch)
        self._account(result, process.pid, usage, sampler, fixed, before, after)
        if prefix is not None and self.stack is not None:
            topics = kafka_log_bytes(self.stack.kafka_data, prefix)
            result.kafka_bytes = sum(topics.values())
            result.detail["kafka_topic_bytes"] = {
                topic[len(prefix) :]: size for topic, size in sorted(topics.items())
            }
        return result

    def _read_log(self, result: RunResult, mark: int) -> None:
        entries = self.server.access_log_entries()[mark:]
        result.requests = len(entries)
        result.pages = sum(1 for e in entries if 200 <= e.status < 300 and is_html_path(e.path))
        result.statuses = dict(Counter(str(e.status) for e in entries))
        paths = Counter(e.path for e in entries)
        twice = {path: count for path, count in paths.items() if count > 1}
        result.duplicates = sum(count - 1 for count in twice.values())
        result.duplicate_examples = sorted(twice)[:5]
        if entries:
            result.window_s = max(e.ts for e in entries) - min(e.ts for e in entries)
            result.detail["first_request_ts"] = min(e.ts for e in entries)

    @staticmethod
    def _phases(result: RunResult, started_epoch: float) -> None:
        """Before the first request (start-up) and after the last one (the tail of parsing,
        storing and seeing the drain): where wall time goes that the fetch window leaves out."""
        first = result.detail.pop("first_request_ts", None)
        if first is None:
            return
        result.detail["before_first_request_s"] = first - started_epoch
        result.detail["after_last_request_s"] = (
            result.wall_s - result.detail["before_first_request_s"] - result.window_s
        )

    def _account(
        self,
        result: RunResult,
        pid: int,
        usage: os.struct_rusage | None,
        sampler: Sampler,
        fixed: dict[int, str],
        before: dict[int, float],
        after: dict[int, float],
    ) -> None:
        total = (usage.ru_utime + usage.ru_stime) if usage else 0.0
        maxrss = usage.ru_maxrss if usage else 0
        own = sampler.seen.get(pid)
        below = [(p, s) for p, s in sampler.seen.items() if p != pid and p not in fixed]
        name = _PROCESS_NAMES[result.system]
        if not below:
            # ru_maxrss counts the parent's pages from before the exec: take VmHWM instead.
            peak = max(own.hwm_kib if own else 0, _reported_hwm(result))
            how = "wait4 rusage, VmHWM" if peak else "wait4 rusage"
            result.procs.append(ProcUse(name, total, peak or maxrss, how))
        else:
            own_cpu = own.cpu_last if own else 0.0
            result.procs.append(
                ProcUse(name, own_cpu, own.hwm_kib if own else 0, "sampled /proc (0.25 s)")
            )
            for _, seen in sorted(below, key=lambda item: _stage_order(item[1].label)):
                result.procs.append(
                    ProcUse(seen.label, seen.cpu_last, seen.hwm_kib, "sampled /proc (0.25 s)")
                )
            rest = total - own_cpu - sum(s.cpu_last for _, s in below)
            result.procs.append(
                ProcUse("exit tails the sampler missed", max(0.0, rest), 0, "wait4 total - sampled")
            )
            result.detail["cpu_total_wait4"] = total
            ours = [own, *(s for _, s in below)] if own else [s for _, s in below]
            result.detail["client_pss_peak_kib"] = sum(s.pss_max_kib for s in ours)
            result.detail["client_hwm_kib"] = sum(s.hwm_kib for s in ours)
        for p, name in fixed.items():
            seen = sampler.seen.get(p)
            rss = seen.rss_max_kib if seen else 0
            result.procs.append(ProcUse(name, after[p] - before[p], rss, "before/after, VmRSS max"))

    # ---- the systems ---------------------------------------------------------------------

    def ceiling(self) -> RunResult:
        urls = self.work / f"{self.site.name}-urls.txt"
        urls.write_text("\n".join(self.site.page_urls) + "\n")
        command = [
            self.python,
            str(BENCH / "_loops.py"),
            "ceiling",
            str(urls),
            str(self.concurrency),
        ]
        return self._finish(
            self._measure(
                "ceiling",
                command,
                dict(os.environ),
            )
        )

    def bare(self) -> RunResult:
        command = [
            self.python,
            str(BENCH / "_loops.py"),
            "crawl",
            self.site.entry_url,
            str(self.concurrency),
        ]
        return self._finish(
            self._measure(
                "bare",
                command,
                dict(os.environ),
            )
        )

    def scrapy(self) -> RunResult:
        command = [
            self.python,
            str(BENCH / "_scrapy.py"),
            self.site.entry_url,
            str(self.concurrency),
        ]
        return self._finish(
            self._measure(
                "scrapy",
                command,
                dict(os.environ),
            )
        )

    @staticmethod
    def _finish(result: RunResult) -> RunResult:
        lines = result.detail.get("output_tail", "").strip().splitlines()
        if lines:
            with contextlib.suppress(ValueError):
                result.detail["reported"] = json.loads(lines[-1])
        return result

    def _stream_env(self, prefix: str, collection: str) -> dict[str, str]:
        assert self.stack is not None
        return {
            **os.environ,
            **self.stack.env(),
            "STREAMCRAWL_ALLOW_NETWORKS": "127.0.0.1/32",
            "STREAMCRAWL_CRAWL_DELAY": "0",
            "STREAMCRAWL_FETCH_PER_HOST_CONCURRENCY": str(self.concurrency),
            "STREAMCRAWL_TOPIC_PREFIX": prefix,
            "STREAMCRAWL_MONGO_COLLECTION": collection,
            # Fresh, like the topics: the warc stage would otherwise archive into the
            # working directory and, at every start, read back the files earlier runs left.
            "STREAMCRAWL_WARC_DIR": str(self.work / f"warc-{collection}"),
        }

    def fetcher(self, loop: Loop) -> RunResult:
        tag = uuid.uuid4().hex[:8]
        prefix = f"bench{tag}."
        env = self._stream_env(prefix, f"bench_{tag}")
        settings = Settings.from_env(env)
        wanted = len(self.site.page_urls)
        loop.run(create_topics(settings))
        produced = loop.run(_produce_fetch(settings, self.site.page_urls, f"bench-{tag}"), 600)
        topics = [prefix + suffix for suffix in (FETCHED, DLQ, RETRY)]
        probe = loop.run(_started_probe(settings))
        counts: dict[str, int] = {}

        def done() -> bool:
            ends = loop.run(probe.end_offsets(topics))
            for topic in topics:
                counts[topic] = sum(end for tp, end in ends.items() if tp.topic == topic)
            return counts[prefix + FETCHED] >= wanted

        command = [self.python, "-m", "streamcrawl.cli", "run", "fetcher"]
        try:
            result = self._measure(
                "fetcher", command, env, servers=("Kafka JVM",), poll=done, prefix=prefix
            )
        finally:
            loop.run(probe.stop())
        result.detail["fetch_records"] = produced
        result.detail["fetched_records"] = counts.get(prefix + FETCHED, 0)
        result.detail["dlq_records"] = counts.get(prefix + DLQ, 0)
        result.detail["retry_records"] = counts.get(prefix + RETRY, 0)
        return result

    def e2e(self) -> RunResult:
        tag = uuid.uuid4().hex[:8]
        prefix = f"bench{tag}."
        env = self._stream_env(prefix, f"bench_{tag}")
        command = [self.python, "-m", "streamcrawl.cli", "crawl", self.site.entry_url]
        servers = ("Kafka JVM", "FerretDB")
        result = self._measure("e2e", command, env, servers=servers, prefix=prefix)
        tail = result.detail.get("output_tail", "")
        for key, pattern in _SUMMARY.items():
            found = pattern.search(tail)
            if found:
                result.detail[key] = float(found.group(1))
        return result


_PROCESS_NAMES = {
    "ceiling": "bare GET loop (python)",
    "bare": "bare crawl loop (python)",
    "scrapy": "scrapy (python)",
    "fetcher": "fetcher",
    "e2e": "crawl CLI (seeds, progress watch)",
}
_SUMMARY = {
    "stored": re.compile(r"stored\s+(\d+) documents"),
    "summary_rate": re.compile(r"rate\s+([0-9.]+) pages/s"),
    "drained_s": re.compile(r"drained in ([0-9.]+)s"),
    "dead_letters": re.compile(r"errors\s+(\d+) dead letters"),
    "fetched_records": re.compile(r"fetched\s+(\d+)\n"),
}
_ORDER = ("frontier", "dedup", "fetcher", "delay", "parser", "sink")


def _reported_hwm(result: RunResult) -> int:
    """The VmHWM a bench script printed on its last line, read before its exit."""
    lines = result.detail.get("output_tail", "").strip().splitlines()
    with contextlib.suppress(ValueError, TypeError, AttributeError, IndexError):
        return int(json.loads(lines[-1]).get("vmhwm_kib", 0))
    return 0


def _stage_label(pid: int) -> str:
    args = cmdline(pid)
    if "run" in args and args.index("run") + 1 < len(args):
        return args[args.index("run") + 1]
    name = comm(pid)  # a forked stage: named after its stage (fetcher-1: a replica)
    if name.split("-")[0] in STAGES:
        return name
    joined = " ".join(args)
    if "multiprocessing.forkserver" in joined:
        return "fork server (stage imports)"
    if "multiprocessing.resource_tracker" in joined:
        return "multiprocessing resource tracker"
    return joined[:60] or str(pid)


def _stage_order(label: str) -> tuple[int, str]:
    base = label.split("-")[0]
    return (_ORDER.index(base) if base in _ORDER else len(_ORDER), label)


async def _started_probe(settings: Settings) -> OffsetProbe:
    probe = OffsetProbe(settings)  # aiokafka clients bind to the loop they are made in
    await probe.start()
    return probe


async def _produce_fetch(settings: Settings, urls: list[str], crawl_id: str) -> int:
    """Every page URL as a crawl.fetch record, keyed by host, on the partition the frontier's
    keyed send (DefaultPartitioner, murmur2 of the key) puts its crawl.discovered record,
    which dedup keeps: what crawl.fetch holds after dedup admitted these URLs."""
    producer = make_producer(settings)
    partitioner = DefaultPartitioner()
    partitions = list(range(HOST_PARTITIONS))
    await producer.start()
    now = time.time()
    try:
        futures = []
        for url in urls:
            canonical = canonical_url(url, settings)
            host = host_of(canonical)
            record = Fetch(
                url=canonical,
                host=host,
                crawl_id=crawl_id,
                depth=1,
                priority=5,
                scope=Scope(
                    allow_domains=[hostname_of(canonical)],
                    max_depth=settings.max_depth,
                    max_pages=settings.max_pages,
                ),
                discovered_at=now,
                admitted_at=now,
            )
            key = host.encode()
            partition = partitioner(key, partitions, partitions)
            futures.append(
                await producer.send(
                    settings.topic_prefix + FETCH, encode(record), key=key, partition=partition
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(urls)
