"""`chartsight index build`, `similar` and `evidence`, run as a user would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import app
from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("cli-retrieval") / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("CHARTSIGHT_HOME", str(home))
    mp.delenv("CHARTSIGHT_CONFIG", raising=False)
    result = runner.invoke(app, ["import", str(Path(__file__).parents[2] / "connectors" / "demo")])
    assert result.exit_code == 0, result.output
    yield home
    mp.undo()


def test_index_build_is_incremental(home: Path):
    first = runner.invoke(app, ["index", "build"])
    assert first.exit_code == 0, first.output
    assert "5 patients, 5 cases" in first.output and "5 added" in first.output
    assert "patients/s" in first.output and "minilm + efficientnet-lite0" in first.output
    assert (home / "index" / "CURRENT").is_file()
    second = runner.invoke(app, ["index", "build"])
    assert second.exit_code == 0, second.output
    assert "0 added, 0 updated, 5 unchanged" in second.output


def test_similar_lists_other_patients_with_scores(home: Path):
    runner.invoke(app, ["index", "build"])
    result = runner.invoke(app, ["similar", TOMMY_FRIESEN, "--k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output)
    assert len(hits) == 3
    assert all(h["patient_id"] != TOMMY_FRIESEN for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["summary"].startswith(("Male", "Female")) for h in hits)
    mr = runner.invoke(app, ["similar", TOMMY_FRIESEN, "--modality", "MR", "--json"])
    assert [h["patient_id"] for h in json.loads(mr.output)] == [MARTINA_MURAZIK]
    table = runner.invoke(app, ["similar", TOMMY_FRIESEN])
    assert table.exit_code == 0 and "most similar of 5 cases" in table.output


def test_evidence_ranks_the_newest_a1c_first(home: Path):
    result = runner.invoke(app, ["evidence", TOMMY_FRIESEN, "What was his last A1c?", "--json"])
    assert result.exit_code == 0, result.output
    items = json.loads(result.output)
    assert items[0]["codes"][0] == "http://loinc.org|4548-4"
    a1c_dates = [i["date"] for i in items if "http://loinc.org|4548-4" in i["codes"]]
    assert items[0]["date"] == max(a1c_dates)
    assert items[0]["text"].endswith(f"[{items[0]['id']}]")
    small = runner.invoke(
        app, ["evidence", TOMMY_FRIESEN, "A1c", "--budget", "60", "--no-dense", "--json"]
    )
    assert sum(len(i["text"]) for i in json.loads(small.output)) <= 60 * 4


def test_unknown_patient_and_changed_encoder_fail_in_one_line(home: Path):
    runner.invoke(app, ["index", "build"])
    missing = runner.invoke(app, ["similar", "no-such-patient"])
    assert missing.exit_code == 1 and "error:" in missing.output
    changed = runner.invoke(
        app, ["similar", TOMMY_FRIESEN], env={"CHARTSIGHT_RETRIEVAL__FUSION__IMAGE_WEIGHT": "0.9"}
    )
    assert changed.exit_code == 1
    assert "was built with fusion" in changed.output and "--rebuild" in changed.output
