"""The embedded local FHIR store on SQLAlchemy: SQLite by default, PostgreSQL by URL.

Imports Bundles (transaction, batch, collection, searchset; Synthea output as-is), NDJSON (FHIR
Bulk Data, streamed) and single resources, optionally gzip-compressed. Each file is imported in one
database transaction: a file either goes in whole or leaves the store as it was.

A file must name each resource once: two entries (or NDJSON lines) for one ``Type/id``, or two
entries with one ``fullUrl``, are refused unless ``meta.versionId`` tells them apart (FHIR R4 Bundle
invariant bdl-7; the transaction rules of the RESTful API refuse overlapping identities too).
Hostile or broken input (encodings other than UTF-8, truncated or corrupt gzip, numbers no float
or 32-bit integer can hold, nesting or sizes beyond the limits below) ends in ``FhirImportError``
naming the file and the entry or line, never in another exception.
"""

from __future__ import annotations

import asyncio
import codecs
import gzip
import hashlib
import io
import json
import math
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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

# Limits that turn hostile or broken files into a clear error instead of a traceback or an
# exhausted machine. One NDJSON line holds one resource; 256 MiB leaves room for a Binary or a
# DocumentReference with a large base64 attachment. A JSON file (Bundle or resource) is parsed
# whole, which takes several times its size in memory: larger exports belong in NDJSON.
MAX_LINE_BYTES = 256 * 2**20
MAX_DOCUMENT_BYTES = 1024 * 2**20
# JSON nesting of one resource: real resources stay far below (a Questionnaire's nested items, an
# extension of an extension); the importer's own passes recurse once per level.
MAX_DEPTH = 100
# Digits of one JSON number: FHIR integers are 32-bit and decimals carry at most 18 significant
# digits in practice; Python refuses to convert integers longer than 4300 digits anyway.
MAX_NUMBER_DIGITS = 100


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


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _is_ndjson(path: Path) -> bool:
    name = path.name.removesuffix(".gz")
    return name.endswith((".ndjson", ".jsonl"))


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


@contextmanager
def _gzip_errors(origin: str, where: str | None) -> Iterator[None]:
    """Turn the gzip module's errors for a damaged file into ``FhirImportError``."""
    try:
        yield
    except EOFError as exc:
        raise FhirImportError(
            origin, "the gzip data ends early (a truncated download or copy?)", where
        ) from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise FhirImportError(origin, f"corrupt gzip data: {exc}", where) from exc


_CHUNK = 8 * 2**20


def _read_document(path: Path, limit: int) -> str:
    """The text of a whole JSON file (decompressed), at most ``limit`` bytes, as UTF-8."""
    data = bytearray()
    # In chunks: read(limit + 1) would allocate the whole limit up front, and a gzip file's size
    # says nothing about what it decompresses to.
    with _gzip_errors(str(path), None), _open_binary(path) as fh:
        while chunk := fh.read(_CHUNK):
            data += chunk
            if len(data) > limit:
                raise FhirImportError(
                    str(path),
                    f"larger than {_size(limit)}, the limit for one JSON file (it is parsed "
                    "whole); export large data as NDJSON (one resource per line, read line by line)",
                )
    return _decode(data, str(path), None, first=True)


