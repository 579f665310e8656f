"""What a caller outside the deployment must not see in an answer, whichever surface it asks
through (REST, its stream, CDS Hooks, MCP): the local store's database URL, the model server's
URL, a stream that never ends when the thread store fails; and MCP keeps REST's question limit.

The chart here has references the store lacks (a Practitioner, an Organization) and the model
server is down, so the answer carries warnings that name both."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from connectors.store import FhirStore
from surfaces.http.security import Principal, thread_key
from tests.peers.issuer import Issuer
from tests.surfaces.http.conftest import EHR_KEY, Running, api_settings

EHR = {"X-API-Key": EHR_KEY}
PID = "dangling-refs"
QUESTION = "What was her last HbA1c?"
PATIENT = {"resourceType": "Patient", "id": PID, "gender": "female", "birthDate": "1960-01-01"}
A1C = {
    "resourceType": "Observation",
    "id": "a1c",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}], "text": "HbA1c"},
    "subject": {"reference": f"Patient/{PID}"},
    "effectiveDateTime": "2020-01-01",
    "valueQuantity": {
        "value": 7.1,
        "unit": "%",
        "system": "http://unitsofmeasure.org",
        "code": "%",
    },
    "performer": [{"reference": "Practitioner/not-in-the-store"}],
}
VISIT = {
    "resourceType": "Encounter",
    "id": "visit",
    "status": "finished",
    "class": {"code": "AMB"},
    "subject": {"reference": f"Patient/{PID}"},
    "serviceProvider": {"reference": "Organization/not-in-the-store"},
    "period": {"start": "2020-01-01"},
}


class Exposed:
    """The running service and what must not leak from it."""

    def __init__(self, running: Running, secrets: list[str]) -> None:
        self.running = running
        self.url = running.url
        self.secrets = secrets

    def assert_hidden(self, text: str) -> None:
        leaked = [s for s in self.secrets if s in text]
        assert not leaked, f"{leaked} in {text[:2000]}"


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory, issuer: Issuer) -> Iterator[Exposed]:
    home = tmp_path_factory.mktemp("exposure-home")
    store = FhirStore(f"sqlite:///{home / 'store.db'}")
    for resource in (PATIENT, A1C, VISIT):
        store.import_json(resource, resource["id"])
    with socket.socket() as s:  # a port nothing listens on: the model server is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = api_settings(home, store, issuer, rate_burst=10_000)
    settings.model.name = "openai"
    settings.model.base_url = f"http://127.0.0.1:{port}/v1"
    settings.model.model = "the-model"
    secrets = [str(home), "store.db", "sqlite:", f"127.0.0.1:{port}"]
    try:
        with Running(settings) as running:
            yield Exposed(running, secrets)
    finally:
        store.close()


def _events(url: str, body: dict[str, Any], within_s: float = 120) -> list[tuple[str, Any]]:
    """The stream's events; fails when it has not ended within ``within_s`` (its pings, every
    15 s, would keep a read timeout from ever firing)."""
    events: list[tuple[str, Any]] = []
    deadline = time.monotonic() + within_s
    with httpx.stream("POST", f"{url}/v1/ask/stream", json=body, headers=EHR, timeout=30) as r:
        assert r.status_code == 200
        kind = None
        for line in r.iter_lines():
            assert time.monotonic() < deadline, f"the stream did not end: {events}"
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind:
                events.append((kind, json.loads(line[5:])))
    return events


def test_rest_and_stream_answers_name_no_database_or_model_server(exposed: Exposed):
    reply = httpx.post(
        f"{exposed.url}/v1/ask",
        json={"patient": PID, "question": QUESTION},
        headers=EHR,
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["fallback_used"] and answer["citations"]
    # the warnings still say what went wrong, without the addresses
    said = " ".join(answer["warnings"])
    assert "Practitioner/not-in-the-store" in said and "the model could not answer" in said
    exposed.assert_hidden(reply.text)
    events = _events(exposed.url, {"patient": PID, "question": QUESTION})
    assert events[-1][0] == "answer" and "fallback" in [k for k, _ in events]
    exposed.assert_hidden(json.dumps(events))


def test_the_cds_card_names_no_model_server(exposed: Exposed):
    hook = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": PID},
        "prefetch": {
            "patient": PATIENT,
            "observations": {"resourceType": "Bundle", "type": "searchset",
                             "entry": [{"resource": A1C}]},
        },
    }  # fmt: skip
    reply = httpx.post(
        f"{exposed.url}/cds-services/chartsight-patient-view", json=hook, headers=EHR, timeout=120
    )
    assert reply.status_code == 200, reply.text
    # the card is composed from the chart (no model call), so the failing model cannot show
    assert "`Observation/a1c`" in reply.json()["cards"][0]["detail"]
    exposed.assert_hidden(reply.text)


def _mcp(url: str, tool: str, args: dict[str, Any]) -> Any:
    async def run() -> Any:
        http = create_mcp_http_client(EHR)
        async with Client(streamable_http_client(f"{url}/mcp/", http_client=http)) as client:
            return await client.call_tool(tool, args)

    return asyncio.run(run())


def test_mcp_answers_name_no_database_or_model_server_and_keep_the_question_limit(
    exposed: Exposed,
):
    result = _mcp(exposed.url, "ask", {"patient": PID, "question": QUESTION, "thread": "m"})
    assert not result.is_error, result.content
    data = result.structured_content
    assert data["thread_id"] == "m" and data["warnings"]
    exposed.assert_hidden(json.dumps(data))
    too_long = "What was her last HbA1c? " + "and " * 600  # over serve.max_question_chars
    for tool in ("ask", "patient_evidence"):
        refused = _mcp(exposed.url, tool, {"patient": PID, "question": too_long})
        assert refused.is_error and "over 2000 characters" in refused.content[0].text
    wrong = _mcp(
        exposed.url,
        "patient_facts",
        {"patient": PID, "tool": "latest_observation", "arguments": {"query": "A1c", "ctx": 1}},
    )
    assert wrong.is_error and "bad arguments" in wrong.content[0].text


def test_a_failing_thread_store_ends_the_stream_with_an_error(exposed: Exposed):
    """A thread whose stored checkpoint cannot be read (here: a row in a format the serializer
    refuses) fails the answer; the stream says so (the thread is damaged: start a new one) and
    ends, and the audit log has the error."""
    body = {"patient": PID, "question": QUESTION, "thread": "broken"}
    assert httpx.post(f"{exposed.url}/v1/ask", json=body, headers=EHR, timeout=120).is_success
    ehr = Principal("ehr", "ehr", frozenset({"system/*.read"}), kind="api-key")
    home: Path = exposed.running.settings.home
    with sqlite3.connect(home / "threads.db") as db:
        db.execute(
            "UPDATE checkpoints SET type = 'pickle' WHERE thread_id = ?",
            (thread_key(ehr, PID, "broken"),),
        )
    events = _events(exposed.url, {**body, "question": "and before that?"}, within_s=40)
    assert events[-1] == (
        "error",
        {"status": 500, "detail": "this thread's saved state is damaged; start a new thread"},
    )
    engine = sa.create_engine(f"sqlite:///{home / 'audit.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT endpoint, outcome FROM audit_log")).all()
    engine.dispose()
    assert ("ask_stream", "error") in [tuple(r) for r in rows]


def test_thread_keys_are_private_to_the_credential_kind_realm_and_client():
    from surfaces.http.security import Principal, thread_key

    base = Principal(
        "app", "SMART user", frozenset({"patient/*.read"}), "p1", realm="https://ehr-a/fhir"
    )
    keys = {
        thread_key(base, "p1", "page-1"),
        thread_key(dataclasses.replace(base, realm="https://ehr-b/fhir"), "p1", "page-1"),
        thread_key(dataclasses.replace(base, client_id="other-app"), "p1", "page-1"),
        thread_key(dataclasses.replace(base, kind="api-key"), "p1", "page-1"),
        thread_key(dataclasses.replace(base, subject="Practitioner/2"), "p1", "page-1"),
        thread_key(base, "p2", "page-1"),
        thread_key(base, "p1", "page-2"),
    }
    assert len(keys) == 7  # two users without fhirUser at two EHRs never share a conversation
    assert thread_key(base, "p1", "page-1") == thread_key(base, "p1", "page-1")
