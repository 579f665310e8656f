"""A ``CaseFilter`` as FAISS sees it: an IDSelector built from the case rows in SQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from retrieval.index.hits import CaseFilter
from retrieval.index.kinds import faiss
from retrieval.index.schema import cases_t, idents_t


def selector(engine: Engine, flt: CaseFilter) -> tuple[Any, set[int] | None, bool]:
    """(IDSelector or None, the ids a pure exclusion leaves out, whether nothing at all is
    allowed). A narrowing filter becomes an allow-list (``IDSelectorBatch``) of the matching ids;
    a filter that only excludes a patient (by id or identifiers) becomes ``IDSelectorNot`` over
    that patient's ids, which are also returned so a GPU search (which ignores selectors) can
    drop them itself; no filter gives (None, None, False)."""
    c = cases_t.c
    if flt.narrows:
        query = select(c.id)
        if flt.modality:
            query = query.where(c.modalities.like(f"%,{flt.modality.upper()},%"))
        if flt.sex:
            query = query.where(c.sex == flt.sex.lower())
        if flt.age_band:
            query = query.where(c.age_band == flt.age_band)
        if flt.exclude_patient:
            query = query.where(c.patient_id != flt.exclude_patient)
        if flt.exclude_identifiers:
            query = query.where(c.id.not_in(_with_identifiers(flt.exclude_identifiers)))
        with engine.connect() as conn:
            allowed = np.array([i for (i,) in conn.execute(query)], dtype=np.int64)
        return faiss.IDSelectorBatch(allowed), None, len(allowed) == 0
    if flt.exclude_patient or flt.exclude_identifiers:
        own: Any = select(c.id).where(c.patient_id == (flt.exclude_patient or ""))
        if flt.exclude_identifiers:
            own = own.union(_with_identifiers(flt.exclude_identifiers))
        with engine.connect() as conn:
            excluded = sorted({int(i) for (i,) in conn.execute(own)})
        if excluded:
            batch = faiss.IDSelectorBatch(np.array(excluded, dtype=np.int64))
            not_excluded = faiss.IDSelectorNot(batch)
            not_excluded.referenced = batch  # keep the inner selector alive
            return not_excluded, set(excluded), False
    return None, None, False


def _with_identifiers(identifiers: Sequence[str]) -> Any:
    """Ids of the cases whose patient carries one of ``identifiers`` (a subquery)."""
    return select(idents_t.c.id).where(idents_t.c.identifier.in_(list(identifiers)))
