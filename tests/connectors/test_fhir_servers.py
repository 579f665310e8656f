"""The FHIR client against real servers: SEKMET and Medplum's router, compared with the local store."""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.errors import ResourceNotFound
from connectors.fhir_client import FhirClient
from connectors.record import CATEGORIES, PatientRecord, assemble_record
from connectors.settings import FhirServerSettings
from connectors.store import FhirStore, StoreSource
from retrieval.evidence import record_evidence
from tests.conftest import post_transaction
from tests.peers.servers import Sekmet

pytestmark = pytest.mark.integration


def _normalise(node: Any) -> Any:
    """Content without server-assigned parts: ids, meta, and reference targets (type kept)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in ("id", "meta", "text"):
                continue
            if key == "reference" and isinstance(value, str) and not value.startswith("#"):
                value = value.split("/")[-2] if "/" in value else value
            out[key] = _normalise(value)
        return out
    if isinstance(node, list):
        return [_normalise(v) for v in node]
    return node


def _content(record: PatientRecord) -> dict[str, Counter[str]]:
    by_type: dict[str, Counter[str]] = {}
    for res in record.resources():
        if res.get_resource_type() not in (*CATEGORIES, "Patient"):
            continue  # Claims, EOBs, care plans: not part of the typed chart
        dumped = json.dumps(
            _normalise(res.model_dump(mode="json", exclude_none=True)), sort_keys=True
        )
        by_type.setdefault(res.get_resource_type(), Counter())[dumped] += 1
    return by_type


def _referenced(record: PatientRecord) -> Counter[str]:
    """The referenced resources' content, without server-assigned ids."""
    return Counter(
        json.dumps(_normalise(r.model_dump(mode="json", exclude_none=True)), sort_keys=True)
        for r in record.referenced.values()
    )


async def test_sekmet_records_agree_with_the_local_store_resource_for_resource(
    sekmet, demo_store: FhirStore
):
    local = StoreSource(demo_store)
    async with FhirClient(FhirServerSettings(url=sekmet.base_url)) as client:
        assert await client.supports_everything()
        for synthea_id, server_id in sekmet.patient_ids.items():
            remote = await assemble_record(client, server_id)
            mine = await assemble_record(local, synthea_id)
            assert remote.complete and mine.complete, (remote.problems, remote.invalid)
            assert remote.counts().get("Observation", 0) > 30
            remote_content, local_content = _content(remote), _content(mine)
            assert remote_content.keys() == local_content.keys() - {"Media", "DocumentReference"}
            for rtype, items in remote_content.items():
                assert items == local_content[rtype], f"{rtype} differs for {synthea_id}"
            # SEKMET's $everything brings every referenced resource; the store's chart fetches
            # those the chart names (its claims' billing providers are not among them)
            assert mine.referenced and not _referenced(mine) - _referenced(remote)


async def test_everything_and_per_type_searches_give_the_same_chart(sekmet):
    server_id = next(iter(sekmet.patient_ids.values()))
    async with FhirClient(FhirServerSettings(url=sekmet.base_url, page_size=25)) as client:
        via_everything = await assemble_record(client, server_id)
        by_type = await client.everything_by_type(server_id)
    # SEKMET 0.1.1's $everything leaves out Goal (a Patient-compartment type): compare the chart's types.
    chart_types = (*CATEGORIES, "Patient", "CarePlan")
    by_type_refs = {
        f"{r.get_resource_type()}/{r.id}"
        for r in by_type.resources
        if r.get_resource_type() in chart_types
    }
    chart_refs = {
        f"{r.get_resource_type()}/{r.id}"
        for r in via_everything.resources()
        if r.get_resource_type() in chart_types
    }
    assert chart_refs == by_type_refs


