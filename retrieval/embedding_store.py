"""Chart-line embeddings kept on disk between processes, so a cold question does not embed again
what an earlier process embedded.

A SQLite file (``<encoders.cache_dir>/line-embeddings.sqlite3`` by default) with one table,
``line_embedding(space, key, vector)``: ``space`` is the encoder's ``EncoderInfo.space`` (its name
and a fingerprint of its weights, so another model, or other weights, never reads these vectors),
``key`` the SHA-256 of the line's text (32 hex digits), ``vector`` the float32 bytes. Only chart
lines are kept, never questions. The agent keeps lines of the embedded store only (whose records
are on this disk already), never of a remote FHIR server or an EHR session.

The store is an optimisation: a database that cannot be opened, read or written (locked past its
timeout, full disk, a corrupt file) is logged and skipped, and the lines are embedded as before.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS line_embedding ("
    "space TEXT NOT NULL, key TEXT NOT NULL, vector BLOB NOT NULL, "
    "PRIMARY KEY (space, key)) WITHOUT ROWID"
)
_CHUNK = 500  # keys per SELECT: under SQLite's default limit of 999 bound parameters (< 3.32)


def line_key(text: str) -> str:
    """A line's key: the first 32 hex digits of the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class EmbeddingStore:
    """Embeddings of one encoder's ``space`` (``dim`` float32 values each) in the SQLite file at
    ``path`` (created with its folder on first use; WAL journal, 5 s busy timeout, so several
    processes may share it)."""

    def __init__(self, path: Path, space: str, dim: int) -> None:
        self.path = path
        self.space = space
        self.dim = dim
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._broken = False

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None and not self._broken:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                conn.commit()
                self._conn = conn
            except (sqlite3.Error, OSError) as exc:
                self._skip("open", exc)
        return self._conn

    def _skip(self, what: str, exc: Exception) -> None:
        log.warning("line embeddings at %s: cannot %s (%s); embedding without them", self.path,
                    what, type(exc).__name__)  # fmt: skip
        self._broken = True

    def get(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of ``texts`` that have one, by text (shape ``(dim,)``, float32);
        ``{}`` when the store cannot be read."""
        keys = {line_key(t): t for t in texts}
        found: dict[str, np.ndarray] = {}
        with self._lock:
            conn = self._connection()
            if conn is None:
                return found
            try:
                wanted = list(keys)
                for i in range(0, len(wanted), _CHUNK):
                    part = wanted[i : i + _CHUNK]
                    rows = conn.execute(
                        "SELECT key, vector FROM line_embedding WHERE space = ? AND key IN "
                        f"({', '.join('?' * len(part))})",
                        [self.space, *part],
                    )
                    for key, blob in rows:
                        vector = np.frombuffer(blob, dtype=np.float32)
                        if vector.shape == (self.dim,):
                            found[keys[key]] = vector
            except sqlite3.Error as exc:
                self._skip("read", exc)
        return found

    def put(self, vectors: dict[str, np.ndarray]) -> None:
        """Keep ``vectors`` (text → shape ``(dim,)``), replacing any stored for the same text; a
        store that cannot be written is skipped."""
        if not vectors:
            return
        rows = [
            (self.space, line_key(t), np.asarray(v, dtype=np.float32).tobytes())
            for t, v in vectors.items()
        ]
        with self._lock:
            conn = self._connection()
            if conn is None:
                return
            try:
                with conn:
                    conn.executemany("INSERT OR REPLACE INTO line_embedding VALUES (?, ?, ?)", rows)
            except sqlite3.Error as exc:
                self._skip("write", exc)

    def close(self) -> None:
        """Close the connection (a later call opens it again)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
