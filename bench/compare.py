"""Side by side on one site, in one run: the server's ceiling, a bare aiohttp crawl loop,
Scrapy, the streamcrawl fetcher alone and streamcrawl end to end.

    bench/compare [--pages 20000] [--concurrency 64] [--sites generated,docs]
                  [--systems ceiling,bare,scrapy,fetcher,e2e] [--json PATH]

Sites, each served by nginx (``streamcrawl.demo.nginx.NginxSite``) on 127.0.0.1:
``generated`` (``--pages`` pages, ``--links`` same-host links each, about ``--page-kb`` KiB)
and ``docs`` (Debian's python3.11-doc HTML, as is). Systems, all with per-host concurrency C:

- ceiling: aiohttp + uvloop GETs of every page URL of the site, no parsing (bench/_loops.py)
- bare: the twenty-line aiohttp + uvloop crawl loop: semaphore, set of seen URLs,
  selectolax links, same host (bench/_loops.py)
- scrapy: a CrawlSpider (bench/_scrapy.py), CONCURRENT_REQUESTS(_PER_DOMAIN) = C, robots.txt
  obeyed, no delay, no autothrottle, no HTTP cache
- fetcher: ``streamcrawl run fetcher`` on a crawl.fetch topic filled beforehand with one
  record per page URL, until crawl.fetched holds one record per URL
- e2e: ``streamcrawl crawl URL``, every stage it runs (eight processes; the scheduler too
  with STREAMCRAWL_SCHEDULE_ENABLED=1)

Pages are the 2xx HTML requests in nginx's access log; pages/s is over the log's window
(first to last request), and the wall time of each process is shown beside it. CPU is every
process's utime + stime: our children's from wait4, the stage processes' sampled from /proc,
Kafka's, FerretDB's and nginx's before and after. The streamcrawl runs use a private local
stack (its own data dir and ports), so its CPU is this benchmark's alone. By default the
streamcrawl measured is the committed HEAD (``git archive`` into a temporary directory put
first on PYTHONPATH), not the working tree; ``--tree worktree`` measures the working tree.
Results are printed as Markdown, appended to bench/RESULTS.md (``--no-record`` to skip),
and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
_SNAPSHOT = "BENCH_COMPARE_SNAPSHOT"
_COMMIT = "BENCH_COMPARE_COMMIT"
ALL_SITES = ("generated", "docs")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/compare", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=20_000, help="generated site pages")
    parser.add_argument("--links", type=int, default=30, help="links per generated page")
    parser.add_argument("--page-kb", type=float, default=16.0, help="generated page size, KiB")
    parser.add_argument("--concurrency", type=int, default=64, help="per-host concurrency C")
    parser.add_argument("--sites", default=",".join(ALL_SITES))
    parser.add_argument("--systems", default="ceiling,bare,scrapy,fetcher,e2e")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--tree", choices=("head", "worktree"), default="head")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per system run, s")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="measure on a freshly started broker and FerretDB (default: warm them first "
        "with one unmeasured end-to-end crawl of the first site)",
    )
    args = parser.parse_args(argv)
    args.site_list = _choices(args.sites, ALL_SITES, "--sites")
    args.system_list = _choices(
        args.systems, ("ceiling", "bare", "scrapy", "fetcher", "e2e"), "--systems"
    )
    return args


def _choices(raw: str, allowed: tuple[str, ...], option: str) -> list[str]:
    picked = [item.strip() for item in raw.split(",") if item.strip()]
    unknown = [item for item in picked if item not in allowed]
    if unknown or not picked:
        raise SystemExit(f"{option}: choose from {', '.join(allowed)} (got {raw!r})")
    return picked


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def snapshot_and_reexec(argv: list[str]) -> None:
    """Put HEAD's ``services/`` (as ``streamcrawl``) and ``schemas/`` in a temporary
    directory, first on PYTHONPATH (ahead of the editable install), and start again."""
    snap = Path(tempfile.mkdtemp(prefix="bench-compare-src-"))
    commit = _git("rev-parse", "--short", "HEAD")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "HEAD", "services", "schemas"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
    (snap / "src").mkdir()
    (snap / "services").rename(snap / "src" / "streamcrawl")
    (snap / "schemas").rename(snap / "src" / "streamcrawl" / "schemas")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(snap / "src"), env.get("PYTHONPATH", "")])
    )
    env[_SNAPSHOT] = str(snap)
    env[_COMMIT] = commit
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def machine() -> dict[str, Any]:
    model = "?"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    versions = {}
    for package in ("scrapy", "twisted", "aiohttp", "uvloop", "selectolax", "aiokafka"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "-"
    from streamcrawl.localstack.provision import FERRETDB_VERSION, KAFKA_VERSION
    from streamcrawl.localstack.stack import StackConfig

    return {
        "nproc": os.cpu_count(),
        "model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nginx": nginx.split("/", 1)[-1],
        "kafka": KAFKA_VERSION,
        "kafka_jvm_options": " ".join(StackConfig.from_env().kafka_jvm_options),
        "ferretdb": FERRETDB_VERSION,
        **versions,
    }


# ---- running ------------------------------------------------------------------------------


def run_site(name: str, args: argparse.Namespace, work: Path, stack: Any, loop: Any) -> dict:
    import _site
    from _systems import Bench
    from streamcrawl.demo.nginx import NginxSite

    root = work / name
    root.mkdir()
    port = free_ports(1)[0]
    started = time.monotonic()
    if name == "generated":
        info = _site.generate(root, port, args.pages, args.links, int(args.page_kb * 1024))
    else:
        info = _site.docs(root, port)
    _log(
        f"{name}: {info.description}, depth <= {info.max_depth} "
        f"(prepared in {time.monotonic() - started:.1f}s)"
    )
    results = []
    with NginxSite(root, port) as server:
        bench = Bench(info, server, work, args.concurrency, stack, args.timeout)
        if stack is not None and not args.cold and not stack.warmed:
            # A broker in service has long since compiled its hot paths; a fresh JVM
            # compiles them during the first crawl, which doubled Kafka's CPU per page.
            _log(f"{name}: warm-up crawl (not measured) ...")
            warm_up = bench.e2e()
            failed = f" ERROR {warm_up.error}" if warm_up.error else ""
            _log(f"{name}: warm-up: {warm_up.pages} pages{failed}")
            stack.warmed = True
        for system in args.system_list:
            _log(f"{name}: {system} ...")
            started = time.monotonic()
            result = bench.fetcher(loop) if system == "fetcher" else getattr(bench, system)()
            _log(
                f"{name}: {system}: {result.pages} pages, {result.requests} requests, "
                f"{result.duplicates} duplicate, {result.rate:.0f} pages/s "
                f"({time.monotonic() - started:.1f}s)"
                + (f" ERROR {result.error}" if result.error else "")
            )
            results.append(result)
    return {"info": info, "results": results}


def _log(text: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---- reporting ------------------------------------------------------------------------------


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _is_server(name: str) -> bool:
    return name.startswith("nginx")


def summary_table(results: list[Any]) -> str:
    from _systems import LABELS

    ceiling = next((r.wall_rate for r in results if r.system == "ceiling" and r.wall_s), None)
    lines = [
        "| system | HTML pages | requests | duplicate fetches | wall s | pages/s | vs ceiling "
        "| pages/s while fetching | client CPU s / 1k pages | nginx CPU s / 1k pages "
        "| client peak RSS MiB | Kafka bytes / page |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            first = r.error.splitlines()[0][:120] if r.error else ""
            lines.append(f"| {LABELS[r.system]} | failed: {first} |" + " |" * 10)
            continue
        per_k = 1000 / r.pages if r.pages else 0.0
        client = [p for p in r.procs if not _is_server(p.name)]
        server = [p for p in r.procs if _is_server(p.name)]
        kafka = "-" if r.kafka_bytes is None else _num(r.kafka_bytes / max(1, r.pages))
        ratio = f"{r.wall_rate / ceiling:.2f}x" if ceiling else "-"
        lines.append(
            f"| {LABELS[r.system]} | {r.pages:,} of {r.expected_pages:,} | {r.requests:,} "
            f"| {r.duplicates} | {r.wall_s:.1f} | {_num(r.wall_rate)} | {ratio} "
            f"| {_num(r.rate)} "
            f"| {sum(p.cpu_s for p in client) * per_k:.2f} "
            f"| {sum(p.cpu_s for p in server) * per_k:.2f} "
            f"| {_num(sum(p.peak_rss_kib for p in client) / 1024)} | {kafka} |"
        )
    return "\n".join(lines)


def process_table(results: list[Any]) -> str:
    lines = [
        "| system | process | CPU s | CPU s / 1k pages | peak RSS MiB | measured by |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        if r.error:
            continue
        per_k = 1000 / r.pages if r.pages else 0.0
        for p in r.procs:
            rss = _num(p.peak_rss_kib / 1024) if p.peak_rss_kib else "-"
            lines.append(
                f"| {r.system} | {p.name} | {p.cpu_s:.2f} | {p.cpu_s * per_k:.3f} | {rss} "
                f"| {p.how} |"
            )
    return "\n".join(lines)


def checks(results: list[Any]) -> list[str]:
    notes = []
    for r in results:
        if r.error:
            notes.append(f"{r.system}: FAILED: {r.error[:500]}")
            continue
        if r.duplicates:
            notes.append(
                f"{r.system}: {r.duplicates} duplicate fetches, e.g. {r.duplicate_examples}"
            )
        if r.pages != r.expected_pages:
            notes.append(
                f"{r.system}: {r.pages:,} HTML pages requested, {r.expected_pages:,} reachable"
            )
        d = r.detail
        if r.system == "e2e" and "stored" in d:
            notes.append(
                f"e2e: crawl summary: {int(d['stored']):,} documents stored, "
                f"{int(d.get('dead_letters', 0))} dead letters, drained in "
                f"{d.get('drained_s', 0):.1f}s, its own rate {d.get('summary_rate', 0):.1f} pages/s"
            )
        if r.system == "fetcher":
            notes.append(
                f"fetcher: {d.get('fetch_records', 0):,} crawl.fetch records in, "
                f"{d.get('fetched_records', 0):,} crawl.fetched, {d.get('retry_records', 0)} "
                f"crawl.retry, {d.get('dlq_records', 0)} crawl.dlq"
            )
        if d.get("kafka_topic_bytes"):
            per_page = ", ".join(
                f"{topic} {_num(size / max(1, r.pages))}"
                for topic, size in d["kafka_topic_bytes"].items()
                if size
            )
            notes.append(f"{r.system}: Kafka bytes per page by topic: {per_page}")
        if d.get("client_pss_peak_kib"):
            pss_mib = d["client_pss_peak_kib"] / 1024
            hwm_mib = d.get("client_hwm_kib", 0) / 1024
            notes.append(
                f"{r.system}: the crawl command and its stage processes: peak PSS {pss_mib:,.0f}"
                f" MiB summed (a page shared by n processes, as the modules of the fork server "
                f"the stages are forked from, counts 1/n in each), peak RSS {hwm_mib:,.0f} MiB "
                "summed (counted in full in every process)"
            )
        if r.system == "scrapy" and "reported" in d:
            notes.append(f"scrapy stats: {json.dumps(d['reported'])}")
        if "before_first_request_s" in d:
            notes.append(
                f"{r.system}: wall {r.wall_s:.1f} s = {d['before_first_request_s']:.1f} s to the "
                f"first request + {r.window_s:.1f} s of requests + "
                f"{d['after_last_request_s']:.1f} s after the last"
            )
        statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(r.statuses.items()))
        notes.append(f"{r.system}: responses by status: {statuses}")
    return notes


def render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    m = meta["machine"]
    out = [
        f"## Side by side: ceiling, bare loop, Scrapy, streamcrawl ({meta['date']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Commit: {meta['commit']} ({meta['tree']}). Machine: {m['nproc']} cores "
        f"({m['model']}), Linux {m['kernel']}, Python {m['python']}; nginx {m['nginx']} "
        f"(1 worker), Kafka {m['kafka']} (JVM options `{m.get('kafka_jvm_options') or 'none'}`), "
        f"FerretDB {m['ferretdb']}, Scrapy {m['scrapy']} "
        f"(Twisted {m['twisted']}), aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, "
        f"selectolax {m['selectolax']}, aiokafka {m['aiokafka']}. Per-host concurrency "
        f"C = {meta['concurrency']}. Load average {meta['load_before']} before, "
        f"{meta['load_after']} after; total run time {meta['total_s']:.0f} s."
        + (
            " Kafka and FerretDB were warmed by one unmeasured end-to-end crawl of the first "
            "site (`--cold` skips it)."
            if meta.get("warm")
            else ""
        ),
    ]
    for name, site in report["sites"].items():
        results = site["results"]
        out += [
            "",
            f"### {name}: {site['info'].description}",
            "",
            summary_table(results),
            "",
            process_table(results),
            "",
            *(f"- {note}" for note in checks(results)),
        ]
    out += ["", _HOW, ""]
    return "\n".join(out)


_HOW = """How to read it: HTML pages are the 2xx requests for .html (or directory) paths in
nginx's access log. wall s runs from the process's start to its exit (the fetcher alone: to
the moment crawl.fetched held one record per URL), start-up and shutdown included (for the
end-to-end crawl: topic creation, the stage processes starting, two quiet polls 0.25 s apart to
see it drained, the stages stopping); pages/s and vs ceiling divide the pages by it.
"pages/s while fetching" divides them by nginx's window (first to last request) instead: it
shows how fast the site was fetched, not when the work was done (the end-to-end crawl goes
on parsing, storing and sifting links after its last request). Client CPU is every process
but nginx: the Python process of the ceiling, bare and Scrapy runs; the fetcher and the
Kafka JVM for the fetcher alone; for the end-to-end run the crawl command, its stage
processes, the Kafka JVM and FerretDB. Client peak RSS adds each process's peak (VmHWM; for
Kafka, FerretDB and nginx the largest VmRSS sampled during the run). Kafka bytes are the
record segments (*.log) of the run's own topics in the broker's data directory after the
run (the fetcher run's include the prepared crawl.fetch records); consumer-offset commits
are not counted. A duplicate fetch is a path requested more than once."""


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.tree == "head" and not os.environ.get(_SNAPSHOT):
        snapshot_and_reexec(argv)
    began = time.monotonic()
    commit = os.environ.get(_COMMIT) or _git("rev-parse", "--short", "HEAD")
    tree = "committed HEAD" if args.tree == "head" else "working tree"
    if args.tree == "worktree" and _git("status", "--porcelain", "services", "schemas"):
        tree = "working tree with uncommitted changes in services/ or schemas/"
    from _systems import Loop, Stack

    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    stack = None
    loop = Loop()
    report: dict[str, Any] = {"sites": {}}
    try:
        if {"fetcher", "e2e"} & set(args.system_list):
            stack = Stack(work / "stack", tuple(free_ports(3)))  # type: ignore[arg-type]
            _log(f"starting a private local stack in {work / 'stack'}")
            stack.up()
        for name in args.site_list:
            report["sites"][name] = run_site(name, args, work, stack, loop)
    finally:
        loop.close()
        if stack is not None:
            stack.down()
        if args.keep:
            _log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        snap = os.environ.get(_SNAPSHOT)
        if snap:
            shutil.rmtree(snap, ignore_errors=True)
    report["meta"] = {
        "date": date.today().isoformat(),
        "command": shlex.join(["bench/compare", *argv]),
        "commit": commit,
        "tree": tree,
        "machine": machine(),
        "concurrency": args.concurrency,
        "warm": bool(stack is not None and stack.warmed),
        "load_before": load_before,
        "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "total_s": time.monotonic() - began,
    }
    text = render(report)
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "meta": report["meta"],
                    "sites": {
                        name: {
                            "info": vars(site["info"]) | {"page_urls": len(site["info"].page_urls)},
                            "results": [r.as_dict() for r in site["results"]],
                        }
                        for name, site in report["sites"].items()
                    },
                },
                indent=1,
            )
        )
    if not args.no_record:
        with open(RESULTS, "a", encoding="utf-8") as results:
            results.write("\n" + text)
        _log(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
