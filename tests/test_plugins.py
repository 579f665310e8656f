"""The plug-in contract (``common/plugins.py``), tested through the complete example package in
``examples/plugins``: one plug-in of each kind (tool, planner rule, compactor, encoder, model
backend), installed the way pip would (a dist-info with its entry points on ``sys.path``)."""

from __future__ import annotations

import asyncio
import logging
import os
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B.flag import Flag
from fhir.resources.R4B.goal import Goal

from agent import ChartSight, Settings
from agent.backends import default_backends
from agent.planner import default_planner
from agent.tools import ToolRegistry, default_tools, tool
from common.plugins import PluginError, installed_entry_points
from connectors.demo import TOMMY_FRIESEN
from connectors.record import PatientRecord
from connectors.store import FhirStore
from retrieval.encoders import EncoderRegistry
from retrieval.evidence import default_compactors
from retrieval.settings import EncoderSettings
from tests.conftest import install_entry_point

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "plugins"
NOW = datetime(2021, 1, 1, tzinfo=UTC)


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The example package 'installed': its folder importable and its entry points, read from
    its pyproject.toml, in a dist-info on sys.path."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist = tmp_path / "chartsight_example_plugins-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    (dist / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
            for group, eps in project["entry-points"].items()
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    return project


def test_the_example_covers_every_kind(example: dict[str, Any]):
    assert set(example["entry-points"]) == {
        "chartsight.tools",
        "chartsight.planner_rules",
        "chartsight.compactors",
        "chartsight.encoders",
        "chartsight.backends",
    }
    tools = default_tools()
    assert "encounter_count" in tools and "latest_observation" in tools
    rules = default_planner(tools.tools.values()).rules
    assert {"tool:encounter_count", "kidney_function"} <= set(rules)
    assert "facts-only" in default_backends() and "evidence" in default_backends()
    assert "char-ngrams" in EncoderRegistry(EncoderSettings()).factories


def _ask(store: FhirStore, home: Path, question: str, **model: Any):  # type: ignore[no-untyped-def]
    settings = Settings(home=home, store={"url": str(store.engine.url)}, model=model or {})

    async def go():  # type: ignore[no-untyped-def]
        async with ChartSight(settings, now=NOW, use_index=False) as cs:
            return await cs.ask(TOMMY_FRIESEN, question)

    return asyncio.run(go())


def _encounter_starts(tommy_json: list[dict[str, Any]]) -> list[datetime]:
    return [
        datetime.fromisoformat(r["period"]["start"])
        for r in tommy_json
        if r["resourceType"] == "Encounter"
    ]


def test_a_plugin_tool_is_called_by_ask_for_the_questions_it_declares(
    example: dict[str, Any], demo_store: FhirStore, tmp_path: Path, tommy_json: list[dict[str, Any]]
):
    answer = _ask(demo_store, tmp_path / "home", "How many visits has he had in the last 3 years?")
    calls = [(c.tool, c.args, c.by) for c in answer.tool_calls]
    assert ("encounter_count", {"years": "3"}, "rules") in calls
    # the count, computed here from the FHIR JSON
    expected = sum(
        1 for s in _encounter_starts(tommy_json) if s >= NOW - timedelta(days=3 * 365.25)
    )
    assert 0 < expected < len(_encounter_starts(tommy_json))
    fact = next(f for f in answer.facts if f.tool == "encounter_count")
    assert fact.value == expected and len(fact.evidence) == expected
    assert f"The record holds {expected} encounters in the last 3 years." in answer.text
    assert not answer.abstained and answer.supported_fraction == 1.0


def test_a_plugin_planner_rule_adds_calls(
    example: dict[str, Any], demo_store: FhirStore, tmp_path: Path
):
    answer = _ask(demo_store, tmp_path / "home", "How is his kidney function?")
    asked = {c.args.get("query") for c in answer.tool_calls if c.tool == "latest_observation"}  # type: ignore[union-attr]
    assert asked == {"kidney function", "eGFR"}  # the built-in's creatinine, and the rule's eGFR
    assert "Creatinine" in answer.text and "[Observation/" in answer.text


def test_a_plugin_backend_answers_and_is_verified(
    example: dict[str, Any], demo_store: FhirStore, tmp_path: Path
):
    answer = _ask(
        demo_store, tmp_path / "home", "What was his last hemoglobin A1c?", name="facts-only"
    )
    assert answer.model == "facts-only" and not answer.abstained
    assert answer.text.startswith("Latest hemoglobin A1c: 2020-12-13")
    # no tool answers: it writes nothing, and the evidence answer is given instead, flagged
    vague = _ask(demo_store, tmp_path / "home2", "Tell me about him.", name="facts-only")
    assert vague.fallback_used and vague.model.startswith("evidence (fallback")


def _record_with(*resources: Any) -> PatientRecord:
    from fhir.resources.R4B.patient import Patient

    record = PatientRecord(
        Patient(id="p1", gender="female", birthDate="1950-01-01"), source="test", fetched_at=NOW
    )
    for r in resources:
        record.add(r)
    return record


def test_plugin_compactors_add_a_type_and_replace_a_builtin_saying_so(
    example: dict[str, Any], caplog: pytest.LogCaptureFixture
):
    flag = Flag.model_validate(
        {
            "resourceType": "Flag",
            "id": "f1",
            "status": "active",
            "code": {"text": "Fall risk"},
            "subject": {"reference": "Patient/p1"},
            "period": {"start": "2020-05-01"},
        }
    )
    goal = Goal.model_validate(
        {
            "resourceType": "Goal",
            "id": "g1",
            "lifecycleStatus": "active",
            "description": {"text": "HbA1c below 7 %"},
            "subject": {"reference": "Patient/p1"},
            "target": [{"dueDate": "2021-06-30"}],
        }
    )
    record = _record_with(flag, goal)
    builtin = {e.id: e.text for e in default_compactors(plugins=False).evidence(record)}
    assert "Flag/f1" not in builtin and "due" not in builtin["Goal/g1"]
    with caplog.at_level(logging.INFO):
        reg = default_compactors()
    assert reg.origins[("resource", "Goal")].startswith("plug-in flag_and_goal")
    assert any("replaces the resource compactor for Goal" in r.message for r in caplog.records)
    lines = {e.id: e for e in reg.evidence(record)}
    assert lines["Flag/f1"].text.startswith(
        "2020-05-01 Alert: Fall risk, active (since 2020-05-01)"
    )
    assert lines["Flag/f1"].active
    assert lines["Goal/g1"].text == builtin["Goal/g1"].replace(
        " [Goal/g1]", ", due 2021-06-30 [Goal/g1]"
    )


def test_a_plugin_encoder_is_built_by_its_kind(example: dict[str, Any]):
    enc = EncoderRegistry(EncoderSettings()).text("char-ngrams:128")
    v = enc.encode_texts(["creatinine", "creatinin", "potassium", ""])
    assert v.shape == (4, 128) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0) and not v[3].any()
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])
    assert enc.info.dim == 128


