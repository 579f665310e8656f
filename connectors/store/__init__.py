"""The embedded local FHIR store on SQLAlchemy: SQLite by default, PostgreSQL by URL.

Imports Bundles (transaction, batch, collection, searchset; Synthea output as-is), NDJSON (FHIR
Bulk Data, streamed) and single resources, optionally gzip-compressed. Each file is imported in one
database transaction: a file either goes in whole or leaves the store as it was.

A file must name each resource once: two entries (or NDJSON lines) for one ``Type/id``, or two
entries with one ``fullUrl``, are refused unless ``meta.versionId`` tells them apart (FHIR R4 Bundle
invariant bdl-7; the transaction rules of the RESTful API refuse overlapping identities too).
Hostile or broken input (encodings other than UTF-8, truncated or corrupt gzip, numbers no float
or 32-bit integer can hold, nesting or sizes beyond the limits) ends in ``FhirImportError``
naming the file and the entry or line, never in another exception.

One concept per module:

- ``core``: ``FhirStore`` (open, import, read, search, ``$everything``) and ``PatientSummary``
- ``async_source``: ``StoreSource``, the store as an async ``FhirSource``
- ``schema``: the tables (``resources_t``, ``INDEX_TABLES``, ...) and ``MAX_ID``
- ``importer``: ``ImportReport``, ``Importer`` and the import log
- ``files``: reading JSON and NDJSON files (gzip, UTF-8, ``MAX_LINE_BYTES``, ``MAX_DOCUMENT_BYTES``)
- ``parsing``: strict JSON and resource admission (``MAX_DEPTH``, ``MAX_NUMBER_DIGITS``)
- ``identities``: one resource per file unless versions tell entries apart (bdl-7)
- ``references``: listing references, resolving ``urn:uuid`` and conditional ones
- ``writing``: a resource's row and index rows, replaced together
- ``search``: FHIR search parameters as SQL
"""

from connectors.store.async_source import StoreSource
from connectors.store.core import FhirStore, PatientSummary
from connectors.store.core import _as_resource as _as_resource  # (tests/connectors use it)
from connectors.store.files import MAX_DOCUMENT_BYTES, MAX_LINE_BYTES
from connectors.store.importer import ImportReport
from connectors.store.parsing import MAX_DEPTH, MAX_NUMBER_DIGITS
from connectors.store.references import references_in as _references  # noqa: F401 (tests use it)
from connectors.store.schema import (
    INDEX_TABLES,
    MAX_ID,
    dates_t,
    imports_t,
    metadata,
    refs_t,
    resources_t,
    strings_t,
    tokens_t,
)

__all__ = [
    "INDEX_TABLES",
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_ID",
    "MAX_LINE_BYTES",
    "MAX_NUMBER_DIGITS",
    "FhirStore",
    "ImportReport",
    "PatientSummary",
    "StoreSource",
    "dates_t",
    "imports_t",
    "metadata",
    "refs_t",
    "resources_t",
    "strings_t",
    "tokens_t",
]
