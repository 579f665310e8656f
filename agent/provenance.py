"""An answer as FHIR R4 resources that say an AI wrote it (HL7 *AI Transparency on FHIR*, STU1
ballot, ``hl7.fhir.uv.aitransparency``; https://build.fhir.org/ig/HL7/aitransparency-ig/).

``answer_bundle`` turns an ``Answer`` into two resources, in a ``collection`` Bundle (the export)
or a ``transaction`` Bundle (the write-back to an EHR after a clinician approved it):

- a ``DocumentReference``: ``status`` current, ``docStatus`` preliminary, ``subject`` the patient,
  type LOINC 34109-9 "Note", the answer text with its question and citations as a Markdown
  attachment, and ``meta.security`` v3-ObservationValue ``AIAST`` "Artificial Intelligence
  asserted" (the IG's first level of observability, *labeling*);
- a ``Provenance`` (profile ``AI-Provenance``) whose ``target`` is that DocumentReference,
  ``reason`` AIAST, whose first agent (type ``author``, role AIdeviceTypeCS
  ``Artificial-Intelligence``) is a contained ``Device`` (profile ``AI-Device``: the model and the
  prompt version, its kind of AI, a reference to the model card), whose ``entity`` lists each
  cited resource (role ``source``) and the model card (role ``derivation``, the IG's
  ``modelCard`` slice), and, once a clinician approved the answer, a second agent of type
  ``verifier`` naming that clinician (``Practitioner/…``, the SMART ``fhirUser``).

An answer that shows similar cases names other patients (a user- or system-level caller sees their
``Patient/<id>`` keys and dated summaries): in these resources, which go to this patient's chart,
each case is generalised first (``charted``), and no case is a Provenance entity.

The Device and the model card's DocumentReference are contained in the Provenance, so a write
needs create rights on DocumentReference and Provenance only (SMART ``patient/DocumentReference.c
patient/Provenance.c``), and each save does not add another Device to the EHR. Every resource is
validated with ``fhir.resources`` (R4B models; these four types are the same in R4).
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.provenance import Provenance

from agent.answer import Answer, Citation, SimilarCase
from agent.backends.evidence import similar_line
from connectors.errors import ConfigurationError
from connectors.fhir_client import FhirClient
from connectors.source import FhirSource
from retrieval.cases import generalised_summary

AIT = "http://hl7.org/fhir/uv/aitransparency"
AI_PROVENANCE_PROFILE = f"{AIT}/StructureDefinition/AI-Provenance"
AI_DEVICE_PROFILE = f"{AIT}/StructureDefinition/AI-Device"
AI_MODEL_CARD_PROFILE = f"{AIT}/StructureDefinition/AI-ModelCard"
AI_DEVICE_TYPE = f"{AIT}/CodeSystem/AIdeviceTypeCS"
AI_INPUTS = f"{AIT}/CodeSystem/AIinputsCS"
AI_KIND_EXTENSION = f"{AIT}/StructureDefinition/aitransparency.AIKind"
MODEL_CARD_EXTENSION = f"{AIT}/StructureDefinition/aitransparency.modelCardDescription"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
LOINC = "http://loinc.org"

AI_ASSERTED: dict[str, str] = {
    "system": V3_OBSERVATION_VALUE,
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
"""The security label the IG puts in ``meta.security`` of what an AI produced (its
``ProvenanceVS``: v3-ObservationValue AIAST)."""

DEVICE_ID = "chartsight-ai"  # the contained Device's id (``#chartsight-ai``)
MODEL_CARD_ID = "model-card"  # the contained model card DocumentReference's id
# a citation that names a FHIR resource (similar cases, "case:…" or "similar-case-1", do not)
_REFERENCE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class Approval:
    """A clinician's approval of an answer before it is saved to the chart: ``approver`` is a FHIR
    reference to the clinician (``Practitioner/123``, or the absolute URL a SMART ``fhirUser``
    holds), ``at`` a timezone-aware time (the Provenance's ``recorded``)."""

    approver: str
    at: datetime


def cited_references(answer: Answer) -> list[str]:
    """The answer's citations that name FHIR resources (``Type/id``), in order, each once: the
    Provenance's entities. Similar cases' keys are left out (they are index keys, not resources
    of this patient's chart)."""
    out: list[str] = []
    for citation in answer.citations:
        if _REFERENCE.match(citation.reference) and citation.reference not in out:
            out.append(citation.reference)
    return out


def charted(answer: Answer) -> Answer:
    """``answer`` as a document in its patient's chart may show it: each similar case (in rank
    order, ``n`` from 1) as a caller bound to this one patient sees it, key ``similar-case-<n>``
    and summary ``retrieval.cases.generalised_summary``'s (no other patient's id, no dates, no
    free text), in ``similar_cases``, the citations and the text (the case's key and its
    evidence line, ``similar_line``, replaced wherever they stand). Unchanged without similar
    cases. A model's own paraphrase of a case summary is not recognised: only the key and the
    line as given to it are replaced."""
    if not answer.similar_cases:
        return answer
    text, citations, cases = answer.text, list(answer.citations), []
    for n, case in enumerate(answer.similar_cases, 1):
        shown = SimilarCase(
            key=f"similar-case-{n}", score=case.score, summary=generalised_summary(case.summary)
        )
        full, general = similar_line(case), similar_line(shown)
        text = text.replace(full, general).replace(case.key, shown.key)
        citations = [
            Citation(
                reference=shown.key if c.reference == case.key else c.reference,
                text=c.text.replace(full, general).replace(case.key, shown.key),
            )
            for c in citations
        ]
        cases.append(shown)
    return answer.model_copy(update={"text": text, "citations": citations, "similar_cases": cases})


def model_label(answer: Answer) -> str:
    """The model that wrote ``answer`` as the Device names it: ``Answer.model`` without a model
    server's address (``openai:qwen@http://10.0.0.5:8000/v1`` → ``openai:qwen``), which would
    name the deployment's network inside the EHR's chart."""
    return re.sub(r"@\S+?(?=\)|$)", "", answer.model) or "unknown"


def answer_markdown(answer: Answer) -> str:
    """The document's text (Markdown): the answer as shown, every sentence with its bracketed
    citations; then the question, each cited resource with its evidence line, and a line saying
    that ChartSight (model, prompt version) generated it at ``created_at``."""
    lines = [answer.text.strip(), "", "---", "", f"**Question:** {answer.question}"]
    if answer.citations:
        lines += ["", "**Sources:**", ""]
        lines += [f"- [{c.reference}] {c.text}" for c in answer.citations]
    lines += [
        "",
        f"_Generated by ChartSight ({model_label(answer)}, prompt {answer.prompt_version or '-'})"
        f" at {answer.created_at}: an AI-generated draft._",
    ]
    return "\n".join(lines) + "\n"


def _software_version() -> str:
    try:
        return importlib.metadata.version("chartsight")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def _ai_kind(answer: Answer) -> list[str]:
    # the embedded evidence answer (also after a fallback) is written by rules from the record;
    # the others by a language model (a vision-language model when images were sent)
    if answer.model.startswith("evidence"):
        return ["Rule-Based-Systems", "Deterministic-AI"]
    return ["Vision-Language-Models" if answer.images else "Large-Language-Models"]


def _device(answer: Answer, model_card_url: str | None) -> dict[str, Any]:
    device: dict[str, Any] = {
        "resourceType": "Device",
        "id": DEVICE_ID,
        "meta": {"profile": [AI_DEVICE_PROFILE]},
        "extension": [
            {
                "url": AI_KIND_EXTENSION,
                "valueCodeableConcept": {"coding": [{"system": AI_DEVICE_TYPE, "code": kind}]},
            }
            for kind in _ai_kind(answer)
        ],
        "type": {
            "coding": [
                {
                    "system": AI_DEVICE_TYPE,
                    "code": "Artificial-Intelligence",
                    "display": "All kinds of Artificial Intelligence",
                }
            ]
        },
        "manufacturer": "ChartSight",
        "deviceName": [
            {"name": "ChartSight", "type": "manufacturer-name"},
            {"name": model_label(answer), "type": "model-name"},
        ],
        "modelNumber": model_label(answer),
        "version": [
            {"type": {"text": "software"}, "value": _software_version()},
            {"type": {"text": "model"}, "value": model_label(answer)},
            {"type": {"text": "prompt"}, "value": answer.prompt_version or "-"},
        ],
    }
    if model_card_url:
        device["extension"].append(
            {"url": MODEL_CARD_EXTENSION, "valueReference": {"reference": f"#{MODEL_CARD_ID}"}}
        )
        device["url"] = model_card_url
    return device


def _model_card(model_card_url: str) -> dict[str, Any]:
    """The IG's ``AI-ModelCard`` DocumentReference pointing at ChartSight's model card (the HTML
    page and its JSON at ``{url}.json``)."""
    return {
        "resourceType": "DocumentReference",
        "id": MODEL_CARD_ID,
        "meta": {"profile": [AI_MODEL_CARD_PROFILE]},
        "status": "current",
        "type": {"coding": [{"system": AI_INPUTS, "code": "AIModelCard"}]},
        "category": [{"text": "HTI-1 decision support source attributes"}],
        "description": "ChartSight's model card: intended use, users, limits, validation.",
        "content": [
            {"attachment": {"contentType": "text/html", "url": model_card_url}},
            {"attachment": {"contentType": "application/json", "url": f"{model_card_url}.json"}},
        ],
    }


def answer_resources(
    answer: Answer,
    *,
    document_ref: str,
    model_card_url: str | None = None,
    approval: Approval | None = None,
    recorded: datetime | None = None,
) -> tuple[DocumentReference, Provenance]:
    """The answer's DocumentReference and its Provenance, validated (``fhir.resources`` R4B
    models; a ``pydantic.ValidationError`` for anything FHIR R4 does not allow).
    ``document_ref`` is how the Provenance names the DocumentReference (a bundle entry's
    ``urn:uuid:…``, or ``DocumentReference/<id>``); ``model_card_url`` (absolute, e.g.
    ``https://chartsight.example/model-card``) adds the model card; ``approval`` adds the
    clinician as the ``verifier`` agent and its time as ``recorded`` (else ``recorded`` or now,
    UTC). Similar cases appear as ``charted`` shows them."""
    answer = charted(answer)
    created = answer.created_at
    document = DocumentReference.model_validate(
        {
            "resourceType": "DocumentReference",
            "meta": {"security": [AI_ASSERTED]},
            "status": "current",
            "docStatus": "preliminary",
            "type": {
                "coding": [{"system": LOINC, "code": "34109-9", "display": "Note"}],
                "text": "ChartSight answer (AI-generated)",
            },
            "subject": {"reference": f"Patient/{answer.patient_id}"},
            "date": created,
            "description": f"ChartSight's answer to: {answer.question}"[:1000],
            "content": [
                {
                    "attachment": {
                        "contentType": "text/markdown; charset=utf-8",
                        "language": "en",
                        "data": base64.b64encode(answer_markdown(answer).encode()).decode(),
                        "title": "ChartSight answer with its citations",
                        "creation": created,
                    }
                }
            ],
        }
    )
    contained = [_device(answer, model_card_url)]
    entities: list[dict[str, Any]] = [
        {"role": "source", "what": {"reference": ref}} for ref in cited_references(answer)
    ]
    if model_card_url:
        contained.append(_model_card(model_card_url))
        entities.append({"role": "derivation", "what": {"reference": f"#{MODEL_CARD_ID}"}})
    agents: list[dict[str, Any]] = [
        {
            "type": {
                "coding": [{"system": PARTICIPANT_TYPE, "code": "author", "display": "Author"}]
            },
            "role": [{"coding": [{"system": AI_DEVICE_TYPE, "code": "Artificial-Intelligence"}]}],
            "who": {"reference": f"#{DEVICE_ID}", "display": f"ChartSight ({model_label(answer)})"},
        }
    ]
    if approval is not None:
        agents.append(
            {
                "type": {
                    "coding": [
                        {"system": PARTICIPANT_TYPE, "code": "verifier", "display": "Verifier"}
                    ]
                },
                "who": {"reference": approval.approver},
            }
        )
    when = approval.at if approval is not None else (recorded or datetime.now(UTC))
    provenance = Provenance.model_validate(
        {
            "resourceType": "Provenance",
            "meta": {"profile": [AI_PROVENANCE_PROFILE]},
            "contained": contained,
            "target": [{"reference": document_ref}],
            "occurredDateTime": created,
            "recorded": when.isoformat(),
            "reason": [{"coding": [AI_ASSERTED]}],
            "activity": {"coding": [{"system": DATA_OPERATION, "code": "CREATE"}]},
            "agent": agents,
            "entity": entities,
        }
    )
    return document, provenance


def answer_bundle(
    answer: Answer,
    *,
    bundle_type: Literal["collection", "transaction"] = "collection",
    model_card_url: str | None = None,
    approval: Approval | None = None,
) -> dict[str, Any]:
    """The answer as a FHIR R4 Bundle (JSON, validated): its DocumentReference and Provenance
    (``answer_resources``), each entry with a ``urn:uuid:`` ``fullUrl`` through which the
    Provenance names the DocumentReference. A ``collection`` (the export) gives both resources
    that uuid as ``id``; a ``transaction`` (the write-back) has no ids and a ``POST`` request per
    entry, so the server assigns ids and rewrites the reference."""
    doc_url, prov_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    document, provenance = answer_resources(
        answer, document_ref=doc_url, model_card_url=model_card_url, approval=approval
    )
    entries = []
    for url, resource in ((doc_url, document), (prov_url, provenance)):
        body = json.loads(resource.model_dump_json(exclude_none=True))
        entry: dict[str, Any] = {"fullUrl": url, "resource": body}
        if bundle_type == "transaction":
            entry["request"] = {"method": "POST", "url": body["resourceType"]}
        else:
            body["id"] = url.removeprefix("urn:uuid:")
        entries.append(entry)
    bundle = Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": bundle_type,
            "timestamp": datetime.now(UTC).isoformat(),
            "entry": entries,
        }
    )
    out: dict[str, Any] = json.loads(bundle.model_dump_json(exclude_none=True))
    return out


async def save_to_chart(source: FhirSource, bundle: dict[str, Any]) -> list[str]:
    """POST a ``transaction`` Bundle to the FHIR server ``source`` reads (a SMART launch's EHR,
    with the user's token) and return each entry's ``response.location``, relative to the
    server's base when under it (``DocumentReference/123/_history/1``), in the bundle's order.
    Raises
    ``ConfigurationError`` when ``source`` is not a FHIR server (the local store takes no
    writes), and ``FhirClient.transaction``'s ``ConnectorError``s."""
    if not isinstance(source, FhirClient):
        raise ConfigurationError("answers are saved to a FHIR server's chart, not the local store")
    reply = await source.transaction(bundle)
    base = source.base_url + "/"
    return [
        str((e.get("response") or {}).get("location", "")).removeprefix(base)
        for e in reply.get("entry") or []
    ]
