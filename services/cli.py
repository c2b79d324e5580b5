"""The ``streamcrawl`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from .core.config import Settings
from .core.kafka import create_topics
from .localstack.provision import ProvisionError
from .localstack.stack import LocalStack, StackConfig, StackError

log = logging.getLogger("streamcrawl")


def _stack_up(args: argparse.Namespace) -> int:
    config = StackConfig.from_env()
    stack = LocalStack(config)
    stack.up(timeout=args.timeout)
    for status in stack.status():
        print(f"# {status.name}: {status.version}, pid {status.pid}, 127.0.0.1:{status.port}",
              file=sys.stderr)
    for key, value in config.connection_env().items():
        print(f"export {key}={value}")
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
    created = asyncio.run(create_topics(Settings.from_env()))
    print("created: " + (", ".join(created) if created else "all topics already exist"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamcrawl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    stack = commands.add_parser("stack", help="the local Kafka + MongoDB-wire stack (no Docker)")
    stack_commands = stack.add_subparsers(dest="action", required=True)
    up = stack_commands.add_parser("up", help="provision, start (or reuse) and wait until ready")
    up.add_argument("--timeout", type=float, default=180.0)
    up.set_defaults(handler=_stack_up)
    down = stack_commands.add_parser("down", help="stop the processes 'up' started")
    down.add_argument("--purge", action="store_true", help="also delete the data directory")
    down.set_defaults(handler=_stack_down)
    stack_commands.add_parser("status", help="what runs").set_defaults(handler=_stack_status)

    topics = commands.add_parser("topics", help="manage the pipeline topics")
    topic_commands = topics.add_subparsers(dest="action", required=True)
    topic_commands.add_parser("create", help="create the topics").set_defaults(
        handler=_topics_create)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (StackError, ProvisionError, ValueError) as exc:
        print(f"streamcrawl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
