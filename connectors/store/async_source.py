"""The local store as an async ``FhirSource`` (``connectors.source``): what the agent and the
surfaces read a patient's chart through, the same interface ``FhirClient`` offers for a server."""

from __future__ import annotations

import asyncio

from connectors.resources import Resource, SearchResult
from connectors.source import BinaryContent, SearchParams
from connectors.store.core import FhirStore


class StoreSource:
    """The local store as an async ``FhirSource``: the same interface as ``FhirClient``.

    Each call runs the synchronous ``FhirStore`` method in a worker thread
    (``asyncio.to_thread``), so the event loop is not blocked by the database; errors are those of
    ``FhirStore`` (``ResourceNotFound``, ``UnsupportedSearch``, ``StoreError``).
    """

    def __init__(self, store: FhirStore) -> None:
        self.store = store

    @property
    def name(self) -> str:
        """``"local store {database URL}"``, the password hidden: the provenance of its data."""
        return f"local store {self.store.safe_url()}"

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        """One resource (``FhirStore.read``); raises ``ResourceNotFound``."""
        return await asyncio.to_thread(self.store.read, resource_type, resource_id)

    async def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        """Every match, in one page (``FhirStore.search``); raises ``UnsupportedSearch``."""
        return await asyncio.to_thread(self.store.search, resource_type, params)

    async def everything(self, patient_id: str) -> SearchResult:
        """The patient and the patient's compartment (``FhirStore.everything``); raises
        ``ResourceNotFound`` when the store holds no such Patient."""
        return await asyncio.to_thread(self.store.everything, patient_id)

    async def binary(self, reference: str) -> BinaryContent:
        """The bytes of ``Binary/{id}`` (``FhirStore.binary``); raises ``ResourceNotFound``."""
        return await asyncio.to_thread(self.store.binary, reference)

    async def aclose(self) -> None:
        """Nothing to release: the ``FhirStore`` belongs to the caller, who closes it."""
        return None

    async def __aenter__(self) -> StoreSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
