"""Helpers the index-build tests share (``test_index_ray``, ``test_index_ndjson``): an index built
from the source the settings name, the cases a build reads, an export of a store as Bulk NDJSON,
and the comparison of two indexes' similar-case hits."""

from __future__ import annotations

import asyncio
import gzip
import json
from pathlib import Path

import numpy as np
from sqlalchemy import select

from agent.index_build import BuildReport, build_index, open_index, patient_cases, patient_ids
from agent.service import source_for
from agent.settings import Settings
from connectors.store import FhirStore
from connectors.store.schema import resources_t
from retrieval.cases import Case
from retrieval.encoders import EncoderRegistry
from retrieval.index import CaseFilter, CaseIndex

Hits = list[list[tuple[str, float]]]


def build(settings: Settings, encoders: EncoderRegistry) -> tuple[BuildReport, CaseIndex]:
    """``build_index`` into the index the settings name, from the source they name."""

    async def go() -> tuple[BuildReport, CaseIndex]:
        index = open_index(settings, encoders)
        source = source_for(settings)
        try:
            return await build_index(index, source, settings), index
        finally:
            await source.aclose()

    return asyncio.run(go())


def cases(settings: Settings) -> list[Case]:
    """Every case a build from the settings' source reads, in patient order."""

    async def go() -> list[Case]:
        source = source_for(settings)
        report = BuildReport()
        try:
            ids = await patient_ids(source)
            return [
                c async for cs in patient_cases(source, None, settings, ids, report) for c in cs
            ]
        finally:
            await source.aclose()

    return asyncio.run(go())


def similar(index: CaseIndex, of: list[Case]) -> Hits:
    """For each case, every hit of ``index`` (key, score), best first."""
    k = len(index)
    return [[(h.key, h.score) for h in index.similar(c, k, CaseFilter())] for c in of]


def same_hits(a: Hits, b: Hits) -> None:
    """The same keys in the same order for each case, scores within float tolerance."""
    assert len(a) == len(b)
    for hits_a, hits_b in zip(a, b, strict=True):
        assert [k for k, _ in hits_a] == [k for k, _ in hits_b]
        np.testing.assert_allclose([s for _, s in hits_a], [s for _, s in hits_b], atol=1e-5)


def export_ndjson(store: FhirStore, folder: Path) -> dict[str, int]:
    """What a system-level ``$export`` of ``store`` hands over: one NDJSON file per resource type
    (references relative, as stored), Observations gzipped and in a sub-folder, the rest plain.
    Returns resources written per type."""
    by_type: dict[str, list[str]] = {}
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(resources_t.c.resource_type, resources_t.c.content).order_by(
                resources_t.c.resource_type, resources_t.c.resource_id
            )
        ).all()
    for rtype, content in rows:
        text = content if isinstance(content, str) else json.dumps(content)
        by_type.setdefault(rtype, []).append(json.dumps(json.loads(text)))
    (folder / "part2").mkdir(parents=True, exist_ok=True)
    for rtype, lines in by_type.items():
        body = "\n".join(lines) + "\n"
        if rtype == "Observation":
            with gzip.open(folder / "part2" / f"{rtype}.000.ndjson.gz", "wt") as fh:
                fh.write(body)
        else:
            (folder / f"{rtype}.000.ndjson").write_text(body)
    return {t: len(v) for t, v in by_type.items()}
