"""Property-based tests of the importer: whatever a file holds, the import either stores exactly
what its report counts, or raises ``FhirImportError`` naming the file (and the entry or line when
one entry is at fault) and leaves the store as it was. Never another exception."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from connectors.errors import FhirImportError
from connectors.store import FhirStore, _as_resource, resources_t
from tests.fhir_strategies import json_values, mutated

# A small transaction Bundle with what the importer works hardest on: urn:uuid references, a
# conditional reference, a contained resource, meta, identifiers and a DELETE.
VALID_BUNDLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:4d3b6c1e-0000-4000-8000-000000000001",
            "resource": {
                "resourceType": "Patient",
                "id": "prop-p1",
                "meta": {"versionId": "1", "lastUpdated": "2026-03-01T10:00:00Z"},
                "identifier": [{"system": "urn:mrn", "value": "12345"}],
                "name": [{"family": "Okafor", "given": ["Adaeze"]}],
                "gender": "female",
                "birthDate": "1961-02",
            },
            "request": {"method": "PUT", "url": "Patient/prop-p1"},
        },
        {
            "fullUrl": "urn:uuid:4d3b6c1e-0000-4000-8000-000000000002",
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "2823-3"}]},
                "subject": {"reference": "urn:uuid:4d3b6c1e-0000-4000-8000-000000000001"},
                "effectiveDateTime": "2026-03-01T08:00:00+01:00",
                "valueQuantity": {
                    "value": 4.1,
                    "unit": "mmol/L",
                    "system": "http://unitsofmeasure.org",
                    "code": "mmol/L",
                },
                "referenceRange": [{"low": {"value": 3.5}, "high": {"value": 5.1}}],
            },
            "request": {"method": "POST", "url": "Observation"},
        },
        {
            "fullUrl": "urn:uuid:4d3b6c1e-0000-4000-8000-000000000003",
            "resource": {
                "resourceType": "MedicationRequest",
                "id": "prop-mr1",
                "status": "active",
                "intent": "order",
                "contained": [
                    {"resourceType": "Medication", "id": "m1", "code": {"text": "amlodipine"}}
                ],
                "medicationReference": {"reference": "#m1"},
                "subject": {"reference": "Patient?identifier=urn:mrn|12345"},
                "authoredOn": "2026-02-01",
            },
            "request": {"method": "POST", "url": "MedicationRequest"},
        },
        {"request": {"method": "DELETE", "url": "Condition/prop-old"}},
    ],
}

_names = itertools.count()


@pytest.fixture(scope="module")
def prop_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FhirStore, Path]]:
    """One store for all examples, already holding a patient (so 'unchanged' means something)."""
    folder = tmp_path_factory.mktemp("properties")
    store = FhirStore(f"sqlite:///{folder / 'store.db'}")
    store.import_json(
        {"resourceType": "Patient", "id": "resident", "name": [{"family": "Bauer"}]}, "seed"
    )
    yield store, folder
    store.close()


def _snapshot(store: FhirStore) -> list[tuple[str, str, str]]:
    with store.engine.connect() as conn:
        return sorted(
            conn.execute(
                select(
                    resources_t.c.resource_type, resources_t.c.resource_id, resources_t.c.content
                )
            ).all()
        )


def _stored_from(store: FhirStore, origin: str) -> list[tuple[str, str, str]]:
    r = resources_t
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                select(r.c.content, r.c.resource_type, r.c.resource_id).where(r.c.origin == origin)
            ).all()
        )


def _check_import(
    store: FhirStore, path: Path, *, entry_at_fault: bool = False
) -> FhirImportError | None:
    """Import ``path`` and check the property; the error, if the import was refused."""
    before = _snapshot(store)
    try:
        report = store.import_path(path, force=True)  # a mutation may leave the file as it was
    except FhirImportError as exc:
        assert str(exc).startswith(str(path)), exc
        assert exc.reason
        if entry_at_fault:
            assert exc.entry, exc
        assert _snapshot(store) == before, "a refused file changed the store"
        return exc
    stored = _stored_from(store, str(path))
    deleted = sum(n for t, n in report.imported.items() if t.endswith("(deleted)"))
    assert len(stored) == report.count - deleted, (report, stored)
    for content, rtype, rid in stored:  # what was stored reads back as valid FHIR
        _as_resource(content, f"{rtype}/{rid}")
    return None


def _file(folder: Path, suffix: str) -> Path:
    return folder / f"doc{next(_names)}{suffix}"


@given(document=json_values(), suffix=st.sampled_from([".json", ".ndjson"]))
def test_any_json_document_imports_or_fails_clearly(prop_store, document: Any, suffix: str):
    store, folder = prop_store
    path = _file(folder, suffix)
    if suffix == ".ndjson" and isinstance(document, list):
        path.write_text("".join(json.dumps(line) + "\n" for line in document))
    else:
        path.write_text(json.dumps(document))
    _check_import(store, path)


@given(data=st.binary(max_size=300), suffix=st.sampled_from([".json", ".ndjson", ".json.gz"]))
def test_any_bytes_import_or_fail_clearly(prop_store, data: bytes, suffix: str):
    store, folder = prop_store
    path = _file(folder, suffix)
    path.write_bytes(data)
    _check_import(store, path)


@given(bundle=mutated(VALID_BUNDLE))
def test_mutated_bundles_import_or_fail_clearly(prop_store, bundle: Any):
    store, folder = prop_store
    path = _file(folder, ".json")
    path.write_text(json.dumps(bundle))
    _check_import(store, path)


@given(bundle=mutated(VALID_BUNDLE, under=3))
def test_a_broken_entry_is_named(prop_store, bundle: Any):
    # Mutations only inside the entries (Bundle.entry[i].…): a refusal is always one entry's fault.
    store, folder = prop_store
    path = _file(folder, ".json")
    path.write_text(json.dumps(bundle))
    _check_import(store, path, entry_at_fault=True)


@given(lines=st.lists(mutated(VALID_BUNDLE["entry"][1]["resource"], under=0), max_size=4))
def test_mutated_ndjson_lines_import_or_fail_clearly(prop_store, lines: list[Any]):
    store, folder = prop_store
    path = _file(folder, ".ndjson")
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    error = _check_import(store, path)
    if error is not None and lines:
        assert error.entry and error.entry.startswith("line "), error


def test_the_valid_bundle_imports(prop_store):
    # The property tests mutate this Bundle: it must import as it is.
    store, folder = prop_store
    path = _file(folder, ".json")
    path.write_text(json.dumps(VALID_BUNDLE))
    assert _check_import(store, path) is None
    assert store.read("Observation", "4d3b6c1e-0000-4000-8000-000000000002").subject.reference == (
        "Patient/prop-p1"
    )
    stored = sorted(f"{t}/{i}" for _, t, i in _stored_from(store, str(path)))
    assert stored == [
        "MedicationRequest/prop-mr1",
        "Observation/4d3b6c1e-0000-4000-8000-000000000002",
        "Patient/prop-p1",
    ]
