"""The asking patient's case is built like the indexed ones (``retrieval.cases.indexed_cases``), so
a similar-case query is fused like the index: the patient's own indexed case is its exact match
(its score is the query vector's own inner product, which a differently fused query
could not reach) whatever ``max_images_per_case`` says, 0 (text only) included."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent import ChartSight, Settings
from agent.index_build import build_index, open_index, patient_ids
from agent.service import source_for
from connectors.store import FhirStore
from retrieval.encoders import EncoderRegistry
from retrieval.index import CaseFilter


@pytest.mark.parametrize("max_images", [0, 2])
def test_the_query_is_fused_like_the_index(demo_store: FhirStore, tmp_path: Path, max_images: int):
    settings = Settings(
        home=tmp_path / "home",
        store={"url": str(demo_store.engine.url)},
        retrieval={"index": {"max_images_per_case": max_images}},
    )

    async def go() -> list[tuple[str, int, str, float, float]]:
        source = source_for(settings)
        try:
            index = open_index(settings, EncoderRegistry(settings.retrieval.encoders))
            report = await build_index(index, source, settings)
            assert report.cases >= 5 and not report.failed
            ids = await patient_ids(source)
        finally:
            await source.aclose()
        out = []
        async with ChartSight(settings, answering=False) as cs:
            index = cs.runtime.index  # type: ignore[union-attr]
            assert index is not None
            for pid in ids:
                case = await cs.patient_case(pid)
                # the patient's own case is not left out here: it must be the exact match
                hit = index.similar(case, 1, CaseFilter())[0]
                q = index.encode([case])[0]
                out.append((f"Patient/{pid}", len(case.images), hit.key, hit.score, float(q @ q)))
        return out

    found = asyncio.run(go())
    assert len(found) >= 5
    for key, _, hit_key, score, own in found:
        assert hit_key == key and score == pytest.approx(own, abs=1e-5), (key, hit_key, score, own)
    with_images = [n for _, n, _, _, _ in found if n]
    if max_images == 0:
        assert not with_images  # the demo patients' images are left out of query and index alike
    else:
        assert with_images and max(with_images) <= max_images  # (the demo has images)
