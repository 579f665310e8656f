"""A drug given as a Medication contained in its order is named wherever a clinician sees the
chart: ``ChartSight.record``, the ranked evidence, and ``chartsight record`` run as a user runs it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from agent.service import ChartSight
from agent.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CONTAINED = ROOT / "tests" / "fixtures" / "realworld" / "01-contained-medication.json"


def _chartsight(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``chartsight`` command (the entry point pyproject.toml declares) in a subprocess."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = target["chartsight"].partition(":")
    env = {
        **os.environ,
        "CHARTSIGHT_HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",  # rich wraps table cells at the default 80 columns of a pipe
    }
    env.pop("CHARTSIGHT_CONFIG", None)
    code = f"from {module} import {function}; {function}()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=home.parent,
        timeout=240,
    )


def test_contained_medication_is_named_in_record_evidence_and_the_cli(tmp_path: Path):
    home = tmp_path / "home"
    imported = _chartsight(home, "import", str(CONTAINED))
    assert imported.returncode == 0, imported.stderr
    shown = _chartsight(home, "record", "bug01-pat", "--no-images")
    assert shown.returncode == 0, shown.stderr
    active = shown.stdout.split("Active medications", 1)[1]
    assert "amlodipine 5 mg tablet" in active and "MedicationRequest/bug01-mr1" in active

    async def chart() -> tuple[str | None, list[str]]:
        async with ChartSight(Settings(home=home)) as agent:
            record = await agent.record("bug01-pat")
            drug = record.medication_code(record.medications[0])
            ranked = await agent.evidence("bug01-pat", "What medications is she on?")
            return (drug.text if drug else None), [r.evidence.text for r in ranked]

    drug, lines = asyncio.run(chart())
    assert drug == "amlodipine 5 mg tablet"
    assert any(
        "Medication: amlodipine 5 mg tablet (RxNorm 197361), active" in line
        and line.endswith("[MedicationRequest/bug01-mr1]")
        for line in lines
    )