def _read_lines(path: Path, limit: int) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of an NDJSON file, read line by line, each at most ``limit`` bytes."""
    origin = str(path)
    with _open_binary(path) as fh:
        lineno = 0
        while True:
            lineno += 1
            where = f"line {lineno}"
            with _gzip_errors(origin, where):
                data = fh.readline(limit + 1)
            if not data:
                return
            if len(data) > limit:
                raise FhirImportError(
                    origin,
                    f"longer than {_size(limit)}, the limit for one NDJSON line (one resource)",
                    where,
                )
            yield lineno, _decode(data, origin, where, first=lineno == 1)


# Byte order marks of the encodings JSON must not be exchanged in (RFC 8259 section 8.1); the
# UTF-32 marks first, as the UTF-32LE mark begins with the UTF-16LE one.
_FOREIGN_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _decode(data: bytes | bytearray, origin: str, where: str | None, *, first: bool) -> str:
    """UTF-8 text of a file or line; ``first``: it starts the file, where a UTF-8 byte order mark
    is dropped (RFC 8259 section 8.1 lets parsers ignore one) and UTF-16/32 are recognised."""
    if first:
        for bom, name in _FOREIGN_BOMS:
            if data.startswith(bom):
                raise FhirImportError(
                    origin,
                    f"the file is {name} (it starts with a {name} byte order mark); FHIR JSON is "
                    f"UTF-8: convert it first, e.g. iconv -f {name} -t UTF-8",
                    where,
                )
        if b"\x00" in data[:4]:
            # JSON text starts with ASCII; NUL bytes among the first four mean UTF-16 or UTF-32
            # without a byte order mark (RFC 4627 section 3).
            raise FhirImportError(
                origin,
                "the file looks UTF-16 or UTF-32 (NUL bytes at its start); FHIR JSON is UTF-8: "
                "convert it first, e.g. iconv -f UTF-16 -t UTF-8",
                where,
            )
        data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        at = f"line {line} byte {column}" if where is None else f"byte {column}"
        raise FhirImportError(
            origin,
            f"not UTF-8: byte 0x{data[exc.start]:02X} at {at} ({exc.reason}); FHIR JSON is "
            "UTF-8: a Latin-1 or Windows-1252 export must be converted first, e.g. "
            "iconv -f WINDOWS-1252 -t UTF-8",
            where,
        ) from exc


class _BadNumber(ValueError):
    """A JSON number the importer refuses."""


def _number_text(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:12]}…{text[-8:]}"


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise _BadNumber(
            f"the integer {_number_text(text)} has {digits} digits; at most "
            f"{MAX_NUMBER_DIGITS} are accepted"
        )
    return int(text)


def _parse_float(text: str) -> float:
    mantissa = text.lstrip("-").lower().partition("e")[0]
    digits = len(mantissa.replace(".", ""))
    if digits > MAX_NUMBER_DIGITS:
        raise _BadNumber(
            f"the number {_number_text(text)} has {digits} digits; at most "
            f"{MAX_NUMBER_DIGITS} are accepted"
        )
    value = float(text)
    if not math.isfinite(value) or (value == 0 and mantissa.strip("0.")):
        raise _BadNumber(f"the number {_number_text(text)} is out of range (beyond a double)")
    return value


def _parse_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not a JSON number (RFC 8259)")


def _loads(text: str, origin: str, where: str | None = None, *, cut: bool = False) -> Any:
    """Parse JSON strictly: numbers finite and of at most ``MAX_NUMBER_DIGITS`` digits, no
    ``NaN``/``Infinity``; ``where`` names the NDJSON line, ``cut`` says it lacks its newline.
    Every failure is a ``FhirImportError``."""
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno} column {exc.colno}" if where is None else f"column {exc.colno}"
        ends_early = (
            cut or exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        )
        kind = "truncated or malformed JSON" if ends_early else "malformed JSON"
        raise FhirImportError(origin, f"{kind} at {at}: {exc.msg}", where) from exc
    except _BadNumber as exc:
        raise FhirImportError(origin, str(exc), where) from exc
    except RecursionError as exc:
        raise FhirImportError(
            origin,
            f"JSON nested too deeply to read (more than {MAX_DEPTH} levels are refused)",
            where,
        ) from exc


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "number" if isinstance(value, int | float) else type(value).__name__


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}…"


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"


def _nesting(node: Any) -> int:
    """How deep JSON arrays and objects nest in ``node`` (a scalar 0, ``[]`` 1), counted without
    recursion; counting stops once past ``MAX_DEPTH``."""
    deepest = 0
    stack = [(node, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _admit(raw: Any, origin: str, where: str) -> dict[str, Any]:
    """One resource's JSON as read: an object with a FHIR R4 resourceType, nested at most
    ``MAX_DEPTH`` levels (so that validation, reference resolution and indexing, which recurse,
    cannot overflow the stack)."""
    if not isinstance(raw, dict):
        raise FhirImportError(origin, f"a JSON {_json_kind(raw)}, not a FHIR resource", where)
    if "resourceType" not in raw:
        raise FhirImportError(origin, "not a FHIR resource (no resourceType)", where)
    if not is_resource_type(raw["resourceType"]):
        raise FhirImportError(origin, f"unknown resourceType {_brief(raw['resourceType'])}", where)
    if _nesting(raw) > MAX_DEPTH:
        raise FhirImportError(
            origin, f"JSON nested deeper than {MAX_DEPTH} levels, the limit for a resource", where
        )
    return raw


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class _Identities:
    """The resources one file has named so far, to refuse two entries for one resource.

    A file names each ``Type/id`` and each ``fullUrl`` once, unless ``meta.versionId`` tells the
    entries apart as versions of one resource (FHIR R4 Bundle invariant bdl-7). Of versions, the
    one with the later ``meta.lastUpdated`` is kept (the later in the file when that does not
    decide); the others are listed in ``superseded``. Holds a small tuple per resource.
    """

    def __init__(self, origin: str, entry_word: str = "entry") -> None:
        self.origin = origin
        self.entry_word = entry_word
        # Type/id -> (entry index or line number, fullUrl, versionId, lastUpdated)
        self.by_key: dict[str, tuple[int, str | None, str | None, datetime | None]] = {}
        self.by_url: dict[str, tuple[int, str]] = {}
        self.versions: dict[tuple[str, str], int] = {}  # only for entries with a versionId
        self.superseded: list[str] = []

    def _name(self, index: int, full_url: str | None) -> str:
        return f"{self.entry_word} {index}" + (f" (fullUrl {full_url})" if full_url else "")

    def claim(self, key: str, full_url: str | None, index: int, meta: Any) -> str:
        """Record the entry ``index`` for the resource ``key`` (``Type/id``).

        Returns "new" for a resource not named before, "newer" when this entry's version replaces
        an earlier one, "older" when an earlier entry holds a newer version. Raises
        ``FhirImportError`` naming both entries when they are not told apart by versionId, or when
        one fullUrl names two resources.
        """
        meta = meta if isinstance(meta, dict) else {}
        version = meta.get("versionId") if isinstance(meta.get("versionId"), str) else None
        updated = _instant(meta.get("lastUpdated"))
        word = self.entry_word
        if version is not None:
            # One version twice, even with another version between them.
            first = self.versions.setdefault((key, version), index)
            if first != index:
                raise FhirImportError(
                    self.origin,
                    f"both are {key} version {version}: a file may hold a resource once, or "
                    "versions with different meta.versionIds (FHIR Bundle invariant bdl-7)",
                    f"{word} {first} and {word} {index}",
                )
        if full_url:
            seen_url = self.by_url.setdefault(full_url, (index, key))
            if seen_url[1] != key:
                raise FhirImportError(
                    self.origin,
                    f"one fullUrl {_brief(full_url)} names two resources, {seen_url[1]} and "
                    f"{key}; a Bundle's fullUrls are unique (FHIR Bundle invariant bdl-7)",
                    f"{word} {seen_url[0]} and {word} {index}",
                )
        earlier = self.by_key.get(key)
        if earlier is None:
            self.by_key[key] = (index, full_url, version, updated)
            return "new"
        e_index, e_url, e_version, e_updated = earlier
        if version is None or e_version is None or version == e_version:
            raise FhirImportError(
                self.origin,
                f"both are {key}: {self._name(e_index, e_url)} and {self._name(index, full_url)}, "
                "not told apart by meta.versionId; a file may hold a resource once, or versions "
                "with different versionIds (FHIR Bundle invariant bdl-7)",
                f"{word} {e_index} and {word} {index}",
            )
        if e_updated is not None and updated is not None and updated < e_updated:
            self.superseded.append(
                f"{word} {index}: {key} version {version} is older than version {e_version} "
                f"({word} {e_index})"
            )
            return "older"
        self.by_key[key] = (index, full_url, version, updated)
        self.superseded.append(
            f"{word} {e_index}: {key} version {e_version} superseded by version {version} "
            f"({word} {index})"
        )
        return "newer"


class FhirStore:
    """The local store (synchronous); ``StoreSource`` offers it through the async ``FhirSource``."""

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
        """Import one file (Bundle, NDJSON or a single resource; ``.gz`` accepted), all or nothing.

        Raises ``FhirImportError`` naming the file (and the entry or line, where there is one) for
        anything that cannot be imported; the store is then left as it was.
        """
        path = Path(path)
        if not path.is_file():
            raise FhirImportError(str(path), "no such file")
        report = ImportReport(str(path))
        try:
            digest = _sha256(path)
            with self.engine.begin() as conn:
                if not force and self._seen(conn, digest):
                    report.unchanged = True
                    return report
                if _is_ndjson(path):
                    self._import_ndjson(conn, path, report)
                else:
                    self._import_json(conn, path, report)
                self._log_import(conn, str(path), digest, report)
        except OSError as exc:
            raise FhirImportError(str(path), f"cannot read the file: {exc}") from exc
        except SQLAlchemyError as exc:
            raise FhirImportError(str(path), f"database error: {exc}") from exc
        except MemoryError as exc:
            # The size limits keep this rare; a machine with little memory can still run out.
            raise FhirImportError(
                str(path),
                "not enough memory to import this file; split it, or export it as NDJSON "
                "(one resource per line, read line by line)",
            ) from exc
        return report

    def import_json(
        self, document: dict[str, Any], origin: str, *, force: bool = False
    ) -> ImportReport:
        """Import a Bundle or resource already in memory, all or nothing; unchanged content is skipped."""
        try:
            canonical = json.dumps(
                document, sort_keys=True, separators=(",", ":"), allow_nan=False
            ).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise FhirImportError(origin, f"not a JSON document: {exc}") from exc
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
        text = _read_document(path, self.max_document_bytes)
        self._import_document(conn, _loads(text, str(path)), str(path), report)

    def _import_document(
        self, conn: Connection, document: Any, origin: str, report: ImportReport
    ) -> None:
        if not isinstance(document, dict):
            raise FhirImportError(
                origin,
                f"not a FHIR resource or Bundle: the file holds a JSON {_json_kind(document)}",
            )
        if "resourceType" not in document:
            raise FhirImportError(origin, "not a FHIR resource or Bundle (no resourceType)")
        if document["resourceType"] == "Bundle":
            self._import_bundle(conn, document, origin, report)
        else:
            raw = _admit(document, origin, "resource")
            resource = self._checked(conn, raw, origin, "resource", {})
            self._write(conn, [resource], origin)
            report.imported[resource["resourceType"]] += 1

    def _import_bundle(
        self, conn: Connection, bundle: dict[str, Any], origin: str, report: ImportReport
    ) -> None:
        btype = bundle.get("type")
        if btype not in ("transaction", "batch", "collection", "searchset", "document", "message"):
            raise FhirImportError(origin, f"Bundle.type {_brief(btype)} cannot be imported")
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            raise FhirImportError(origin, "Bundle.entry is not a list")
        # Pass 1: give every entry its final Type/id, so urn:uuid references can be resolved, and
        # refuse two entries for one resource before anything is written.
        identities = _Identities(origin)
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
                    raise FhirImportError(origin, f"DELETE of {_brief(url)} is not Type/id", where)
                identities.claim(f"{rtype}/{rid}", None, i, None)
                deletes.append((rtype, rid))
                continue
            resource = entry.get("resource")
            if resource is None:
                report.skipped.append(f"{where}: no resource")
                continue
            resource = _admit(resource, origin, where)
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
        lookup = _ConditionalLookup(conn, [r for _, r in planned.values()])
        batch: list[dict[str, Any]] = []
        for i, resource in planned.values():
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
        origin = str(path)
        identities = _Identities(origin, entry_word="line")
        batch: list[dict[str, Any]] = []
        for lineno, line in _read_lines(path, self.max_line_bytes):
            if not line.strip():
                continue
            where = f"line {lineno}"
            raw = _admit(_loads(line, origin, where, cut=not line.endswith("\n")), origin, where)
            if raw["resourceType"] == "Bundle":
                raise FhirImportError(origin, "NDJSON lines must be resources, not Bundles", where)
            resource = self._checked(conn, raw, origin, where, {})
            verdict = identities.claim(
                f"{resource['resourceType']}/{resource['id']}", None, lineno, resource.get("meta")
            )
            if verdict == "older":
                continue
            if verdict == "new":
                report.imported[resource["resourceType"]] += 1
            batch.append(resource)
            if len(batch) >= self.batch_size:
                self._write(conn, batch, origin)
                batch = []
        self._write(conn, batch, origin)
        report.skipped.extend(identities.superseded)

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
                origin, f"resource id {_brief(rid)} missing or longer than {MAX_ID}", where
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
                f"reference to Patient/{_brief(patient)}: an id longer than {MAX_ID} characters",
                where,
            )
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
        # Of two versions of one resource in a batch, the newer came last (see _Identities).
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
            # Not validated yet: an identifier of the wrong shape fails validation later.
            idents = res.get("identifier")
            for ident in idents if isinstance(idents, list) else []:
                if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                    system = ident.get("system")
                    key = (
                        res["resourceType"],
                        system if isinstance(system, str) else "",
                        ident["value"],
                    )
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
