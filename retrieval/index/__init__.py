"""The similar-case index: fused case vectors in FAISS, case metadata and vectors in SQL.

Layout of an index folder::

    cases.db            SQLite (or any SQLAlchemy URL): one row per case, with its fused vector
    CURRENT             the name of the live generation, replaced atomically
    gen-000007/         index.faiss, ids.npy (FAISS ids in the index), manifest.json

SQL is the source of truth; the FAISS file is derived from it. A build commits cases to SQL in
chunks, then writes a new generation and switches ``CURRENT`` to it; a crash at any point leaves
the previous generation live, and the next open brings it up to date from SQL without encoding
anything again. The manifest names the encoders (with a fingerprint of their weights), the fusion,
the dimensions and a checksum, so that an index is never searched with vectors of another space.

Modules: ``schema`` (SQL tables), ``rows`` (reading and writing them), ``fusion`` (one vector per
case), ``kinds`` (FAISS index kinds, training, GPU copies), ``filters`` (a ``CaseFilter`` as an
IDSelector), ``hits`` (filters, hits and what a caller sees of them), ``manifest`` (generations on
disk and the vector space), ``case_index`` (``CaseIndex``), ``errors``.
"""

from __future__ import annotations

from sqlalchemy import select

from retrieval.index.case_index import BuildStats, CaseIndex
from retrieval.index.errors import CaseIndexError, IndexMismatch
from retrieval.index.fusion import Fusion
from retrieval.index.hits import CaseFilter, CaseHit, generalised_hit, shown_to
from retrieval.index.kinds import EXACT_LIMIT, auto_factory, faiss
from retrieval.index.manifest import FORMAT
from retrieval.index.schema import cases_t, idents_t, meta_t, metadata, thumbs_t

__all__ = [
    "EXACT_LIMIT",
    "FORMAT",
    "BuildStats",
    "CaseFilter",
    "CaseHit",
    "CaseIndex",
    "CaseIndexError",
    "Fusion",
    "IndexMismatch",
    "auto_factory",
    "cases_t",
    "faiss",
    "generalised_hit",
    "idents_t",
    "meta_t",
    "metadata",
    "select",
    "shown_to",
    "thumbs_t",
]