def test_replacing_a_builtin_without_saying_so_is_refused_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    install_entry_point(
        tmp_path,
        monkeypatch,
        "cs_quiet_tool",
        "from agent.tools import Fact, tool\n"
        "@tool('age', 'Always 30.')\n"
        "def age(ctx):\n"
        "    return [Fact('age', 'Age 30.', value=30)]\n"
        "def register(reg):\n"
        "    reg.add('age', age)\n"
        "def register_encoder(reg):\n"
        "    reg.add('minilm', lambda argument, settings: None)\n",
        "chartsight.tools",
        "quiet = cs_quiet_tool:register",
    )
    with caplog.at_level(logging.WARNING):
        tools = default_tools()
    assert tools["age"].description.startswith("The patient's age")  # the built-in stands
    assert any("tool plug-in quiet failed to load" in r.message for r in caplog.records)
    # with replace=True it is replaced, and the registry says by whom
    reg = ToolRegistry()

    @tool("age", "Always 30.")
    def always(ctx):  # type: ignore[no-untyped-def]
        return []

    reg.add("age", default_tools(plugins=False)["age"])
    with pytest.raises(PluginError, match="replace=True"):
        reg.add("age", always)
    reg.add("age", always, replace=True)
    assert reg["age"] is always and reg.replaced == {"age": "code"}
    with pytest.raises(PluginError, match="registered as a Tool of that name"):
        reg.add("other", always)


def test_an_encoder_plugin_replaces_a_builtin_kind_only_when_it_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    install_entry_point(
        tmp_path,
        monkeypatch,
        "cs_enc",
        "from chartsight_example_plugins.encoders import char_ngrams\n"
        "def register(reg):\n"
        "    reg.add('minilm', char_ngrams, replace=True)\n",
        "chartsight.encoders",
        "loud = cs_enc:register",
    )
    monkeypatch.syspath_prepend(str(EXAMPLE))
    registry = EncoderRegistry(EncoderSettings())
    assert registry.factories.replaced["minilm"].startswith("plug-in loud")
    assert registry.text("minilm").info.name == "char-ngrams"


def test_a_package_installed_while_running_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The entry points are scanned once and kept, but a distribution that appears in a folder
    already on ``sys.path`` (``pip install`` into the running environment) is seen next time."""
    monkeypatch.syspath_prepend(str(tmp_path))
    group = "chartsight.tools"
    assert "late" not in installed_entry_points(group).names
    dist = tmp_path / "late_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: late-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\nlate = late_plugin:register\n")
    stat = tmp_path.stat()  # the folder's time moved on, as an install a moment later moves it
    os.utime(tmp_path, (stat.st_atime, stat.st_mtime + 1))
    assert "late" in installed_entry_points(group).names
