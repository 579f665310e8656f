"""The interface every patient-data source offers: a FHIR server or the embedded local store."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from connectors.errors import ResourceNotFound
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


def _category_codes(resource: Resource) -> list[tuple[str | None, str]]:
    """``(system, code)`` of each category a resource carries: the codings of its ``category``
    (a CodeableConcept, or a list of them, as in Observation and Condition) or its codes (a list
    of codes, as in AllergyIntolerance); empty for a type without the element (Encounter)."""
    value = getattr(resource, "category", None)
    out: list[tuple[str | None, str]] = []
    for item in value if isinstance(value, list) else [value] if value is not None else []:
        if isinstance(item, str):
            out.append((None, item))
            continue
        for coding in getattr(item, "coding", None) or []:
            if coding.code:
                out.append((str(coding.system) if coding.system else None, str(coding.code)))
    return out


def _token_matches(token: str, system: str | None, code: str) -> bool:
    """A FHIR search token (``code``, ``system|code``, ``|code``: FHIR R4 search 3.1.1.4.9)
    matched against one coding."""
    if "|" not in token:
        return token == code
    want_system, _, want_code = token.partition("|")
    return want_code == code and (want_system or None) == system


@dataclass(frozen=True)
class RecordScope:
    """Which of a patient's resources a caller may read, from its SMART scopes
    (``surfaces.http.security.readable``): every type (``types is None``, a ``*`` scope), or the
    listed types in full plus, in ``categories``, types limited to resources of one of the given
    category tokens (SMART v2 ``patient/Observation.rs?category=laboratory``: ``("Observation",
    frozenset({"laboratory"}))``; tokens as FHIR search writes them, ``code`` or
    ``system|code``). Hashable: the agent keeps one record cache per scope."""

    types: frozenset[str] | None = None
    categories: tuple[tuple[str, frozenset[str]], ...] = ()

    @property
    def whole(self) -> bool:
        """Whether every resource type may be read (a ``*`` scope)."""
        return self.types is None

    def allows(self, resource_type: str) -> bool:
        """Whether some resources of ``resource_type`` may be read (all, or those of a category)."""
        return (
            self.types is None
            or resource_type in self.types
            or any(t == resource_type for t, _ in self.categories)
        )

    def admits(self, resource: Resource) -> bool:
        """Whether ``resource`` may be read: its type is granted, or its type is granted for
        some categories and one of its ``category`` codings matches one of them (a type without
        a ``category`` element never matches)."""
        rtype = resource.get_resource_type()
        if self.types is None or rtype in self.types:
            return True
        tokens = [tok for t, toks in self.categories if t == rtype for tok in toks]
        return any(
            _token_matches(token, system, code)
            for system, code in _category_codes(resource)
            for token in tokens
        )

    def withheld(self) -> list[str]:
        """What of a chart is not read, in the order of ``PATIENT_COMPARTMENT_SEARCHES``: each
        type not granted (``"MedicationRequest"``), and each type granted only for some
        categories (``"Observation outside category laboratory"``). Empty for the whole record."""
        if self.types is None:
            return []
        limited = dict(self.categories)
        out = []
        for rtype, _ in PATIENT_COMPARTMENT_SEARCHES:
            if rtype in self.types:
                continue
            if rtype in limited:
                out.append(f"{rtype} outside category {', '.join(sorted(limited[rtype]))}")
            else:
                out.append(rtype)
        return out


class ScopedSource:
    """A ``FhirSource`` showing only what ``scope`` admits of ``inner``: searches of types it does
    not allow return nothing without a request, results (searches, ``$everything``) keep only the
    resources it admits, a read of a resource it does not admit raises ``ResourceNotFound`` (as if
    absent: a caller is not told what it may not see), ``$everything`` becomes searches of the
    allowed types only. Binaries pass through (they are reached
    only from resources the scope admitted). Resources outside the compartment that the chart
    points at (``connectors.record.REFERENCED_TYPES``) are fetched only when allowed too."""

    def __init__(self, inner: FhirSource, scope: RecordScope) -> None:
        self.inner = inner
        self.scope = scope

    @property
    def name(self) -> str:
        """The inner source's name (the record's provenance is the server read)."""
        return self.inner.name

    def _kept(self, result: SearchResult) -> SearchResult:
        kept = [r for r in result.resources if self.scope.admits(r)]
        # an invalid resource's category cannot be trusted: kept only for types granted in full
        types = self.scope.types
        invalid = [i for i in result.invalid if types is None or i.resource_type in types]
        return SearchResult(kept, invalid, len(kept), result.pages)

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        """``inner.read`` when the scope admits the resource; else raises ``ResourceNotFound``."""
        if self.scope.allows(resource_type):
            found = await self.inner.read(resource_type, resource_id)
            if self.scope.admits(found):
                return found
        raise ResourceNotFound(
            f"{self.name}/{resource_type}/{resource_id}", 404, "not readable with these scopes"
        )

    async def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        """``inner.search`` restricted to what the scope admits; an empty result, with no
        request, for a type it does not allow."""
        if not self.scope.allows(resource_type):
            return SearchResult(total=0)
        return self._kept(await self.inner.search(resource_type, params))

    async def everything(self, patient_id: str) -> SearchResult:
        """The patient and what the scope admits of the compartment: ``inner.everything``
        restricted when the scope is whole; else the Patient read and one search per allowed type
        of ``PATIENT_COMPARTMENT_SEARCHES``, run concurrently, so that no other type is asked for
        (a server would refuse ``$everything`` to a token of narrower scopes, and the caller's
        data is fetched on a need-to-know basis). Raises what ``inner`` raises."""
        if self.scope.whole:
            return self._kept(await self.inner.everything(patient_id))
        wanted = [(t, p) for t, p in PATIENT_COMPARTMENT_SEARCHES if self.scope.allows(t)]
        patient = asyncio.ensure_future(self.read("Patient", patient_id))
        try:
            results = await asyncio.gather(
                *(self.search(t, {p: f"Patient/{patient_id}"}) for t, p in wanted)
            )
        except BaseException:
            patient.cancel()
            await asyncio.gather(patient, return_exceptions=True)
            raise
        return SearchResult.combined(await patient, results)

    async def binary(self, reference: str) -> BinaryContent:
        """``inner.binary``."""
        return await self.inner.binary(reference)

    async def aclose(self) -> None:
        """Nothing: the inner source is its owner's to close."""
