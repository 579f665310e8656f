"""The LLM planner's bounded tool loop, driven by a scripted OpenAI-compatible server so that the
model's calls are exact: good calls add cited facts, bad calls are reported back to the model, the
loop stops at its bound, and what the model then writes is verified like any answer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.service import ChartSight
from agent.settings import Settings
from agent.tools import default_tools
from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from tests.agent.test_ask import NOW, _a1cs
from tests.peers.scripted_model import ScriptedModel, call


@pytest.fixture
def settings(tmp_path: Path, demo_store: FhirStore) -> Settings:
    s = Settings(home=tmp_path / "home", store={"url": str(demo_store.engine.url)})
    s.model.name = "openai"
    s.model.supports_tools = True
    s.model.max_tool_steps = 2
    s.model.http.deadline_s = 20
    return s


def _ask(settings: Settings, question: str, events: list[tuple[str, Any]] | None = None):  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        async with ChartSight(settings, now=NOW) as agent:
            return await agent.ask(
                TOMMY_FRIESEN,
                question,
                on_event=(lambda k, d: events.append((k, d))) if events is not None else None,
            )

    return asyncio.run(run())


def test_the_models_tool_calls_add_cited_facts_and_the_loop_is_bounded(
    settings: Settings, tommy_json: list[dict[str, Any]]
):
    newest = _a1cs(tommy_json)[0]
    meds = {
        f"MedicationRequest/{r['id']}"
        for r in tommy_json
        if r["resourceType"] == "MedicationRequest" and r["status"] == "active"
    }
    value = f"{newest['valueQuantity']['value']:.4g}"
    turns = [
        [
            call("latest_observation", json.dumps({"query": "hemoglobin a1c"}), "c1"),
            call("drop_all_tables", "{}", "c2"),  # no such tool
            call("observation_stats", "{not json", "c3"),  # not JSON
            call("latest_observation", json.dumps({"query": "A1c", "patient": "x"}), "c4"),
        ],
        [call("active_medications", "{}", "c5")],
        [call("allergies", "{}", "c6")],  # a third round: past the bound, never run
    ]
    answer_text = (
        f"His last HbA1c was {value} % on {newest['effectiveDateTime'][:10]} "
        f"[Observation/{newest['id']}]. He also had a stroke in 1999 [Observation/{newest['id']}]."
    )
    events: list[tuple[str, Any]] = []
    with ScriptedModel(turns, [answer_text]) as model:
        settings.model.base_url = model.base_url
        answer = _ask(settings, "What was his last HbA1c?", events)

    # the model was offered every registered tool, as OpenAI function schemas
    offered = {t["function"]["name"] for t in model.tool_requests[0]["tools"]}
    assert offered == set(default_tools(plugins=False).tools)
    # the loop ran exactly max_tool_steps rounds
    assert len(model.tool_requests) == 2
    # the second round saw a tool message for every call of the first, errors spelled out
    replies = {
        m["tool_call_id"]: m["content"]
        for m in model.tool_requests[1]["messages"]
        if m["role"] == "tool"
    }
    assert set(replies) == {"c1", "c2", "c3", "c4"}
    assert value in replies["c1"] and f"Observation/{newest['id']}" in replies["c1"]
    assert "drop_all_tables" in replies["c2"] and "not a valid tool" in replies["c2"]
    assert "not a JSON object" in replies["c3"]
    assert replies["c4"].startswith("Error") and "patient" in replies["c4"]

    by_model = [c for c in answer.tool_calls if c.by == "model"]
    assert [(c.tool, c.error) for c in by_model] == [
        ("latest_observation", False),
        ("drop_all_tables", True),
        ("observation_stats", True),
        ("latest_observation", True),
        ("active_medications", False),
    ]
    assert any(c.by == "rules" for c in answer.tool_calls)
    # the model's medication call added facts the rule plan did not ask for, cited from the record
    med_facts = [f for f in answer.facts if f.tool == "active_medications"]
    assert med_facts and {e for f in med_facts for e in f.evidence} == meds
    # the answer the model then wrote was verified: the supported sentence stays, the other goes
    assert answer.model.startswith("openai:"), answer.rejected
    assert value in answer.text and "stroke" not in answer.text
    assert any("stroke" in r.text for r in answer.rejected)
    assert {"think", "act"} <= set(answer.latency_ms)
    kinds = [k for k, _ in events]
    assert kinds.count("tool_calls") == 2 and "tool_results" in kinds


def test_a_model_that_calls_nothing_leaves_the_rule_plan(settings: Settings):
    with ScriptedModel([[]], ["No answer [Patient/x]."]) as model:
        settings.model.base_url = model.base_url
        answer = _ask(settings, "What was his last HbA1c?")
    assert len(model.tool_requests) == 1
    assert [c.by for c in answer.tool_calls] == ["rules"]
    assert answer.facts and answer.fallback_used  # nothing the model wrote held up


def test_a_model_server_down_while_planning_leaves_the_rule_plan(settings: Settings):
    settings.model.base_url = "http://127.0.0.1:9/v1"  # nothing listens there
    settings.model.http.deadline_s = 5
    answer = _ask(settings, "What was his last HbA1c?")
    assert any("could not plan tool calls" in w for w in answer.warnings)
    assert answer.fallback_used and answer.facts and answer.supported_fraction == 1.0


def test_without_tool_support_the_model_is_never_offered_tools(settings: Settings):
    settings.model.supports_tools = False
    with ScriptedModel([[call("allergies", "{}", "c1")]], ["x [Patient/x]."]) as model:
        settings.model.base_url = model.base_url
        answer = _ask(settings, "What was his last HbA1c?")
    assert not model.tool_requests and "think" not in answer.latency_ms
