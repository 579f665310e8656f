"""Assemble one patient's chart, typed, from any ``FhirSource``."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.allergyintolerance import AllergyIntolerance
from fhir.resources.R4B.codeableconcept import CodeableConcept
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
from fhir.resources.R4B.reference import Reference

from connectors.errors import ChartSightError, ConnectorError, ResourceNotFound
from connectors.indexing import COMPARTMENT_ELEMENTS
from connectors.resources import InvalidResource, Resource, reference_of
from connectors.source import PATIENT_COMPARTMENT_SEARCHES, FhirSource, ScopedSource

log = logging.getLogger(__name__)

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# A literal reference to a resource on the same server: Type/id, optionally a version of it.
_RELATIVE = re.compile(r"([A-Z][A-Za-z]{1,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?")


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

# Resource types outside the patient compartment that the chart's resources point at and that a
# reader needs to name things: the drug of a medication order, who recorded or performed something,
# where it happened. ``assemble_record`` fetches them into ``PatientRecord.referenced``.
REFERENCED_TYPES: tuple[str, ...] = (
    "Medication",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
)

# Where each resource type points at REFERENCED_TYPES (dotted attribute paths; lists are walked).
# From the FHIR R4 element definitions of these resources.
REFERENCE_PATHS: dict[str, tuple[str, ...]] = {
    "Patient": ("managingOrganization", "generalPractitioner"),
    "MedicationRequest": ("medicationReference", "requester", "performer", "recorder"),
    "MedicationStatement": ("medicationReference", "informationSource"),
    "MedicationAdministration": ("medicationReference", "performer.actor"),
    "MedicationDispense": ("medicationReference", "performer.actor", "location"),
    "Encounter": ("participant.individual", "location.location", "serviceProvider"),
    "Condition": ("recorder", "asserter"),
    "AllergyIntolerance": ("recorder", "asserter"),
    "Observation": ("performer",),
    "DiagnosticReport": ("performer", "resultsInterpreter"),
    "Procedure": ("performer.actor", "recorder", "asserter", "location"),
    "Immunization": ("performer.actor", "location"),
    "ImagingStudy": ("referrer", "interpreter", "location"),
    "DocumentReference": ("author", "custodian"),
    "CareTeam": ("participant.member", "managingOrganization"),
}

# Ids asked for in one ``_id=a,b,c`` search (keeps the URL well under common 8 KiB limits).
ID_BATCH = 50
# Missing referenced resources named in one FetchProblem; the rest are counted.
MAX_NAMED = 5


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
    # what upper layers derive from the assembled record, kept with it (a record is not changed
    # once assembled; a new fetch is a new object): e.g. the tools' observation series
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Resources outside the patient compartment that the chart points at (REFERENCED_TYPES),
    # keyed "Type/id"; not part of ``resources()`` (they are not the patient's data).
    referenced: dict[str, Resource] = field(default_factory=dict)
    _index: dict[str, Resource] = field(default_factory=dict, init=False, repr=False, compare=False)
    _indexed: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    @property
    def patient_id(self) -> str:
        """The Patient's ``id`` (the logical id, without ``Patient/``)."""
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

    def resolve(
        self, reference: str | Reference | None, from_resource: Resource | None = None
    ) -> Resource | None:
        """The resource a reference points at, if the record holds it; else None.

        The one place references are followed. ``reference`` is a ``Reference`` or its
        ``reference`` string, in any of the forms FHIR R4 allows (§2.3.0 "Resource References"):

        - ``#id``: the resource contained in ``from_resource`` (the resource the reference is
          in; without it a contained reference resolves to None); ``#`` alone is
          ``from_resource`` itself;
        - ``Type/id`` or ``Type/id/_history/v``: a resource of the chart (``resources()``) or a
          referenced one (``referenced``);
        - ``{base}/Type/id``: the same, when ``{base}`` is the server the record came from
          (``source``); an absolute URL on another server resolves to None;
        - ``urn:uuid:{uuid}``: the resource whose id is that uuid (the local store keeps a
          Bundle entry's uuid as the id of a resource imported without one).
        """
        ref = reference.reference if isinstance(reference, Reference) else reference
        if not ref:
            return None
        ref = str(ref)
        if ref.startswith("#"):
            if from_resource is None:
                return None
            if ref == "#":
                return from_resource
            for inner in getattr(from_resource, "contained", None) or []:
                if inner.id == ref[1:]:
                    return inner
            return None
        index = self._lookup()
        if ref.startswith("urn:uuid:"):
            found = [r for key, r in index.items() if key.endswith("/" + ref[9:])]
            return found[0] if len(found) == 1 else None
        key = self.local_reference(ref)
        return index.get(key) if key is not None else None

    def local_reference(self, reference: str) -> str | None:
        """``Type/id`` of a literal reference to the record's source (relative, or absolute under
        the source's base URL, any ``_history`` dropped); None for contained, logical, urn: or
        other servers' references."""
        base = self.source.rstrip("/") + "/"
        if reference.startswith(base):
            reference = reference[len(base) :]
        found = _RELATIVE.fullmatch(reference)
        return f"{found.group(1)}/{found.group(2)}" if found else None

    def medication_code(self, resource: Resource) -> CodeableConcept | None:
        """The drug of a MedicationRequest, -Statement, -Administration or -Dispense, as a
        CodeableConcept: its ``medicationCodeableConcept``, or the ``code`` of the Medication
        its ``medicationReference`` resolves to (contained or referenced); None if unknown."""
        concept = getattr(resource, "medicationCodeableConcept", None)
        if isinstance(concept, CodeableConcept):
            return concept
        med = self.resolve(getattr(resource, "medicationReference", None), resource)
        code = getattr(med, "code", None)
        return code if isinstance(code, CodeableConcept) else None

    def _lookup(self) -> dict[str, Resource]:
        # Rebuilt when resources were added since it was built (``add`` or list appends).
        sizes = (
            len(self.referenced),
            *(len(getattr(self, a)) for a in dict.fromkeys(CATEGORIES.values())),
            len(self.other),
        )
        if sizes != self._indexed:
            self._index = {reference_of(r): r for r in self.resources()}
            self._index.update(self.referenced)
            self._indexed = sizes
        return self._index

    def counts(self) -> dict[str, int]:
        """Resources per type."""
        out: dict[str, int] = {}
        for res in self.resources():
            out[res.get_resource_type()] = out.get(res.get_resource_type(), 0) + 1
        return out

    def add(self, resource: Resource) -> None:
        """File a resource under its category, ``referenced`` (REFERENCED_TYPES) or ``other``."""
        rtype = resource.get_resource_type()
        if rtype == "Patient":
            return
        if rtype in REFERENCED_TYPES:
            self.referenced[reference_of(resource)] = resource
            return
        attr = CATEGORIES.get(rtype)
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
    """Find a patient by id (also written ``Patient/<id>``), or by an identifier value
    (``system|value`` or a bare value)."""
    if re.fullmatch(r"Patient/[A-Za-z0-9\-.]{1,64}", key):
        key = key.removeprefix("Patient/")
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
    and is discarded if the key turns out to be an identifier of another patient. Then the
    resources the chart points at outside the compartment are fetched (``fetch_referenced``).
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
        await fetch_referenced(source, record)
        return record
    for res in result.resources:
        if res.get_resource_type() == "Patient" and str(res.id) == pid:
            record.patient = res  # type: ignore[assignment]
        else:
            _file(record, res, pid, "Patient/$everything")
    record.invalid.extend(result.invalid)
    await fetch_referenced(source, record)
    return record


