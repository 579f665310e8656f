"""Errors of what lies outside ChartSight: servers, files, images (``ConnectorError`` and its
kinds). The root, ``ChartSightError``, and ``ConfigurationError`` live in ``common.errors``;
they are re-exported here for the connectors' callers."""

from __future__ import annotations

import re

from common.errors import ChartSightError as ChartSightError
from common.errors import ConfigurationError as ConfigurationError
from common.errors import scrub as scrub

_REFERENCE = re.compile(r"(?:^|[/#])([A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64})$")


def _reference_in(url: str) -> str | None:
    """The ``Type/id`` a URL or "<source>#Type/id" names, if any."""
    found = _REFERENCE.search(url.split("?")[0].rstrip("/"))
    return found.group(1) if found else None


class ConnectorError(ChartSightError):
    """Something outside ChartSight (a server, a file, an image) could not be used."""


class HttpStatusError(ConnectorError):
    """A server answered with an error status (after any retries)."""

    def __init__(self, url: str, status: int, detail: str = "") -> None:
        self.url = url
        self.status = status
        self.detail = detail
        msg = f"{url} answered HTTP {status}"
        super().__init__(f"{msg}: {detail}" if detail else msg)

    @property
    def public(self) -> str:
        """``"the patient's data source answered HTTP {status}"``, without the URL or body."""
        return f"the patient's data source answered HTTP {self.status}"


class ResourceNotFound(HttpStatusError):
    """The resource does not exist (HTTP 404, or absent from the local store)."""

    @property
    def public(self) -> str:
        """``"{Type/id} was not found"`` (``"the resource was not found"`` when the URL names
        none): the caller's own reference, without the server's URL."""
        return f"{_reference_in(self.url) or 'the resource'} was not found"


class _AtUrl(ConnectorError):
    """A failure at a server's URL, with its reason; callers outside are told ``said`` only."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: {reason}")


class TransportError(_AtUrl):
    """The server could not be reached or did not answer in time (after any retries)."""

    said = "the patient's data source could not be reached in time"


class InvalidResponse(_AtUrl):
    """The server answered 2xx with a body that is not what the protocol requires."""

    said = "the patient's data source gave an answer that could not be used"


class IncompletePaging(ConnectorError):
    """A search could not be read to its end; never returned as a silent partial result."""

    said = "the patient's record could not be read to its end"

    def __init__(self, url: str, fetched: int, total: int | None, reason: str) -> None:
        self.url = url
        self.fetched = fetched
        self.total = total
        of = f" of {total}" if total is not None else ""
        super().__init__(f"{url}: fetched {fetched}{of} resources, then {reason}")


class AuthError(ConnectorError):
    """Authorization with the FHIR server or its token endpoint failed."""

    said = "ChartSight could not authorize with the patient's data source"


class StoreError(ConnectorError):
    """The local FHIR store could not do what was asked."""

    said: str | None = "the local store could not do what was asked"


class UnsupportedSearch(StoreError):
    """A search parameter the local store does not index."""

    said = None  # the message, scrubbed: it names the caller's own parameter


class FhirImportError(StoreError):
    """A file could not be imported; nothing from that file was stored."""

    def __init__(self, path: str, reason: str, entry: str | None = None) -> None:
        self.path = path
        self.entry = entry
        self.reason = reason
        where = f"{path} ({entry})" if entry else path
        super().__init__(f"{where}: {reason}")

    @property
    def public(self) -> str:
        """``"{entry}: {reason}"`` (or the reason alone), scrubbed: without the file's path."""
        return scrub(f"{self.entry}: {self.reason}" if self.entry else self.reason)


class ImageError(ConnectorError):
    """One image could not be fetched or decoded."""

    def __init__(self, reference: str, reason: str) -> None:
        self.reference = reference
        self.reason = reason
        super().__init__(f"{reference}: {reason}")