async def test_search_reads_every_page_through_next_links(sekmet, demo_store: FhirStore):
    synthea_id, server_id = next(iter(sekmet.patient_ids.items()))
    expected = len(demo_store.search("Observation", {"patient": synthea_id}).resources)
    async with FhirClient(FhirServerSettings(url=sekmet.base_url, page_size=7)) as client:
        result = await client.search("Observation", {"patient": f"Patient/{server_id}"})
    assert result.pages == -(-expected // 7)
    assert len(result.resources) == expected
    assert len({r.id for r in result.resources}) == expected


async def test_patient_found_by_identifier_and_unknown_patient_is_a_clear_error(sekmet):
    server_id = next(iter(sekmet.patient_ids.values()))
    async with FhirClient(FhirServerSettings(url=sekmet.base_url)) as client:
        # SEKMET assigns its own ids; the Synthea identifier still finds the patient
        patient = await client.read("Patient", server_id)
        identifier = patient.identifier[0]
        record = await assemble_record(client, f"{identifier.system}|{identifier.value}")
        assert record.patient_id == server_id
        with pytest.raises(ResourceNotFound) as info:
            await assemble_record(client, "no-such-patient")
    assert "no-such-patient" in str(info.value)


async def test_binary_as_fhir_json(sekmet):
    payload = bytes(range(256)) * 4
    created = httpx.post(
        f"{sekmet.base_url}/Binary",
        json={
            "resourceType": "Binary",
            "contentType": "application/octet-stream",
            "data": base64.b64encode(payload).decode(),
        },
        headers={"Content-Type": "application/fhir+json"},
    )
    created.raise_for_status()
    binary_id = created.json()["id"]
    async with FhirClient(FhirServerSettings(url=sekmet.base_url)) as client:
        content = await client.binary(f"Binary/{binary_id}")
    assert content.data == payload
    assert content.content_type == "application/octet-stream"


async def test_medplum_without_next_links_is_paged_by_offset(medplum, demo_store: FhirStore):
    synthea_id, server_id = next(iter(medplum.patient_ids.items()))
    expected = len(demo_store.search("Observation", {"patient": synthea_id}).resources)
    async with FhirClient(FhirServerSettings(url=medplum.base_url, page_size=10)) as client:
        result = await client.search("Observation", {"patient": f"Patient/{server_id}"})
    assert expected > 20
    assert len(result.resources) == expected  # a client trusting next links would stop at 10
    assert result.pages == -(-expected // 10)


async def test_medplum_record_by_type_agrees_with_the_local_store(medplum, demo_store: FhirStore):
    synthea_id, server_id = next(iter(medplum.patient_ids.items()))
    async with FhirClient(
        FhirServerSettings(url=medplum.base_url, page_size=20, concurrency=4)
    ) as client:
        assert not await client.supports_everything()
        remote = await assemble_record(client, server_id)
    mine = await assemble_record(StoreSource(demo_store), synthea_id)
    assert remote.complete, (remote.problems, remote.invalid)
    remote_content, local_content = _content(remote), _content(mine)
    for rtype, items in remote_content.items():
        assert items == local_content[rtype], f"{rtype} differs"
    assert remote_content.keys() == local_content.keys()
    # the hospital and the clinician, by _include and by an _id search (Medplum pages by _offset)
    assert {k.split("/")[0] for k in remote.referenced} == {"Organization", "Practitioner"}
    assert _referenced(remote) == _referenced(mine)


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _as_transaction(collection: dict[str, Any]) -> dict[str, Any]:
    """A collection Bundle as a transaction that keeps its resource ids (PUT Type/id)."""
    entries = []
    for entry in collection["entry"]:
        res = entry["resource"]
        url = f"{res['resourceType']}/{res['id']}"
        entries.append({"resource": res, "request": {"method": "PUT", "url": url}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


class _CountingTransport(httpx.AsyncHTTPTransport):
    """Records the path and query of every request (to see which round trips a record took)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.URL] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url)
        return await super().handle_async_request(request)


@pytest.fixture(scope="module")
def sekmet_refs() -> Iterator[tuple[str, str]]:
    """A SEKMET of its own (so other tests' patient lists stay as they are) holding the
    references fixtures; yields its base URL and the id of the referenced-resources patient."""
    with Sekmet() as server:
        reply = post_transaction(
            server.base_url, json.loads((FIXTURES / "referenced-resources.json").read_text())
        )
        locations = [e["response"]["location"] for e in reply["entry"]]
        patient = next(loc for loc in locations if "Patient/" in loc)
        contained = json.loads(
            (FIXTURES / "realworld" / "01-contained-medication.json").read_text()
        )
        post_transaction(server.base_url, _as_transaction(contained))
        yield server.base_url, patient.split("Patient/")[1].split("/")[0]


def _evidence_line(record: PatientRecord, rtype: str) -> str:
    return next(e.text for e in record_evidence(record) if e.id.startswith(f"{rtype}/"))


@pytest.mark.parametrize("everything", [True, False])
async def test_sekmet_names_a_medication_stored_as_its_own_resource(sekmet_refs, everything):
    base_url, patient_id = sekmet_refs
    transport = _CountingTransport()
    settings = FhirServerSettings(url=base_url, use_everything=everything)
    async with FhirClient(settings, transport=transport) as client:
        record = await assemble_record(client, patient_id)
    assert record.complete, (record.problems, record.invalid)
    assert sorted(k.split("/")[0] for k in record.referenced) == [
        "Location",
        "Medication",
        "Organization",
        "Practitioner",
    ]
    order = _evidence_line(record, "MedicationRequest")
    assert "Medication: metformin 500 mg tablet (RxNorm 861007), active" in order
    assert "lisinopril 10 mg tablet" in _evidence_line(record, "MedicationStatement")
    (visit,) = record.encounters
    assert record.resolve(visit.location[0].location).name == "Ward 4B"
    assert record.resolve(visit.participant[0].individual).name[0].family == "Eze"
    paths = [url.path.rsplit("/", 1)[-1] for url in transport.requests]
    if everything:  # SEKMET's $everything brings the referenced resources along
        assert "Practitioner" not in paths and "Medication" not in paths
    else:  # the drug, the ward and the hospital by _include; the practitioner by one _id search
        assert "Medication" not in paths and "Location" not in paths
        assert paths.count("Practitioner") == 1
        (search,) = [u for u in transport.requests if u.path.endswith("/Practitioner")]
        assert search.params["_id"] == str(visit.participant[0].individual.reference).split("/")[1]


async def test_sekmet_contained_medication_is_named(sekmet_refs):
    base_url, _ = sekmet_refs
    async with FhirClient(FhirServerSettings(url=base_url)) as client:
        record = await assemble_record(client, "bug01-pat")
    assert record.complete, (record.problems, record.invalid)
    line = _evidence_line(record, "MedicationRequest")
    assert "Medication: amlodipine 5 mg tablet (RxNorm 197361), active" in line


async def test_medplum_offset_paging_counts_matches_not_included_resources(
    medplum, demo_store: FhirStore
):
    synthea_id, server_id = next(iter(medplum.patient_ids.items()))
    expected = len(demo_store.search("Encounter", {"patient": synthea_id}).resources)
    async with FhirClient(FhirServerSettings(url=medplum.base_url, page_size=4)) as client:
        result = await client.search(
            "Encounter",
            {"patient": f"Patient/{server_id}", "_include": "Encounter:service-provider"},
        )
    # every page repeats the hospital as an include; an _offset moved by it would skip visits
    assert expected > 4 and len(result.of_type("Encounter")) == expected
    assert result.pages == -(-expected // 4)
    assert len(result.of_type("Organization")) == 1
