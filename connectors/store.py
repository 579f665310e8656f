"""The embedded local FHIR store on SQLAlchemy: SQLite by default, PostgreSQL by URL.

Imports Bundles (transaction, batch, collection, searchset; Synthea output as-is), NDJSON (FHIR
Bulk Data, streamed) and single resources, optionally gzip-compressed. Each file is imported in one
database transaction: a file either goes in whole or leaves the store as it was.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    or_,
    select,
    tuple_,
)
from sqlalchemy.exc import SQLAlchemyError

from connectors.errors import FhirImportError, ResourceNotFound, StoreError, UnsupportedSearch
from connectors.indexing import (
    DATES,
    STRINGS,
    TOKENS,
    compartment_patient,
    date_range,
    index_rows,
    normalise_string,
)
from connectors.resources import (
    InvalidResource,
    Resource,
    SearchResult,
    display_name,
    is_resource_type,
    validate,
)
from connectors.source import BinaryContent, SearchParams

metadata = MetaData()


def _ref_cols() -> list[Column[Any]]:
    return [
        Column("resource_type", String(64), nullable=False),
        Column("resource_id", String(64), nullable=False),
    ]


resources_t = Table(
    "fhir_resource",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("resource_id", String(64), primary_key=True),
    Column("patient_id", String(64), index=True),
    Column("last_updated", String(40), nullable=False),
    Column("origin", String(1024)),
    Column("content", Text, nullable=False),
)
tokens_t = Table(
    "fhir_token",
    metadata,
    *_ref_cols(),
    Column("param", String(64), nullable=False),
    Column("system", String(255), nullable=False),
    Column("code", String(255), nullable=False),
    Index("ix_token_lookup", "param", "code", "resource_type"),
    Index("ix_token_owner", "resource_type", "resource_id"),
)
dates_t = Table(
    "fhir_date",
    metadata,
    *_ref_cols(),
    Column("param", String(64), nullable=False),
    Column("start", String(32), nullable=False),
    Column("end", String(32), nullable=False),
    Index("ix_date_owner", "resource_type", "resource_id"),
)
strings_t = Table(
    "fhir_string",
    metadata,
    *_ref_cols(),
    Column("param", String(64), nullable=False),
    Column("value", String(255), nullable=False),
    Index("ix_string_lookup", "param", "value"),
    Index("ix_string_owner", "resource_type", "resource_id"),
)
refs_t = Table(
    "fhir_reference",
    metadata,
    *_ref_cols(),
    Column("param", String(64), nullable=False),
    Column("target", String(255), nullable=False),
    Index("ix_ref_lookup", "param", "target"),
    Index("ix_ref_owner", "resource_type", "resource_id"),
)
imports_t = Table(
    "fhir_import",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", String(1024), nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("imported_at", String(40), nullable=False),
    Column("resources", Integer, nullable=False),
)
INDEX_TABLES = {"tokens": tokens_t, "dates": dates_t, "strings": strings_t, "refs": refs_t}
MAX_ID = 64


@dataclass
class ImportReport:
    """What one file added to the store."""

    path: str
    imported: Counter[str] = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)
    unchanged: bool = False

    @property
    def count(self) -> int:
        return sum(self.imported.values())


@dataclass(frozen=True)
class PatientSummary:
    """One line of the patient list."""

    id: str
    name: str
    gender: str | None
    birth_date: str | None
    resources: int


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _is_ndjson(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return name.endswith((".ndjson", ".jsonl"))


class FhirStore:
    """The local store (synchronous); ``StoreSource`` offers it through the async ``FhirSource``."""

    def __init__(self, url: str, *, batch_size: int = 500) -> None:
        self.url = url
        self.batch_size = batch_size
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(
                parents=True, exist_ok=True
            )
        try:
            self.engine: Engine = create_engine(url, future=True)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot open the local store at {self._safe_url()}: {exc}") from exc

    def _safe_url(self) -> str:
        return (
            self.engine.url.render_as_string(hide_password=True)
            if hasattr(self, "engine")
            else self.url
        )

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- import

    def import_path(self, path: Path | str, *, force: bool = False) -> ImportReport:
        """Import one file (Bundle, NDJSON or a single resource; ``.gz`` accepted), all or nothing."""
        path = Path(path)
        if not path.is_file():
            raise FhirImportError(str(path), "no such file")
        digest = _sha256(path)
        report = ImportReport(str(path))
        with self.engine.begin() as conn:
            if not force and self._seen(conn, digest):
                report.unchanged = True
                return report
            try:
                if _is_ndjson(path):
                    self._import_ndjson(conn, path, report)
                else:
                    self._import_json(conn, path, report)
            except (OSError, EOFError, UnicodeDecodeError) as exc:
                raise FhirImportError(str(path), f"cannot read the file: {exc}") from exc
            except SQLAlchemyError as exc:
                raise FhirImportError(str(path), f"database error: {exc}") from exc
            self._log_import(conn, str(path), digest, report)
        return report

    def import_json(
        self, document: dict[str, Any], origin: str, *, force: bool = False
    ) -> ImportReport:
        """Import a Bundle or resource already in memory, all or nothing; unchanged content is skipped."""
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(canonical).hexdigest()
        report = ImportReport(origin)
        with self.engine.begin() as conn:
            if not force and self._seen(conn, digest):
                report.unchanged = True
                return report
            self._import_document(conn, document, origin, report)
            self._log_import(conn, origin, digest, report)
        return report

    @staticmethod
    def _seen(conn: Connection, digest: str) -> bool:
        return (
            conn.execute(select(imports_t.c.id).where(imports_t.c.sha256 == digest)).first()
            is not None
        )

    @staticmethod
    def _log_import(conn: Connection, origin: str, digest: str, report: ImportReport) -> None:
        conn.execute(
            insert(imports_t).values(
                path=origin[-1024:], sha256=digest, imported_at=_now(), resources=report.count
            )
        )

    def _import_json(self, conn: Connection, path: Path, report: ImportReport) -> None:
        with _open(path) as fh:
            try:
                document = json.load(fh)
            except json.JSONDecodeError as exc:
                raise FhirImportError(
                    str(path), f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
                ) from exc
        self._import_document(conn, document, str(path), report)

    def _import_document(
        self, conn: Connection, document: Any, origin: str, report: ImportReport
    ) -> None:
        if not isinstance(document, dict) or "resourceType" not in document:
            raise FhirImportError(origin, "not a FHIR resource or Bundle (no resourceType)")
        if document["resourceType"] == "Bundle":
            self._import_bundle(conn, document, origin, report)
        else:
            resource = self._checked(conn, document, origin, "resource", {})
            self._write(conn, [resource], origin)
            report.imported[resource["resourceType"]] += 1

    def _import_bundle(
        self, conn: Connection, bundle: dict[str, Any], origin: str, report: ImportReport
    ) -> None:
        btype = bundle.get("type")
        if btype not in ("transaction", "batch", "collection", "searchset", "document", "message"):
            raise FhirImportError(origin, f"Bundle.type {btype!r} cannot be imported")
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            raise FhirImportError(origin, "Bundle.entry is not a list")
        # Pass 1: give every entry its final Type/id, so urn:uuid references can be resolved.
        targets: dict[str, str] = {}
        planned: list[tuple[int, dict[str, Any]]] = []
        deletes: list[tuple[str, str]] = []
        for i, entry in enumerate(entries):
            where = f"entry {i}"
            if not isinstance(entry, dict):
                raise FhirImportError(origin, "entry is not a JSON object", where)
            request = entry.get("request") or {}
            if request.get("method") == "DELETE":
                rtype, _, rid = str(request.get("url", "")).partition("/")
                if not is_resource_type(rtype) or not rid:
                    raise FhirImportError(
                        origin, f"DELETE of {request.get('url')!r} is not Type/id", where
                    )
                deletes.append((rtype, rid))
                continue
            resource = entry.get("resource")
            if resource is None:
                report.skipped.append(f"{where}: no resource")
                continue
            if not isinstance(resource, dict):
                raise FhirImportError(origin, "entry.resource is not a JSON object", where)
            rtype = str(resource.get("resourceType"))
            if not is_resource_type(rtype):
                raise FhirImportError(origin, f"unknown resourceType {rtype!r}", where)
            full_url = entry.get("fullUrl")
            rid = str(resource.get("id") or "")
            if not rid and isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                rid = full_url.removeprefix("urn:uuid:")
            rid = rid or str(uuid.uuid4())
            resource = {**resource, "id": rid}
            if isinstance(full_url, str) and full_url:
                targets[full_url] = f"{rtype}/{rid}"
            planned.append((i, resource))
        lookup = _ConditionalLookup(conn, [r for _, r in planned])
        batch: list[dict[str, Any]] = []
        for i, resource in planned:
            where = f"entry {i} ({resource['resourceType']}/{resource['id']})"
            try:
                resolved = _resolve_references(resource, targets, lookup)
            except ValueError as exc:
                raise FhirImportError(origin, str(exc), where) from exc
            batch.append(self._checked(conn, resolved, origin, where, targets))
            report.imported[resource["resourceType"]] += 1
            if len(batch) >= self.batch_size:
                self._write(conn, batch, origin)
                batch = []
        self._write(conn, batch, origin)
        for rtype, rid in deletes:
            self._delete(conn, [(rtype, rid)])
            report.imported[f"{rtype} (deleted)"] += 1

    def _import_ndjson(self, conn: Connection, path: Path, report: ImportReport) -> None:
        batch: list[dict[str, Any]] = []
        with _open(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"line {lineno}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    reason = (
                        "truncated or malformed JSON"
                        if not line.endswith("\n")
                        else "malformed JSON"
                    )
                    raise FhirImportError(str(path), f"{reason}: {exc.msg}", where) from exc
                if not isinstance(raw, dict) or not is_resource_type(raw.get("resourceType")):
                    got = raw.get("resourceType") if isinstance(raw, dict) else type(raw).__name__
                    raise FhirImportError(
                        str(path), f"not a FHIR resource (resourceType {got!r})", where
                    )
                if raw["resourceType"] == "Bundle":
                    raise FhirImportError(
                        str(path), "NDJSON lines must be resources, not Bundles", where
                    )
                batch.append(self._checked(conn, raw, str(path), where, {}))
                report.imported[raw["resourceType"]] += 1
                if len(batch) >= self.batch_size:
                    self._write(conn, batch, str(path))
                    batch = []
        self._write(conn, batch, str(path))

    def _checked(
        self,
        conn: Connection,
        raw: dict[str, Any],
        origin: str,
        where: str,
        targets: dict[str, str],
    ) -> dict[str, Any]:
        rid = raw.get("id")
        if not isinstance(rid, str) or not rid or len(rid) > MAX_ID:
            raise FhirImportError(
                origin, f"resource id {rid!r} missing or longer than {MAX_ID}", where
            )
        result = validate(raw, origin)
        if isinstance(result, InvalidResource):
            raise FhirImportError(origin, f"invalid {result.resource_type}: {result.error}", where)
        for ref in _references(raw):
            if ref.startswith(("urn:uuid:", "urn:oid:")) and ref not in targets:
                raise FhirImportError(origin, f"broken reference {ref!r}: no such entry", where)
        return raw

    def _delete(self, conn: Connection, keys: Sequence[tuple[str, str]]) -> None:
        for table in (resources_t, *INDEX_TABLES.values()):
            conn.execute(
                delete(table).where(tuple_(table.c.resource_type, table.c.resource_id).in_(keys))
            )

    def _write(self, conn: Connection, batch: list[dict[str, Any]], origin: str) -> None:
        if not batch:
            return
        # A later entry for the same resource replaces an earlier one, as on a server.
        unique = {(r["resourceType"], r["id"]): r for r in batch}
        self._delete(conn, list(unique))
        now = _now()
        rows = []
        index_rows_by_table: dict[str, list[dict[str, Any]]] = {name: [] for name in INDEX_TABLES}
        for (rtype, rid), res in unique.items():
            rows.append(
                {
                    "resource_type": rtype,
                    "resource_id": rid,
                    "patient_id": compartment_patient(res),
                    "last_updated": (res.get("meta") or {}).get("lastUpdated") or now,
                    "origin": origin[-1024:],
                    "content": json.dumps(res, separators=(",", ":"), ensure_ascii=False),
                }
            )
            for name, values in index_rows(res).items():
                cols = [c.name for c in INDEX_TABLES[name].columns][2:]
                index_rows_by_table[name].extend(
                    {"resource_type": rtype, "resource_id": rid, **dict(zip(cols, v, strict=True))}
                    for v in values
                    if all(len(str(x)) <= 255 for x in v)
                )
        conn.execute(insert(resources_t), rows)
        for name, table_rows in index_rows_by_table.items():
            if table_rows:
                conn.execute(insert(INDEX_TABLES[name]), table_rows)

    # ---------------------------------------------------------------- read and search

    def read(self, resource_type: str, resource_id: str) -> Resource:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(resources_t.c.content).where(
                    resources_t.c.resource_type == resource_type,
                    resources_t.c.resource_id == resource_id,
                )
            ).first()
        if row is None:
            raise ResourceNotFound(
                f"{self._safe_url()}#{resource_type}/{resource_id}", 404, "not in the local store"
            )
        return _as_resource(row[0], f"{resource_type}/{resource_id}")

    def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        """Every match of a search; supports the indexed parameters, ``_id``, ``_sort``."""
        if not is_resource_type(resource_type):
            raise UnsupportedSearch(f"unknown resource type {resource_type!r}")
        r = resources_t
        query = select(r.c.content, r.c.resource_type, r.c.resource_id).where(
            r.c.resource_type == resource_type
        )
        order = [r.c.resource_id]
        for name, value in _param_items(params):
            base, _, modifier = name.partition(":")
            if base in ("_count", "_total", "_format", "_elements", "_summary"):
                continue  # paging and presentation: the store always returns every match
            if base == "_sort":
                order = _sort_order(resource_type, value)
                continue
            query = query.where(_condition(resource_type, base, modifier, value))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(*order)).all()
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
                f"{self._safe_url()}#Patient/{patient_id}", 404, "not in the local store"
            )
        return _result(rows)

    def binary(self, reference: str) -> BinaryContent:
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
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _as_resource(content: str, origin: str) -> Resource:
    result = validate(json.loads(content), origin)
    if isinstance(result, InvalidResource):  # only if the models changed since import
        raise StoreError(f"{origin} in the local store no longer validates: {result.error}")
    return result


def _result(rows: Iterable[Any]) -> SearchResult:
    out = SearchResult(pages=1)
    for content, rtype, rid in rows:
        checked = validate(json.loads(content), f"{rtype}/{rid}")
        (out.invalid if isinstance(checked, InvalidResource) else out.resources).append(checked)  # type: ignore[arg-type]
    out.total = len(out.resources) + len(out.invalid)
    return out


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


class _ConditionalLookup:
    """Resolves conditional references (``Organization?identifier=sys|val``) in a bundle or the store."""

    def __init__(self, conn: Connection, bundle_resources: list[dict[str, Any]]) -> None:
        self.conn = conn
        self.by_identifier: dict[tuple[str, str, str], list[str]] = {}
        for res in bundle_resources:
            for ident in res.get("identifier") or []:
                if isinstance(ident, dict) and "value" in ident:
                    key = (res["resourceType"], ident.get("system") or "", str(ident["value"]))
                    self.by_identifier.setdefault(key, []).append(
                        f"{res['resourceType']}/{res['id']}"
                    )

    def __call__(self, reference: str) -> str:
        rtype, _, query = reference.partition("?")
        name, _, value = query.partition("=")
        if name != "identifier" or "&" in value or not is_resource_type(rtype):
            raise ValueError(
                f"conditional reference {reference!r}: only Type?identifier=system|value is supported"
            )
        system, bar, code = value.partition("|")
        if not bar:
            system, code = "", value
        found = list(self.by_identifier.get((rtype, system, code), []))
        if not found:
            t = tokens_t
            rows = self.conn.execute(
                select(t.c.resource_id).where(
                    t.c.resource_type == rtype,
                    t.c.param == "identifier",
                    t.c.code == code,
                    *([t.c.system == system] if system else []),
                )
            ).all()
            found = [f"{rtype}/{row[0]}" for row in rows]
        if len(set(found)) != 1:
            what = "matches nothing" if not found else f"matches {len(set(found))} resources"
            raise ValueError(f"broken reference {reference!r}: {what}")
        return found[0]


def _resolve_references(
    node: Any, targets: dict[str, str], conditional: Callable[[str], str]
) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                if value in targets:
                    value = targets[value]
                elif "?" in value and not value.startswith(("http:", "https:", "#")):
                    value = conditional(value)
            else:
                value = _resolve_references(value, targets, conditional)
            out[key] = value
        return out
    if isinstance(node, list):
        return [_resolve_references(v, targets, conditional) for v in node]
    return node


def _param_items(params: SearchParams | None) -> Iterator[tuple[str, str]]:
    for key, value in (params or {}).items():
        if isinstance(value, str):
            yield key, value
        else:
            for v in value:
                yield key, v


_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")


def _owner(table: Table) -> Any:
    return and_(
        table.c.resource_type == resources_t.c.resource_type,
        table.c.resource_id == resources_t.c.resource_id,
    )


def _condition(resource_type: str, name: str, modifier: str, value: str) -> Any:
    """SQL condition for one search parameter; comma-separated values are OR-ed."""
    values = [v for v in value.split(",") if v != ""]
    if not values:
        raise UnsupportedSearch(f"search parameter {name!r} has an empty value")
    r = resources_t
    if name == "_id":
        return r.c.resource_id.in_(values)
    if name in ("patient", "subject") and resource_type != "Patient":
        ids = [v.removeprefix("Patient/") for v in values]
        return r.c.patient_id.in_(ids)
    if name in TOKENS.get(resource_type, {}) or name in ("identifier", "status"):
        t = tokens_t
        ors = []
        for v in values:
            system, bar, code = v.partition("|")
            if not bar:
                ors.append(t.c.code == v)
            elif code:
                ors.append(and_(t.c.system == system, t.c.code == code))
            else:
                ors.append(t.c.system == system)
        cond = exists().where(_owner(t), t.c.param == name, or_(*ors))
        return ~cond if modifier == "not" else cond
    if name in DATES.get(resource_type, {}):
        d = dates_t
        return exists().where(_owner(d), d.c.param == name, or_(*(_date_cmp(v) for v in values)))
    if name in STRINGS.get(resource_type, {}):
        s = strings_t
        ors = []
        for v in values:
            norm = normalise_string(v)
            if modifier == "exact":
                ors.append(s.c.value == norm)
            elif modifier == "contains":
                ors.append(s.c.value.contains(norm, autoescape=True))
            else:
                ors.append(s.c.value.startswith(norm, autoescape=True))
        return exists().where(_owner(s), s.c.param == name, or_(*ors))
    raise UnsupportedSearch(
        f"the local store cannot search {resource_type} by {name!r}; indexed: "
        + ", ".join(
            sorted(
                {
                    "_id",
                    "identifier",
                    "status",
                    *TOKENS.get(resource_type, {}),
                    *DATES.get(resource_type, {}),
                    *STRINGS.get(resource_type, {}),
                }
            )
        )
    )


def _date_cmp(value: str) -> Any:
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    rng = date_range(value[2:] if value[:2] in _PREFIXES else value)
    if rng is None:
        raise UnsupportedSearch(f"{value!r} is not a FHIR date")
    lo, hi = rng
    d = dates_t
    return {
        "eq": and_(d.c.start >= lo, d.c.end <= hi),
        "ne": or_(d.c.start > hi, d.c.end < lo),
        "gt": d.c.end > hi,
        "lt": d.c.start < lo,
        "ge": d.c.end >= lo,
        "le": d.c.start <= hi,
        "sa": d.c.start > hi,
        "eb": d.c.end < lo,
    }[prefix]


def _sort_order(resource_type: str, value: str) -> list[Any]:
    order = []
    for key in value.split(","):
        desc = key.startswith("-")
        key = key.lstrip("-")
        if key == "_id":
            col: Any = resources_t.c.resource_id
        elif key == "_lastUpdated":
            col = resources_t.c.last_updated
        elif key in DATES.get(resource_type, {}):
            d = dates_t
            col = select(func.min(d.c.start)).where(_owner(d), d.c.param == key).scalar_subquery()
        else:
            raise UnsupportedSearch(f"the local store cannot sort {resource_type} by {key!r}")
        order.append(col.desc() if desc else col.asc())
    order.append(resources_t.c.resource_id)
    return order


class StoreSource:
    """The local store as an async ``FhirSource``: the same interface as ``FhirClient``."""

    def __init__(self, store: FhirStore) -> None:
        self.store = store

    @property
    def name(self) -> str:
        return f"local store {self.store._safe_url()}"

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        return await asyncio.to_thread(self.store.read, resource_type, resource_id)

    async def search(self, resource_type: str, params: SearchParams | None = None) -> SearchResult:
        return await asyncio.to_thread(self.store.search, resource_type, params)

    async def everything(self, patient_id: str) -> SearchResult:
        return await asyncio.to_thread(self.store.everything, patient_id)

    async def binary(self, reference: str) -> BinaryContent:
        return await asyncio.to_thread(self.store.binary, reference)

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> StoreSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
