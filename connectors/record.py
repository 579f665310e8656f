"""Assemble one patient's chart, typed, from any ``FhirSource``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.allergyintolerance import AllergyIntolerance
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.immunization import Immunization
from fhir.resources.R4B.media import Media
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.medicationstatement import MedicationStatement
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.procedure import Procedure

from connectors.errors import ChartSightError, ConnectorError, ResourceNotFound
from connectors.resources import InvalidResource, Resource, reference_of
from connectors.source import PATIENT_COMPARTMENT_SEARCHES, FhirSource

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@dataclass(frozen=True)
class FetchProblem:
    """Part of the chart that could not be fetched, and why."""

    what: str
    error: str


# Record attribute for each resource type a chart is sorted into.
CATEGORIES: dict[str, str] = {
    "Condition": "conditions",
    "Observation": "observations",
    "MedicationRequest": "medications",
    "MedicationStatement": "medications",
    "AllergyIntolerance": "allergies",
    "Procedure": "procedures",
    "Encounter": "encounters",
    "DiagnosticReport": "diagnostic_reports",
    "DocumentReference": "documents",
    "ImagingStudy": "imaging_studies",
    "Media": "media",
    "Immunization": "immunizations",
}


@dataclass
class PatientRecord:
    """A patient's chart: typed resources by category, plus what could not be fetched."""

    patient: Patient
    source: str
    fetched_at: datetime
    conditions: list[Condition] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)
    medications: list[MedicationRequest | MedicationStatement] = field(default_factory=list)
    allergies: list[AllergyIntolerance] = field(default_factory=list)
    procedures: list[Procedure] = field(default_factory=list)
    encounters: list[Encounter] = field(default_factory=list)
    diagnostic_reports: list[DiagnosticReport] = field(default_factory=list)
    documents: list[DocumentReference] = field(default_factory=list)
    imaging_studies: list[ImagingStudy] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)
    immunizations: list[Immunization] = field(default_factory=list)
    other: list[Resource] = field(default_factory=list)
    invalid: list[InvalidResource] = field(default_factory=list)
    problems: list[FetchProblem] = field(default_factory=list)

    @property
    def patient_id(self) -> str:
        return str(self.patient.id)

    @property
    def complete(self) -> bool:
        """True when nothing was left out (no fetch problem, no invalid resource)."""
        return not self.problems and not self.invalid

    def resources(self) -> Iterator[Resource]:
        """Every resource of the record, the patient first."""
        yield self.patient
        for attr in dict.fromkeys(CATEGORIES.values()):
            yield from getattr(self, attr)
        yield from self.other

    def get(self, reference: str) -> Resource | None:
        """The resource with this ``Type/id`` reference, if the record holds it."""
        for res in self.resources():
            if reference_of(res) == reference:
                return res
        return None

    def counts(self) -> dict[str, int]:
        """Resources per type."""
        out: dict[str, int] = {}
        for res in self.resources():
            out[res.get_resource_type()] = out.get(res.get_resource_type(), 0) + 1
        return out

    def add(self, resource: Resource) -> None:
        attr = CATEGORIES.get(resource.get_resource_type())
        if resource.get_resource_type() == "Patient":
            return
        getattr(self, attr).append(resource) if attr else self.other.append(resource)


async def find_patients(
    source: FhirSource, name: str, birth_date: str | None = None
) -> list[Patient]:
    """Patients by name (given and family name, as a person writes them) and birth date."""
    words = name.split()
    if not words:
        return []
    params: dict[str, str] = {"family": words[-1]}
    if len(words) > 1:
        params["given"] = words[0]
    if birth_date:
        params["birthdate"] = birth_date
    found = (await source.search("Patient", params)).resources
    return [p for p in found if isinstance(p, Patient)]


async def resolve_patient(source: FhirSource, key: str) -> Patient:
    """Find a patient by id, or by an identifier value (``system|value`` or a bare value)."""
    try:
        found = await source.read("Patient", key)
        if isinstance(found, Patient):
            return found
    except ResourceNotFound:
        pass
    except ConnectorError:
        if "/" in key or "|" in key:
            pass  # not a valid id on this server; try it as an identifier
        else:
            raise
    matches = (await source.search("Patient", {"identifier": key})).resources
    if len(matches) == 1 and isinstance(matches[0], Patient):
        return matches[0]
    if len(matches) > 1:
        ids = ", ".join(str(m.id) for m in matches[:5])
        raise ChartSightError(
            f"{key!r} matches {len(matches)} patients ({ids}); give the Patient id"
        )
    raise ResourceNotFound(
        f"{source.name}#Patient/{key}", 404, "no patient with this id or identifier"
    )


async def assemble_record(source: FhirSource, patient_key: str) -> PatientRecord:
    """The patient's full chart from ``source``; parts that fail are listed, not dropped silently.

    Uses ``$everything`` (which the source may answer by concurrent per-type searches); if that
    fails, falls back to one search per resource type, each failure recorded on its own. When the
    key looks like a resource id, ``$everything`` starts at once, while the patient is resolved,
    and is discarded if the key turns out to be an identifier of another patient.
    """
    early = (
        asyncio.ensure_future(source.everything(patient_key))
        if _FHIR_ID.fullmatch(patient_key)
        else None
    )
    try:
        patient = await resolve_patient(source, patient_key)
    except BaseException:
        if early is not None:
            early.cancel()
            await asyncio.gather(early, return_exceptions=True)
        raise
    pid = str(patient.id)
    if early is not None and pid != patient_key:
        early.cancel()
        await asyncio.gather(early, return_exceptions=True)
        early = None
    record = PatientRecord(patient=patient, source=source.name, fetched_at=datetime.now(UTC))
    try:
        result = await (early if early is not None else source.everything(pid))
    except ConnectorError as exc:
        record.problems.append(FetchProblem("Patient/$everything", str(exc)))
        await _fill_by_type(source, pid, record)
        return record
    for res in result.resources:
        if res.get_resource_type() == "Patient" and str(res.id) == pid:
            record.patient = res  # type: ignore[assignment]
        elif res.get_resource_type() == "Patient":
            record.other.append(res)
        else:
            record.add(res)
    record.invalid.extend(result.invalid)
    return record


async def _fill_by_type(source: FhirSource, pid: str, record: PatientRecord) -> None:
    async def one(rtype: str, param: str) -> tuple[str, Any]:
        try:
            return rtype, await source.search(rtype, {param: f"Patient/{pid}"})
        except ConnectorError as exc:
            return rtype, exc

    for rtype, outcome in await asyncio.gather(
        *(one(t, p) for t, p in PATIENT_COMPARTMENT_SEARCHES)
    ):
        if isinstance(outcome, ConnectorError):
            record.problems.append(FetchProblem(rtype, str(outcome)))
            continue
        for res in outcome.resources:
            record.add(res)
        record.invalid.extend(outcome.invalid)
