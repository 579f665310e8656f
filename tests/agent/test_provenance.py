"""An answer as FHIR resources (agent/provenance.py): HL7 AI Transparency on FHIR's labels,
profiles and codes, validated by fhir.resources, every reference resolvable inside the Bundle
or naming a cited resource."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.patient import Patient

from agent import AI_ASSERTED, Answer, Approval, Citation, answer_bundle, answer_resources
from agent.provenance import (
    AI_DEVICE_TYPE,
    AI_PROVENANCE_PROFILE,
    MODEL_CARD_EXTENSION,
    answer_markdown,
    model_label,
)
from connectors.record import PatientRecord
from connectors.resources import validate
from retrieval.evidence import record_evidence

ANSWER = Answer(
    question="What was his last HbA1c?",
    patient_id="p-1",
    text="Latest HbA1c: 6.1 % on 2020-01-02 [Observation/o-1].\nThe one before: 5.9 % "
    "[Observation/o-2].",
    citations=[
        Citation(reference="Observation/o-1", text="HbA1c 6.1 % (2020-01-02)"),
        Citation(reference="Observation/o-2", text="HbA1c 5.9 % (2019-06-01)"),
        Citation(reference="case:synthea-42", text="a similar case"),
    ],
    model="openai:qwen2.5@http://10.1.2.3:8000/v1",
    prompt_version="3",
)


def _resources(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}


def test_the_export_is_a_valid_collection_with_the_ai_label_and_provenance():
    bundle = answer_bundle(ANSWER, model_card_url="https://cs.example/model-card")
    Bundle.model_validate(bundle)  # FHIR R4 (R4B models) accepts it as it is
    assert bundle["type"] == "collection"
    doc, prov = _resources(bundle)["DocumentReference"], _resources(bundle)["Provenance"]
    assert doc["status"] == "current" and doc["docStatus"] == "preliminary"
    assert doc["subject"] == {"reference": "Patient/p-1"}
    assert doc["meta"]["security"] == [AI_ASSERTED]
    assert AI_ASSERTED["code"] == "AIAST"
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert text.startswith("Latest HbA1c: 6.1 %") and "[Observation/o-1] HbA1c 6.1 %" in text
    assert doc["content"][0]["attachment"]["contentType"].startswith("text/markdown")

    assert prov["meta"]["profile"] == [AI_PROVENANCE_PROFILE]
    full_urls = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    assert full_urls[prov["target"][0]["reference"]] is doc  # the target is the answer
    assert prov["reason"][0]["coding"] == [AI_ASSERTED]
    # the AI agent: a contained AI-Device, type author, role Artificial-Intelligence
    (agent,) = prov["agent"]
    assert agent["type"]["coding"][0]["code"] == "author"
    assert agent["role"][0]["coding"][0] == {
        "system": AI_DEVICE_TYPE,
        "code": "Artificial-Intelligence",
    }
    contained = {f"#{r['id']}": r for r in prov["contained"]}
    device = contained[agent["who"]["reference"]]
    assert device["resourceType"] == "Device"
    versions = {v["type"]["text"]: v["value"] for v in device["version"]}
    assert versions["model"] == "openai:qwen2.5" and versions["prompt"] == "3"
    assert "10.1.2.3" not in str(bundle)  # the model server's address stays inside
    card = next(e for e in device["extension"] if e["url"] == MODEL_CARD_EXTENSION)
    model_card = contained[card["valueReference"]["reference"]]
    assert model_card["content"][0]["attachment"]["url"] == "https://cs.example/model-card"
    # entities: the cited resources (role source), not the similar case; the model card
    sources = [e["what"]["reference"] for e in prov["entity"] if e["role"] == "source"]
    assert sources == ["Observation/o-1", "Observation/o-2"]
    assert {"role": "derivation", "what": {"reference": "#model-card"}} in prov["entity"]


def test_an_approval_adds_the_clinician_as_verifier_and_a_transaction_has_no_ids():
    at = datetime(2026, 11, 30, 4, 0, tzinfo=UTC)
    bundle = answer_bundle(
        ANSWER, bundle_type="transaction", approval=Approval("Practitioner/dr-who", at)
    )
    Bundle.model_validate(bundle)
    assert [e["request"] for e in bundle["entry"]] == [
        {"method": "POST", "url": "DocumentReference"},
        {"method": "POST", "url": "Provenance"},
    ]
    assert all("id" not in e["resource"] for e in bundle["entry"])
    prov = _resources(bundle)["Provenance"]
    verifier = prov["agent"][1]
    assert verifier["type"]["coding"][0]["code"] == "verifier"
    assert verifier["who"] == {"reference": "Practitioner/dr-who"}
    assert prov["recorded"].startswith("2026-11-30T04:00:00")
    # no model card URL known: no model card, no dangling reference to one
    assert [r["resourceType"] for r in prov["contained"]] == ["Device"]
    assert "#model-card" not in str(bundle)


def test_the_device_says_what_kind_of_ai_wrote_it():
    rules = ANSWER.model_copy(update={"model": "evidence (fallback from openai:x@http://h:1/v1)"})
    assert model_label(rules) == "evidence (fallback from openai:x)"
    _, prov = answer_resources(rules, document_ref="DocumentReference/d")
    kinds = [e.valueCodeableConcept.coding[0].code for e in prov.contained[0].extension]
    assert kinds == ["Rule-Based-Systems", "Deterministic-AI"]
    _, prov = answer_resources(ANSWER, document_ref="DocumentReference/d")
    assert prov.contained[0].extension[0].valueCodeableConcept.coding[0].code == (
        "Large-Language-Models"
    )
    assert "prompt 3" in answer_markdown(ANSWER)


def test_a_saved_answer_read_back_from_the_chart_says_it_is_ai_generated():
    """Once saved, the note is part of the chart ChartSight reads: its evidence line says what it
    is, so a later answer quoting it does not present it as a clinician's note."""
    document, _ = answer_resources(ANSWER, document_ref="DocumentReference/d")
    raw = json.loads(document.model_dump_json(exclude_none=True))
    patient = Patient.model_validate({"resourceType": "Patient", "id": "p-1"})
    record = PatientRecord(patient=patient, source="test", fetched_at=datetime.now(UTC))
    record.add(validate({**raw, "id": "ai-note"}, "test"))  # type: ignore[arg-type]
    (line,) = [e for e in record_evidence(record) if e.id == "DocumentReference/ai-note"]
    assert "(preliminary) (AI-generated)" in line.text
    unlabelled = {**raw, "id": "note", "meta": {}, "type": {"text": "Progress note"}}
    unlabelled["content"] = [{"attachment": {"contentType": "text/plain", "data": "b2s="}}]
    record.add(validate(unlabelled, "test"))  # type: ignore[arg-type]
    (plain,) = [e for e in record_evidence(record) if e.id == "DocumentReference/note"]
    assert "AI-generated" not in plain.text
