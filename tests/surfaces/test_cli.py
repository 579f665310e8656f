"""The chartsight command line, run as a user would (in-process through Typer's runner)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from connectors.demo import TOMMY_FRIESEN
from surfaces.cli import app
from tests.conftest import load_bundle

runner = CliRunner()


def test_demo_imports_and_prints_a_record(home: Path):
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "5 patients" in result.output
    assert "Tommy Friesen" in result.output and "Chronic congestive heart" in result.output
    assert "Media/demo-ct-small" in result.output
    again = runner.invoke(app, ["demo"])
    assert again.exit_code == 0 and "0 resources imported now" in again.output


def test_import_reports_imported_unchanged_and_failed_files(
    home: Path, bundles: list[Path], tmp_path: Path
):
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"resourceType": "Patient", "id": "a"}\n{"resourceType": "Pati')
    result = runner.invoke(app, ["import", str(bundles[0]), str(bundles[1]), str(bad)])
    assert result.exit_code == 1
    assert (
        "bad.ndjson" in result.output
        and "line 2" in result.output
        and "nothing stored" in result.output
    )
    assert "2 files; 0 unchanged files skipped; 1 files failed" in result.output.replace("\n", " ")
    again = runner.invoke(app, ["import", str(bundles[0])])
    assert again.exit_code == 0 and "unchanged" in again.output


def test_patients_search_and_record_json(home: Path, bundles: list[Path]):
    assert runner.invoke(app, ["import", *map(str, bundles)]).exit_code == 0
    listed = runner.invoke(app, ["patients", "--search", "fries"])
    assert (
        listed.exit_code == 0 and "Tommy Friesen" in listed.output and "Karla" not in listed.output
    )
    shown = runner.invoke(app, ["record", TOMMY_FRIESEN, "--json", "--no-images"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    bundle = next(
        load_bundle(p) for p in bundles if TOMMY_FRIESEN in json.dumps(load_bundle(p)["entry"][0])
    )
    expected_obs = sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    assert data["counts"]["Observation"] == expected_obs
    assert (
        data["patient"]["id"] == TOMMY_FRIESEN and data["problems"] == [] and data["invalid"] == []
    )


def test_unknown_patient_and_unreachable_server_are_one_line_errors(home: Path):
    missing = runner.invoke(app, ["record", "nobody"])
    assert missing.exit_code == 1 and "error:" in missing.output and "nobody" in missing.output
    assert "Traceback" not in missing.output
    down = runner.invoke(app, ["record", "p1", "--fhir-url", "http://127.0.0.1:9/fhir"])
    assert down.exit_code == 1 and "127.0.0.1:9" in down.output


@pytest.mark.integration
def test_record_from_a_fhir_server(home: Path, sekmet):
    server_id = next(iter(sekmet.patient_ids.values()))
    result = runner.invoke(app, ["record", server_id, "--fhir-url", sekmet.base_url])
    assert result.exit_code == 0, result.output
    assert f"Patient/{server_id} from {sekmet.base_url}" in result.output.replace("\n", "")


def test_record_text_is_printed_as_text_never_as_markup(home: Path, tmp_path: Path):
    name = "[red]Eve[/red] [link=https://evil.example]Ng[/link]"
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "mk", "name": [{"text": name}]}},
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": "mk-glu",
                    "status": "preliminary",
                    "code": {"text": "Glucose [bold]fasting[/bold]"},
                    "subject": {"reference": "Patient/mk"},
                    "effectiveDateTime": "2026-01-02",
                    "valueQuantity": {"value": 5, "unit": "mmol/L"},
                }
            },
        ],
    }
    path = tmp_path / "[b]markup[_b].json"
    path.write_text(json.dumps(bundle))
    assert runner.invoke(app, ["import", str(path)]).exit_code == 0
    shown = runner.invoke(app, ["record", "mk", "--no-images"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert name in shown.output
    assert "Glucose [bold]fasting[/bold]" in " ".join(shown.output.split())
    asked = runner.invoke(app, ["ask", "mk", "What was the last glucose?"], terminal_width=200)
    assert asked.exit_code == 0, asked.output
    said = " ".join(asked.output.split())
    assert "Latest glucose" in said and "[bold]fasting[/bold]" in said
    assert "[status preliminary]" in said
    # a question outside a thread keeps nothing: no checkpoint, no thread to follow up on
    assert " thread " not in said
    threads = home / "threads.db"
    assert not threads.exists() or "What was the last glucose" not in threads.read_bytes().decode(
        "latin-1"
    )
    # the chart's lines were embedded once, kept beside the models for the next process
    models = os.environ.get("CHARTSIGHT_RETRIEVAL__ENCODERS__CACHE_DIR", str(home / "models"))
    assert (Path(models) / "line-embeddings.sqlite3").is_file()
    followed = runner.invoke(app, ["ask", "mk", "And the one before?", "--thread", "t1"])
    assert followed.exit_code == 0 and " thread t1 " in " ".join(followed.output.split())


def test_now_sets_the_day_a_question_is_asked_on(home: Path, bundles: list[Path]):
    """``--now`` moves "today" for a chart exported in the past: "the last year" of Tommy
    Friesen's chart (which ends in December 2020) is 2020, not the year before the machine's
    date; ``evidence`` takes it too; a day that is not one, or one after today, is refused by name."""
    assert runner.invoke(app, ["import", *map(str, bundles)]).exit_code == 0
    question = "What changed in the last year?"
    asked = runner.invoke(app, ["ask", TOMMY_FRIESEN, question, "--now", "2021-01-01"])
    assert asked.exit_code == 0, asked.output
    said = " ".join(asked.output.split())
    # the whole of 2021-01-01 and the 365 days before it
    assert "From 2020-01-02 to 2021-01-01 the record has" in said and "diagnoses" in said
    today = " ".join(runner.invoke(app, ["ask", TOMMY_FRIESEN, question]).output.split())
    assert "Nothing is recorded from" in today and "latest dated entry is from 2020" in today
    ranked = runner.invoke(
        app, ["evidence", TOMMY_FRIESEN, "last HbA1c", "--now", "2021-01-01", "--no-dense"]
    )
    assert ranked.exit_code == 0 and "Observation/" in ranked.output
    refused = runner.invoke(app, ["ask", TOMMY_FRIESEN, question, "--now", "2021-13-01"])
    assert refused.exit_code == 2 and "--now" in refused.output
    future = runner.invoke(app, ["ask", TOMMY_FRIESEN, question, "--now", "2999-01-01"])
    assert future.exit_code == 2 and "2999-01-01 is after today" in " ".join(future.output.split())


def test_now_is_the_whole_day_asked_on(home: Path, tmp_path: Path):
    """``--now 2026-11-29``: a potassium taken at 08:15 that day is the latest on that day (a
    day alone once meant its first instant, and a critical result of the day asked on was "dated
    after" it); one of the next day is said and not taken."""
    doc = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in [
        {"resourceType": "Patient", "id": "k1", "gender": "male", "birthDate": "1950-01-01"},
        *[{"resourceType": "Observation", "id": oid, "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}], "text": "Potassium"},
           "subject": {"reference": "Patient/k1"}, "effectiveDateTime": when,
           "valueQuantity": {"value": v, "unit": "mmol/L", "system": "http://unitsofmeasure.org",
                             "code": "mmol/L"}}
          for oid, when, v in (("ka", "2026-11-01T08:00:00Z", 4.0), ("kb", "2026-11-29T08:15:00Z", 6.9),
                               ("kc", "2026-11-30T09:00:00Z", 5.0))],
    ]]}  # fmt: skip
    path = tmp_path / "k.json"
    path.write_text(json.dumps(doc))
    assert runner.invoke(app, ["import", str(path)]).exit_code == 0
    asked = runner.invoke(app, ["ask", "k1", "What was his last potassium?", "--now", "2026-11-29"])
    said = " ".join(asked.output.split())
    assert asked.exit_code == 0 and said.startswith("Latest potassium: 2026-11-29"), said
    assert "6.9 mmol/L" in said and "1 result dated after 2026-11-29 is not taken" in said
