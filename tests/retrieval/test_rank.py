"""Hybrid evidence ranking; the right answers are computed from the Synthea data itself."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import numpy as np
import pytest

from benchmarks.large_chart import generate_patient
from connectors.record import PatientRecord, assemble_record
from connectors.store import FhirStore, StoreSource
from retrieval.encoders import EncoderRegistry, TextEncoder
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
        "mL/min/{1.73_m2}",
    )  # eGFR, not creatinine's (an analyte of its own: its changes have a meaning)


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


class _CountingEncoder:
    """The real text encoder, counting the texts it is asked to embed."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.info = encoder.info
        self.texts: list[str] = []

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += texts
        return self.encoder.encode_texts(texts)


@pytest.fixture(scope="module")
def large_chart(tmp_path_factory: pytest.TempPathFactory) -> PatientRecord:
    """A generated chart of 3000 resources (benchmarks/large_chart.py), through the real store."""
    bundle = generate_patient(3000, seed=7)
    store = FhirStore(f"sqlite:///{tmp_path_factory.mktemp('large')}/store.db")
    store.import_json(bundle, "large-chart")
    try:
        return asyncio.run(
            assemble_record(StoreSource(store), bundle["entry"][0]["resource"]["id"])
        )
    finally:
        store.close()


def test_large_chart_is_narrowed_before_embedding(
    large_chart: PatientRecord, encoders: EncoderRegistry
):
    items = record_evidence(large_chart)
    assert len(items) > 2900
    counting = _CountingEncoder(encoders.text())
    settings = RankSettings(dense_candidates=40)
    ranker = EvidenceRanker(settings, counting)

    ranked = ranker.score("What was the last A1c?", items)
    assert ranked[0].evidence.id == _newest(large_chart, "4548-4")
    assert len(counting.texts) <= settings.dense_candidates + 1  # the lines and the question
    # an older heart rate was not embedded: it takes its series' newest embedded line's score
    heart = [r for r in ranked if "http://loinc.org|8867-4" in r.evidence.codes]
    heart.sort(key=lambda r: r.evidence.date, reverse=True)
    assert len(heart) > 100 and heart[-1].parts["dense"] == heart[0].parts["dense"] > 0

    active = {f"MedicationRequest/{m.id}" for m in large_chart.medications if m.status == "active"}
    top = ranker.rank("What medications is she currently taking?", items)
    assert len(active) == 6 and {r.evidence.id for r in top[: len(active)]} == active
    assert len(counting.texts) <= 2 * (settings.dense_candidates + 1)

    asked = len(counting.texts)  # the same question again: every vector comes from the cache
    assert ranker.rank("What was the last A1c?", items)[0].evidence.id == ranked[0].evidence.id
    assert len(counting.texts) == asked


def test_line_embeddings_kept_on_disk_serve_a_later_process(
    tommy: PatientRecord, encoders: EncoderRegistry, tmp_path
):
    from retrieval.embedding_store import EmbeddingStore, line_key

    items = record_evidence(tommy)
    text = encoders.text()
    path = tmp_path / "line-embeddings.sqlite3"

    first = _CountingEncoder(text)
    store = EmbeddingStore(path, text.info.space, text.info.dim)
    expected = EvidenceRanker(encoder=first, store=store).score("What was his last HbA1c?", items)
    store.close()
    assert len(first.texts) > 100  # the chart's lines were embedded (the dense candidates)

    # another process (a new ranker, a new connection): only the question is embedded
    again = _CountingEncoder(text)
    store = EmbeddingStore(path, text.info.space, text.info.dim)
    got = EvidenceRanker(encoder=again, store=store).score("What was his last HbA1c?", items)
    assert again.texts == ["What was his last HbA1c?"]
    assert [(r.evidence.id, round(r.score, 6)) for r in got] == [
        (r.evidence.id, round(r.score, 6)) for r in expected
    ]
    # the question itself is never kept; another encoder's space reads nothing
    assert store.get(["What was his last HbA1c?"]) == {}
    assert EmbeddingStore(path, "other:space", text.info.dim).get(first.texts[:3]) == {}
    assert line_key(first.texts[0]) == line_key(first.texts[0]) != line_key(first.texts[1])

    # a ranker for records from elsewhere (an EHR session) shares memory, keeps nothing on disk
    other = EvidenceRanker(encoder=text, store=store).without_store()
    elsewhere = [dataclasses.replace(items[0], text="Wheezing noted on 2020-01-02")]
    other.score("any wheezing?", elsewhere)
    assert other.store is None and store.get([elsewhere[0].text]) == {}


def test_an_unusable_embedding_file_is_skipped(
    tommy: PatientRecord, encoders: EncoderRegistry, tmp_path
):
    from retrieval.embedding_store import EmbeddingStore

    items = record_evidence(tommy)[:20]
    path = tmp_path / "line-embeddings.sqlite3"
    path.write_bytes(b"not a database" * 100)
    text = encoders.text()
    ranker = EvidenceRanker(
        encoder=text, store=EmbeddingStore(path, text.info.space, text.info.dim)
    )
    plain = EvidenceRanker(encoder=text)
    assert [r.evidence.id for r in ranker.score("HbA1c", items)] == [
        r.evidence.id for r in plain.score("HbA1c", items)
    ]
    assert path.read_bytes() == b"not a database" * 100  # left as it was
