"""The Ray engine of ``chartsight index build`` writes the index the local engine writes: on the demo
patients, an index built on two Ray actors returns the same similar cases (keys, and scores within
float tolerance) as the local build, its generation has the same manifest, and a second build
after one patient changed encodes only that patient's changed case, on either engine. Ray is
started on this machine for each build and shut down after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.index_build import open_index
from agent.settings import Settings
from connectors.demo import TOMMY_FRIESEN, import_demo
from connectors.store import FhirStore
from retrieval.encoders import EncoderRegistry
from retrieval.index import CaseIndex, manifest
from tests.agent.index_builds import build, cases, export_ndjson, same_hits, similar

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

# a problem the demo patient does not have: his summary (and only his case) changes
GOUT = {
    "resourceType": "Condition",
    "id": "ray-test-gout",
    "clinicalStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active",
            }
        ]
    },
    "verificationStatus": {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed",
            }
        ]
    },
    "code": {
        "coding": [{"system": "http://snomed.info/sct", "code": "90560007", "display": "Gout"}],
        "text": "Gout",
    },
    "subject": {"reference": f"Patient/{TOMMY_FRIESEN}"},
    "onsetDateTime": "2020-02-01",
}


def _manifest(index: CaseIndex) -> dict[str, Any]:
    gen = manifest.current_generation(index.path)
    assert gen is not None
    found = json.loads((gen / "manifest.json").read_text())
    return {k: found[k] for k in ("space", "factory", "count", "faiss")}


def test_ray_builds_the_index_the_local_engine_builds(tmp_path: Path):
    store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
    import_demo(store)
    url = str(store.engine.url)
    local = Settings(home=tmp_path / "local", store={"url": url})
    on_ray = Settings(
        home=tmp_path / "ray",
        store={"url": url},
        index_build={"engine": "ray", "workers": 2, "batch_patients": 2},
    )
    encoders = EncoderRegistry(local.retrieval.encoders)

    first_local, index_local = build(local, encoders)
    first_ray, index_ray = build(on_ray, encoders)
    assert not ray.is_initialized()  # the build's own Ray instance was shut down
    assert (first_ray.engine, first_ray.workers) == ("ray", 2)
    assert first_ray.patients == first_local.patients >= 5
    assert first_ray.cases == first_local.cases == first_ray.added == len(index_ray)
    assert not first_ray.failed
    assert first_ray.timings["cases"] > 0 and first_ray.timings["encode"] > 0

    # `similar` cannot tell them apart: the same generation format and hits
    assert _manifest(index_ray) == _manifest(index_local)
    assert index_ray.fingerprints() == index_local.fingerprints()
    read = cases(local)
    same_hits(similar(index_ray, read), similar(index_local, read))
    reopened = open_index(on_ray, encoders)
    same_hits(similar(reopened, read), similar(index_local, read))

    # incremental: one patient changed, only his patient case is encoded again, on either engine
    store.import_json(GOUT, "gout.json")
    again_ray, index_ray = build(on_ray, encoders)
    again_local, index_local = build(local, encoders)
    for again in (again_ray, again_local):
        assert (again.added, again.updated) == (0, 1), again
        assert again.unchanged == first_local.cases - 1
    assert not ray.is_initialized()
    changed = [c for c in cases(local) if c.key == f"Patient/{TOMMY_FRIESEN}"]
    assert "Gout" in changed[0].summary
    same_hits(similar(index_ray, changed), similar(index_local, changed))
    store.close()


def test_ray_builds_from_bulk_ndjson_what_the_local_engine_builds_from_the_store(tmp_path: Path):
    from agent.index_build import ndjson_source

    store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
    import_demo(store)
    export_ndjson(store, tmp_path / "export")
    local = Settings(home=tmp_path / "local", store={"url": str(store.engine.url)})
    store.close()
    on_ray = Settings(
        home=tmp_path / "ray", index_build={"engine": "ray", "workers": 2, "batch_patients": 2}
    )
    encoders = EncoderRegistry(local.retrieval.encoders)
    first_local, index_local = build(local, encoders)
    with ndjson_source([tmp_path / "export"], on_ray) as using:
        # the actors read the temporary store the export was read into
        first_ray, index_ray = build(using, encoders)
    assert not ray.is_initialized()
    assert (first_ray.engine, first_ray.workers) == ("ray", 2) and not first_ray.failed
    assert first_ray.cases == first_local.cases == len(index_ray)
    assert _manifest(index_ray) == _manifest(index_local)
    assert index_ray.fingerprints() == index_local.fingerprints()
    read = cases(local)
    same_hits(similar(index_ray, read), similar(index_local, read))
    assert not list((tmp_path / "ray").glob(".ndjson-build-*"))
