"""The interface every patient-data source offers: a FHIR server or the embedded local store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from connectors.resources import Resource, SearchResult

SearchParams = Mapping[str, str | Sequence[str]]

# What a patient's chart is read from when a source cannot answer $everything.
# (resource type, search parameter that points at the patient)
PATIENT_COMPARTMENT_SEARCHES: tuple[tuple[str, str], ...] = (
    ("Condition", "patient"),
    ("Observation", "patient"),
    ("MedicationRequest", "patient"),
    ("MedicationStatement", "patient"),
    ("AllergyIntolerance", "patient"),
    ("Procedure", "patient"),
    ("Encounter", "patient"),
    ("DiagnosticReport", "patient"),
    ("DocumentReference", "patient"),
    ("ImagingStudy", "patient"),
    ("Media", "patient"),
    ("Immunization", "patient"),
    ("CarePlan", "patient"),
    ("Goal", "patient"),
    ("CareTeam", "patient"),
    ("Consent", "patient"),
)


@dataclass(frozen=True)
class BinaryContent:
    """Raw bytes of a Binary resource or an attachment."""

    data: bytes
    content_type: str | None
    url: str


@runtime_checkable
class FhirSource(Protocol):
    """Read access to FHIR resources; implemented by ``FhirClient`` and ``StoreSource``."""

    @property
    def name(self) -> str:
        """Where the data comes from (a base URL or the store's database URL), for provenance."""
        ...

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        """One resource; raises ``ResourceNotFound``."""
        ...

    async def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        """Every match, all pages read."""
        ...

    async def everything(self, patient_id: str) -> SearchResult:
        """The patient and every resource in the patient's compartment."""
        ...

    async def binary(self, reference: str) -> BinaryContent:
        """The bytes of ``Binary/{id}`` (or a URL under the source's base)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