def _owner(record: PatientRecord, resource: Resource) -> str | None:
    """The id of the Patient a resource is about: its ``subject``, ``patient`` or ``beneficiary``
    reference to a Patient (``connectors.indexing.COMPARTMENT_ELEMENTS``, the elements by which
    the local store files a resource in a compartment), relative or under the source's base
    URL; None when it names none."""
    for element in COMPARTMENT_ELEMENTS:
        ref = getattr(resource, element, None)
        key = record.local_reference(str(getattr(ref, "reference", None) or ""))
        if key is not None and key.startswith("Patient/"):
            return key.removeprefix("Patient/")
    return None


def _file(record: PatientRecord, resource: Resource, pid: str, origin: str) -> None:
    """Add ``resource`` to the record of Patient ``pid`` unless it is about another patient: a
    server's Patient compartment also holds resources in which the patient only takes part (a
    CareTeam of another patient naming this one as a member, a DocumentReference this patient
    authored about another; FHIR R4 CompartmentDefinition patient), and those are that other
    patient's data, as is another Patient (a linked one). They go to ``record.invalid`` ("about
    another patient"), as a CDS Hooks prefetch's do (``connectors.prefetch``)."""
    owner = (
        str(resource.id) if resource.get_resource_type() == "Patient" else _owner(record, resource)
    )
    if owner is None or owner == pid:
        record.add(resource)
        return
    raw = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
    record.invalid.append(
        InvalidResource(
            resource.get_resource_type(), str(resource.id), raw,
            f"about another patient (Patient/{owner})", origin,
        )
    )  # fmt: skip


def _references_at(node: Any, path: str) -> Iterator[Reference]:
    """The References found along a dotted attribute path, walking lists on the way."""
    head, _, rest = path.partition(".")
    value = getattr(node, head, None)
    for item in value if isinstance(value, list) else [value]:
        if item is None:
            continue
        if rest:
            yield from _references_at(item, rest)
        elif isinstance(item, Reference):
            yield item


