"""Shared fixtures. Integration tests run against a real Kafka broker and a real
MongoDB-wire server, started once per session on free ports by the same code as
``streamcrawl stack up`` (they reuse its download cache)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.crawl.local import free_port
from streamcrawl.localstack.stack import StackConfig

# Re-exported: the tests import these from here.
from .support.crawl import KCAT, isolated_settings, kcat_consume
from .support.stack import running_stack

__all__ = ["KCAT", "free_port", "isolated_settings", "kcat_consume"]


def pytest_sessionstart(session: pytest.Session) -> None:
    # A run stopped with SIGTERM (a CI time-out, `timeout`) should still tear down the
    # servers it started: turn the signal into the interrupt pytest cleans up after.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    with running_stack(tmp_path_factory.mktemp("stack")) as local:
        yield local.config


@pytest.fixture()
def settings(stack: StackConfig) -> Settings:
    return isolated_settings(stack)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
