"""The dependency rule, as CI enforces it: ``lint-imports`` checks the contracts in pyproject.toml
(imports point down, surfaces -> agent -> retrieval/prompts -> connectors; the core imports neither
the surfaces nor their frameworks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    # both contracts were read and checked (an empty configuration would pass as well)
    assert "Contracts: 2 kept, 0 broken." in report, report
