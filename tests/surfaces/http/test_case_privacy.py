"""Similar cases and callers bound to one patient: one rule in every surface (REST similar and
ask, MCP, the SMART page, CDS). A patient-level key or token gets similar cases without keys,
patient ids, dates or free text; user- and system-level callers get them in full."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from typer.testing import CliRunner

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.cli import app as cli
from tests.peers.issuer import Issuer
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, Running, api_settings

DATE = re.compile(r"\b(19|20)\d{2}(-\d{2})?(-\d{2})?\b")
SIMILAR_QUESTION = "Which similar cases are there?"


@pytest.fixture(scope="module")
def indexed(
    tmp_path_factory: pytest.TempPathFactory, demo_store: FhirStore, issuer: Issuer
) -> Iterator[Running]:
    home = tmp_path_factory.mktemp("privacy-home")
    settings = api_settings(home, demo_store, issuer, rate_burst=10_000)
    env = {"CHARTSIGHT_HOME": str(home), "CHARTSIGHT_STORE__URL": settings.store.url}
    built = CliRunner().invoke(cli, ["index", "build"], env=env)
    assert built.exit_code == 0, built.output
    with Running(settings) as running:
        yield running


def _similar(running: Running, headers: dict[str, str]) -> list[dict[str, Any]]:
    reply = httpx.get(
        f"{running.url}/v1/patients/{TOMMY_FRIESEN}/similar", params={"k": 4}, headers=headers
    )
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def _assert_generalised(hits: list[dict[str, Any]], others: set[str]) -> None:
    assert hits
    for n, hit in enumerate(hits, 1):
        assert hit["key"] == f"similar-case-{n}" and hit.get("patient_id", "") == ""
        assert not DATE.search(hit["summary"]), hit["summary"]
        assert "Report impressions" not in hit["summary"] and "Imaging:" not in hit["summary"]
        assert not any(pid in str(hit) for pid in others)


def test_full_cases_for_system_and_user_callers(indexed: Running, issuer: Issuer):
    system = _similar(indexed, {"X-API-Key": EHR_KEY})
    assert all(h["key"].startswith("Patient/") and h["patient_id"] for h in system)
    assert any(DATE.search(h["summary"]) for h in system)  # dates are there to be taken out
    user = {"Authorization": f"Bearer {issuer.token('user/*.read')}"}
    assert [h["key"] for h in _similar(indexed, user)] == [h["key"] for h in system]


@pytest.mark.parametrize("kind", ["api-key", "token"])
def test_a_patient_bound_caller_gets_generalised_cases(indexed: Running, issuer: Issuer, kind: str):
    others = {h["patient_id"] for h in _similar(indexed, {"X-API-Key": EHR_KEY})}
    headers = (
        {"X-API-Key": BOUND_KEY}
        if kind == "api-key"
        else {"Authorization": f"Bearer {issuer.token('patient/*.read', TOMMY_FRIESEN)}"}
    )
    _assert_generalised(_similar(indexed, headers), others)
    # the same rule inside an answer: the prompt, the similar cases and the citations
    reply = httpx.post(
        f"{indexed.url}/v1/ask",
        json={"patient": TOMMY_FRIESEN, "question": SIMILAR_QUESTION},
        headers=headers,
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    _assert_generalised(answer["similar_cases"], others)
    assert not any(pid in reply.text for pid in others)
    # and the answer says them, each cited by its rank: it was an abstention, every sentence
    # removed as citing nothing, while similar_cases held the cases
    assert not answer["abstained"] and "[similar-case-1]" in answer["text"]
    assert not any("unsupported" in w for w in answer["warnings"])
    full = httpx.post(
        f"{indexed.url}/v1/ask",
        json={"patient": TOMMY_FRIESEN, "question": SIMILAR_QUESTION},
        headers={"X-API-Key": EHR_KEY},
        timeout=60,
    ).json()
    assert any(c["key"].startswith("Patient/") for c in full["similar_cases"])


def test_mcp_applies_the_same_rule(indexed: Running):
    others = {h["patient_id"] for h in _similar(indexed, {"X-API-Key": EHR_KEY})}

    async def run(key: str) -> Any:
        headers = {"X-API-Key": key}
        http = create_mcp_http_client(headers)
        async with Client(streamable_http_client(f"{indexed.url}/mcp/", http_client=http)) as c:
            result = await c.call_tool("similar_cases", {"patient": TOMMY_FRIESEN, "k": 3})
        data = result.structured_content
        return data.get("result", data) if isinstance(data, dict) else data

    _assert_generalised(asyncio.run(run(BOUND_KEY)), others)
    assert all(h["patient_id"] in others for h in asyncio.run(run(EHR_KEY)))


def test_mcp_patient_facts_similar_cases_applies_the_same_rule(indexed: Running):
    """``patient_facts`` runs any structured tool, ``similar_cases`` among them: a bound caller
    gets the same generalised cases there (no case key, patient id or date in the statement, the
    evidence or the details) as from the ``similar_cases`` tool."""
    others = {h["patient_id"] for h in _similar(indexed, {"X-API-Key": EHR_KEY})}

    async def run(key: str) -> Any:
        http = create_mcp_http_client({"X-API-Key": key})
        async with Client(streamable_http_client(f"{indexed.url}/mcp/", http_client=http)) as c:
            result = await c.call_tool(
                "patient_facts",
                {"patient": TOMMY_FRIESEN, "tool": "similar_cases", "arguments": {"k": 4}},
            )
        assert not result.is_error, result.content
        data = result.structured_content
        return data.get("result", data) if isinstance(data, dict) else data

    bound = run(BOUND_KEY)
    facts = asyncio.run(bound)
    assert facts
    for n, fact in enumerate(facts, 1):
        assert fact["evidence"] == [f"similar-case-{n}"], fact
        assert not any(pid in str(fact) for pid in others), fact
        assert not DATE.search(fact["statement"]), fact["statement"]
    full = asyncio.run(run(EHR_KEY))
    assert all(f["evidence"][0].startswith("Patient/") for f in full)


def test_an_exported_or_saved_answer_names_no_other_patient(indexed: Running):
    """The FHIR export (and the SMART page's save, the same Bundle) is a document for this
    patient's chart: a system-level answer's similar cases used to go into it in full (other
    patients' ``Patient/<id>`` keys and dated summaries in the text, and as Provenance entities,
    claiming the answer derives from their records)."""
    others = {h["patient_id"] for h in _similar(indexed, {"X-API-Key": EHR_KEY})}
    reply = httpx.post(
        f"{indexed.url}/v1/ask",
        json={"patient": TOMMY_FRIESEN, "question": SIMILAR_QUESTION},
        headers={"X-API-Key": EHR_KEY, "Accept": "application/fhir+json"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert others and not any(pid in reply.text for pid in others)
    resources = {e["resource"]["resourceType"]: e["resource"] for e in reply.json()["entry"]}
    text = base64.b64decode(
        resources["DocumentReference"]["content"][0]["attachment"]["data"]
    ).decode()
    assert "[similar-case-1]" in text and not DATE.search(text.split("---")[0])
    sources = [e["what"]["reference"] for e in resources["Provenance"]["entity"]]
    assert all(not s.startswith("Patient/") or s == f"Patient/{TOMMY_FRIESEN}" for s in sources)
