"""The ``streamcrawl`` command line."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence

from .core.config import Settings
from .core.kafka import KafkaAccessError, check_kafka_access
from .core.secrets import install_log_redaction
from .core.topics import FETCH, FETCHER_GROUP, GROUP_INPUTS, HOST_PARTITIONS
from .localstack.provision import ProvisionError
from .localstack.stack import LocalStack, StackConfig, StackError
from .registry import STAGE_NAMES

log = logging.getLogger("streamcrawl")


def _stack_up(args: argparse.Namespace) -> int:
    config = StackConfig.from_env()
    if args.brokers is not None:
        config = dataclasses.replace(config, brokers=args.brokers)
    if args.secure:
        config = dataclasses.replace(config, secure=True)
    stack = LocalStack(config)
    stack.up(timeout=args.timeout)
    for status in stack.status():
        print(
            f"# {status.name}: {status.version}, pid {status.pid}, 127.0.0.1:{status.port}",
            file=sys.stderr,
        )
    for key, value in stack.config.connection_env().items():
        print(f"export {key}={value}")
    return 0


def _stack_provision(_: argparse.Namespace) -> int:
    from .localstack.provision import ensure_ferretdb, ensure_kafka

    config = StackConfig.from_env()
    kafka = ensure_kafka(config.cache_dir)
    ferretdb = ensure_ferretdb(config.cache_dir)
    print(f"Kafka {kafka.version}: {kafka.libs}\nFerretDB: {ferretdb}")
    return 0


def _stack_down(args: argparse.Namespace) -> int:
    stopped = LocalStack(StackConfig.from_env()).down(purge=args.purge)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _stack_status(_: argparse.Namespace) -> int:
    rows = LocalStack(StackConfig.from_env()).status()
    for row in rows:
        state = "answering" if row.answering else ("running" if row.running else "stopped")
        pid = row.pid if row.pid is not None else "-"
        print(f"{row.name:6} {state:10} pid={pid} port={row.port} ({row.version})")
    return 0 if all(row.answering for row in rows) else 3


def _topics_create(_: argparse.Namespace) -> int:
    from .core.kafka import create_topics

    settings = Settings.from_env()
    asyncio.run(check_kafka_access(settings))
    created = asyncio.run(create_topics(settings))
    print("created: " + (", ".join(created) if created else "all topics already exist"))
    return 0


def _run_stage(args: argparse.Namespace) -> int:
    from .runner import run_stage

    settings = Settings.from_env()
    logging.getLogger().setLevel(settings.log_level.upper())
    run_stage(args.stage, settings)
    return 0


def _seed(args: argparse.Namespace) -> int:
    from .crawl.seeds import SeedOptions, produce_seeds, seed_payloads

    urls = [line.strip() for line in sys.stdin] if args.urls == ["-"] else list(args.urls)
    options = SeedOptions(
        crawl_id=args.crawl_id,
        priority=args.priority,
        max_depth=args.max_depth,
        max_pages=args.max_pages,
        allow_domains=tuple(args.allow_domain),
    )
    # Without options, the plain-text form: exactly what kcat would send.
    payloads = seed_payloads([url for url in urls if url], options)
    settings = Settings.from_env()
    asyncio.run(check_kafka_access(settings))
    sent = asyncio.run(produce_seeds(settings, payloads))
    print(f"produced {sent} seed(s)")
    return 0


def _lag(args: argparse.Namespace) -> int:
    from .core.kafka import group_lag
    from .crawl.autoscale import keda_replicas

    settings = Settings.from_env()
    asyncio.run(check_kafka_access(settings))
    groups = [args.group] if args.group else list(GROUP_INPUTS)
    fetch_lag = lagging = 0
    for group in groups:
        topics = [settings.topic_prefix + suffix for suffix in GROUP_INPUTS.get(group, (FETCH,))]
        for row in asyncio.run(group_lag(settings, group, topics)):
            committed = "-" if row.committed is None else str(row.committed)
            print(
                f"{row.group:22} {row.topic:18} {row.partition:3} end={row.end_offset:<8} "
                f"committed={committed:<8} lag={row.lag}"
            )
            if row.group == FETCHER_GROUP:
                fetch_lag += row.lag
                lagging += row.lag > 0
    replicas = keda_replicas(
        fetch_lag,
        HOST_PARTITIONS,
        args.lag_threshold,
        args.activation_threshold,
        args.min_replicas,
        args.max_replicas,
        partitions_with_lag=lagging,
    )
    print(
        f"fetcher lag {fetch_lag} in {lagging} partition(s): KEDA would run {replicas} "
        f"fetcher replica(s) (lagThreshold={args.lag_threshold}, "
        f"activation={args.activation_threshold}, min={args.min_replicas}, "
        f"max={args.max_replicas}, partitions={HOST_PARTITIONS}, limitToPartitionsWithLag)"
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    from .crawl.status import status_report

    code, text = asyncio.run(
        status_report(Settings.from_env(), args.crawl_id, args.top, args.sort, args.json)
    )
    print(text, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _control(args: argparse.Namespace) -> int:
    from .core.control import command_state, send_control

    settings = Settings.from_env()
    asyncio.run(check_kafka_access(settings))
    sent = asyncio.run(send_control(settings, args.crawl_ids, command_state(args.command)))
    for record in sent:
        print(f"crawl {record.crawl_id}: {record.state}")
    return 0


def _crawl(args: argparse.Namespace) -> int:
    from .crawl.local import crawl_command

    return crawl_command(args)


def _recrawl(args: argparse.Namespace) -> int:
    from .crawl.recrawl import recrawl_command

    return recrawl_command(args)


def _schedule(args: argparse.Namespace) -> int:
    import uvloop

    from .scheduler.service import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    uvloop.run(serve(Settings.from_env(), args.crawl_id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamcrawl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    stack = commands.add_parser("stack", help="the local Kafka + MongoDB-wire stack (no Docker)")
    stack_commands = stack.add_subparsers(dest="action", required=True)
    up = stack_commands.add_parser("up", help="provision, start (or reuse) and wait until ready")
    up.add_argument("--timeout", type=float, default=180.0)
    up.add_argument(
        "--brokers",
        type=_broker_count,
        help="Kafka nodes (combined broker+controller; 3: a 3-voter quorum and topics with "
        "3 replicas, min.insync.replicas 2). Default: what the data directory holds, else 1",
    )
    up.add_argument(
        "--secure",
        action="store_true",
        help="Kafka clients on SASL_SSL: SCRAM-SHA-512 over TLS, a CA and broker certificate "
        "made with keytool, the password in a 0600 file; prints the exports to use it",
    )
    up.set_defaults(handler=_stack_up)
    stack_commands.add_parser("provision", help="download and build the servers only").set_defaults(
        handler=_stack_provision
    )
    down = stack_commands.add_parser("down", help="stop the processes 'up' started")
    down.add_argument("--purge", action="store_true", help="also delete the data directory")
    down.set_defaults(handler=_stack_down)
    stack_commands.add_parser("status", help="what runs").set_defaults(handler=_stack_status)

    topics = commands.add_parser("topics", help="manage the pipeline topics")
    topic_commands = topics.add_subparsers(dest="action", required=True)
    topic_commands.add_parser("create", help="create the topics").set_defaults(
        handler=_topics_create
    )

    # The stage's class is imported only once the arguments are parsed: ``run STAGE --help``
    # never imports a stage.
    run = commands.add_parser("run", help="run one stage, as a pod would")
    run.add_argument("stage", choices=STAGE_NAMES)
    run.set_defaults(handler=_run_stage)

    seed = commands.add_parser("seed", help="produce seed URLs to crawl.seeds")
    seed.add_argument("urls", nargs="+", metavar="URL", help="URLs, or - to read stdin")
    _add_scope_options(seed)
    seed.add_argument("--priority", type=int)
    seed.set_defaults(handler=_seed)

    crawl = commands.add_parser("crawl", help="crawl locally through every stage")
    crawl.add_argument("urls", nargs="*", metavar="URL")
    _add_scope_options(crawl)
    crawl.add_argument(
        "--demo",
        action="store_true",
        help="generate a site, serve it with nginx on 127.0.0.1 and crawl it",
    )
    crawl.add_argument("--demo-pages", type=int, default=2000)
    crawl.add_argument("--timeout", type=float, default=None, help="give up after N seconds")
    crawl.add_argument(
        "--count-stored",
        action="store_true",
        help="end by counting this crawl's documents in MongoDB (a FerretDB/SQLite count scans "
        "the collection); by default the summary counts the sink's writes from Kafka offsets",
    )
    crawl.add_argument(
        "--autoscale",
        metavar="MIN:MAX",
        help="scale fetcher processes on crawl.fetch lag, as KEDA would",
    )
    crawl.add_argument(
        "--lag-threshold", type=int, default=100, help="KEDA lagThreshold for --autoscale"
    )
    crawl.add_argument(
        "--polling-interval",
        type=float,
        default=5.0,
        help="seconds between scaling decisions (KEDA pollingInterval)",
    )
    crawl.add_argument(
        "--cooldown", type=float, default=30.0, help="scale-down stabilisation window in seconds"
    )
    crawl.set_defaults(handler=_crawl)

    recrawl = commands.add_parser(
        "recrawl",
        help="revisit a crawl's stored pages with conditional requests (If-None-Match, "
        "If-Modified-Since): unchanged pages only get checked_at on their status documents, "
        "changed ones are rewritten",
    )
    recrawl.add_argument("crawl_id", metavar="CRAWL_ID")
    recrawl.add_argument(
        "--round",
        type=_round_id,
        help="the revisit round (dedup admits a URL once per round); default: the Unix second",
    )
    recrawl.add_argument(
        "--run",
        action="store_true",
        help="run every stage locally until the round is drained, as crawl does, then print "
        "a summary; without it the revisits are only queued for a running pipeline",
    )
    recrawl.add_argument(
        "--from-pages",
        action="store_true",
        help="read the crawl's pages instead of their status documents (slower): once, for "
        "a crawl stored partly before status documents existed; the sink writes the "
        "missing ones as it checks the pages",
    )
    recrawl.add_argument("--timeout", type=float, default=None, help="give up after N seconds")
    recrawl.set_defaults(handler=_recrawl)

    schedule = commands.add_parser(
        "schedule",
        help="the scheduler: queue a revisit of each stored page when its next_visit (the "
        "adaptive revisit schedule) comes, until stopped",
    )
    schedule.add_argument("--crawl-id", default=None, help="only this crawl's pages")
    schedule.set_defaults(handler=_schedule)

    status = commands.add_parser(
        "status", help="crawls and their numbers, from the stats stage (STREAMCRAWL_STATS_URL)"
    )
    status.add_argument("crawl_id", nargs="?", metavar="CRAWL_ID", help="one crawl and its hosts")
    status.add_argument("--json", action="store_true", help="JSON, for scripts")
    status.add_argument("--top", type=int, default=20, help="hosts shown for one crawl")
    status.add_argument(
        "--sort",
        default="errors",
        choices=["errors", "fetched", "latency_p95_s", "latency_mean_s", "host"],
        help="order of the hosts",
    )
    status.set_defaults(handler=_status)

    for command, summary in (
        ("pause", "pause crawls: their URLs wait in crawl.retry, nothing of them is fetched"),
        ("resume", "resume paused crawls"),
        ("cancel", "cancel crawls for good: their URLs are dropped and counted as cancelled"),
    ):
        control = commands.add_parser(command, help=summary + " (crawl.control)")
        control.add_argument("crawl_ids", nargs="+", metavar="CRAWL_ID")
        control.set_defaults(handler=_control)

    lag = commands.add_parser("lag", help="consumer lag, and what KEDA would scale to")
    lag.add_argument("--group", choices=list(GROUP_INPUTS))
    lag.add_argument("--lag-threshold", type=int, default=100)
    lag.add_argument("--activation-threshold", type=int, default=1)
    lag.add_argument("--min-replicas", type=int, default=1)
    lag.add_argument("--max-replicas", type=int, default=HOST_PARTITIONS)
    lag.set_defaults(handler=_lag)
    return parser


def _broker_count(text: str) -> int:
    count = int(text)
    if not 1 <= count <= 9:
        raise argparse.ArgumentTypeError("between 1 and 9 brokers")
    return count


def _round_id(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a round is a positive integer")
    return value


def _add_scope_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--crawl-id")
    parser.add_argument("--max-pages", type=int)
    parser.add_argument("--max-depth", type=int)
    parser.add_argument(
        "--allow-domain",
        action="append",
        default=[],
        help="keep the crawl on this domain (repeatable)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    install_log_redaction()
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (StackError, ProvisionError, KafkaAccessError, ValueError) as exc:
        print(f"streamcrawl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
