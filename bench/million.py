"""A million-page crawl end to end, from one seed, with every process's memory watched.

    bench/million [--pages 1000000] [--links 10] [--page-kb 3] [--concurrency 64]
                  [--out DIR] [--work DIR] [--no-record] [--keep]

Generates a site of ``--pages`` small pages (bench/_tree_site.py: a tree within the default
``max_depth``, so all of them are reachable and each must be stored once), serves it with one
nginx, starts a private local stack (Kafka with a 512 MiB heap, FerretDB as the stack starts
it) and runs ``streamcrawl crawl`` on the entry page with the default settings except
``CRAWL_DELAY=0``, ``ALLOW_NETWORKS=127.0.0.1/32`` and ``FETCH_PER_HOST_CONCURRENCY``.

Every 10 s it records each process's RSS and CPU (the crawl command, each stage, the Kafka
JVM, FerretDB, nginx) to ``samples.csv`` and the pipeline's progress from Kafka offsets (the
sink group's commits on crawl.pages; MongoDB is not scanned during the run) with the Kafka,
FerretDB and dedup-snapshot disk use to ``progress.csv``. At the end: total time, pages/s
over time, Bloom memory (the dedup snapshots' size), Kafka disk, MongoDB size and a count,
CPU by process, peak RSS and whether it stayed flat over the second half, and the pages
nginx served more than once. Plots go to bench/million-memory.png and
bench/million-rate.png, the report to ``--out``/report.md and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
INTERVAL = 10.0
# RSS counts as flat when its maximum over the second half of the run is within this
# much of its value at the midpoint (a ratio, or an absolute slack for small processes).
FLAT_RATIO = 1.10
FLAT_SLACK_KIB = 32 * 1024
RSS_LIMIT_KIB = 1024 * 1024


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/million", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=1_000_000)
    parser.add_argument("--links", type=int, default=10, help="links per page (at least)")
    parser.add_argument("--page-kb", type=float, default=3.0, help="page size, KiB")
    parser.add_argument("--concurrency", type=int, default=64, help="per-host concurrency")
    parser.add_argument("--kafka-heap", default="512m", help="Kafka JVM -Xmx")
    parser.add_argument("--out", type=Path, help="results directory (default bench/out/...)")
    parser.add_argument("--work", type=Path, help="site and stack directory (default: a temp)")
    parser.add_argument("--plots", type=Path, default=BENCH, help="where the PNGs go")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the site and stack data")
    parser.add_argument(
        "--analyse",
        type=Path,
        metavar="OUT",
        help="only summarise the samples of a run (finished or still going) in OUT, and plot",
    )
    return parser.parse_args(argv)


def _log(text: str) -> None:
    print(f"[million {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def du_bytes(path: Path, suffix: str = "") -> int:
    """Bytes of the files under ``path`` (allocated blocks, as du counts them)."""
    total = 0
    if not path.exists():
        return 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            if suffix and not name.endswith(suffix):
                continue
            try:
                total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


# ---- sampling ---------------------------------------------------------------------------


@dataclass
class Watched:
    """The processes sampled: fixed servers, and every descendant of the crawl command."""

    fixed: dict[int, str]
    root: int | None = None
    labels: dict[int, str] = field(default_factory=dict)

    def current(self) -> dict[int, str]:
        from _procs import descendants
        from _systems import _stage_label

        pids = dict(self.fixed)
        if self.root is not None:
            pids.setdefault(self.root, "crawl command")
            for pid in descendants(self.root):
                if pid not in self.labels:
                    self.labels[pid] = _stage_label(pid)
                pids[pid] = self.labels[pid]
        return pids


class Recorder(threading.Thread):
    """Every ``INTERVAL`` s: one samples.csv row per process, one progress.csv row."""

    def __init__(self, out: Path, watched: Watched, progress: Any, disks: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.watched = watched
        self.progress = progress  # () -> dict of counts, from Kafka offsets
        self.disks = disks  # name -> () -> bytes
        self.started = time.monotonic()
        self._halt = threading.Event()
        self.samples_csv = out / "samples.csv"
        self.progress_csv = out / "progress.csv"
        self.samples_csv.write_text("t,process,pid,rss_kib,hwm_kib,cpu_s\n", encoding="utf-8")
        self.progress_csv.unlink(missing_ok=True)
        self.errors = 0

    def sample(self) -> None:
        from _procs import cpu_seconds, status_kib

        t = round(time.monotonic() - self.started, 1)
        rows = []
        for pid, name in self.watched.current().items():
            cpu = cpu_seconds(pid)
            rss = status_kib(pid, "VmRSS")
            if cpu is None or rss is None:
                continue
            hwm = status_kib(pid, "VmHWM") or rss
            rows.append([t, name, pid, rss, hwm, f"{cpu:.2f}"])
        with open(self.samples_csv, "a", newline="", encoding="utf-8") as samples:
            csv.writer(samples).writerows(rows)
        try:
            row = {"t": t, **self.progress()}
        except Exception as exc:  # a slow broker answer must not end the recording
            self.errors += 1
            _log(f"progress probe failed ({exc!r}); the next sample tries again")
            return
        for name, measure in self.disks.items():
            row[name] = measure()
        new = not self.progress_csv.exists()
        with open(self.progress_csv, "a", newline="", encoding="utf-8") as progress:
            writer = csv.DictWriter(progress, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(INTERVAL)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


# ---- the run ----------------------------------------------------------------------------


def git_commit() -> tuple[str, bool]:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "services", "schemas", "bench"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    return commit, dirty


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` cleans up as Ctrl-C does
    if args.analyse:
        print(render_partial(args.analyse.resolve(), plots(args.analyse.resolve(), args.plots)))
        return
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or BENCH / "out" / f"million-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-million-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_commit()
    meta: dict[str, Any] = {
        "command": shlex.join(["bench/million", *argv]),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "out": str(out),
        "work": str(work),
    }
    _log(f"results in {out}, site and stack in {work}")
    try:
        report = run(args, out, work, meta)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if (out / "samples.csv").exists():
        report["plots"] = [str(path) for path in plots(out, args.plots)]
    text = render(report)
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    print(text)
    if not args.no_record:
        with open(RESULTS, "a", encoding="utf-8") as results:
            results.write("\n" + text + "\n")
        _log(f"appended to {RESULTS}")


def run(args: argparse.Namespace, out: Path, work: Path, meta: dict[str, Any]) -> dict[str, Any]:
    import _tree_site
    from _systems import Loop, Stack
    from streamcrawl.core.config import Settings
    from streamcrawl.demo.nginx import NginxSite

    port, *stack_ports = free_ports(4)
    max_depth = Settings().max_depth
    began = time.monotonic()
    site = _tree_site.generate(
        work / "site", port, args.pages, args.links, int(args.page_kb * 1024), max_depth
    )
    meta["site"] = site.description
    meta["generate_s"] = time.monotonic() - began
    _log(f"site: {site.description} (written in {meta['generate_s']:.0f}s)")
    stack = Stack(work / "stack", tuple(stack_ports), kafka_heap=args.kafka_heap)  # type: ignore[arg-type]
    loop = Loop()
    report: dict[str, Any] = {"meta": meta}
    with NginxSite(work / "site", port) as server:
        try:
            _log("starting the private stack")
            stack.up()
            report.update(crawl(args, out, work, site, server, stack, loop))
        finally:
            loop.close()
            stack.down()
    report["log"] = read_access_log(server.access_log, site.pages)
    meta["total_s"] = time.monotonic() - began
    meta["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    report["checks"] = checks(report, site.pages)
    return report


def crawl(
    args: argparse.Namespace,
    out: Path,
    work: Path,
    site: Any,
    server: Any,
    stack: Any,
    loop: Any,
) -> dict[str, Any]:
    from _procs import descendants, kafka_log_bytes, wait_child
    from streamcrawl.core.config import Settings
    from streamcrawl.crawl.watch import PipelineWatch

    tag = f"million{int(time.time())}"
    prefix = f"{tag}."
    state_dir = work / "dedup-state"
    env = {
        **os.environ,
        **stack.env(),
        "STREAMCRAWL_ALLOW_NETWORKS": "127.0.0.1/32",
        "STREAMCRAWL_CRAWL_DELAY": "0",
        "STREAMCRAWL_FETCH_PER_HOST_CONCURRENCY": str(args.concurrency),
        "STREAMCRAWL_TOPIC_PREFIX": prefix,
        "STREAMCRAWL_MONGO_COLLECTION": tag,
        "STREAMCRAWL_STATE_DIR": str(state_dir),
    }
    settings = Settings.from_env(env)

    async def started_watch() -> PipelineWatch:
        watch = PipelineWatch(settings)  # aiokafka clients bind to the loop they are made in
        await watch.start()
        return watch

    watch = loop.run(started_watch())

    def progress() -> dict[str, int]:
        p = loop.run(watch.progress(), 60)
        return {
            "fetched": p.fetched,
            "parsed": p.parsed,
            "stored": p.stored,
            "fetch_queue": p.queued,
            "dead_letters": p.errors,
            "lag_total": p.lag_total,
        }

    master = int((server.root / "nginx.pid").read_text().strip())
    fixed = {
        stack.pids["Kafka JVM"]: "Kafka JVM",
        stack.pids["FerretDB"]: "FerretDB",
        master: "nginx master",
        **{pid: "nginx worker" for pid in descendants(master)},
    }
    mongo_data = stack.config.data_dir / "mongo" / "data"
    disks = {
        "kafka_bytes": lambda: sum(kafka_log_bytes(stack.kafka_data, prefix).values()),
        "ferretdb_bytes": lambda: du_bytes(mongo_data),
        "bloom_snapshot_bytes": lambda: du_bytes(state_dir),
    }
    watched = Watched(fixed)
    recorder = Recorder(out, watched, progress, disks)
    command = [sys.executable, "-m", "streamcrawl.cli", "crawl", site.entry_url]
    _log(f"crawl: {shlex.join(command)} (log: {out / 'crawl.log'})")
    started = time.monotonic()
    with open(out / "crawl.log", "wb") as log_file:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: its stages can be found and stopped
        )
    watched.root = process.pid
    recorder.start()
    try:
        code, usage, _ = wait_child(process.pid, None, timeout=7 * 24 * 3600.0, every=1.0)
    except BaseException:
        stop_crawl(process.pid)
        raise
    finally:
        recorder.stop()
    crawl_s = time.monotonic() - started
    loop.run(watch.stop())
    _log(f"crawl exited {code} after {crawl_s:.0f}s; counting what was stored")
    counts = count_documents(stack.config.mongo_uri, settings)
    result = {
        "crawl": {
            "exit_code": code,
            "wall_s": crawl_s,
            "cpu_s_wait4": (usage.ru_utime + usage.ru_stime) if usage else None,
            "summary": (out / "crawl.log").read_text(errors="replace")[-1200:],
            **counts,
            "probe_errors": recorder.errors,
        },
        "disk": {
            "kafka_bytes": sum(kafka_log_bytes(stack.kafka_data, prefix).values()),
            "kafka_by_topic": {
                topic[len(prefix) :]: size
                for topic, size in sorted(kafka_log_bytes(stack.kafka_data, prefix).items())
            },
            "kafka_data_dir_bytes": du_bytes(stack.kafka_data),
            "ferretdb_bytes": du_bytes(mongo_data),
            "bloom_snapshot_bytes": du_bytes(state_dir),
            "bloom_snapshot_files": sorted(
                (p.name, p.stat().st_size) for p in state_dir.rglob("*") if p.is_file()
            )
            if state_dir.exists()
            else [],
        },
    }
    result["series"] = analyse(out)
    return result


def stop_crawl(pid: int, grace: float = 60.0) -> None:
    """Interrupted: SIGTERM to the crawl command's process group (the stages drain and
    commit on SIGTERM; SIGINT would not do, a background job ignores it), then SIGKILL to
    whatever is left after ``grace`` s, so no stage outlives the stack."""
    _log(f"stopping the crawl command {pid} and its stages")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap the command, or its zombie keeps the group
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def count_documents(uri: str, settings: Any) -> dict[str, Any]:
    """The run's collection (it holds this crawl only): collStats' count, then an exact
    ``count_documents({})`` (a scan on FerretDB/SQLite), each timed. Distinct URLs need no
    count: ``_id`` is the canonical URL and ``url`` has a unique index."""
    from pymongo import MongoClient

    client: MongoClient[dict[str, Any]] = MongoClient(uri, socketTimeoutMS=7_200_000)
    try:
        database = client[settings.mongo_database]
        started = time.monotonic()
        stats = database.command("collStats", settings.mongo_collection)
        result: dict[str, Any] = {
            "collstats_count": stats.get("count"),
            "collstats_size": stats.get("size"),
            "collstats_storage_size": stats.get("storageSize"),
            "collstats_s": time.monotonic() - started,
        }
        _log(f"collStats: {result['collstats_count']} documents ({result['collstats_s']:.1f}s)")
        started = time.monotonic()
        result["stored_count"] = database[settings.mongo_collection].count_documents({})
        result["count_s"] = time.monotonic() - started
        _log(f"count_documents: {result['stored_count']} ({result['count_s']:.1f}s)")
        return result
    finally:
        client.close()


def read_access_log(path: Path, pages: int) -> dict[str, Any]:
    """One pass over nginx's log: requests by status, and how many times each page was
    requested (a byte per page; no per-line objects, so a million lines stay cheap)."""
    from _tree_site import page_number

    times = bytearray(pages)
    statuses: Counter[str] = Counter()
    other: Counter[str] = Counter()
    requests = 0
    first = last = 0.0
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 6 or parts[5] == "streamcrawl-nginx-readiness-probe":
                continue
            requests += 1
            ts = float(parts[0])
            first = first or ts
            last = ts
            statuses[parts[3]] += 1
            number = page_number(parts[2])
            if number is None or number >= pages:
                other[parts[2]] += 1
            elif times[number] < 255:
                times[number] += 1
    twice = [n for n in range(pages) if times[n] > 1]
    return {
        "requests": requests,
        "statuses": dict(statuses),
        "pages_requested": sum(1 for value in times if value),
        "duplicate_pages": len(twice),
        "duplicate_requests": sum(times[n] - 1 for n in twice),
        "duplicate_examples": twice[:5],
        "other_paths": dict(other.most_common(5)),
        "other_duplicates": sum(count - 1 for count in other.values() if count > 1),
        "window_s": last - first,
    }


# ---- analysis ---------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def analyse(out: Path) -> dict[str, Any]:
    """Per process: peak RSS, RSS at the midpoint and the max over the second half, CPU;
    and the pages/s series. Replicas and nginx workers are kept apart by pid."""
    rows = _read_csv(out / "samples.csv")
    progress = _read_csv(out / "progress.csv")
    end = max((float(r["t"]) for r in rows), default=0.0)
    middle = end / 2
    per: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        per.setdefault((row["process"], row["pid"]), []).append(row)
    processes = []
    for (name, pid), samples in per.items():
        times = [float(s["t"]) for s in samples]
        rss = [int(s["rss_kib"]) for s in samples]
        cpu = [float(s["cpu_s"]) for s in samples]
        second = [r for t, r in zip(times, rss, strict=True) if t >= middle]
        at_mid = next((r for t, r in zip(times, rss, strict=True) if t >= middle), rss[-1])
        peak = max(max(rss), max(int(s["hwm_kib"]) for s in samples))
        growth = (max(second) - at_mid) if second else 0
        processes.append(
            {
                "process": name,
                "pid": int(pid),
                "samples": len(samples),
                "peak_rss_kib": peak,
                "rss_mid_kib": at_mid,
                "rss_second_half_max_kib": max(second) if second else None,
                "rss_last_kib": rss[-1],
                "second_half_growth_kib": growth,
                "flat": growth <= max(FLAT_SLACK_KIB, at_mid * (FLAT_RATIO - 1)),
                "under_1gib": peak < RSS_LIMIT_KIB,
                "cpu_s": cpu[-1] - cpu[0],
            }
        )
    processes.sort(key=lambda p: (_order(str(p["process"])), int(str(p["pid"]))))
    rates = []
    for before, after in itertools.pairwise(progress):
        dt = float(after["t"]) - float(before["t"])
        if dt > 0:
            rates.append(
                {
                    "t": float(after["t"]),
                    "stored_per_s": (int(after["stored"]) - int(before["stored"])) / dt,
                    "fetched_per_s": (int(after["fetched"]) - int(before["fetched"])) / dt,
                }
            )
    return {"processes": processes, "rates": rates, "progress_rows": len(progress)}


_ORDER = ("crawl command", "frontier", "dedup", "fetcher", "delay", "parser", "sink")


def _order(name: str) -> int:
    base = name.split("-")[0]
    if base in _ORDER:
        return _ORDER.index(base)
    return len(_ORDER) + ("Kafka JVM", "FerretDB", "nginx master", "nginx worker").index(name)


def plots(out: Path, target: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_csv(out / "samples.csv")
    progress = _read_csv(out / "progress.csv")
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        key = row["process"] if row["process"] != "nginx worker" else "nginx worker"
        label = f"{key} ({row['pid']})" if key.startswith("fetcher-") else key
        ts, mib = series.setdefault(label, ([], []))
        ts.append(float(row["t"]) / 60)
        mib.append(int(row["rss_kib"]) / 1024)
    figure, axis = plt.subplots(figsize=(10, 5.5))
    for label, (ts, mib) in sorted(series.items(), key=lambda item: _order(item[0].split(" (")[0])):
        axis.plot(ts, mib, label=label, linewidth=1.2)
    axis.axhline(1024, color="red", linestyle="--", linewidth=0.8, label="1 GiB")
    axis.set_xlabel("minutes since the crawl started")
    axis.set_ylabel("RSS, MiB")
    axis.set_title("bench/million: resident memory per process (sampled every 10 s)")
    axis.legend(fontsize=8, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    memory = target / "million-memory.png"
    figure.savefig(memory, dpi=100)
    plt.close(figure)

    ts = [float(r["t"]) / 60 for r in progress]
    stored = [int(r["stored"]) for r in progress]
    fetched = [int(r["fetched"]) for r in progress]
    figure, axis = plt.subplots(figsize=(10, 5))
    for name, values in (("stored (sink commits)", stored), ("fetched", fetched)):
        rate = [
            (b - a) / max(1e-9, (t1 - t0) * 60)
            for a, b, t0, t1 in zip(values, values[1:], ts, ts[1:], strict=False)
        ]
        axis.plot(ts[1:], rate, label=f"pages/s {name}, per 10 s", linewidth=0.8)
    window = 6
    rate_stored = [
        (stored[i] - stored[i - window]) / max(1e-9, (ts[i] - ts[i - window]) * 60)
        for i in range(window, len(stored))
    ]
    axis.plot(ts[window:], rate_stored, label="pages/s stored, 60 s average", linewidth=2)
    axis.set_xlabel("minutes since the crawl started")
    axis.set_ylabel("pages/s")
    axis.set_title("bench/million: pages per second (from Kafka offsets)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    rate_png = target / "million-rate.png"
    figure.savefig(rate_png, dpi=100)
    plt.close(figure)
    return [memory, rate_png]


def checks(report: dict[str, Any], pages: int) -> list[str]:
    notes = []
    crawl = report.get("crawl", {})
    log = report.get("log", {})
    if crawl.get("exit_code") != 0:
        notes.append(f"FAILED: the crawl command exited {crawl.get('exit_code')}")
    if crawl.get("stored_count") != pages:
        notes.append(f"FAILED: {crawl.get('stored_count')} documents stored, {pages} reachable")
    if log.get("duplicate_requests"):
        notes.append(
            f"FAILED: {log['duplicate_requests']} duplicate page requests, "
            f"e.g. {log['duplicate_examples']}"
        )
    if log.get("pages_requested") != pages:
        notes.append(f"FAILED: nginx served {log.get('pages_requested')} of {pages} pages")
    for proc in report.get("series", {}).get("processes", []):
        if not proc["under_1gib"]:
            peak = proc["peak_rss_kib"] / 1024
            notes.append(f"FAILED: {proc['process']} peaked at {peak:.0f} MiB")
        if not proc["flat"]:
            notes.append(
                f"NOT FLAT: {proc['process']} grew {proc['second_half_growth_kib'] / 1024:.0f} MiB "
                "over the second half"
            )
    return notes or ["all checks passed"]


# ---- report -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "?"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from streamcrawl.localstack.provision import FERRETDB_VERSION, KAFKA_VERSION

    memory = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    return {
        "nproc": os.cpu_count(),
        "model": model,
        "memory_gib": round(int(memory) / 1024 / 1024),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "kafka": KAFKA_VERSION,
        "ferretdb": FERRETDB_VERSION,
    }


def _mib(kib: float | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.0f}"


def _bytes_mib(size: int) -> str:
    return f"{size / 1024 / 1024:,.1f} MiB"


def render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    m = meta["machine"]
    crawl = report.get("crawl", {})
    disk = report.get("disk", {})
    log = report.get("log", {})
    series = report.get("series", {"processes": [], "rates": []})
    stored = crawl.get("stored_count") or 0
    wall = crawl.get("wall_s") or 0.0
    rates = [r["stored_per_s"] for r in series["rates"]]
    out = [
        f"## A million-URL run: bench/million ({meta['started_utc'][:10]})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Commit: {meta['commit']}. Machine: {m['nproc']} cores ({m['model']}), "
        f"{m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; Kafka {m['kafka']} "
        f"(-Xmx from --kafka-heap), FerretDB {m['ferretdb']} (SQLite), one nginx worker. "
        f"Load average {meta['load_before']} before, {meta.get('load_after', '?')} after. "
        f"Started {meta['started_utc']}.",
        "",
        f"Site: {meta.get('site', '?')}, written in {meta.get('generate_s', 0):.0f} s.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| crawl wall time (command start to drained exit) | {wall:,.0f} s |",
        f"| documents in MongoDB at the end (count) | {stored:,} |",
        f"| documents by collStats | {crawl.get('collstats_count')} |",
        f"| pages/s end to end (stored / wall) | {stored / wall if wall else 0:,.1f} |",
        f"| pages/s stored per 10 s: median, min, max | "
        f"{_median(rates):,.0f}, {min(rates, default=0):,.0f}, {max(rates, default=0):,.0f} |",
        f"| nginx: requests, pages served, window | {log.get('requests', 0):,}, "
        f"{log.get('pages_requested', 0):,}, {log.get('window_s', 0):,.0f} s |",
        f"| pages requested more than once (nginx log) | {log.get('duplicate_pages', 0)} "
        f"({log.get('duplicate_requests', 0)} extra requests) |",
        f"| Bloom filters (dedup snapshots on disk) | "
        f"{_bytes_mib(disk.get('bloom_snapshot_bytes', 0))} |",
        f"| Kafka disk, this run's topics (*.log) | {_bytes_mib(disk.get('kafka_bytes', 0))} |",
        f"| Kafka data dir (du, offsets topic included) | "
        f"{_bytes_mib(disk.get('kafka_data_dir_bytes', 0))} |",
        f"| MongoDB (FerretDB SQLite data dir, du) | {_bytes_mib(disk.get('ferretdb_bytes', 0))} |",
        f"| CPU s, the crawl command and its stages (wait4) | "
        f"{crawl.get('cpu_s_wait4') or 0:,.0f} |",
        f"| final count took | {crawl.get('count_s', 0):,.0f} s |",
        "",
        "| process | CPU s | CPU ms / page | peak RSS MiB | RSS at midpoint | max RSS 2nd half "
        "| flat | < 1 GiB |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in series["processes"]:
        per_page = p["cpu_s"] * 1000 / stored if stored else 0.0
        out.append(
            f"| {p['process']} | {p['cpu_s']:,.0f} | {per_page:.2f} | {_mib(p['peak_rss_kib'])} "
            f"| {_mib(p['rss_mid_kib'])} | {_mib(p['rss_second_half_max_kib'])} "
            f"| {'yes' if p['flat'] else 'NO'} | {'yes' if p['under_1gib'] else 'NO'} |"
        )
    topics = ", ".join(
        f"{name} {_bytes_mib(size)}" for name, size in disk.get("kafka_by_topic", {}).items()
    )
    out += [
        "",
        f"- Kafka by topic: {topics}",
        f"- nginx statuses: {log.get('statuses')}; other paths: {log.get('other_paths')}",
        f"- Checks: {'; '.join(report.get('checks', []))}",
        "- Plots: bench/million-memory.png (RSS per process), bench/million-rate.png (pages/s).",
        "- How: RSS (VmRSS) and CPU (utime+stime) of every process read from /proc every 10 s "
        "(peak RSS also takes the stage processes' VmHWM); progress from Kafka offsets (the sink "
        "group's commits on crawl.pages), never by scanning MongoDB during the run; CPU per "
        "process is the last sample minus the first, so a stage's last < 10 s are missed (the "
        "wait4 total covers them). Flat: the max over the second half is within "
        f"{(FLAT_RATIO - 1) * 100:.0f}% (or {FLAT_SLACK_KIB // 1024} MiB) of the value at the "
        "midpoint. Duplicates: nginx access log, pages requested more than once.",
        f"- Output: {meta['out']} (samples.csv, progress.csv, crawl.log, report.json).",
    ]
    return "\n".join(out)


def render_partial(out: Path, pngs: list[Path]) -> str:
    """What the samples of a run say so far: progress, rates and memory per process."""
    series = analyse(out)
    progress = _read_csv(out / "progress.csv")
    last = progress[-1] if progress else {}
    rates = [r["stored_per_s"] for r in series["rates"]]
    lines = [
        f"Samples in {out}: {len(progress)} progress rows, last at t={last.get('t')} s: "
        f"fetched {last.get('fetched')}, stored {last.get('stored')}, fetch queue "
        f"{last.get('fetch_queue')}, Kafka {int(last.get('kafka_bytes') or 0) / 2**20:,.0f} MiB, "
        f"FerretDB {int(last.get('ferretdb_bytes') or 0) / 2**20:,.0f} MiB, Bloom snapshots "
        f"{int(last.get('bloom_snapshot_bytes') or 0) / 2**20:,.1f} MiB",
        f"pages/s stored per 10 s: median {_median(rates):,.0f}, min {min(rates, default=0):,.0f}, "
        f"max {max(rates, default=0):,.0f}",
        "",
        "| process | CPU s | peak RSS MiB | RSS at midpoint | max RSS 2nd half | last RSS | flat |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in series["processes"]:
        lines.append(
            f"| {p['process']} | {p['cpu_s']:,.0f} | {_mib(p['peak_rss_kib'])} "
            f"| {_mib(p['rss_mid_kib'])} | {_mib(p['rss_second_half_max_kib'])} "
            f"| {_mib(p['rss_last_kib'])} | {'yes' if p['flat'] else 'NO'} |"
        )
    lines.append("")
    lines.append("Plots: " + ", ".join(str(png) for png in pngs))
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


if __name__ == "__main__":
    main()
