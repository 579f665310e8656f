"""An answer exported as FHIR (HL7 AI Transparency on FHIR) from ``POST /v1/ask`` with
``Accept: application/fhir+json`` and from ``chartsight ask --fhir``: a Bundle fhir.resources
validates, whose every reference resolves (inside the Bundle, inside its resource, or to a
resource of the patient's record in the store the service reads)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
from fhir.resources.R4B.bundle import Bundle
from typer.testing import CliRunner

from connectors.demo import TOMMY_FRIESEN
from connectors.errors import ResourceNotFound
from connectors.store import FhirStore
from surfaces.cli import app as cli
from tests.surfaces.http.conftest import EHR_KEY, Running

AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}


def _references(node: Any) -> list[str]:
    """Every ``Reference.reference`` in a JSON tree."""
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def check_export(bundle: dict[str, Any], store: FhirStore, patient: str) -> dict[str, Any]:
    """Validate ``bundle`` and resolve each of its references; return its Provenance."""
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        contained = {f"#{c['id']}" for c in resource.get("contained", [])}
        for ref in _references(resource):
            if ref.startswith("urn:uuid:"):
                assert ref in full_urls, ref
            elif ref.startswith("#"):
                assert ref in contained, ref
            else:
                rtype, rid = ref.split("/")
                try:
                    store.read(rtype, rid)
                except ResourceNotFound as exc:
                    raise AssertionError(f"{ref} does not resolve") from exc
    by_type = {e["resource"]["resourceType"]: e for e in bundle["entry"]}
    doc = by_type["DocumentReference"]["resource"]
    prov = by_type["Provenance"]["resource"]
    assert doc["meta"]["security"] == [AIAST]
    assert (doc["status"], doc["docStatus"]) == ("current", "preliminary")
    assert doc["subject"]["reference"] == f"Patient/{patient}"
    assert prov["target"] == [{"reference": by_type["DocumentReference"]["fullUrl"]}]
    return prov


def test_ask_with_accept_fhir_json_answers_a_bundle_whose_references_resolve(
    service: Running, demo_store: FhirStore
):
    body = {"patient": TOMMY_FRIESEN, "question": "What was his last HbA1c?"}
    headers = {"X-API-Key": EHR_KEY, "Accept": "application/fhir+json"}
    reply = httpx.post(f"{service.url}/v1/ask", json=body, headers=headers, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/fhir+json")
    bundle = reply.json()
    prov = check_export(bundle, demo_store, TOMMY_FRIESEN)
    plain = httpx.post(
        f"{service.url}/v1/ask", json=body, headers={"X-API-Key": EHR_KEY}, timeout=120
    ).json()
    cited = [c["reference"] for c in plain["citations"]]
    assert cited and all(c.startswith("Observation/") for c in cited)
    sources = [e["what"]["reference"] for e in prov["entity"] if e["role"] == "source"]
    assert sources == cited  # the entities are the cited resources
    device = next(c for c in prov["contained"] if c["resourceType"] == "Device")
    assert prov["agent"][0]["who"]["reference"] == f"#{device['id']}"
    versions = {v["type"]["text"]: v["value"] for v in device["version"]}
    assert versions["model"] == plain["model"] and versions["prompt"] == plain["prompt_version"]
    card = next(c for c in prov["contained"] if c["id"] == "model-card")
    assert card["content"][0]["attachment"]["url"] == "https://chartsight.example/model-card"
    doc = next(
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] != "Provenance"
    )
    text = base64.b64decode(doc["content"][0]["attachment"]["data"]).decode()
    assert text.startswith(plain["text"].strip())

    # plain JSON first, or no preference: the Answer JSON as before
    for accept in ("application/json, application/fhir+json", "*/*"):
        reply = httpx.post(
            f"{service.url}/v1/ask",
            json=body,
            headers={"X-API-Key": EHR_KEY, "Accept": accept},
            timeout=120,
        )
        assert reply.headers["content-type"].startswith("application/json")
        assert reply.json()["question"] == body["question"]
    spec = httpx.get(f"{service.url}/openapi.json").json()
    assert (
        "application/fhir+json" in spec["paths"]["/v1/ask"]["post"]["responses"]["200"]["content"]
    )


def test_cli_ask_fhir_prints_the_bundle(tmp_path: Path, demo_store: FhirStore):
    env = {
        "CHARTSIGHT_HOME": str(tmp_path),
        "CHARTSIGHT_STORE__URL": str(demo_store.engine.url),
        "CHARTSIGHT_SERVE__PUBLIC_URL": "https://chartsight.hospital.example",
    }
    done = CliRunner().invoke(
        cli, ["ask", TOMMY_FRIESEN, "What was his last HbA1c?", "--fhir"], env=env
    )
    assert done.exit_code == 0, done.output
    bundle = json.loads(done.stdout)
    prov = check_export(bundle, demo_store, TOMMY_FRIESEN)
    assert [e for e in prov["entity"] if e["role"] == "source"]
    card = next(c for c in prov["contained"] if c["id"] == "model-card")
    assert card["content"][0]["attachment"]["url"] == (
        "https://chartsight.hospital.example/model-card"
    )
