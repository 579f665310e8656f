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


def test_every_public_definition_has_a_docstring():
    """Module-level functions and classes, and the public methods of public classes, under the
    product's packages (a newcomer reads shapes, units, errors and sources there)."""
    import ast

    missing = []
    for package in ("agent", "retrieval", "connectors", "surfaces", "prompts", "common"):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body:
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    continue
                if node.name.startswith("_"):
                    continue
                defs = [(node.name, node)]
                if isinstance(node, ast.ClassDef):
                    defs += [
                        (f"{node.name}.{sub.name}", sub)
                        for sub in node.body
                        if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef)
                        and not sub.name.startswith("_")
                    ]
                missing += [
                    f"{path.relative_to(ROOT)}:{d.lineno} {name}"
                    for name, d in defs
                    if ast.get_docstring(d) is None
                ]
    assert not missing, "no docstring: " + ", ".join(missing)
