"""The fault suite's report: each fault's figures as a JSON line (path from
``STREAMCRAWL_FAULTS_REPORT``, default ``faults.jsonl`` in pytest's base temp dir) and a
per-fault table printed at the end of the session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support.faults import FaultFigures, Recorder, table

_RESULTS: list[FaultFigures] = []
_REPORT: list[Path] = []


@pytest.fixture(scope="session")
def fault_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorder]:
    path = Path(
        os.environ.get("STREAMCRAWL_FAULTS_REPORT")
        or tmp_path_factory.getbasetemp() / "faults.jsonl"
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
