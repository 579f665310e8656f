"""ChartSight's one exception hierarchy. Its root, ``ChartSightError``, lives here because
``connectors`` is the bottom layer: every layer above (retrieval, agent, surfaces) raises and
catches it without importing upward, and adds its own subclasses (e.g. ``CaseIndexError``,
``ToolError``, ``Unauthenticated``).

Each error's message is one line a user can act on; the underlying exception is chained
(``raise ... from exc``) for developers.
"""

from __future__ import annotations


class ChartSightError(Exception):
    """Base of every error ChartSight raises on purpose."""


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


class ResourceNotFound(HttpStatusError):
    """The resource does not exist (HTTP 404, or absent from the local store)."""


class TransportError(ConnectorError):
    """The server could not be reached or did not answer in time (after any retries)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: {reason}")


class InvalidResponse(ConnectorError):
    """The server answered 2xx with a body that is not what the protocol requires."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"{url}: {reason}")


class IncompletePaging(ConnectorError):
    """A search could not be read to its end; never returned as a silent partial result."""

    def __init__(self, url: str, fetched: int, total: int | None, reason: str) -> None:
        self.url = url
        self.fetched = fetched
        self.total = total
        of = f" of {total}" if total is not None else ""
        super().__init__(f"{url}: fetched {fetched}{of} resources, then {reason}")


class AuthError(ConnectorError):
    """Authorization with the FHIR server or its token endpoint failed."""


class StoreError(ConnectorError):
    """The local FHIR store could not do what was asked."""


class UnsupportedSearch(StoreError):
    """A search parameter the local store does not index."""


class FhirImportError(StoreError):
    """A file could not be imported; nothing from that file was stored."""

    def __init__(self, path: str, reason: str, entry: str | None = None) -> None:
        self.path = path
        self.entry = entry
        self.reason = reason
        where = f"{path} ({entry})" if entry else path
        super().__init__(f"{where}: {reason}")


class ImageError(ConnectorError):
    """One image could not be fetched or decoded."""

    def __init__(self, reference: str, reason: str) -> None:
        self.reference = reference
        self.reason = reason
        super().__init__(f"{reference}: {reason}")


class ConfigurationError(ChartSightError):
    """Settings are missing or contradictory."""
