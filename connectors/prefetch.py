"""A CDS Hooks request's prefetched resources as a read-only ``FhirSource``.

An EHR that calls a CDS service may send the resources the service asked for (``prefetch``: each a
resource or a search Bundle; https://cds-hooks.org/specification/current/#prefetch-template). This
source serves a record from them alone: reads and searches over what was sent, nothing fetched.
"""

from __future__ import annotations

from typing import Any

from connectors.errors import ResourceNotFound
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
            raws = (
                [e.get("resource") for e in value.get("entry") or []]
                if value.get("resourceType") == "Bundle"
                else [value]
            )
            for raw in raws:
                made = validate(raw, f"prefetch {key}")
                if isinstance(made, InvalidResource):
                    self.invalid.append(made)
                else:
                    self.resources.append(made)

    @property
    def name(self) -> str:
        return "CDS Hooks prefetch"

    def has_patient(self, patient_id: str) -> bool:
        return any(
            r.get_resource_type() == "Patient" and str(r.id) == patient_id for r in self.resources
        )

    async def read(self, resource_type: str, resource_id: str) -> Any:
        for r in self.resources:
            if r.get_resource_type() == resource_type and str(r.id) == resource_id:
                return r
        raise ResourceNotFound(f"{resource_type}/{resource_id}", 404, "not in the prefetch")

    async def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
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
        return SearchResult(
            resources=list(self.resources), invalid=list(self.invalid), pages=1,
            total=len(self.resources),
        )  # fmt: skip

    async def binary(self, reference: str) -> BinaryContent:
        raise ResourceNotFound(reference, 404, "binaries are not part of the prefetch")

    async def aclose(self) -> None:
        return None
