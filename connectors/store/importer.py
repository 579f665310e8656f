"""Importing FHIR data into the store: Bundles (transaction, batch, collection, searchset,
document, message; Synthea output as-is), NDJSON (FHIR Bulk Data, streamed) and single resources.

One ``Importer`` works inside one database transaction, which the caller (``FhirStore``) opens and
commits, so a file either goes in whole or leaves the store as it was. Each resource is admitted
(``parsing.admit``), given its final ``Type/id`` (a Bundle entry's ``urn:uuid`` fullUrl becomes
its id), checked against the identities rule (``identities``), its references resolved
(``references``), validated against the FHIR R4 models, then written in batches (``writing``).
The ``fhir_import`` log records each file's SHA-256 so that an unchanged file is skipped.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select

from connectors.errors import FhirImportError
from connectors.indexing import compartment_patient
from connectors.resources import InvalidResource, is_resource_type, validate
from connectors.store.files import is_ndjson, read_document, read_lines
from connectors.store.identities import Identities
from connectors.store.parsing import admit, brief, json_kind, loads
from connectors.store.references import ConditionalLookup, references_in, resolve_references
from connectors.store.schema import MAX_ID, imports_t
from connectors.store.writing import delete_resources, now, refresh_statistics, write_resources


@dataclass
class ImportReport:
    """What one file added to the store.

    ``path``: the file (or the origin given to ``FhirStore.import_json``); ``imported``: resources
    stored per resource type, with ``"{type} (deleted)"`` keys for a transaction's DELETEs;
    ``skipped``: one line per entry left out (no resource, or a version superseded by a newer
    one); ``unchanged``: the file was imported before (same SHA-256) and nothing was done.
    """

    path: str
    imported: Counter[str] = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)
    unchanged: bool = False

    @property
    def count(self) -> int:
        """The number of resources stored (and deleted) from the file."""
        return sum(self.imported.values())


def already_imported(conn: Connection, digest: str) -> bool:
    """Whether a file or document with this SHA-256 (64 hex digits) is in the import log."""
    return (
        conn.execute(select(imports_t.c.id).where(imports_t.c.sha256 == digest)).first() is not None
    )


def log_import(conn: Connection, origin: str, digest: str, report: ImportReport) -> None:
    """Record in the import log that ``origin`` (its last 1024 characters), with SHA-256
    ``digest``, was imported now with ``report.count`` resources."""
    conn.execute(
        insert(imports_t).values(
            path=origin[-1024:], sha256=digest, imported_at=now(), resources=report.count
        )
    )


# resources written before the first look at the database's statistics (then at twice as many)
_FIRST_STATISTICS_CHECK = 1000


class Importer:
    """Imports documents and files through ``conn``, an open transaction, writing resources in
    batches of ``batch_size``; the caller commits or rolls back. ``max_line_bytes`` and
    ``max_document_bytes`` limit one NDJSON line and one JSON file (``connectors.store.files``)."""

    def __init__(
        self, conn: Connection, *, batch_size: int, max_line_bytes: int, max_document_bytes: int
    ) -> None:
        self.conn = conn
        self.batch_size = batch_size
        self.max_line_bytes = max_line_bytes
        self.max_document_bytes = max_document_bytes
        self.written = 0  # resources written in this transaction
        self._check_at = _FIRST_STATISTICS_CHECK

    def _write(self, batch: list[dict[str, Any]], origin: str) -> None:
        """``write_resources``, and at 1,000, 2,000, 4,000... resources written the database's
        statistics brought up to date where they lag far behind (``refresh_statistics``)."""
        write_resources(self.conn, batch, origin)
        self.written += len(batch)
        if self.written >= self._check_at:
            self._check_at *= 2
            refresh_statistics(self.conn, self.written)

    def file(self, path: Path, report: ImportReport) -> None:
        """Import the file ``path`` into ``report``: NDJSON (``.ndjson``/``.jsonl``) line by line,
        any other name as one JSON document (a Bundle or one resource); ``.gz`` decompressed.
        Raises ``FhirImportError`` naming the entry or line; ``OSError`` if it cannot be read."""
        if is_ndjson(path):
            self._ndjson_file(path, report)
        else:
            text = read_document(path, self.max_document_bytes)
            self.document(loads(text, str(path)), str(path), report)

    def document(self, document: Any, origin: str, report: ImportReport) -> None:
        """Import a parsed JSON ``document`` (a Bundle or one resource) read from ``origin`` into
        ``report``. Raises ``FhirImportError`` naming ``origin`` and the entry."""
        if not isinstance(document, dict):
            raise FhirImportError(
                origin,
                f"not a FHIR resource or Bundle: the file holds a JSON {json_kind(document)}",
            )
        if "resourceType" not in document:
            raise FhirImportError(origin, "not a FHIR resource or Bundle (no resourceType)")
        if document["resourceType"] == "Bundle":
            self._bundle(document, origin, report)
        else:
            raw = admit(document, origin, "resource")
            resource = _checked(raw, origin, "resource", {})
            self._write([resource], origin)
            report.imported[resource["resourceType"]] += 1

    def _bundle(self, bundle: dict[str, Any], origin: str, report: ImportReport) -> None:
        btype = bundle.get("type")
        if btype not in ("transaction", "batch", "collection", "searchset", "document", "message"):
            raise FhirImportError(origin, f"Bundle.type {brief(btype)} cannot be imported")
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            raise FhirImportError(origin, "Bundle.entry is not a list")
        # Pass 1: give every entry its final Type/id, so urn:uuid references can be resolved, and
        # refuse two entries for one resource before anything is written.
        identities = Identities(origin)
        targets: dict[str, str] = {}
        planned: dict[str, tuple[int, dict[str, Any]]] = {}
        deletes: list[tuple[str, str]] = []
        for i, entry in enumerate(entries):
            where = f"entry {i}"
            if not isinstance(entry, dict):
                raise FhirImportError(origin, "entry is not a JSON object", where)
            request = entry.get("request") or {}
            if not isinstance(request, dict):
                raise FhirImportError(origin, "entry.request is not a JSON object", where)
            full_url = entry.get("fullUrl")
            if full_url is not None and not isinstance(full_url, str):
                raise FhirImportError(origin, "entry.fullUrl is not a string", where)
            if request.get("method") == "DELETE":
                url = request.get("url")
                rtype, _, rid = url.partition("/") if isinstance(url, str) else ("", "", "")
                if not is_resource_type(rtype) or not rid:
                    raise FhirImportError(origin, f"DELETE of {brief(url)} is not Type/id", where)
                identities.claim(f"{rtype}/{rid}", None, i, None)
                deletes.append((rtype, rid))
                continue
            resource = entry.get("resource")
            if resource is None:
                report.skipped.append(f"{where}: no resource")
                continue
            resource = admit(resource, origin, where)
            rtype = resource["resourceType"]
            rid = str(resource.get("id") or "")
            if not rid and full_url and full_url.startswith("urn:uuid:"):
                rid = full_url.removeprefix("urn:uuid:")
            rid = rid or str(uuid.uuid4())
            resource = {**resource, "id": rid}
            key = f"{rtype}/{rid}"
            if identities.claim(key, full_url, i, resource.get("meta")) != "older":
                planned[key] = (i, resource)
            if full_url:
                targets[full_url] = key
        report.skipped.extend(identities.superseded)
        lookup = ConditionalLookup(self.conn, [r for _, r in planned.values()])
        batch: list[dict[str, Any]] = []
        for i, resource in planned.values():
            where = f"entry {i} ({resource['resourceType']}/{resource['id']})"
            try:
                resolved = resolve_references(resource, targets, lookup)
            except ValueError as exc:
                raise FhirImportError(origin, str(exc), where) from exc
            self._add(batch, _checked(resolved, origin, where, targets), origin)
            report.imported[resource["resourceType"]] += 1
        self._write(batch, origin)
        for rtype, rid in deletes:
            delete_resources(self.conn, [(rtype, rid)])
            report.imported[f"{rtype} (deleted)"] += 1

    def _add(self, batch: list[dict[str, Any]], resource: dict[str, Any], origin: str) -> None:
        """Append ``resource`` to ``batch``; a full batch is written and emptied."""
        batch.append(resource)
        if len(batch) >= self.batch_size:
            self._write(batch, origin)
            batch.clear()

    def _ndjson_file(self, path: Path, report: ImportReport) -> None:
        origin = str(path)
        identities = Identities(origin, entry_word="line")
        batch: list[dict[str, Any]] = []
        for lineno, line in read_lines(path, self.max_line_bytes):
            if not line.strip():
                continue
            where = f"line {lineno}"
            raw = admit(loads(line, origin, where, cut=not line.endswith("\n")), origin, where)
            if raw["resourceType"] == "Bundle":
                raise FhirImportError(origin, "NDJSON lines must be resources, not Bundles", where)
            resource = _checked(raw, origin, where, {})
            verdict = identities.claim(
                f"{resource['resourceType']}/{resource['id']}", None, lineno, resource.get("meta")
            )
            if verdict == "older":
                continue
            if verdict == "new":
                report.imported[resource["resourceType"]] += 1
            self._add(batch, resource, origin)
        self._write(batch, origin)
        report.skipped.extend(identities.superseded)


def _checked(
    raw: dict[str, Any],
    origin: str,
    where: str,
    targets: dict[str, str],
) -> dict[str, Any]:
    """``raw``, once it can be stored: an id of 1 to 64 characters, valid against its FHIR R4
    model, in the compartment of a patient whose id fits, and no ``urn:uuid:``/``urn:oid:``
    reference that is not a key of ``targets`` (the Bundle's fullUrls). Raises
    ``FhirImportError`` naming ``where`` otherwise."""
    rid = raw.get("id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ID:
        raise FhirImportError(
            origin, f"resource id {brief(rid)} missing or longer than {MAX_ID}", where
        )
    result = validate(raw, origin)
    if isinstance(result, InvalidResource):
        raise FhirImportError(origin, f"invalid {result.resource_type}: {result.error}", where)
    patient = compartment_patient(raw)
    if patient is not None and len(patient) > MAX_ID:
        # No Patient can have this id (FHIR ids are at most 64 characters), and the
        # patient_id column is that long: PostgreSQL would refuse the row, SQLite keep it.
        raise FhirImportError(
            origin,
            f"reference to Patient/{brief(patient)}: an id longer than {MAX_ID} characters",
            where,
        )
    for ref in references_in(raw):
        if ref.startswith(("urn:uuid:", "urn:oid:")) and ref not in targets:
            raise FhirImportError(origin, f"broken reference {ref!r}: no such entry", where)
    return raw
