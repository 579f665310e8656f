"""SMART v2 granular scopes (SMART App Launch 2.2, "Scopes and Launch Context"), enforced per
resource type in every surface: a caller holding ``patient/Observation.rs patient/Condition.rs``
gets answers built from those types alone, with a warning naming what was withheld; a query
restricted to a category reads that category only; v1 ``patient/*.read`` is unchanged."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.observation import Observation
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from connectors.demo import TOMMY_FRIESEN
from connectors.source import RecordScope
from connectors.store import FhirStore, StoreSource
from surfaces.http.security import Principal, readable
from tests.peers.issuer import Issuer
from tests.surfaces.http.conftest import Running

GRANULAR = "patient/Patient.rs patient/Observation.rs patient/Condition.rs"
ALLOWED = {"Patient", "Observation", "Condition"}
MEDS_QUESTION = "What medications is he taking?"


def caller(*scopes: str) -> Principal:
    return Principal("client", "client", frozenset(scopes), TOMMY_FRIESEN)


def test_scopes_read_as_a_record_scope() -> None:
    assert readable(caller("patient/*.read")).whole
    assert readable(caller("user/*.rs", "patient/Observation.rs")).whole
    scope = readable(caller(*GRANULAR.split(), "patient/MedicationRequest.r", "openid"))
    assert scope.types == frozenset(ALLOWED)  # read without search is not enough to assemble
    lab = readable(caller("patient/Observation.rs?category=laboratory,vital-signs"))
    assert lab.types == frozenset() and lab.categories == (
        ("Observation", frozenset({"laboratory", "vital-signs"})),
    )
    # a whole-type grant beside a category-restricted one reads the whole type
    both = readable(caller("patient/Observation.rs?category=laboratory", "patient/Observation.rs"))
    assert both.types == frozenset({"Observation"}) and both.categories == ()
    # a query ChartSight cannot enforce grants nothing
    assert not readable(caller("patient/Observation.rs?code=1234-5")).allows("Observation")
    assert not readable(caller("patient/Observation.rs?category:not=survey")).allows("Observation")


def _observation(system: str, code: str) -> Observation:
    return Observation.model_validate(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "x"},
            "category": [{"coding": [{"system": system, "code": code}]}],
        }
    )


def test_a_category_restriction_matches_the_resource_category() -> None:
    system = "http://terminology.hl7.org/CodeSystem/observation-category"
    lab, vital = _observation(system, "laboratory"), _observation(system, "vital-signs")
    scope = RecordScope(frozenset(), (("Observation", frozenset({"laboratory"})),))
    assert scope.admits(lab) and not scope.admits(vital)
    by_system = RecordScope(frozenset(), (("Observation", frozenset({f"{system}|laboratory"})),))
    assert by_system.admits(lab)
    other = RecordScope(frozenset(), (("Observation", frozenset({"http://other|laboratory"})),))
    assert not other.admits(lab)
    assert scope.withheld()[:2] == ["Condition", "Observation outside category laboratory"]


def _ask(running: Running, token: str, question: str) -> httpx.Response:
    return httpx.post(
        f"{running.url}/v1/ask",
        json={"patient": TOMMY_FRIESEN, "question": question},
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )


def _cited_types(answer: dict[str, Any]) -> set[str]:
    refs = [c["reference"] for c in answer["citations"]]
    refs += [e for f in answer["facts"] for e in f["evidence"]]
    return {r.split("/", 1)[0] for r in refs}


@pytest.fixture(scope="module")
def med_names(demo_store: FhirStore) -> list[str]:
    """The names of Tommy's medications, as his record spells them."""

    async def names() -> list[str]:
        found = await StoreSource(demo_store).search(
            "MedicationRequest", {"patient": TOMMY_FRIESEN}
        )
        return [
            str(r.medicationCodeableConcept.text or r.medicationCodeableConcept.coding[0].display)
            for r in found.resources
            if r.medicationCodeableConcept is not None
        ]

    out = asyncio.run(names())
    assert out
    return out


