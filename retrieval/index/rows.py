"""Reading and writing case rows in SQL (tables in ``schema``): vectors, fingerprints,
thumbnails, the rows of search hits, and the changes a build makes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine

from retrieval.cases import Case
from retrieval.index.hits import CaseHit
from retrieval.index.schema import cases_t, idents_t, thumbnail_png, thumbs_t

_READ_CHUNK = 5000  # ids per SELECT ... IN (...)


def sql_state(engine: Engine) -> dict[int, str]:
    """FAISS id → fingerprint of every case row."""
    with engine.connect() as conn:
        return dict(conn.execute(select(cases_t.c.id, cases_t.c.fingerprint)).all())


def fingerprints(
    engine: Engine, *, keys: Sequence[str] | None = None, patients: Sequence[str] | None = None
) -> dict[str, str]:
    """Case key → fingerprint of every case row; only of the rows with these ``keys``, or of these
    ``patients``' cases (by ``patient_id``), when given (read ``_READ_CHUNK`` at a time)."""
    query = select(cases_t.c.key, cases_t.c.fingerprint)
    with engine.connect() as conn:
        if keys is not None:
            column, wanted = cases_t.c.key, list(keys)
        elif patients is not None:
            column, wanted = cases_t.c.patient_id, list(patients)
        else:
            return dict(conn.execute(query).all())
        out: dict[str, str] = {}
        for start in range(0, len(wanted), _READ_CHUNK):
            chunk = wanted[start : start + _READ_CHUNK]
            out.update(conn.execute(query.where(column.in_(chunk))).all())
        return out


def read_vectors(engine: Engine, ids: Sequence[int], dim: int) -> np.ndarray:
    """The fused vectors of ``ids``, float32 of shape (len(ids), dim) in the order of ``ids``; an
    id without a row leaves a zero row."""
    out = np.zeros((len(ids), dim), dtype=np.float32)
    pos = {i: n for n, i in enumerate(ids)}
    with engine.connect() as conn:
        for start in range(0, len(ids), _READ_CHUNK):
            chunk = list(ids[start : start + _READ_CHUNK])
            for cid, blob in conn.execute(
                select(cases_t.c.id, cases_t.c.vector).where(cases_t.c.id.in_(chunk))
            ):
                out[pos[cid]] = np.frombuffer(blob, dtype=np.float32)
    return out


def thumbnail(engine: Engine, key: str) -> bytes | None:
    """The PNG preview of the case ``key``'s first image; None for an unknown key or a case
    without images."""
    with engine.connect() as conn:
        found = conn.execute(select(thumbs_t.c.png).where(thumbs_t.c.key == key)).first()
    return bytes(found[0]) if found else None


def replace_cases(
    engine: Engine, cases: Sequence[Case], vectors: np.ndarray
) -> tuple[list[int], list[int]]:
    """Write ``cases`` (with their fused ``vectors``, one row each) in one transaction, replacing
    any rows of the same keys with their identifiers and thumbnails. Returns (the new FAISS ids in
    the order of ``cases``, the ids of the rows replaced)."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    keys = [c.key for c in cases]
    with engine.begin() as conn:
        old = dict(
            conn.execute(select(cases_t.c.key, cases_t.c.id).where(cases_t.c.key.in_(keys))).all()
        )
        if old:
            conn.execute(delete(cases_t).where(cases_t.c.id.in_(list(old.values()))))
            conn.execute(delete(idents_t).where(idents_t.c.id.in_(list(old.values()))))
        conn.execute(delete(thumbs_t).where(thumbs_t.c.key.in_(keys)))
        for case in cases:
            if case.images:
                conn.execute(insert(thumbs_t).values(key=case.key, png=thumbnail_png(case)))
        new_ids = []
        for case, vec in zip(cases, vectors, strict=True):
            result = conn.execute(
                insert(cases_t).values(
                    key=case.key,
                    patient_id=case.patient_id,
                    kind=case.kind,
                    sex=case.sex,
                    age_band=case.age_band,
                    modalities="," + ",".join(case.modalities) + "," if case.modalities else "",
                    label=case.label,
                    summary=case.summary,
                    fingerprint=case.fingerprint(),
                    has_image=int(bool(case.images)),
                    vector=np.asarray(vec, dtype=np.float32).tobytes(),
                    updated_at=now,
                )
            )
            new_id = int(result.inserted_primary_key[0])  # type: ignore[index]
            new_ids.append(new_id)
            for ident in case.identifiers:
                conn.execute(insert(idents_t).values(id=new_id, identifier=ident))
    return new_ids, list(old.values())


def delete_cases(engine: Engine, keys: Sequence[str]) -> list[int]:
    """Delete the rows of ``keys`` (with their identifiers and thumbnails) in one transaction;
    returns the FAISS ids deleted (unknown keys are skipped)."""
    with engine.begin() as conn:
        ids = [int(i) for (i,) in conn.execute(select(cases_t.c.id).where(cases_t.c.key.in_(keys)))]
        if ids:
            conn.execute(delete(cases_t).where(cases_t.c.id.in_(ids)))
            conn.execute(delete(idents_t).where(idents_t.c.id.in_(ids)))
            conn.execute(delete(thumbs_t).where(thumbs_t.c.key.in_(keys)))
    return ids


def case_hits(engine: Engine, found: list[tuple[int, float]]) -> list[CaseHit]:
    """``CaseHit``s for (FAISS id, score) search results, in their order; ids without a row (removed
    since the search) are skipped."""
    if not found:
        return []
    c = cases_t.c
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                select(
                    c.id,
                    c.key,
                    c.patient_id,
                    c.summary,
                    c.sex,
                    c.age_band,
                    c.modalities,
                    c.label,
                    c.kind,
                ).where(c.id.in_([i for i, _ in found]))
            )
        }
    return [
        CaseHit(
            key=rows[i].key,
            patient_id=rows[i].patient_id,
            score=score,
            summary=rows[i].summary,
            sex=rows[i].sex,
            age_band=rows[i].age_band,
            modalities=tuple(m for m in rows[i].modalities.split(",") if m),
            label=rows[i].label,
            kind=rows[i].kind,
        )
        for i, score in found
        if i in rows
    ]
