"""Reading the files the store imports: whole JSON documents and NDJSON lines, plain or gzip,
as UTF-8 text within size limits.

Every failure (a missing or unreadable file is the caller's) ends in ``FhirImportError`` naming the
file and, for NDJSON, the line: a damaged gzip stream, a file or line over its limit, text in
another encoding than UTF-8 (FHIR JSON is UTF-8: RFC 8259 section 8.1; FHIR R4 http.html, "UTF-8 for all request and
response bodies").
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from connectors.errors import FhirImportError

# Limits that turn hostile or broken files into a clear error instead of a traceback or an
# exhausted machine. One NDJSON line holds one resource; 256 MiB leaves room for a Binary or a
# DocumentReference with a large base64 attachment. A JSON file (Bundle or resource) is parsed
# whole, which takes several times its size in memory: larger exports belong in NDJSON.
MAX_LINE_BYTES = 256 * 2**20
MAX_DOCUMENT_BYTES = 1024 * 2**20


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file's bytes as stored (compressed, if it is), 64 hex digits: what the
    import log keys a file by."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def is_ndjson(path: Path) -> bool:
    """Whether the file name says NDJSON (``.ndjson`` or ``.jsonl``, optionally ``.gz``); any other
    name is read as one JSON document."""
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


def read_document(path: Path, limit: int) -> str:
    """The text of a whole JSON file (decompressed), at most ``limit`` bytes, as UTF-8; a UTF-8
    byte order mark is dropped. Raises ``FhirImportError`` for a damaged gzip stream, a file over
    ``limit`` or text that is not UTF-8; ``OSError`` if the file cannot be read."""
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


def read_lines(path: Path, limit: int) -> Iterator[tuple[int, str]]:
    """``(line number from 1, text with its newline)`` of an NDJSON file, read line by line, each
    at most ``limit`` bytes. Raises ``FhirImportError`` naming the line for a damaged gzip stream,
    a line over ``limit`` or text that is not UTF-8; ``OSError`` if the file cannot be read."""
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


def _size(limit: int) -> str:
    return f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit} bytes"
