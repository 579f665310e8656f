"""References of a patient's chart: contained resources, and resources outside the compartment
(Medication, Practitioner, Location, Organization) fetched from the local store."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.errors import ConnectorError, UnsupportedSearch
from connectors.record import ID_BATCH, MAX_NAMED, PatientRecord, assemble_record
from connectors.resources import Resource, SearchResult, reference_of
from connectors.source import SearchParams
from connectors.store import FhirStore, StoreSource
from retrieval.evidence import record_evidence

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CONTAINED = FIXTURES / "realworld" / "01-contained-medication.json"
REFERENCED = FIXTURES / "referenced-resources.json"


def _line(record: PatientRecord, reference: str) -> str:
    return next(e.text for e in record_evidence(record) if e.id == reference)


async def _referenced_record(store: FhirStore) -> PatientRecord:
    store.import_path(REFERENCED)
    (patient,) = store.search("Patient", {"identifier": "urn:chartsight:test|refs-01"}).resources
    return await assemble_record(StoreSource(store), str(patient.id))


async def test_contained_medication_is_named_from_the_referring_resource(store: FhirStore):
    store.import_path(CONTAINED)
    record = await assemble_record(StoreSource(store), "bug01-pat")
    (order,) = record.medications
    med = record.resolve(order.medicationReference, order)
    assert med is not None and med.get_resource_type() == "Medication"
    assert record.resolve("#m1") is None  # a contained id means nothing outside its container
    assert record.medication_code(order).text == "amlodipine 5 mg tablet"
    line = _line(record, "MedicationRequest/bug01-mr1")
    assert "Medication: amlodipine 5 mg tablet (RxNorm 197361), active" in line
    assert record.complete and record.referenced == {}  # nothing to fetch for a contained drug


async def test_referenced_resources_are_fetched_from_the_store(store: FhirStore):
    record = await _referenced_record(store)
    assert record.complete, record.problems
    assert sorted(k.split("/")[0] for k in record.referenced) == [
        "Location",
        "Medication",
        "Organization",
        "Practitioner",
    ]
    # the chart itself is unchanged: referenced resources are not the patient's data
    assert not any(r.get_resource_type() in ("Medication", "Location") for r in record.resources())
    (order,) = [m for m in record.medications if m.get_resource_type() == "MedicationRequest"]
    assert record.medication_code(order).text == "metformin 500 mg tablet"
    assert "Medication: metformin 500 mg tablet (RxNorm 861007), active" in _line(
        record, reference_of(order)
    )
    prescriber = record.resolve(order.requester)
    assert prescriber is not None and prescriber.name[0].family == "Eze"
    (visit,) = record.encounters
    assert record.resolve(visit.location[0].location).name == "Ward 4B"
    assert record.resolve(visit.participant[0].individual) is prescriber
    assert record.resolve(visit.serviceProvider).name == "Riverside Community Hospital"
    assert record.resolve(record.patient.managingOrganization) is record.resolve(
        visit.serviceProvider
    )


async def test_medication_statement_and_administration_with_contained_drugs(store: FhirStore):
    record = await _referenced_record(store)
    (statement,) = [m for m in record.medications if m.get_resource_type() == "MedicationStatement"]
    assert "Medication: lisinopril 10 mg tablet (RxNorm 314076), active; once daily" in _line(
        record, reference_of(statement)
    )
    (given,) = [r for r in record.other if r.get_resource_type() == "MedicationAdministration"]
    assert record.medication_code(given).text == "ceftriaxone 1 g injection"
    assert record.resolve(given.performer[0].actor).name[0].given == ["Ngozi"]
    assert record.resolve(given.context).get_resource_type() == "Encounter"


async def test_a_missing_referenced_resource_is_a_fetch_problem_not_an_error(store: FhirStore):
    store.import_json(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {"resource": {"resourceType": "Patient", "id": "p1"}},
                {
                    "resource": {
                        "resourceType": "MedicationRequest",
                        "id": "mr1",
                        "status": "active",
                        "intent": "order",
                        "medicationReference": {
                            "reference": "Medication/gone",
                            "display": "warfarin 5 mg",
                        },
                        "subject": {"reference": "Patient/p1"},
                    }
                },
            ],
        },
        "missing.json",
    )
    record = await assemble_record(StoreSource(store), "p1")
    assert [(p.what, p.error) for p in record.problems] == [
        (
            "Medication/gone",
            f"referenced by MedicationRequest/mr1: not found at {StoreSource(store).name}",
        )
    ]
    # the order is still in the chart, named by the reference's display
    assert "Medication: warfarin 5 mg, active" in _line(record, "MedicationRequest/mr1")


def _record(source: str, *resources: Resource) -> PatientRecord:
    from fhir.resources.R4B.patient import Patient

    record = PatientRecord(Patient(id="p1"), source, datetime.now(UTC))
    for res in resources:
        record.add(res)
    return record


def test_resolve_reads_every_reference_form():
    from fhir.resources.R4B.medication import Medication
    from fhir.resources.R4B.practitioner import Practitioner

    med = Medication(id="7d0c5e2a-5b1f-4c3e-9a61-000000000005", code={"text": "metformin"})
    doc = Practitioner(id="pr1")
    record = _record("https://ehr.example/fhir/R4/", med, doc)
    assert record.referenced == {f"Medication/{med.id}": med, "Practitioner/pr1": doc}
    assert record.resolve("Practitioner/pr1") is doc
    assert record.resolve("Practitioner/pr1/_history/3") is doc
    assert record.resolve("https://ehr.example/fhir/R4/Practitioner/pr1") is doc
    assert record.resolve("https://other.example/fhir/Practitioner/pr1") is None
    assert record.resolve(f"urn:uuid:{med.id}") is med
    assert record.resolve("Patient/p1") is record.patient
    assert record.resolve("Practitioner/nobody") is None
    assert record.resolve(None) is None
    assert record.resolve("#") is None
    # resources added after a lookup are found too
    late = Practitioner(id="pr2")
    record.add(late)
    assert record.resolve("Practitioner/pr2") is late


class _CountingSource(StoreSource):
    """The local store, counting searches; optionally refusing ``_id`` searches of a type, as
    servers that offer only reads of it do."""

    def __init__(self, store: FhirStore, refuse: str | None = None) -> None:
        super().__init__(store)
        self.searches: list[tuple[str, dict[str, Any]]] = []
        self.reads = 0
        self.refuse = refuse

    async def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        self.searches.append((resource_type, dict(params or {})))
        if resource_type == self.refuse and "_id" in (params or {}):
            raise UnsupportedSearch(f"{resource_type} cannot be searched by _id")
        return await super().search(resource_type, params)

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        self.reads += 1
        return await super().read(resource_type, resource_id)


def _many_performers(store: FhirStore, n: int, *, practitioners: bool = True) -> None:
    entries: list[dict[str, Any]] = [{"resource": {"resourceType": "Patient", "id": "p1"}}]
    for i in range(n):
        if practitioners:
            entries.append({"resource": {"resourceType": "Practitioner", "id": f"pr{i}"}})
        entries.append(
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": f"o{i}",
                    "status": "final",
                    "code": {"text": "heart rate"},
                    "subject": {"reference": "Patient/p1"},
                    "performer": [{"reference": f"Practitioner/pr{i}"}],
                }
            }
        )
    store.import_json({"resourceType": "Bundle", "type": "collection", "entry": entries}, "n")


@pytest.mark.parametrize("refuse", [None, "Practitioner"])
async def test_referenced_resources_come_in_id_batches_or_reads(
    store: FhirStore, refuse: str | None
):
    n = 2 * ID_BATCH + 5
    _many_performers(store, n)
    source = _CountingSource(store, refuse)
    record = await assemble_record(source, "p1")
    assert record.complete, record.problems[:3]
    assert len(record.referenced) == n
    by_id = [params["_id"].split(",") for rtype, params in source.searches if "_id" in params]
    assert [len(ids) for ids in by_id] == [ID_BATCH, ID_BATCH, 5]
    assert source.reads == (n if refuse else 0) + 1  # + the patient's own read


async def test_many_missing_references_of_a_type_are_one_problem(store: FhirStore):
    _many_performers(store, 12, practitioners=False)
    source = StoreSource(store)
    record = await assemble_record(source, "p1")
    (problem,) = record.problems
    assert problem.what == "12 referenced Practitioner resources"
    assert problem.error.startswith(f"not found at {source.name}: Practitioner/pr")
    assert problem.error.count("(by Observation/o") == MAX_NAMED
    assert problem.error.endswith(f" and {12 - MAX_NAMED} more")
    assert len(record.observations) == 12 and not record.referenced


class _CompartmentSource(StoreSource):
    """The local store answering ``$everything`` and per-type searches as a FHIR server's Patient
    compartment does: with every resource the patient takes part in, also those about another
    patient (the other Patient, a CareTeam naming p1 as a member, a DocumentReference p1
    authored)."""

    def __init__(self, store: FhirStore, fail_everything: bool = False) -> None:
        super().__init__(store)
        self.fail_everything = fail_everything

    def _theirs(self, resource_type: str | None = None) -> list[Resource]:
        found = [
            *self.store.search("Patient", {"_id": "p2"}).resources,
            *self.store.search("CareTeam", {"_id": "their-team"}).resources,
            *self.store.search("DocumentReference", {"_id": "their-note"}).resources,
        ]
        return [r for r in found if resource_type in (None, r.get_resource_type())]

    async def everything(self, patient_id: str) -> SearchResult:
        if self.fail_everything:
            raise ConnectorError("$everything is not supported")
        mine = await super().everything(patient_id)
        return SearchResult(resources=[*mine.resources, *self._theirs()], pages=1)

    async def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        mine = await super().search(resource_type, params)
        if "_id" in (params or {}):
            return mine
        return SearchResult(resources=[*mine.resources, *self._theirs(resource_type)], pages=1)


@pytest.mark.parametrize("fail_everything", [False, True])
async def test_a_resource_about_another_patient_is_left_out_of_the_record(
    store: FhirStore, fail_everything: bool
):
    note = "QU5PVEhFUiBQQVRJRU5UJ1MgTk9URQ=="  # "ANOTHER PATIENT'S NOTE"
    entries: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "p1"},
        {"resourceType": "Patient", "id": "p2", "name": [{"family": "Other"}]},
        {"resourceType": "CareTeam", "id": "my-team", "subject": {"reference": "Patient/p1"}},
        {"resourceType": "CareTeam", "id": "their-team", "name": "p2's team",
         "subject": {"reference": "Patient/p2"}, "participant": [{"member": {"reference": "Patient/p1"}}]},
        {"resourceType": "DocumentReference", "id": "their-note", "status": "current",
         "subject": {"reference": "Patient/p2"}, "author": [{"reference": "Patient/p1"}],
         "content": [{"attachment": {"contentType": "text/plain", "data": note}}]},
    ]  # fmt: skip
    store.import_json(
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": r} for r in entries],
        },
        "compartment",
    )
    record = await assemble_record(_CompartmentSource(store, fail_everything), "p1")
    kept = {reference_of(r) for r in record.resources()}
    assert "CareTeam/my-team" in kept
    assert not kept & {"Patient/p2", "CareTeam/their-team", "DocumentReference/their-note"}
    assert not [e for e in record_evidence(record) if "Other" in e.text or "p2" in e.text]
    left_out = {i.reference: i.error for i in record.invalid}
    if not fail_everything:  # (per-type searches do not search Patients)
        assert left_out["Patient/p2"] == "about another patient (Patient/p2)"
    assert left_out["CareTeam/their-team"] == "about another patient (Patient/p2)"
    assert left_out["DocumentReference/their-note"] == "about another patient (Patient/p2)"
