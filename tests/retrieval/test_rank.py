"""Hybrid evidence ranking; the right answers are computed from the Synthea data itself."""

from __future__ import annotations

import pytest

from connectors.record import PatientRecord
from retrieval.encoders import EncoderRegistry
from retrieval.evidence import record_evidence
from retrieval.rank import BM25, EvidenceRanker, approx_tokens, tokens
from retrieval.settings import RankSettings
from retrieval.terms import default_terms


def _newest(record: PatientRecord, loinc: str) -> str:
    matches = [o for o in record.observations if any(c.code == loinc for c in o.code.coding or [])]
    return "Observation/" + str(max(matches, key=lambda o: o.effectiveDateTime).id)


def test_bm25_prefers_rarer_and_more_frequent_terms():
    docs = [tokens(t) for t in ("glucose high", "glucose glucose", "creatinine normal", "x y z")]
    scores = BM25(docs).scores(tokens("glucose creatinine"))
    assert scores[2] > scores[0] > 0 and scores[1] > scores[0] and scores[3] == 0


def test_term_table_maps_words_to_codes():
    terms = default_terms()
    matched = terms.matches("What was her last HbA1c?")
    assert any("http://loinc.org|4548-4" in t.codes for t in matched)
    assert not terms.matches("nothing clinical here")
    assert terms.usual_range("http://loinc.org|4548-4") == (4.0, 5.6, "%")
    assert terms.usual_range("http://loinc.org|33914-3") == (
        60.0,
        None,
        None,
    )  # eGFR, not creatinine's


@pytest.mark.parametrize("dense", [True, False], ids=["hybrid", "lexical-only"])
@pytest.mark.parametrize(
    ("question", "loinc"),
    [
        ("What was the last A1c?", "4548-4"),
        ("most recent hemoglobin a1c", "4548-4"),
        ("latest creatinine", "38483-4"),
        ("How heavy is he now? body weight", "29463-7"),
        ("Is his blood pressure controlled?", "55284-4"),
    ],
)
def test_newest_matching_result_ranks_first(
    tommy: PatientRecord, encoders: EncoderRegistry, question: str, loinc: str, dense: bool
):
    ranker = EvidenceRanker(encoder=encoders.text() if dense else None)
    top = ranker.rank(question, record_evidence(tommy))
    assert top[0].evidence.id == _newest(tommy, loinc)


def test_current_medications_rank_active_ones_first(
    martina: PatientRecord, encoders: EncoderRegistry
):
    ranker = EvidenceRanker(encoder=encoders.text())
    active = {f"MedicationRequest/{m.id}" for m in martina.medications if m.status == "active"}
    top = ranker.rank("What medications is she currently taking?", record_evidence(martina))
    assert {r.evidence.id for r in top[: len(active)]} == active


def test_problem_question_finds_the_condition(tommy: PatientRecord, encoders: EncoderRegistry):
    ranker = EvidenceRanker(encoder=encoders.text())
    heart_failure = next(c for c in tommy.conditions if "heart failure" in c.code.text.lower())
    top = ranker.rank("Does he have heart failure?", record_evidence(tommy), max_items=3)
    assert f"Condition/{heart_failure.id}" in {r.evidence.id for r in top}


def test_token_budget_and_item_limit_hold(tommy: PatientRecord):
    ranker = EvidenceRanker(RankSettings(token_budget=120, max_items=40))
    chosen = ranker.rank("blood pressure", record_evidence(tommy))
    assert chosen and sum(r.tokens for r in chosen) <= 120
    assert all(r.tokens == approx_tokens(r.evidence.text) for r in chosen)
    assert len(ranker.rank("blood pressure", record_evidence(tommy), max_items=2)) == 2
    scores = [r.score for r in ranker.score("blood pressure", record_evidence(tommy))]
    assert scores == sorted(scores, reverse=True)


def test_parts_explain_the_score(tommy: PatientRecord, encoders: EncoderRegistry):
    settings = RankSettings()
    top = EvidenceRanker(settings, encoders.text()).rank("A1c", record_evidence(tommy))[0]
    p = top.parts
    expected = (
        settings.lexical_weight * p["lexical"]
        + settings.dense_weight * p["dense"]
        + settings.code_weight * p["code"]
        + settings.category_weight * p["category"]
        + settings.recency_weight * p["recency"]  # "A1c" alone asks for no particular date
        + settings.active_weight * p["active"]
    )
    assert top.score == pytest.approx(expected)
    assert p["code"] == 1.0 and p["recency"] == 1.0


def test_no_evidence_gives_no_ranking():
    assert EvidenceRanker().rank("anything", []) == []
