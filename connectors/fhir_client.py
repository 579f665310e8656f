"""An async client for any FHIR R4 server."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from common import observe
from connectors.auth import fhir_auth
from connectors.errors import (
    ConnectorError,
    HttpStatusError,
    IncompletePaging,
    InvalidResponse,
    TransportError,
)
from connectors.http import RetryingHttp, _detail
from connectors.resources import InvalidResource, Resource, SearchResult, validate
from connectors.settings import FhirServerSettings
from connectors.source import PATIENT_COMPARTMENT_SEARCHES, BinaryContent, SearchParams

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

# ``_include`` added to the per-type searches of ``everything_by_type``, so that the resources a
# chart names outside the patient compartment (the drug of an order, where a visit happened) come
# in the same round trips. Search parameters from the FHIR R4 specification.
EVERYTHING_INCLUDES: dict[str, tuple[str, ...]] = {
    "MedicationRequest": ("MedicationRequest:medication",),
    "MedicationStatement": ("MedicationStatement:medication",),
    "Encounter": ("Encounter:location", "Encounter:service-provider"),
}


def _params(params: SearchParams | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in (params or {}).items():
        if isinstance(value, str):
            out.append((key, value))
        else:
            out.extend((key, v) for v in value)
    return out


def _validate_page(raws: list[Any], page_url: str) -> list[Resource | InvalidResource]:
    return [validate(raw, page_url) for raw in raws]


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


class FhirClient:
    """Read, search (every page), ``$everything`` and Binary against one FHIR R4 server.

    Use as ``async with FhirClient(settings) as client``. Implements ``FhirSource``.
    """

    def __init__(
        self,
        settings: FhirServerSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not settings.url:
            raise ConnectorError("no FHIR server URL given (set fhir.url or --fhir-url)")
        self.settings = settings
        self.base_url = settings.url.rstrip("/")
        self.http = RetryingHttp(
            settings.http,
            auth=fhir_auth(settings, self.base_url),
            headers={"Accept": FHIR_JSON},
            transport=transport,
            failures=observe.FHIR_ERROR,
        )
        self._capabilities: dict[str, Any] | None = None
        self._semaphore = asyncio.Semaphore(settings.concurrency)

    @property
    def name(self) -> str:
        """The server's base URL (without a trailing ``/``): the provenance of its data."""
        return self.base_url

    async def __aenter__(self) -> FhirClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections; the client is not used after."""
        await self.http.aclose()

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (e.g. ``Patient/123``) under the server's base URL."""
        return f"{self.base_url}/{path.lstrip('/')}"

    async def _get_json(self, url: str, params: list[tuple[str, str]] | None = None) -> Any:
        async with self._semaphore:
            response = await self.http.request("GET", url, params=params)
        try:
            return response.json()
        except ValueError as exc:
            raise InvalidResponse(
                str(response.url), f"body is not valid JSON ({exc}); {len(response.content)} bytes"
            ) from exc

    async def capabilities(self) -> dict[str, Any]:
        """The server's CapabilityStatement (cached)."""
        if self._capabilities is None:
            body = await self._get_json(self.url("metadata"))
            if not isinstance(body, dict) or body.get("resourceType") != "CapabilityStatement":
                raise InvalidResponse(self.url("metadata"), "is not a CapabilityStatement")
            self._capabilities = body
        return self._capabilities

    async def supports_everything(self) -> bool:
        """Whether the CapabilityStatement offers ``Patient/$everything``."""
        try:
            caps = await self.capabilities()
        except ConnectorError as exc:
            log.info("no usable CapabilityStatement (%s); not using $everything", exc)
            return False
        for rest in caps.get("rest") or []:
            for op in rest.get("operation") or []:
                if op.get("name") in ("everything", "patient-everything"):
                    return True
            for res in rest.get("resource") or []:
                if res.get("type") != "Patient":
                    continue
                for op in res.get("operation") or []:
                    if op.get("name") in ("everything", "patient-everything") or str(
                        op.get("definition", "")
                    ).endswith("/Patient-everything"):
                        return True
        return False

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        """``GET [base]/{type}/{id}`` as its FHIR R4 model. Raises ``ResourceNotFound`` (404),
        ``InvalidResponse`` when the body is not a valid resource, or another
        ``ConnectorError`` from ``RetryingHttp``."""
        url = self.url(f"{resource_type}/{resource_id}")
        body = await self._get_json(url)
        result = validate(body, url)
        if isinstance(result, InvalidResource):
            raise InvalidResponse(url, f"invalid {resource_type}: {result.error}")
        return result

    async def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        """Every match of ``GET [base]/{type}?params``, all pages read (``_count`` defaults to
        ``fhir.page_size``); included resources kept. Raises ``IncompletePaging`` when the pages
        end before the matches, or another ``ConnectorError``."""
        query = _params(params)
        if not any(k == "_count" for k, _ in query):
            query.append(("_count", str(self.settings.page_size)))
        return await self._collect(self.url(resource_type), query, resource_type)

    async def everything(self, patient_id: str) -> SearchResult:
        """The patient and the patient's compartment: ``Patient/{id}/$everything`` when
        ``fhir.use_everything`` and the CapabilityStatement offers it, else one search per type
        (``everything_by_type``). Raises ``ResourceNotFound`` or another ``ConnectorError``."""
        if self.settings.use_everything and await self.supports_everything():
            url = self.url(f"Patient/{patient_id}/$everything")
            return await self._collect(url, [("_count", str(self.settings.page_size))])
        return await self.everything_by_type(patient_id)

    async def everything_by_type(self, patient_id: str) -> SearchResult:
        """The patient's chart by one search per resource type, run concurrently."""
        patient_read = asyncio.ensure_future(self.read("Patient", patient_id))
        searches = [
            self.search(
                rtype,
                {param: f"Patient/{patient_id}", "_include": EVERYTHING_INCLUDES.get(rtype, ())},
            )
            for rtype, param in PATIENT_COMPARTMENT_SEARCHES
        ]
        try:
            results = await asyncio.gather(*searches)
        except BaseException:
            patient_read.cancel()
            raise
        return SearchResult.combined(await patient_read, results)

    async def _collect(
        self, url: str, query: list[tuple[str, str]], match_type: str | None = None
    ) -> SearchResult:
        """Read every page of a search, through next links or, failing those, ``_offset``.

        Each page's resources are validated in a worker thread while the next page is fetched.
        Paging counts matches only: entries a search ``_include``d (``search.mode`` "include",
        or, where a server leaves the mode out, of another type than ``match_type``) are kept
        but neither count toward ``total`` nor move ``_offset``.
        """
        result = SearchResult()
        validations: list[asyncio.Future[list[Resource | InvalidResource]]] = []
        seen: set[tuple[str, str]] = set()
        matched = 0
        count = next((int(v) for k, v in query if k == "_count" and v.isdigit()), None)
        next_url: str | None = url
        next_params: list[tuple[str, str]] | None = query
        visited: set[str] = set()
        try:
            while next_url is not None:
                if result.pages >= self.settings.max_pages:
                    raise IncompletePaging(
                        url, matched, result.total, f"{result.pages} pages (max_pages)"
                    )
                page_key = next_url + json.dumps(next_params)
                if page_key in visited:
                    raise IncompletePaging(
                        url, matched, result.total, "the server repeated a page link"
                    )
                visited.add(page_key)
                bundle = await self._get_json(next_url, next_params)
                if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                    got = (
                        bundle.get("resourceType")
                        if isinstance(bundle, dict)
                        else type(bundle).__name__
                    )
                    raise InvalidResponse(next_url, f"expected a Bundle, got {got}")
                result.pages += 1
                if isinstance(bundle.get("total"), int):
                    result.total = bundle["total"]
                on_page, fresh, new = self._new_entries(bundle, seen, match_type)
                matched += new
                if fresh:
                    validations.append(
                        asyncio.ensure_future(asyncio.to_thread(_validate_page, fresh, next_url))
                    )
                if on_page and not new:
                    raise IncompletePaging(
                        url,
                        matched,
                        result.total,
                        "a page repeated resources already read (the server may ignore _offset)",
                    )
                link = _next_link(bundle)
                if link is not None:
                    next_url, next_params = urljoin(next_url, link), None
                    continue
                next_url = next_params = None
                # No next link. Servers that page only by _offset (Medplum's router, for one) leave
                # it out; a full page, or fewer than `total`, means there may be more to read.
                more = (result.total is not None and matched < result.total) or (
                    result.total is None and count is not None and new >= count
                )
                if more and count is not None and new > 0:
                    next_url = url
                    next_params = [(k, v) for k, v in query if k != "_offset"]
                    next_params.append(("_offset", str(matched)))
                elif more:
                    raise IncompletePaging(
                        url, matched, result.total, "the server gave no next link"
                    )
            if result.total is not None and matched < result.total:
                raise IncompletePaging(url, matched, result.total, "the pages ran out early")
        except BaseException:
            for pending in validations:
                pending.cancel()
            raise
        for page in await asyncio.gather(*validations):
            for checked in page:
                result.add(checked)
        return result

    @staticmethod
    def _new_entries(
        bundle: Mapping[str, Any], seen: set[tuple[str, str]], match_type: str | None = None
    ) -> tuple[int, list[Any], int]:
        """How many matches a page held, the raw resources (matches and includes) not seen on
        earlier pages, and how many of those are matches."""
        on_page = new = 0
        fresh: list[Any] = []
        for entry in bundle.get("entry") or []:
            if not isinstance(entry, dict):
                continue
            mode = (entry.get("search") or {}).get("mode")
            if mode == "outcome":
                continue
            raw = entry.get("resource")
            rtype = str(raw.get("resourceType")) if isinstance(raw, dict) else "?"
            is_match = mode == "match" or (
                mode is None and (match_type is None or rtype == match_type)
            )
            on_page += is_match
            key = (
                (rtype, str(raw.get("id")))
                if isinstance(raw, dict)
                else ("?", str(entry.get("fullUrl")))
            )
            if key in seen:
                continue
            seen.add(key)
            fresh.append(raw)
            new += is_match
        return on_page, fresh, new

    async def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """``POST [base]`` of a ``transaction`` Bundle (FHIR R4 http 3.1.0.11), sent once: a
        create is not idempotent, so nothing is sent again after the request went out (an
        answer lost to a timeout could otherwise save the same note twice). Returns the
        ``transaction-response`` Bundle. Raises ``HttpStatusError`` when the server refuses it
        (its OperationOutcome's first diagnostics as the detail), ``TransportError`` when it
        cannot be reached or does not answer within ``fhir.http.timeout_s``, and
        ``InvalidResponse`` for an answer that is not a Bundle."""
        url = self.base_url
        try:
            async with self._semaphore:
                response = await self.http.client.post(
                    url, json=dict(bundle), headers={"Content-Type": FHIR_JSON}
                )
        except httpx.HTTPError as exc:
            raise TransportError(
                url, f"the transaction was not answered ({type(exc).__name__})"
            ) from exc
        if not response.is_success:
            raise HttpStatusError(url, response.status_code, _detail(response))
        try:
            body = response.json()
        except ValueError as exc:
            raise InvalidResponse(url, f"the transaction's answer is not JSON ({exc})") from exc
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise InvalidResponse(url, "the transaction's answer is not a Bundle")
        return body

    async def binary(self, reference: str) -> BinaryContent:
        """A Binary's bytes; asks for the raw form and falls back to FHIR JSON with base64 data."""
        url = reference if urlsplit(reference).scheme else self.url(reference)
        async with self._semaphore:
            response = await self.http.request("GET", url, headers={"Accept": "*/*"})
        ctype = response.headers.get("Content-Type", "").split(";")[0].strip() or None
        if ctype in (FHIR_JSON, "application/json"):
            try:
                body = response.json()
            except ValueError as exc:
                raise InvalidResponse(url, f"Binary body is not valid JSON ({exc})") from exc
            if isinstance(body, dict) and body.get("resourceType") == "Binary":
                data = body.get("data")
                try:
                    raw = base64.b64decode(data or "", validate=True)
                except ValueError as exc:
                    raise InvalidResponse(url, "Binary.data is not valid base64") from exc
                return BinaryContent(raw, body.get("contentType"), url)
        return BinaryContent(response.content, ctype, url)
