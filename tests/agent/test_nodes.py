"""The graph's steps one at a time (``agent/nodes.py``), on states built here: what each reads and
writes, without the rest of the graph."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent import nodes
from agent.answer import FactUsed, SentenceCheck, SimilarCase
from agent.backends import Grounds
from agent.backends.evidence import compose, similar_line
from agent.runtime import AgentRuntime
from agent.settings import Settings
from agent.tools import ToolRegistry, default_tools, tool
from tests.agent.test_tools import records as records  # the demo records fixture

A1C = FactUsed(
    tool="latest_observation",
    statement="Latest A1c: 2020-12-13 Hemoglobin A1c 6.3 %. [Observation/a]",
    value=6.3,
    unit="%",
    evidence=("Observation/a",),
)
LINE = "2020-01-02 Visit note: Seen today. Doing well. [DocumentReference/n]"


def _runtime(tmp_path: Path, tools: ToolRegistry | None = None) -> AgentRuntime:
    return AgentRuntime(
        settings=Settings(home=tmp_path / "home"),
        source=None,  # type: ignore[arg-type]  (the steps tested here read no source)
        tools=tools or default_tools(plugins=False),
        ranker=None,  # type: ignore[arg-type]
    )


def _run(step: Any, state: dict[str, Any], rt: AgentRuntime) -> dict[str, Any]:
    return asyncio.run(step(state, {"configurable": {"runtime": rt}}))


def test_the_evidence_backend_gives_one_line_per_sentence():
    listed = FactUsed(
        tool="active_medications", statement="2020-01-01 Metformin [MedicationRequest/m]",
        evidence=("MedicationRequest/m",),
    )  # fmt: skip
    case = SimilarCase(key="Patient/x", score=0.91, summary="Male. " + "word " * 80)
    text = compose(Grounds(facts=(A1C, listed, A1C), similar=(case,)))
    lines = text.split("\n")
    assert lines[:2] == [A1C.statement, listed.statement]  # each statement once
    assert lines[2].startswith("Similar case (score 0.91): Male; word") and lines[2].endswith(
        "… [Patient/x]"
    )
    assert len(similar_line(case)) < 300


def test_the_evidence_backend_quotes_matching_lines_only_when_no_result_was_asked_for():
    scores = {"DocumentReference/n": {"lexical": 1.0}, "Observation/z": {"dense": 0.9}}
    evidence = {"DocumentReference/n": LINE, "Observation/z": "2020 Weight 80 kg [Observation/z]"}
    quoted = compose(Grounds(evidence=evidence, evidence_scores=scores))
    # one sentence: the note's own full stops become semicolons; no match by meaning alone
    assert quoted == (
        "Relevant record entry: 2020-01-02 Visit note: Seen today; Doing well [DocumentReference/n]"
    )
    absent = A1C.model_copy(update={"statement": "No A1c result.", "evidence": ()})
    assert compose(Grounds(facts=(absent,), evidence=evidence, evidence_scores=scores)) == ""


def test_after_check_retries_a_model_once():
    bad = [SentenceCheck(text="x", supported=False)]
    assert nodes.after_check({"checked": bad, "model": "openai:m", "attempts": 1}) == "generate"
    assert nodes.after_check({"checked": bad, "model": "openai:m", "attempts": 2}) == "finalize"
    assert nodes.after_check({"checked": bad, "model": "evidence", "attempts": 1}) == "finalize"


def _verified(text: str, facts: list[FactUsed]) -> list[SentenceCheck]:
    from agent.grounding import evidence_map, verify

    return verify(text, evidence_map({}, facts), [f.statement for f in facts]).sentences


def test_finalize_keeps_supported_sentences_and_abstains_without_them(tmp_path: Path):
    rt = _runtime(tmp_path)
    base = {"question": "q", "patient_id": "p", "facts": [A1C], "timings": {"plan": 1.0}}
    checked = _verified(A1C.statement + " He is on insulin [Observation/a].", [A1C])
    out = _run(nodes.finalize, {**base, "checked": checked, "model": "openai:m"}, rt)
    answer = out["answer"]
    assert answer.text == A1C.statement and [c.reference for c in answer.citations] == [
        "Observation/a"
    ]
    assert answer.supported_fraction == 0.5 and len(answer.rejected) == 1
    assert "1 unsupported sentence(s) removed" in answer.warnings
    assert answer.facts == [A1C] and answer.latency_ms["plan"] == 1.0
    assert out["history"] == [{"question": "q", "answer": answer.text}]
    # nothing held up and no fact: an abstention that names the closest evidence
    none = _run(
        nodes.finalize,
        {
            **base,
            "facts": [],
            "checked": [],
            "model": "evidence",
            "evidence": {"Observation/z": "z"},
        },
        rt,
    )["answer"]
    assert none.abstained and none.text == "The record does not answer this question."
    # the closest lines are shown apart: no citation rests on them
    assert none.citations == [] and [(c.reference, c.text) for c in none.nearest] == [
        ("Observation/z", "z")
    ]


def test_finalize_falls_back_to_the_evidence_answer_when_no_model_sentence_holds(tmp_path: Path):
    rt = _runtime(tmp_path)
    checked = _verified("He is on insulin [Observation/a].", [A1C])
    state = {"question": "q", "patient_id": "p", "facts": [A1C], "checked": checked}
    answer = _run(nodes.finalize, {**state, "model": "openai:m"}, rt)["answer"]
    assert answer.text == A1C.statement and answer.fallback_used
    assert answer.model == "evidence (fallback from openai:m)"
    assert any("evidence answer is given instead" in w for w in answer.warnings)


def test_a_sentence_that_asserts_nothing_is_removed_without_a_retry_or_an_answer(tmp_path: Path):
    """Issue 12: "See the cited records" is no answer. It is removed without asking the model
    again, and when nothing else was said the evidence answer is given; ``supported_fraction`` is
    over the sentences shown (the evidence answer's) on that path as on every other."""
    rt = _runtime(tmp_path)
    checked = _verified("See the cited records [Observation/a].", [A1C])
    assert [c.problems for c in checked] == [("asserts nothing",)]
    assert nodes.after_check({"checked": checked, "model": "openai:m", "attempts": 1}) == (
        "finalize"
    )
    state = {"question": "q", "patient_id": "p", "facts": [A1C], "checked": checked}
    answer = _run(nodes.finalize, {**state, "model": "openai:m"}, rt)["answer"]
    assert answer.text == A1C.statement and answer.fallback_used
    assert answer.supported_fraction == 1.0 and answer.rejected == checked
    # beside a claim it neither counts against the answer nor triggers a retry
    mixed = _verified(A1C.statement + " See the cited records [Observation/a].", [A1C])
    assert nodes.after_check({"checked": mixed, "model": "openai:m", "attempts": 1}) == "finalize"
    answer = _run(nodes.finalize, {**state, "checked": mixed, "model": "openai:m"}, rt)["answer"]
    assert answer.text == A1C.statement and not answer.fallback_used
    assert answer.supported_fraction == 1.0 and len(answer.rejected) == 1


def test_the_verify_step_lets_a_sentence_repeat_the_question_s_window(tmp_path: Path):
    rt = _runtime(tmp_path)
    absence = FactUsed(
        tool="latest_observation",
        statement="No numeric A1c result from 2018-01-01 to 2021-01-01. [Patient/p]",
        evidence=("Patient/p",),
        echo=("from 2018-01-01 to 2021-01-01",),
    )
    state = {
        "question": "Any A1c in the last 3 years?",
        "facts": [absence],
        "draft": "No A1c result was recorded in the last 3 years [Patient/p].",
    }
    assert [c.supported for c in _run(nodes.check, state, rt)["checked"]] == [True]
    asked = {**state, "question": "Any A1c?"}
    assert [c.supported for c in _run(nodes.check, asked, rt)["checked"]] == [False]


def test_gather_tools_keeps_the_others_when_one_tool_fails(tmp_path: Path, records):  # type: ignore[no-untyped-def]
    from connectors.demo import TOMMY_FRIESEN

    @tool("broken", "Always fails.")
    def broken(ctx):  # type: ignore[no-untyped-def]
        raise RuntimeError("a defect")

    tools = default_tools(plugins=False)
    tools.add("broken", broken)
    rt = _runtime(tmp_path, tools)
    record = records[TOMMY_FRIESEN]
    rt.records[record.patient_id] = record
    plan = [
        {"tool": "broken", "args": {}},
        {"tool": "latest_observation", "args": {"query": "A1c"}},
    ]
    out = _run(nodes.gather_tools, {"patient_id": record.patient_id, "plan": plan}, rt)
    assert [f.tool for f in out["facts"]] == ["latest_observation"]
    assert out["warnings"] == ["the broken tool failed and was left out (RuntimeError)"]
    assert [(c.tool, c.error, c.by) for c in out["tool_log"]] == [
        ("broken", True, "rules"),
        ("latest_observation", False, "rules"),
    ]
    assert "tools" in out["timings"]


@pytest.mark.parametrize("bad", [{"query": 3}, {"nope": 1}])
def test_gather_tools_reports_bad_arguments(tmp_path: Path, records, bad):  # type: ignore[no-untyped-def]
    from connectors.demo import TOMMY_FRIESEN

    rt = _runtime(tmp_path)
    record = records[TOMMY_FRIESEN]
    rt.records[record.patient_id] = record
    plan = [{"tool": "latest_observation", "args": bad}]
    out = _run(nodes.gather_tools, {"patient_id": record.patient_id, "plan": plan}, rt)
    assert out["facts"] == [] and out["warnings"][0].startswith("latest_observation: bad arguments")
    assert out["tool_log"][0].error


def test_and_before_that_steps_back_from_a_dated_question(tmp_path: Path):
    rt = _runtime(tmp_path)
    day = {
        "query": "blood pressure",
        "since": "2019-03-17T00:00:00",
        "until": "2019-03-17T23:59:59",
    }
    state = {
        "question": "and before that?",
        "history": [{"question": "Blood pressure on 2019-03-17?", "answer": "..."}],
        "plan": [{"tool": "latest_observation", "args": day}],
    }
    out = _run(nodes.plan, state, rt)
    # the latest before that day, not the same reading again
    assert out["plan"] == [
        {
            "tool": "latest_observation",
            "args": {"query": "blood pressure", "until": "2019-03-16T23:59:59"},
        }
    ]
    plain = {**state, "plan": [{"tool": "latest_observation", "args": {"query": "A1c"}}]}
    assert _run(nodes.plan, plain, rt)["plan"] == [
        {"tool": "latest_observation", "args": {"query": "A1c", "nth": 2}}
    ]