def test_a_granular_caller_gets_an_answer_from_its_types_only(service: Running, issuer: Issuer):
    reply = _ask(
        service,
        issuer.token(GRANULAR, TOMMY_FRIESEN),
        "What are his active problems and his latest HbA1c?",
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["citations"], {k: answer[k] for k in ("warnings", "facts", "abstained")}
    assert _cited_types(answer) <= ALLOWED, _cited_types(answer)
    warning = [w for w in answer["warnings"] if "SMART scopes" in w]
    assert warning and "MedicationRequest" in warning[0] and "Observation," not in warning[0]


def test_no_medication_scope_no_medications(service: Running, issuer: Issuer, med_names: list[str]):
    full = _ask(service, issuer.token("patient/*.read", TOMMY_FRIESEN), MEDS_QUESTION).json()
    assert "MedicationRequest" in _cited_types(full)  # v1 patient/*.read reads them, unchanged
    assert not any("SMART scopes" in w for w in full["warnings"])
    reply = _ask(service, issuer.token(GRANULAR, TOMMY_FRIESEN), MEDS_QUESTION)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert "MedicationRequest" not in _cited_types(answer)
    shown = (answer["text"] + " ".join(f["statement"] for f in answer["facts"])).lower()
    assert not any(name.lower() in shown for name in med_names), answer["text"]
    # the stream variant too
    stream = httpx.post(
        f"{service.url}/v1/ask/stream",
        json={"patient": TOMMY_FRIESEN, "question": MEDS_QUESTION},
        headers={"Authorization": f"Bearer {issuer.token(GRANULAR, TOMMY_FRIESEN)}"},
        timeout=120,
    )
    assert stream.status_code == 200
    assert "MedicationRequest/" not in stream.text
    assert not any(name.lower() in stream.text.lower() for name in med_names)


def test_the_patient_must_be_readable(service: Running, issuer: Issuer):
    token = issuer.token("patient/Observation.rs patient/Condition.rs", TOMMY_FRIESEN)
    reply = _ask(service, token, "What are his active problems and his latest HbA1c?")
    assert reply.status_code == 403 and "Patient.rs" in reply.json()["detail"]


def test_similar_cases_need_every_type(service: Running, issuer: Issuer):
    reply = httpx.get(
        f"{service.url}/v1/patients/{TOMMY_FRIESEN}/similar",
        headers={"Authorization": f"Bearer {issuer.token(GRANULAR, TOMMY_FRIESEN)}"},
    )
    assert reply.status_code == 403 and "every resource type" in reply.json()["detail"]


def test_mcp_reads_only_the_granted_types(
    service: Running, issuer: Issuer, demo_store: FhirStore, med_names: list[str]
):
    async def call(token: str, tool: str, args: dict[str, Any]) -> Any:
        http = create_mcp_http_client({"Authorization": f"Bearer {token}"})
        async with Client(streamable_http_client(f"{service.url}/mcp/", http_client=http)) as c:
            result = await c.call_tool(tool, args)
        assert not result.is_error, result.content
        data = result.structured_content
        return data.get("result", data) if isinstance(data, dict) else data

    granular = issuer.token(GRANULAR, TOMMY_FRIESEN)
    meds = asyncio.run(
        call(granular, "patient_facts", {"patient": TOMMY_FRIESEN, "tool": "active_medications"})
    )
    assert not any(name.lower() in str(meds).lower() for name in med_names), meds
    answer = asyncio.run(
        call(granular, "ask", {"patient": TOMMY_FRIESEN, "question": MEDS_QUESTION})
    )
    assert "MedicationRequest" not in _cited_types(answer)
    assert any("SMART scopes" in w for w in answer["warnings"])
    # a category-restricted grant: the evidence holds laboratory Observations only
    labs = issuer.token(
        "patient/Patient.rs patient/Observation.rs?category=laboratory", TOMMY_FRIESEN
    )
    lines = asyncio.run(
        call(
            labs,
            "patient_evidence",
            {
                "patient": TOMMY_FRIESEN,
                "question": "blood pressure and glucose",
                "token_budget": 4000,
            },
        )
    )
    refs = {line["id"] for line in lines}
    assert refs and {r.split("/", 1)[0] for r in refs} <= {"Patient", "Observation"}

    async def categories(ref: str) -> set[str]:
        res = await StoreSource(demo_store).read("Observation", ref.split("/", 1)[1])
        return {c.code for cat in res.category or [] for c in cat.coding or []}

    for ref in refs - {f"Patient/{TOMMY_FRIESEN}"}:
        assert "laboratory" in asyncio.run(categories(ref)), ref


def test_a_scoped_source_reads_nothing_else(demo_store: FhirStore) -> None:
    """The record fetch through ``ScopedSource``: a type not granted is neither searched nor
    read (as if absent), and the assembled record holds only the granted types."""
    from connectors.errors import ResourceNotFound
    from connectors.record import assemble_record
    from connectors.source import ScopedSource

    async def run() -> None:
        inner = StoreSource(demo_store)
        meds = await inner.search("MedicationRequest", {"patient": TOMMY_FRIESEN})
        assert meds.resources
        scoped = ScopedSource(inner, readable(caller(*GRANULAR.split())))
        assert (
            await scoped.search("MedicationRequest", {"patient": TOMMY_FRIESEN})
        ).resources == []
        with pytest.raises(ResourceNotFound):
            await scoped.read("MedicationRequest", str(meds.resources[0].id))
        record = await assemble_record(scoped, TOMMY_FRIESEN)
        assert set(record.counts()) == ALLOWED and not record.referenced and not record.problems

    asyncio.run(run())
