"""The case index's SQL tables: the source of truth that every FAISS generation is derived from.

``cases`` holds one row per case with its fused vector (float32 bytes), ``case_identifiers`` each
case's patient identifiers (to leave a patient's own cases out across sources), ``case_thumbnails``
a small PNG preview per case with images, and ``index_meta`` the vector space the rows were made in.
"""

from __future__ import annotations

import io

from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, Text

from retrieval.cases import Case

metadata = MetaData()
cases_t = Table(
    "cases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # the FAISS id
    Column("key", String(512), nullable=False, unique=True),
    Column("patient_id", String(256), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("sex", String(16), index=True),
    Column("age_band", String(16), index=True),
    Column("modalities", String(256), nullable=False, default=""),  # ",CT,MR," for LIKE
    Column("label", String(256)),
    Column("summary", Text, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("has_image", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32, the fused vector
    Column("updated_at", String(32), nullable=False),
)
# each case's patient identifiers, to leave a patient's own cases out across sources
idents_t = Table(
    "case_identifiers",
    metadata,
    Column("id", Integer, nullable=False, index=True),  # the case's FAISS id
    Column("identifier", String(512), nullable=False, index=True),
)
# a small greyscale preview of each case's first image, for case cards (PNG, at most 128 px)
thumbs_t = Table(
    "case_thumbnails",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("png", LargeBinary, nullable=False),
)
meta_t = Table(
    "index_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


def thumbnail_png(case: Case) -> bytes:
    """The ``case_thumbnails`` row of a case with images: its first image in greyscale, at most
    128 × 128 px (aspect kept), as optimised PNG bytes. Raises IndexError for a case without one."""
    picture = case.images[0].convert("L")
    picture.thumbnail((128, 128))
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
