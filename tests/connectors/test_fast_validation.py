"""The fast validation path (``connectors.fast_validation``) gives the models, records and invalid
resources that ``fhir.resources``' own validation gives: on the demo patients, on the real-world
shapes in ``tests/fixtures/realworld``, and on resources each of its checks refuses."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from connectors import fast_validation
from connectors.demo import demo_bundles
from connectors.record import PatientRecord, assemble_record
from connectors.resources import InvalidResource, Resource, validate
from connectors.store import FhirStore, StoreSource
from tests.conftest import load_bundle

REALWORLD = Path(__file__).resolve().parents[1] / "fixtures" / "realworld"


def _entries(path: Path) -> list[Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        body = json.load(fh)
    if body.get("resourceType") == "Bundle":
        return [e.get("resource") for e in body.get("entry") or []]
    return [body]


def _both(raw: Any) -> tuple[Resource | InvalidResource, Resource | InvalidResource]:
    """``validate`` of the same JSON by the library's code and by the fast path (each given
    its own copy: validation must not depend on what the other did to the input)."""
    with fast_validation.strict():
        slow = validate(copy.deepcopy(raw), "test")
    assert fast_validation.installed()
    return slow, validate(copy.deepcopy(raw), "test")


def _assert_same(raw: Any) -> Resource | InvalidResource:
    slow, fast = _both(raw)
    assert type(fast) is type(slow)
    if isinstance(slow, InvalidResource):
        assert fast == slow
    else:
        assert fast == slow
        assert fast.model_dump(mode="json", by_alias=True) == slow.model_dump(
            mode="json", by_alias=True
        )
    return fast


def test_the_fast_path_is_installed_for_the_fhir_core_it_matches():
    assert fast_validation.install()
    assert fast_validation.installed()
    with fast_validation.strict():
        assert not fast_validation.installed()
    assert fast_validation.installed()


@pytest.mark.parametrize("bundle", demo_bundles(), ids=lambda p: p.name.split("_")[0])
def test_demo_patients_validate_to_the_same_models(bundle: Path):
    raws = [e["resource"] for e in load_bundle(bundle)["entry"]]
    assert all(not isinstance(_assert_same(raw), InvalidResource) for raw in raws)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in REALWORLD.iterdir() if p.name.endswith((".json", ".json.gz"))),
    ids=lambda p: p.name.split(".")[0],
)
def test_realworld_shapes_validate_to_the_same_models_and_errors(path: Path):
    raws = _entries(path)
    if len(raws) > 500:  # the 10k-observation bundle: its first and last few hundred
        raws = raws[:250] + raws[-250:]
    for raw in raws:
        _assert_same(raw)


def _observation(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": {"value": 4.1, "unit": "mmol/L"},
    }
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


INVALID = {
    # reject_null_complex_elements: a null inside a list of a complex type
    "null in a complex list": _observation(performer=[{"reference": "Practitioner/x"}, None]),
    "null in a nested complex list": _observation(
        code={"coding": [None, {"system": "http://loinc.org", "code": "2823-3"}]}
    ),
    # _validate_required_primitive_elements: Observation.status is 1..1
    "required primitive missing": _observation(status=None),
    # ... and in a nested element: Extension.url is 1..1
    "required primitive missing, nested": _observation(extension=[{"valueString": "x"}]),
    # _validate_one_of_many: two values of one choice element
    "two values of value[x]": _observation(valueString="high"),
    # a required choice left out: MedicationRequest.medication[x] is 1..1
    "required choice missing": {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
    },
    "wrong primitive type": _observation(status={"not": "a code"}),
    "unknown element": _observation(colour="red"),
    "unknown nested resourceType": _observation(contained=[{"resourceType": "Nope", "id": "x"}]),
    "not an object": ["Observation"],
}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_resources_are_reported_alike(name: str):
    slow, fast = _both(INVALID[name])
    assert isinstance(slow, InvalidResource), slow
    assert fast == slow


def test_a_valid_primitive_extension_in_place_of_a_required_value_is_accepted_alike():
    # FHIR R4 §2.1.0.1 ("Special-Case"): a required primitive may be absent when its extension
    # says why; the fast path leaves that case to the library's code
    raw = _observation(
        status=None,
        _status={
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                    "valueCode": "unknown",
                }
            ]
        },
    )
    assert not isinstance(_assert_same(raw), InvalidResource)


def _comparable(record: PatientRecord) -> PatientRecord:
    return dataclasses.replace(record, fetched_at=record.patient.meta.lastUpdated)  # type: ignore[union-attr]


@pytest.mark.slow
async def test_demo_records_assemble_the_same_through_the_store(demo_store: FhirStore):
    source = StoreSource(demo_store)
    for patient in demo_store.search("Patient", {}).resources:
        with fast_validation.strict():
            slow = await assemble_record(source, str(patient.id))
        fast = await assemble_record(source, str(patient.id))
        assert _comparable(fast) == _comparable(slow)
        assert [r.model_dump(mode="json") for r in fast.resources()] == [
            r.model_dump(mode="json") for r in slow.resources()
        ]
        assert fast.invalid == slow.invalid and fast.problems == slow.problems
