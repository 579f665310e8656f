"""The embedded local FHIR store on SQLAlchemy: SQLite by default, PostgreSQL by URL.

``FhirStore`` opens the database (creating the tables of ``schema``), imports files and documents
(``importer``; each in one transaction, all or nothing) and answers reads, searches (``search``)
and ``$everything`` synchronously; ``StoreSource`` offers it as an async ``FhirSource``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, create_engine, event, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from common.schema import create_schema
from connectors.errors import FhirImportError, ResourceNotFound, StoreError
from connectors.resources import (
    InvalidResource,
    Resource,
    SearchResult,
    display_name,
    validate,
)
from connectors.source import BinaryContent, SearchParams
from connectors.store.files import MAX_DOCUMENT_BYTES, MAX_LINE_BYTES, file_sha256
from connectors.store.importer import Importer, ImportReport, already_imported, log_import
from connectors.store.schema import metadata, resources_t
from connectors.store.search import search_statement


@dataclass(frozen=True)
class PatientSummary:
    """One line of the patient list: the Patient's id, display name (``display_name``), gender
    and birthDate as FHIR gives them (``None`` when absent), and how many resources of the
    patient's compartment the store holds."""

    id: str
    name: str
    gender: str | None
    birth_date: str | None
    resources: int


class FhirStore:
    """The local store (synchronous); ``StoreSource`` offers it through the async ``FhirSource``.

    ``url``: an SQLAlchemy database URL (``sqlite:///path`` creates the folder; ``postgresql+...``);
    ``batch_size``: resources written per INSERT while importing; ``max_line_bytes`` and
    ``max_document_bytes``: the size limits of one NDJSON line and one JSON file (see
    ``connectors.store.files``). Raises ``StoreError`` when the database cannot be opened or its
    tables created.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 500,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_document_bytes: int = MAX_DOCUMENT_BYTES,
    ) -> None:
        self.url = url
        self.batch_size = batch_size
        self.max_line_bytes = max_line_bytes
        self.max_document_bytes = max_document_bytes
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(
                parents=True, exist_ok=True
            )
        try:
            # pre_ping: a connection the database dropped (a restart) is replaced, not used
            self.engine: Engine = create_engine(url, future=True, pool_pre_ping=True)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            create_schema(self.engine, metadata)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the local store at {self.safe_url()}: {exc}") from exc

    def safe_url(self) -> str:
        """The database URL with any password shown as ``***``, for messages and provenance."""
        return (
            self.engine.url.render_as_string(hide_password=True)
            if hasattr(self, "engine")
            else self.url
        )

    def close(self) -> None:
        """Close the database connections (the engine's pool); the store is not used after."""
        self.engine.dispose()

    # ---------------------------------------------------------------- import

    def import_path(self, path: Path | str, *, force: bool = False) -> ImportReport:
        """Import one file (Bundle, NDJSON or a single resource; ``.gz`` accepted), all or nothing.
        A file whose SHA-256 is in the import log is skipped (``report.unchanged``) unless ``force``.

        Raises ``FhirImportError`` naming the file (and the entry or line, where there is one) for
        anything that cannot be imported; the store is then left as it was.
        """
        file = Path(path)
        if not file.is_file():
            raise FhirImportError(str(file), "no such file")
        report = ImportReport(str(file))
        try:
            self._import_once(file_sha256(file), report, force, lambda i: i.file(file, report))
        except OSError as exc:
            raise FhirImportError(str(file), f"cannot read the file: {exc}") from exc
        except MemoryError as exc:
            # The size limits keep this rare; a machine with little memory can still run out.
            raise FhirImportError(
                str(file),
                "not enough memory to import this file; split it, or export it as NDJSON "
                "(one resource per line, read line by line)",
            ) from exc
        return report

    def import_json(
        self, document: dict[str, Any], origin: str, *, force: bool = False
    ) -> ImportReport:
        """Import a Bundle or resource already in memory (``origin`` names it in messages and the
        import log), all or nothing; a document whose canonical JSON was imported before is
        skipped (``report.unchanged``) unless ``force``. Raises ``FhirImportError``."""
        try:
            canonical = json.dumps(
                document, sort_keys=True, separators=(",", ":"), allow_nan=False
            ).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise FhirImportError(origin, f"not a JSON document: {exc}") from exc
        digest = hashlib.sha256(canonical).hexdigest()
        report = ImportReport(origin)
        self._import_once(digest, report, force, lambda i: i.document(document, origin, report))
        return report

    def _import_once(
        self, digest: str, report: ImportReport, force: bool, work: Callable[[Importer], None]
    ) -> None:
        """Run ``work`` in one transaction and log the import under ``digest``; when ``digest`` is
        in the log already and not ``force``, only mark ``report`` unchanged. A database error
        (a value the database refuses, such as a NUL in PostgreSQL text) rolls the transaction
        back and is raised as ``FhirImportError`` naming ``report.path``, for a file and an
        in-memory document alike."""
        try:
            with self.engine.begin() as conn:
                if not force and already_imported(conn, digest):
                    report.unchanged = True
                    return
                work(
                    Importer(
                        conn,
                        batch_size=self.batch_size,
                        max_line_bytes=self.max_line_bytes,
                        max_document_bytes=self.max_document_bytes,
                    )
                )
                log_import(conn, report.path, digest, report)
        except SQLAlchemyError as exc:
            raise FhirImportError(report.path, f"database error: {exc}") from exc

    # ---------------------------------------------------------------- read and search

    def read(self, resource_type: str, resource_id: str) -> Resource:
        """The stored resource as its FHIR R4 model. Raises ``ResourceNotFound`` (404) when the
        store does not hold it, ``StoreError`` when it no longer validates."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(resources_t.c.content).where(
                    resources_t.c.resource_type == resource_type,
                    resources_t.c.resource_id == resource_id,
                )
            ).first()
        if row is None:
            raise ResourceNotFound(
                f"{self.safe_url()}#{resource_type}/{resource_id}", 404, "not in the local store"
            )
        return _as_resource(row[0], f"{resource_type}/{resource_id}")

    def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        """Every match of a search, in one page (``pages`` 1, ``total`` the count); supports the
        indexed parameters, ``_id`` and ``_sort`` (``connectors.store.search`` lists them).
        Raises ``UnsupportedSearch`` for anything else. A stored resource that no longer
        validates is listed in ``invalid``."""
        query = search_statement(resource_type, params)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return _result(rows)

    def everything(self, patient_id: str) -> SearchResult:
        """The patient and every resource in the patient's compartment."""
        r = resources_t
        query = select(r.c.content, r.c.resource_type, r.c.resource_id).where(
            or_(
                r.c.patient_id == patient_id,
                and_(r.c.resource_type == "Patient", r.c.resource_id == patient_id),
            )
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(r.c.resource_type, r.c.resource_id)).all()
        if not any(row[1] == "Patient" for row in rows):
            raise ResourceNotFound(
                f"{self.safe_url()}#Patient/{patient_id}", 404, "not in the local store"
            )
        return _result(rows)

    def binary(self, reference: str) -> BinaryContent:
        """The decoded ``data`` and ``contentType`` of the Binary ``reference`` names
        (``Binary/{id}``, or a URL ending in it). Raises ``ResourceNotFound`` for any other
        reference or a Binary the store does not hold."""
        rtype, _, rid = reference.rpartition("/")
        if rtype.rpartition("/")[2] != "Binary" or not rid:
            raise ResourceNotFound(
                reference, 404, "the local store holds attachments as Binary/{id} only"
            )
        binary = self.read("Binary", rid)
        data = getattr(binary, "data", None)  # fhir.resources decodes base64Binary to bytes
        return BinaryContent(bytes(data or b""), getattr(binary, "contentType", None), reference)

    def patients(self, name: str | None = None, limit: int = 100) -> list[PatientSummary]:
        """Patients in the store, optionally those whose name starts with ``name``."""
        params = {"name": name} if name else {}
        found = self.search("Patient", params)
        with self.engine.connect() as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    select(resources_t.c.patient_id, func.count())
                    .where(resources_t.c.patient_id.is_not(None))
                    .group_by(resources_t.c.patient_id)
                ).all()
            )
        out = []
        for p in found.resources[:limit]:
            out.append(
                PatientSummary(
                    id=str(p.id),
                    name=display_name(p),
                    gender=getattr(p, "gender", None),
                    birth_date=str(getattr(p, "birthDate", None) or "") or None,
                    resources=int(counts.get(str(p.id), 0)),
                )
            )
        return out

    def counts(self) -> dict[str, int]:
        """Number of resources per type."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(resources_t.c.resource_type, func.count()).group_by(
                    resources_t.c.resource_type
                )
            ).all()
        return {str(t): int(n) for t, n in rows}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """Per SQLite connection: write-ahead log (readers do not block the writer), fsync at
    checkpoints only, and wait up to 10 s for a lock (https://sqlite.org/pragma.html)."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _as_resource(content: str, origin: str) -> Resource:
    """The stored JSON ``content`` as its FHIR R4 model; ``StoreError`` if it no longer validates."""
    result = validate(json.loads(content), origin)
    if isinstance(result, InvalidResource):  # only if the models changed since import
        raise StoreError(f"{origin} in the local store no longer validates: {result.error}")
    return result


def _result(rows: Iterable[Any]) -> SearchResult:
    """A one-page ``SearchResult`` of ``(content, resource_type, resource_id)`` rows, in order."""
    out = SearchResult(pages=1)
    for content, rtype, rid in rows:
        out.add(validate(json.loads(content), f"{rtype}/{rid}"))
    out.total = len(out.resources) + len(out.invalid)
    return out
