"""A CDS Hooks request's prefetched resources as a read-only ``FhirSource``.

An EHR that calls a CDS service may send the resources the service asked for (``prefetch``: each a
resource or a search Bundle; https://cds-hooks.org/specification/current/#prefetch-template). This
source serves a record from them alone: reads and searches over what was sent, nothing fetched.
"""

from __future__ import annotations

from typing import Any

from connectors.errors import ResourceNotFound
from connectors.indexing import compartment_patient
from connectors.resources import InvalidResource, SearchResult, validate
from connectors.source import BinaryContent, SearchParams


class PrefetchSource:
    """The resources the EHR prefetched, as a read-only FhirSource."""

    def __init__(self, prefetch: dict[str, dict[str, Any] | None]) -> None:
        self.resources: list[Any] = []
        self.invalid: list[InvalidResource] = []
        for key, value in prefetch.items():
            if not value:
                continue
            raws: list[Any] = [value]
            if value.get("resourceType") == "Bundle":
                entries = value.get("entry") or []
                if not isinstance(entries, list):  # kept, with the reason, like any bad resource
                    self.invalid.append(
                        InvalidResource(
                            "Bundle", None, value, "Bundle.entry is not a list", f"prefetch {key}"
                        )
                    )
                    entries = []
                raws = [e.get("resource") if isinstance(e, dict) else e for e in entries]
            for raw in raws:
                made = validate(raw, f"prefetch {key}")
                if isinstance(made, InvalidResource):
                    self.invalid.append(made)
                else:
                    self.resources.append(made)

    @property
    def name(self) -> str:
        """``"CDS Hooks prefetch"``: the provenance of its data."""
        return "CDS Hooks prefetch"

    def has_patient(self, patient_id: str) -> bool:
        """Whether the prefetch holds a valid Patient with this id."""
        return any(
            r.get_resource_type() == "Patient" and str(r.id) == patient_id for r in self.resources
        )

    async def read(self, resource_type: str, resource_id: str) -> Any:
        """The prefetched resource ``{type}/{id}``; raises ``ResourceNotFound`` if not sent."""
        for r in self.resources:
            if r.get_resource_type() == resource_type and str(r.id) == resource_id:
                return r
        raise ResourceNotFound(f"{resource_type}/{resource_id}", 404, "not in the prefetch")

    async def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        """Every prefetched resource of ``resource_type``; of the parameters only a Patient's
        ``identifier`` filters (by value, the system ignored): the rest of the chart comes from
        ``everything``."""
        found = [r for r in self.resources if r.get_resource_type() == resource_type]
        ident = dict(params or {}).get("identifier")
        if resource_type == "Patient" and ident:
            value = str(ident).split("|")[-1]
            found = [
                r
                for r in found
                if any(i.value == value for i in getattr(r, "identifier", []) or [])
            ]
        return SearchResult(resources=found, total=len(found), pages=1)

    async def everything(self, patient_id: str) -> SearchResult:
        """The patient, the resources in the patient's compartment and those in none (a
        Medication, a Practitioner). A resource in another patient's compartment (a prefetch
        search the EHR ran without the patient, a Bundle of the wrong chart) is left out of the
        record and listed as invalid: it is not this patient's data."""
        mine: list[Any] = []
        invalid = list(self.invalid)
        for r in self.resources:
            raw = r.model_dump(mode="json", by_alias=True, exclude_none=True)
            owner = compartment_patient(raw)
            if owner is None or owner == patient_id:
                mine.append(r)
            else:
                invalid.append(
                    InvalidResource(
                        r.get_resource_type(), str(r.id), raw,
                        "in another patient's compartment", "prefetch",
                    )
                )  # fmt: skip
        return SearchResult(resources=mine, invalid=invalid, pages=1, total=len(mine))

    async def binary(self, reference: str) -> BinaryContent:
        """Always raises ``ResourceNotFound``: a prefetch carries no binaries."""
        raise ResourceNotFound(reference, 404, "binaries are not part of the prefetch")

    async def aclose(self) -> None:
        """Nothing to release: the prefetch is in memory."""
        return None
