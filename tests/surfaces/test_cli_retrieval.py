"""`chartsight index build`, `similar` and `evidence`, run as a user would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from surfaces.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("cli-retrieval") / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("CHARTSIGHT_HOME", str(home))
    mp.delenv("CHARTSIGHT_CONFIG", raising=False)
    result = runner.invoke(app, ["demo"])  # demo patients with their images, and the index
    assert result.exit_code == 0, result.output
    assert "Similar-case index: 5 cases (5 added now)" in result.output
    assert "What was his last hemoglobin A1c?" in result.output
    assert "Latest hemoglobin A1c: 2020-12-13 Hemoglobin A1c" in " ".join(result.output.split())
    assert "Similar case (score" in result.output and "model evidence" in result.output
    yield home
    mp.undo()


def test_index_build_is_incremental(home: Path):
    assert (home / "index" / "CURRENT").is_file()
    again = runner.invoke(app, ["index", "build"])
    assert again.exit_code == 0, again.output
    assert "5 patients, 5 cases" in again.output
    assert "0 added, 0 updated, 5 unchanged" in again.output
    assert "patients/s" in again.output and "minilm + efficientnet-lite0" in again.output
    fresh = runner.invoke(app, ["index", "build", "--rebuild"])
    assert fresh.exit_code == 0, fresh.output
    assert "5 added, 0 updated, 0 unchanged" in fresh.output


def test_similar_lists_other_patients_with_scores(home: Path):
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
    missing = runner.invoke(app, ["similar", "no-such-patient"])
    assert missing.exit_code == 1 and "error:" in missing.output
    changed = runner.invoke(
        app, ["similar", TOMMY_FRIESEN], env={"CHARTSIGHT_RETRIEVAL__FUSION__IMAGE_WEIGHT": "0.9"}
    )
    assert changed.exit_code == 1
    message = " ".join(changed.output.split())
    assert "was built with fusion mode concat, image_weight 0.5, text_weight 0.5" in message
    assert "settings ask for mode concat, image_weight 0.9" in message and "--rebuild" in message


def test_index_build_from_a_fhir_server(sekmet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHARTSIGHT_HOME", str(tmp_path / "server-home"))
    result = runner.invoke(app, ["index", "build", "--fhir-url", sekmet.base_url])
    assert result.exit_code == 0, result.output
    assert "5 patients, 5 cases" in result.output and "5 added" in result.output
    server_id = sekmet.patient_ids[TOMMY_FRIESEN]
    hits = runner.invoke(
        app, ["similar", server_id, "--fhir-url", sekmet.base_url, "--k", "2", "--json"]
    )
    assert hits.exit_code == 0, hits.output
    found = json.loads(hits.output)
    assert len(found) == 2 and server_id not in {h["patient_id"] for h in found}
    assert set(sekmet.patient_ids.values()) >= {h["patient_id"] for h in found}
    found = runner.invoke(
        app, ["find", "Tommy Friesen", "--born", "1947-06-15", "--fhir-url", sekmet.base_url]
    )
    assert found.exit_code == 0, found.output
    assert found.output.split()[0] == server_id
    bad = runner.invoke(app, ["index", "build", "--source", "pacs"])
    assert bad.exit_code == 1 and "--source is 'local' or 'fhir'" in bad.output


def test_ask_prints_a_cited_answer_as_json(home: Path):
    result = runner.invoke(app, ["ask", TOMMY_FRIESEN, "What was his last A1c?", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["model"] == "evidence" and answer["supported_fraction"] == 1.0
    ref = answer["citations"][0]["reference"]
    assert ref.startswith("Observation/") and f"[{ref}]" in answer["text"]
    assert answer["facts"][0]["tool"] == "latest_observation"
    assert answer["thread_id"] is None  # without --thread nothing is kept


def test_chat_keeps_one_thread(home: Path):
    result = runner.invoke(
        app, ["chat", TOMMY_FRIESEN], input="What was his last A1c?\nand before that?\n\n"
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Latest A1c:" in text and "Previous A1c:" in text
    threads = {part.split()[0] for part in text.split("thread ")[1:]}
    assert len(threads) == 1


def test_ask_with_an_unreachable_model_says_it_fell_back(home: Path):
    result = runner.invoke(
        app,
        ["ask", TOMMY_FRIESEN, "What was his last A1c?", "--model-url", "http://127.0.0.1:9/v1"],
        env={"CHARTSIGHT_MODEL__HTTP__DEADLINE_S": "5"},
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Latest A1c:" in text and "evidence answer is given instead" in text


def test_ask_streams_the_stages(home: Path):
    result = runner.invoke(app, ["ask", TOMMY_FRIESEN, "How old is he?", "--stream"])
    assert result.exit_code == 0, result.output
    assert "· resolve" in result.output and "· verify" in result.output


def test_find_a_patient_by_name_and_birth_date(home: Path):
    found = runner.invoke(app, ["find", "Tommy Friesen", "--born", "1947-06-15"])
    assert found.exit_code == 0, found.output
    assert found.output.split()[0] == TOMMY_FRIESEN
    missing = runner.invoke(app, ["find", "Tommy Friesen", "--born", "1950-01-01"])
    assert missing.exit_code == 1 and "Patient not found" in missing.output
