"""Property-based tests of the compactors: for any record of valid FHIR resources (demo resources
with fields dropped, odd text, extreme numbers, duplicated list items), the chart's evidence is
made without an exception, and every item cites a resource of the record."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from connectors.demo import demo_bundles, demo_images_bundle
from connectors.record import PatientRecord
from connectors.resources import InvalidResource, Resource, reference_of, validate
from retrieval.evidence import CompactContext, default_compactors
from tests.conftest import load_bundle
from tests.fhir_strategies import _parent, _paths, odd_text


def _seeds() -> dict[str, list[dict[str, Any]]]:
    """Up to three demo resources of each type a compactor is registered for, by type."""
    wanted = set(default_compactors(plugins=False).resources)
    out: dict[str, list[dict[str, Any]]] = {}
    bundles = [load_bundle(p) for p in demo_bundles()] + [demo_images_bundle()]
    for bundle in bundles:
        for entry in bundle["entry"]:
            res = entry["resource"]
            kind = out.setdefault(res["resourceType"], [])
            if res["resourceType"] in wanted and len(kind) < 3:
                kind.append(res)
    # Kinds the demo lacks: a contained Medication, an allergy, a statement with a dosage.
    out["MedicationRequest"].append(
        {
            "resourceType": "MedicationRequest",
            "id": "contained-med",
            "status": "active",
            "intent": "order",
            "contained": [
                {"resourceType": "Medication", "id": "m1", "code": {"text": "amlodipine 5 mg"}}
            ],
            "medicationReference": {"reference": "#m1"},
            "subject": {"reference": "Patient/p"},
            "dosageInstruction": [{"text": "once daily"}],
        }
    )
    out["Observation"] += [
        {
            "resourceType": "Observation",
            "id": "bp",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
            "subject": {"reference": "Patient/p"},
            "effectiveDateTime": "2026-03-01T08:00:00Z",
            "component": [
                {
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                    "valueQuantity": {"value": 150, "unit": "mm[Hg]"},
                    "referenceRange": [{"high": {"value": 130}}],
                    "interpretation": [{"coding": [{"code": "H"}]}],
                },
                {
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                    "valueQuantity": {"value": 95, "unit": "mm[Hg]"},
                },
            ],
        },
        {
            "resourceType": "Observation",
            "id": "k",
            "status": "entered-in-error",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
            "subject": {"reference": "Patient/p"},
            "effectivePeriod": {"start": "2026-03-01", "end": "2026-03-02"},
            "valueQuantity": {"value": 6.8, "unit": "mmol/L"},
            "referenceRange": [{"low": {"value": 3.5}, "high": {"value": 5.1}, "text": "3.5-5.1"}],
            "interpretation": [{"coding": [{"code": "HH"}]}],
            "note": [{"text": "haemolysed"}],
            "dataAbsentReason": {"text": "error"},
        },
    ]
    out["DiagnosticReport"].append(
        {
            "resourceType": "DiagnosticReport",
            "id": "note",
            "status": "final",
            "code": {"text": "discharge summary"},
            "subject": {"reference": "Patient/p"},
            "result": [{"reference": "Observation/k"}],
            "conclusion": "stable",
            "presentedForm": [{"contentType": "text/html", "data": "PGI+c3RhYmxlPC9iPg=="}],
        }
    )
    out["MedicationStatement"] = [
        {
            "resourceType": "MedicationStatement",
            "id": "ms1",
            "status": "active",
            "medicationCodeableConcept": {"text": "metformin"},
            "subject": {"reference": "Patient/p"},
            "dosage": [{"text": "500 mg twice daily"}],
        }
    ]
    out["AllergyIntolerance"] = [
        {
            "resourceType": "AllergyIntolerance",
            "id": "a1",
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "criticality": "high",
            "code": {"text": "penicillin"},
            "patient": {"reference": "Patient/p"},
            "reaction": [{"manifestation": [{"text": "hives"}]}],
        }
    ]
    return {k: v for k, v in out.items() if k in wanted and v}


SEEDS = _seeds()
DATE = re.compile(r"^\d{4}(-\d{2})?(-\d{2})?(T.*)?$")
# Partial dates (FHIR allows year and year-month), the extremes, and far time zones.
ODD_DATES = ["2019", "2026-03", "0001-01-01", "9999-12-31T23:59:59Z", "2026-03-01T10:00:00+14:00"]
EXTREME_NUMBERS = [0, -0.0, 1e308, -1e308, 1e-300, 123456789012345678, -1, 0.1, 2**31 - 1]


@st.composite
def valid_variant(draw: st.DrawFn, original: dict[str, Any]) -> Resource:
    """``original`` after changes that mostly keep it valid FHIR (dropped fields, odd text,
    extreme numbers, duplicated list items); the original when a change breaks validity."""
    doc = copy.deepcopy(original)
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        paths = [p for p in _paths(doc) if p[0] not in ("resourceType", "id")]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _parent(doc, path), path[-1]
        value = parent[key]
        action = draw(st.sampled_from(["drop", "drop", "text", "number", "date", "duplicate"]))
        if action == "drop":
            del parent[key]
        elif action == "text" and isinstance(value, str):
            parent[key] = draw(odd_text)
        elif action == "number" and isinstance(value, int | float) and not isinstance(value, bool):
            parent[key] = draw(st.sampled_from(EXTREME_NUMBERS))
        elif action == "date" and isinstance(value, str) and DATE.match(value):
            parent[key] = draw(st.sampled_from(ODD_DATES))
        elif action == "duplicate" and isinstance(value, list) and value:
            value.append(copy.deepcopy(value[0]))
    checked = validate(doc, "hypothesis")
    if isinstance(checked, InvalidResource):
        checked = validate(original, "seed")
    assert not isinstance(checked, InvalidResource), checked
    note(f"{reference_of(checked)}: {checked.model_dump_json(exclude_none=True)}")
    return checked


def records() -> st.SearchStrategy[PatientRecord]:
    kinds = sorted(SEEDS)
    resource = st.sampled_from(kinds).flatmap(
        lambda kind: st.sampled_from(SEEDS[kind]).flatmap(valid_variant)
    )
    patient = st.sampled_from(SEEDS["Patient"]).flatmap(valid_variant)

    def build(patient: Resource, resources: list[Resource]) -> PatientRecord:
        record = PatientRecord(patient=patient, source="hypothesis", fetched_at=datetime.now(UTC))  # type: ignore[arg-type]
        for res in resources:
            record.add(res)
        return record

    return st.builds(build, patient, st.lists(resource, min_size=1, max_size=6))


@given(record=records())
def test_evidence_never_raises_and_cites_the_record(record: PatientRecord):
    items = default_compactors(plugins=False).evidence(record)
    refs = {reference_of(r) for r in record.resources()}
    assert items
    for item in items:
        assert item.id in refs
        assert item.text.endswith(f"[{item.id}]")


@given(record=records())
def test_every_compactor_handles_the_record_itself(record: PatientRecord):
    # evidence() catches a compactor's exception and falls back to a bare line: right for the
    # chart, but the fact is lost. Called directly, every registered compactor must not raise.
    compactors = default_compactors(plugins=False)
    context = CompactContext(record)
    for res in record.resources():
        compactor = compactors.resources.get(res.get_resource_type())
        if compactor is not None:
            compactor(res, compactors, context)


# Found by the explore profile: fhir.resources keeps a partial date ("2019", "1958-03", allowed
# for date and dateTime) as a str, and _iso_day calls .isoformat() on it. evidence() then falls
# back to a bare line ("Patient: no code"), losing the name, sex and birth date, or a Condition's
# "resolved" date. They are printed at their own precision (retrieval.clinical.fhir_date).
PARTIAL_DATES = [
    ({"resourceType": "Patient", "id": "p", "birthDate": "2019"}, "2019"),
    ({"resourceType": "Patient", "id": "p", "birthDate": "1958-03"}, "1958-03"),
    ({"resourceType": "Patient", "id": "p", "deceasedDateTime": "2020"}, "2020"),
    (
        {
            "resourceType": "Condition",
            "id": "c",
            "subject": {"reference": "Patient/p"},
            "code": {"text": "gout"},
            "abatementDateTime": "2019",
        },
        "2019",
    ),
]


@pytest.mark.parametrize(("raw", "shown"), PARTIAL_DATES)
def test_partial_dates_are_compacted_at_their_precision(raw: dict[str, Any], shown: str):
    resource = validate(raw, "test")
    assert not isinstance(resource, InvalidResource), resource
    patient = resource if raw["resourceType"] == "Patient" else validate(PARTIAL_DATES[0][0], "t")
    record = PatientRecord(patient=patient, source="test", fetched_at=datetime.now(UTC))  # type: ignore[arg-type]
    record.add(resource)  # type: ignore[arg-type]
    compactors = default_compactors(plugins=False)
    made = compactors.resources[raw["resourceType"]](resource, compactors, CompactContext(record))
    assert made is not None and not isinstance(made, list)
    assert shown in made.text, made.text
