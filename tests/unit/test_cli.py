"""The command line: ``run`` knows every stage of the registry and answers ``--help``
without importing any stage."""

from __future__ import annotations

import subprocess
import sys

import pytest
from streamcrawl.cli import build_parser
from streamcrawl.registry import STAGE_NAMES, STAGES


def test_run_accepts_exactly_the_registered_stages() -> None:
    for stage in STAGE_NAMES:
        assert build_parser().parse_args(["run", stage]).stage == stage
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "no-such-stage"])


def test_run_stage_help_imports_no_stage() -> None:
    stage_modules = sorted({target.partition(":")[0] for target in STAGES.values()})
    probe = (
        "import sys\n"
        "from streamcrawl.cli import main\n"
        "for stage in sys.argv[1].split():\n"
        "    try:\n"
        "        main(['run', stage, '--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        "print('imported:', *(m for m in sys.argv[2].split() if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, " ".join(STAGE_NAMES), " ".join(stage_modules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == "imported:"
