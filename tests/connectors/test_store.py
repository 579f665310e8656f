"""The embedded local store: imports (all or nothing, clear errors), indexes and search."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from connectors.errors import FhirImportError, ResourceNotFound, UnsupportedSearch
from connectors.store import FhirStore, StoreSource, _references
from tests.conftest import load_bundle
from tests.connectors.plans import by_owner, observations_ndjson, plans_of


def _write_ndjson(path: Path, resources: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in resources))
    return path


def test_import_synthea_bundle_resolves_urn_uuid_references(
    store: FhirStore, smallest_bundle: Path
):
    bundle = load_bundle(smallest_bundle)
    report = store.import_path(smallest_bundle)
    expected = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
    assert report.imported == expected
    assert store.counts() == dict(expected)
    patient_id = bundle["entry"][0]["resource"]["id"]
    everything = store.everything(patient_id)
    obs = everything.of_type("Observation")
    assert obs and all(o.subject.reference == f"Patient/{patient_id}" for o in obs)
    # every urn:uuid reference was rewritten to Type/id and points at a stored resource
    for res in everything.resources:
        for ref in _references(res.model_dump(mode="json")):
            assert not ref.startswith("urn:"), ref
            if ref.count("/") == 1 and not ref.startswith("#"):
                rtype, rid = ref.split("/")
                store.read(rtype, rid)


def test_reimport_is_skipped_unless_forced(store: FhirStore, smallest_bundle: Path):
    first = store.import_path(smallest_bundle)
    again = store.import_path(smallest_bundle)
    assert again.unchanged and again.count == 0
    forced = store.import_path(smallest_bundle, force=True)
    assert forced.count == first.count
    assert sum(store.counts().values()) == first.count  # replaced, not duplicated


def test_ndjson_import_streams_resources(store: FhirStore, smallest_bundle: Path, tmp_path: Path):
    source = FhirStore(f"sqlite:///{tmp_path / 'src.db'}")
    source.import_path(smallest_bundle)
    resources = [
        r.model_dump(mode="json", exclude_none=True)
        for r in source.everything(
            load_bundle(smallest_bundle)["entry"][0]["resource"]["id"]
        ).resources
    ]
    plain = _write_ndjson(tmp_path / "export.ndjson", resources)
    gz = tmp_path / "export2.ndjson.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(plain.read_text())
    report = store.import_path(plain)
    assert report.count == len(resources)
    assert store.import_path(gz).count == len(resources)
    assert sum(store.counts().values()) == len(resources)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"resourceType": "Bundle", "type": "transaction", "entry": [', "malformed JSON"),
        ('{"resourceType": "Patinet", "id": "x"}', "unknown resourceType 'Patinet'"),
        ('{"hello": "world"}', "not a FHIR resource"),
        ("\x89PNG\r\n\x1a\n not json at all", "malformed JSON"),
        (
            '{"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}, '
            '"valueQuantity": {"value": "not-a-number"}}',
            "invalid Observation",
        ),
    ],
)
def test_bad_files_fail_clearly_and_store_nothing(
    store, smallest_bundle, tmp_path, content, needle
):
    store.import_path(smallest_bundle)
    before = store.counts()
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(FhirImportError) as info:
        store.import_path(bad)
    assert str(bad) in str(info.value) and needle in str(info.value)
    assert store.counts() == before


def test_broken_reference_rolls_back_the_whole_bundle(store, smallest_bundle, tmp_path):
    bundle = load_bundle(smallest_bundle)
    # break the reference of the last entry: everything before it must not be stored either
    last = bundle["entry"][-1]["resource"]
    for key in ("subject", "patient", "encounter"):
        if key in last:
            last[key] = {"reference": "urn:uuid:00000000-0000-0000-0000-000000000000"}
            break
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(bundle))
    with pytest.raises(FhirImportError) as info:
        store.import_path(path)
    message = str(info.value)
    assert "broken reference" in message and f"entry {len(bundle['entry']) - 1}" in message
    assert store.counts() == {}


def test_truncated_ndjson_line_names_the_line_and_keeps_earlier_imports(
    store, smallest_bundle, tmp_path
):
    store.import_path(smallest_bundle)
    before = store.counts()
    lines = [json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(5)]
    path = tmp_path / "cut.ndjson"
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    with pytest.raises(FhirImportError) as info:
        store.import_path(path)
    assert "line 5" in str(info.value) and "truncated" in str(info.value)
    assert store.counts() == before


def test_conditional_reference_resolves_against_stored_identifier(store, tmp_path):
    org = {
        "resourceType": "Organization",
        "id": "org1",
        "identifier": [{"system": "urn:npi", "value": "42"}],
    }
    store.import_json(org, "org")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:p",
                "resource": {
                    "resourceType": "Patient",
                    "id": "p",
                    "managingOrganization": {"reference": "Organization?identifier=urn:npi|42"},
                },
                "request": {"method": "POST", "url": "Patient"},
            }
        ],
    }
    store.import_json(bundle, "b")
    assert store.read("Patient", "p").managingOrganization.reference == "Organization/org1"
    bundle["entry"][0]["resource"]["managingOrganization"]["reference"] = (
        "Organization?identifier=urn:npi|43"
    )
    with pytest.raises(FhirImportError, match="matches nothing"):
        store.import_json(bundle, "b2")


def test_dates_in_the_year_9999_import_and_search(store: FhirStore):
    """The last day, month and year ``datetime`` has (9999-12-31 is EHRs' "no end") are indexed
    up to the last instant, not an OverflowError that fails the import."""
    for n, when in enumerate(("9999-12-31", "9999-12", "9999")):
        store.import_json(
            {
                "resourceType": "Condition",
                "id": f"c{n}",
                "subject": {"reference": "Patient/p"},
                "code": {"text": "Hypertension"},
                "onsetDateTime": when,
            },
            f"c{n}",
        )
    found = store.search("Condition", {"onset-date": "ge9999-12-31"})
    assert {c.id for c in found.resources} == {"c0", "c1", "c2"}


def test_search_by_code_date_identifier_and_name(demo_store: FhirStore):
    patients = demo_store.patients()
    assert len(patients) == 5
    tommy = next(p for p in patients if p.name == "Tommy Friesen")
    a1c = demo_store.search(
        "Observation", {"patient": tommy.id, "code": "http://loinc.org|4548-4", "_sort": "-date"}
    )
    dates = [str(o.effectiveDateTime) for o in a1c.resources]
    assert a1c.resources and dates == sorted(dates, reverse=True)
    assert all(c.code == "4548-4" for o in a1c.resources for c in o.code.coding)
    recent = demo_store.search(
        "Observation", {"patient": tommy.id, "code": "4548-4", "date": "ge2020-01-01"}
    )
    assert {o.id for o in recent.resources} == {
        o.id for o in a1c.resources if str(o.effectiveDateTime) >= "2020"
    }
    ident = demo_store.search(
        "Patient",
        {
            "identifier": "https://github.com/synthetichealth/synthea|dc0e6a8c-6c31-4d75-966f-ac682f486756"
        },
    )
    assert [p.id for p in ident.resources] == [tommy.id]
    assert [p.id for p in demo_store.patients("friesen")] == [tommy.id]
    assert [p.id for p in demo_store.patients("tom")] == [tommy.id]
    with pytest.raises(UnsupportedSearch, match="cannot search Observation by 'value-quantity'"):
        demo_store.search("Observation", {"value-quantity": "5"})


async def test_store_source_offers_the_fhir_source_interface(demo_store: FhirStore):
    source = StoreSource(demo_store)
    tommy = next(p for p in demo_store.patients() if p.name == "Tommy Friesen")
    patient = await source.read("Patient", tommy.id)
    assert patient.id == tommy.id
    everything = await source.everything(tommy.id)
    assert len(everything.resources) == tommy.resources  # the Patient is in its own compartment
    with pytest.raises(ResourceNotFound):
        await source.read("Patient", "nope")
    binary = await source.binary("Binary/demo-mr-small")
    assert binary.content_type == "application/dicom" and binary.data[128:132] == b"DICM"


def test_replacing_resources_finds_them_by_index(tmp_path: Path):
    """An import looks up which of its resources are stored, and a re-import deletes the old
    rows, through the key and owner indexes: the row-value ``(type, id) IN (VALUES ...)`` form
    made SQLite scan every table whole for each batch of 500, so imports slowed as the store
    grew (1,396 resources/s at 600 patients)."""
    store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
    files = observations_ndjson(tmp_path / "export", "p1", 1200)
    with plans_of(store) as first:
        for path in files:
            store.import_path(path)
    with plans_of(store) as again:
        report = store.import_path(files[1], force=True)
    store.close()
    assert report.count == 1200
    assert len(first) >= 3 and by_owner(first), first  # look-ups of 500, 500, 200 ids
    assert len(again) >= 3 * 6 and by_owner(again), again  # and deletes from the six tables
