"""The local store on a real PostgreSQL server: the same imports, searches and records as on SQLite,
and a failed import rolls back there too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from connectors.demo import TOMMY_FRIESEN, import_demo
from connectors.errors import FhirImportError
from connectors.record import assemble_record
from connectors.store import FhirStore, StoreSource
from tests.conftest import load_bundle
from tests.connectors.plans import estimates_of, observations_ndjson


@pytest.fixture(scope="module")
def pg_store(postgres: Any) -> Any:
    store = FhirStore(postgres.create_database("store"))
    import_demo(store)  # as the SQLite demo store was made
    yield store
    store.close()


def _record_json(store: FhirStore, pid: str) -> dict[str, Any]:
    record = asyncio.run(assemble_record(StoreSource(store), pid))
    return {
        f"{r.get_resource_type()}/{r.id}": json.loads(r.model_dump_json())
        for r in record.resources()
    }


def test_postgres_and_sqlite_stores_give_the_same_records(pg_store: FhirStore, demo_store):
    assert pg_store.counts() == demo_store.counts()
    for pid in [p.id for p in pg_store.patients()]:
        assert _record_json(pg_store, pid) == _record_json(demo_store, pid)


def test_searches_agree(pg_store: FhirStore, demo_store):
    params = {"patient": TOMMY_FRIESEN, "code": "http://loinc.org|4548-4", "date": "ge2015-01-01"}
    on_pg = pg_store.search("Observation", params)
    on_sqlite = demo_store.search("Observation", params)
    assert len(on_pg.resources) == len(on_sqlite.resources) > 0
    assert sorted(r.id for r in on_pg.resources) == sorted(r.id for r in on_sqlite.resources)


def test_a_broken_bundle_rolls_back_on_postgres(pg_store: FhirStore, bundles: list[Path], tmp_path):
    before = pg_store.counts()
    bundle = load_bundle(bundles[0])
    for entry in bundle["entry"]:
        entry["resource"]["id"] = f"copy-{entry['resource']['id']}"
        entry["fullUrl"] = f"urn:uuid:copy-{entry['fullUrl'].rsplit(':', 1)[-1]}"
    bundle["entry"][-1]["resource"]["subject"] = {"reference": "urn:uuid:nowhere"}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(bundle))
    with pytest.raises(FhirImportError, match="broken reference"):
        pg_store.import_path(path, force=True)
    assert pg_store.counts() == before


def test_a_long_import_keeps_the_planner_informed(postgres: Any, tmp_path: Path):
    """Within one long import (one transaction) into a young store, the planner's estimate of
    the rows of the type being imported keeps up with the table (the statistics are refreshed as
    the import grows it). Before, it kept an empty store's estimate (0.5 % of the rows: 27 of
    74,048), answered each batch's look-ups and deletes by id from the ``resource_type`` half of
    the owner index and read every stored Observation for each batch of 500: an import into
    PostgreSQL was 7× slower than into SQLite and slowed as it went."""
    store = FhirStore(postgres.create_database("long_import"))
    files = observations_ndjson(tmp_path / "export", "p1", 6000)
    with estimates_of(store, "Observation") as first:
        for path in files:
            store.import_path(path)
    with estimates_of(store, "Observation") as again:
        report = store.import_path(files[1], force=True)
    counts = store.counts()
    store.close()
    assert report.count == 6000 and counts["Observation"] == 6000
    grown = [(est, held) for est, held in first + again if held >= 2000]
    assert len(grown) >= 10
    assert all(est >= held / 4 for est, held in grown), grown


def test_copy_keeps_awkward_text_and_refuses_what_postgres_cannot_store(
    postgres: Any, tmp_path: Path
):
    """Rows go to PostgreSQL by COPY: tabs, newlines, backslashes, non-ASCII and empty values
    come back as they went in; a NUL inside an indexed string, which PostgreSQL text cannot hold,
    is a ``FhirImportError`` naming the file, and the store keeps what it had."""
    store = FhirStore(postgres.create_database("copy_text"))
    family = "O'Brien\tTab\nLine\\\\Back Ünïcödé 名前"
    plain = tmp_path / "Patient.ndjson"
    plain.write_text(
        json.dumps({"resourceType": "Patient", "id": "p1", "name": [{"family": family}]}) + "\n"
    )
    store.import_path(plain)
    read = store.read("Patient", "p1")
    assert read.name[0].family == family
    assert [p.id for p in store.patients(name="o'brien")] == ["p1"]

    nul = tmp_path / "nul.ndjson"
    nul.write_text(
        json.dumps({"resourceType": "Patient", "id": "p2", "name": [{"family": "A\u0000B"}]}) + "\n"
    )
    with pytest.raises(FhirImportError) as refused:
        store.import_path(nul)
    assert "nul.ndjson" in str(refused.value)
    assert store.counts() == {"Patient": 1}
    store.close()


def test_an_in_memory_document_postgres_refuses_is_an_import_error(postgres: Any):
    """``import_json`` (what a Bulk import and the HTTP service hand over) maps a value the
    database refuses to ``FhirImportError`` naming the document, as ``import_path`` does for a
    file; nothing of it is kept."""
    store = FhirStore(postgres.create_database("json_nul"))
    patient = {"resourceType": "Patient", "id": "p", "name": [{"family": "a\u0000b"}]}
    with pytest.raises(FhirImportError) as refused:
        store.import_json(patient, "the-document")
    assert "the-document" in str(refused.value) and "database error" in str(refused.value)
    assert store.counts() == {}
    store.close()