def missing_references(record: PatientRecord) -> dict[str, str]:
    """``Type/id`` of each REFERENCED_TYPES resource the chart points at (REFERENCE_PATHS) that
    the record does not hold, with the first resource pointing at it. Contained (``#id``) and
    other servers' references are left out: they are not fetched."""
    wanted: dict[str, str] = {}
    for res in record.resources():
        for path in REFERENCE_PATHS.get(res.get_resource_type(), ()):
            for ref in _references_at(res, path):
                key = record.local_reference(str(ref.reference or ""))
                if (
                    key is not None
                    and key.split("/", 1)[0] in REFERENCED_TYPES
                    and key not in record.referenced
                ):
                    wanted.setdefault(key, reference_of(res))
    return wanted


async def fetch_referenced(source: FhirSource, record: PatientRecord) -> None:
    """Fetch into ``record.referenced`` what ``missing_references`` lists.

    Per type, ``_id=a,b,c`` searches of up to ID_BATCH ids run concurrently (the source bounds
    its own concurrency); where such a search fails, the ids are read one by one. What cannot
    be had is a ``FetchProblem``, not an error: one naming the resource and what points at it,
    or, for several of a type failing alike (an export without its practitioners), one for them
    all naming the first MAX_NAMED, so that the record's problems stay readable. Through a
    ``ScopedSource``, types its scope does not allow are not asked for.
    """
    wanted = missing_references(record)
    scope = source.scope if isinstance(source, ScopedSource) else None
    if scope is not None:  # what the caller may not read is not asked for (no "not found")
        wanted = {k: v for k, v in wanted.items() if scope.allows(k.split("/", 1)[0])}
    by_type: dict[str, list[str]] = {}
    for key in wanted:
        rtype, _, rid = key.partition("/")
        by_type.setdefault(rtype, []).append(rid)
    batches = [
        (rtype, ids[i : i + ID_BATCH])
        for rtype, ids in by_type.items()
        for i in range(0, len(ids), ID_BATCH)
    ]
    outcomes = await asyncio.gather(*(_fetch_batch(source, t, ids) for t, ids in batches))
    failed: dict[tuple[str, str], list[str]] = {}
    for found, invalid, errors in outcomes:
        for res in found:
            record.referenced[reference_of(res)] = res
        record.invalid.extend(invalid)
        for key, error in errors.items():
            failed.setdefault((key.split("/", 1)[0], error), []).append(key)
    for (rtype, error), keys in failed.items():
        if len(keys) == 1:
            record.problems.append(
                FetchProblem(keys[0], f"referenced by {wanted[keys[0]]}: {error}")
            )
            continue
        named = ", ".join(f"{k} (by {wanted[k]})" for k in keys[:MAX_NAMED])
        more = f" and {len(keys) - MAX_NAMED} more" if len(keys) > MAX_NAMED else ""
        record.problems.append(
            FetchProblem(f"{len(keys)} referenced {rtype} resources", f"{error}: {named}{more}")
        )


async def _fetch_batch(
    source: FhirSource, rtype: str, ids: list[str]
) -> tuple[list[Resource], list[InvalidResource], dict[str, str]]:
    """Resources of one type by id: one ``_id`` search, else reads; with the ids not had."""
    try:
        result = await source.search(rtype, {"_id": ",".join(ids)})
    except ConnectorError as exc:
        log.info(
            "%s cannot be searched by _id at %s (%s); reading one by one", rtype, source.name, exc
        )
        return await _read_each(source, rtype, ids)
    found = [r for r in result.resources if r.get_resource_type() == rtype and r.id in ids]
    invalid = [i for i in result.invalid if i.resource_type == rtype and i.id in ids]
    had = {str(r.id) for r in found} | {str(i.id) for i in invalid}
    missing = {f"{rtype}/{rid}": f"not found at {source.name}" for rid in ids if rid not in had}
    return found, invalid, missing


async def _read_each(
    source: FhirSource, rtype: str, ids: list[str]
) -> tuple[list[Resource], list[InvalidResource], dict[str, str]]:
    reads = await asyncio.gather(*(source.read(rtype, rid) for rid in ids), return_exceptions=True)
    found: list[Resource] = []
    errors: dict[str, str] = {}
    for rid, outcome in zip(ids, reads, strict=True):
        if isinstance(outcome, ResourceNotFound):
            errors[f"{rtype}/{rid}"] = f"not found at {source.name}"
        elif isinstance(outcome, ConnectorError):
            errors[f"{rtype}/{rid}"] = str(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            found.append(outcome)
    return found, [], errors


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
            _file(record, res, pid, rtype)
        record.invalid.extend(outcome.invalid)
