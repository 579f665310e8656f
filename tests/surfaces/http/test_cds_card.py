"""The patient-view card's text from real charts (the demo bundles): a summary of whole items
within 140 characters, the most relevant first, a cited bullet per fact, and the indicator."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from agent import PrefetchSource
from connectors.demo import TOMMY_FRIESEN, demo_bundles
from connectors.record import PatientRecord, assemble_record
from retrieval.cases import ChartSections, chart_sections
from retrieval.evidence import record_evidence
from surfaces.http.cds_card import (
    compose_card,
    compose_summary,
    problem_name,
    ranked_abnormal,
    ranked_problems,
    result_phrase,
)
from tests.conftest import load_bundle


def _record(resources: list[dict[str, Any]]) -> PatientRecord:
    everything = {"resourceType": "Bundle", "type": "searchset",
                  "entry": [{"resource": r} for r in resources]}  # fmt: skip
    source = PrefetchSource({"patient": resources[0], "all": everything})
    return asyncio.run(assemble_record(source, resources[0]["id"]))


def _sections(resources: list[dict[str, Any]]) -> ChartSections:
    record = _record(resources)
    return chart_sections(record, record_evidence(record))


CHARTS = [[e["resource"] for e in load_bundle(p)["entry"]] for p in demo_bundles()]


def _items(summary: str) -> tuple[list[str], list[str]]:
    """The summary's problems and results, as ``compose_summary`` joins them."""
    active, _, abnormal = summary.partition(" — abnormal: ")
    if active.startswith("Abnormal: "):
        return [], active.removeprefix("Abnormal: ").split("; ")
    return active.removeprefix("Active: ").split("; "), abnormal.split("; ") if abnormal else []


@pytest.mark.parametrize("chart", CHARTS, ids=[c[0]["id"][:8] for c in CHARTS])
def test_the_summary_is_whole_items_of_the_chart_within_140_characters(chart):
    sections = _sections(chart)
    text = compose_card(sections)
    assert len(text.summary) <= 140
    problems, results = _items(text.summary)
    names = {problem_name(e) for e in sections.problems}
    phrases = {result_phrase(e) for e in sections.latest_results if e.abnormal}
    assert set(problems) <= names and set(results) <= phrases  # whole items, never a cut one
    assert problems[0] == problem_name(ranked_problems(sections)[0])  # the most relevant first
    if phrases:
        assert results  # each demo chart has room for one abnormal result beside its problems
    assert "…" not in text.summary


def test_tommys_card_names_his_newest_disorder_and_his_abnormal_laboratory_result():
    (tommy,) = [c for c in CHARTS if c[0]["id"] == TOMMY_FRIESEN]
    text = compose_card(_sections(tommy))
    assert text.summary.startswith("Active: Chronic congestive heart failure; ")
    # HbA1c (a laboratory result) before his BMI and blood pressure (vital signs)
    assert "abnormal: Hemoglobin A1c/Hemoglobin.total in Blood 6.277 % (high)" in text.summary
    assert "Body Mass Index" not in text.summary
    assert text.indicator == "info"
    bullets = [line for line in text.detail.splitlines() if line.startswith("- ")]
    cited = [re.search(r"`([A-Za-z]+/[^`]+)`$", b) for b in bullets]
    assert all(cited) and [m.group(1) for m in cited if m] == text.cited
    ids = {f"{r['resourceType']}/{r['id']}" for r in tommy}
    assert set(text.cited) <= ids
    # allergies are never left silent: none recorded, or not read at all
    assert "**Allergies:** no active allergy recorded." in text.detail
    unread = compose_card(_sections(tommy), allergies_read=False)
    assert "**Allergies:** not read (the EHR sent none with this request)." in unread.detail


def test_findings_and_situations_come_after_disorders():
    (chart,) = [c for c in CHARTS if c[0]["id"].startswith("43b6ae50")]
    ranked = [problem_name(e) for e in ranked_problems(_sections(chart))]
    assert ranked[-2:] == ["Body mass index 30+ - obesity", "History of cardiac arrest"]
    assert ranked[0] == "Alzheimer's disease"


def test_an_item_that_does_not_fit_is_left_out_not_cut():
    long_name = "Chronic kidney disease stage 3 due to type 2 diabetes mellitus with " * 2
    summary = compose_summary(
        [long_name.strip(), "Asthma"], ["Potassium 6.1 mmol/L (high)", "x" * 139]
    )
    assert summary == "Active: Asthma — abnormal: Potassium 6.1 mmol/L (high)"
    assert compose_summary(["y" * 141], ["z" * 141]) == (
        "1 active problems and 1 abnormal results; see details."
    )
    assert compose_summary([], []) == (
        "No active problems or abnormal latest results in the record."
    )
    assert compose_summary([], ["Potassium 6.1 mmol/L (high)"]) == (
        "Abnormal: Potassium 6.1 mmol/L (high)"
    )


def test_a_critical_result_comes_first_and_makes_the_card_a_warning():
    (tommy,) = [c for c in CHARTS if c[0]["id"] == TOMMY_FRIESEN]
    potassium = {
        "resourceType": "Observation", "id": "k-critical", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3",
                             "display": "Potassium [Moles/volume] in Serum or Plasma"}]},
        "subject": {"reference": f"Patient/{TOMMY_FRIESEN}"},
        "effectiveDateTime": "2019-01-01T08:00:00Z",
        "valueQuantity": {"value": 6.9, "unit": "mmol/L", "system": "http://unitsofmeasure.org",
                          "code": "mmol/L"},
        "interpretation": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            "code": "HH"}]}],
    }  # fmt: skip
    sections = _sections([*tommy, potassium])
    first = ranked_abnormal(sections)[0]
    assert first.id == "Observation/k-critical"  # older than the HbA1c, but critical
    text = compose_card(sections)
    assert text.indicator == "warning"
    assert "6.9 mmol/L (critically high)" in text.summary


def test_a_long_section_lists_ten_and_counts_the_rest():
    (tommy,) = [c for c in CHARTS if c[0]["id"] == TOMMY_FRIESEN]
    extra = [
        {"resourceType": "Condition", "id": f"dx-{i}",
         "subject": {"reference": f"Patient/{TOMMY_FRIESEN}"},
         "clinicalStatus": {"coding": [{"code": "active"}]},
         "code": {"text": f"Problem number {i}"}, "recordedDate": f"2021-01-{i + 1:02d}"}
        for i in range(12)
    ]  # fmt: skip
    sections = _sections([*tommy, *extra])
    text = compose_card(sections)
    problems = text.detail.split("**Active problems**")[1].split("**")[0]
    bullets = [line for line in problems.splitlines() if line.startswith("- ")]
    assert (
        len(bullets) == 11
        and bullets[-1] == f"- and {len(sections.problems) - 10} more in the chart"
    )
