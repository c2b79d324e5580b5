"""The fault suite's report: each fault's figures as a JSON line (path from
``STREAMCRAWL_FAULTS_REPORT``, default ``bench/out/faults.jsonl``, which git ignores) and a
per-fault table printed at the end of the session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support.crawl import Site, served_site
from ..support.faults import FaultFigures, Recorder, table

# Small enough for CI: about 1,700 URLs, a minute a crawl on two cores.
SITE_PAGES = 1500
BROKEN_PAGES = 3  # the site's real failures: always 500, they must end in crawl.dlq
RETRY_BASE_DELAY = "3"  # seconds: the failing URLs' retries span the crawl

_RESULTS: list[FaultFigures] = []
_REPORT: list[Path] = []


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    with served_site(tmp_path / "site", SITE_PAGES, broken=BROKEN_PAGES) as served:
        yield served


@pytest.fixture(scope="session")
def fault_report(pytestconfig: pytest.Config) -> Iterator[Recorder]:
    path = Path(
        os.environ.get("STREAMCRAWL_FAULTS_REPORT")
        or pytestconfig.rootpath / "bench" / "out" / "faults.jsonl"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")  # this session's figures only
    _REPORT.append(path)

    def record(figures: FaultFigures) -> None:
        _RESULTS.append(figures)
        with path.open("a", encoding="utf-8") as out:
            out.write(figures.to_json() + "\n")

    yield record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RESULTS:
        return
    terminalreporter.section("fault suite: per-fault figures")
    for line in table(_RESULTS):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"figures as JSON lines: {_REPORT[-1]}")
