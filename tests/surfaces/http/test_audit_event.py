"""Every access to patient data is audited (REST, CDS Hooks, MCP and each SMART page call) with
the HTTP request's id; the rows read back as FHIR R4 AuditEvents (IHE BALP) through
``GET /fhir/AuditEvent`` for auditors holding an AuditEvent scope."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.http.security import key_digest
from surfaces.settings import ApiKey
from tests.conftest import LoadedServer
from tests.peers.issuer import Issuer
from tests.peers.smart_ehr import SmartEhr
from tests.surfaces.http.conftest import EHR_KEY, Running, api_settings
from tests.surfaces.http.test_mcp import _http

EHR = {"X-API-Key": EHR_KEY}
AUDITOR_KEY = "test-auditor-key"  # user/AuditEvent.rs: reads the audit trail, no records
AUDITOR = {"X-API-Key": AUDITOR_KEY}


@pytest.fixture(scope="module")
def launched(
    tmp_path_factory: pytest.TempPathFactory,
    demo_store: FhirStore,
    issuer: Issuer,
    sekmet: LoadedServer,
) -> Iterator[tuple[Running, SmartEhr, str]]:
    home = tmp_path_factory.mktemp("audit-home")
    settings = api_settings(home, demo_store, issuer, rate_burst=10_000)
    settings.serve.auth.api_keys.append(
        ApiKey(client_id="auditor", key_sha256=key_digest(AUDITOR_KEY), scopes="user/AuditEvent.rs")
    )
    running = Running(settings)
    settings.serve.public_url = running.url
    with SmartEhr(sekmet.base_url, f"{running.url}/callback") as ehr:
        settings.serve.smart.issuers = [ehr.fhir_url]
        with running:
            yield running, ehr, sekmet.patient_ids[TOMMY_FRIESEN]


def _rows(running: Running) -> list[dict[str, Any]]:
    engine = sa.create_engine(f"sqlite:///{running.settings.home / 'audit.db'}")
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM audit_log"))]
    engine.dispose()
    return rows


def _page_session(running: Running, ehr: SmartEhr, pid: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=running.url, follow_redirects=False, timeout=120)
    start = client.get("/launch", params={"iss": ehr.fhir_url, "launch": ehr.launch(pid)})
    client.get(httpx.get(start.headers["location"]).headers["location"])
    found = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/app").text)
    assert found
    return client, found.group(1)


def test_every_patient_data_call_is_audited_with_its_request_id(launched: Any):
    running, ehr, pid = launched
    url = running.url
    before = len(_rows(running))

    # REST: similar cases of a patient the store does not have (an error, not a silent gap)
    rid = f"audit-{uuid.uuid4().hex[:8]}"
    reply = httpx.get(
        f"{url}/v1/patients/nobody-here/similar", headers={**EHR, "X-Request-Id": rid}
    )
    assert reply.status_code >= 400 and reply.headers["x-request-id"] == rid

    # CDS Hooks: a fhirAuthorization bound to another patient is refused, and that is audited
    hook = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/dr-who", "patientId": TOMMY_FRIESEN},
        "fhirServer": "http://127.0.0.1:9/fhir",
        "fhirAuthorization": {
            "access_token": "t", "token_type": "Bearer", "expires_in": 60,
            "scope": "patient/*.read", "subject": "x", "patient": "someone-else",
        },
    }  # fmt: skip
    cds = httpx.post(f"{url}/cds-services/chartsight-patient-view", json=hook, headers=EHR)
    assert cds.status_code == 403

    # MCP: a tool call that fails is audited as one that succeeds is
    async def mcp() -> Any:
        async with _http(running, EHR_KEY) as client:
            return await client.call_tool(
                "patient_facts", {"patient": TOMMY_FRIESEN, "tool": "drop_tables"}
            )

    assert asyncio.run(mcp()).is_error

    # the SMART page: the page itself, a cited resource (and one not in the record), a trend
    client, csrf = _page_session(running, ehr, pid)
    assert client.get(f"/app/resource/Patient/{pid}").status_code == 200
    assert client.get("/app/resource/Patient/someone-else").status_code == 404
    trend = client.post(
        "/app/trend", json={"references": ["Observation/x"]}, headers={"X-CSRF-Token": csrf}
    )
    assert trend.status_code == 204
    client.get("/app/similar")

    rows = _rows(running)[before:]
    seen = {(r["endpoint"], r["outcome"]) for r in rows}
    assert ("similar", "error") in seen
    assert ("cds-patient-view", "denied") in seen
    assert ("mcp:patient_facts", "error") in seen
    for wanted in [
        ("app_page", "answered"),
        ("app_resource", "answered"),
        ("app_resource", "not found"),
        ("app_trend", "answered"),
    ]:
        assert wanted in seen, (wanted, seen)
    assert any(e == "app_similar" for e, _ in seen)
    page = [r for r in rows if r["endpoint"].startswith("app_")]
    assert all(r["patient_id"] == pid and r["client_id"] == "chartsight" for r in page)
    # every row carries its HTTP request's id; the REST call's is the caller's own
    assert [r["request_id"] for r in rows if r["endpoint"] == "similar"] == [rid]
    assert all(r["request_id"] for r in rows), rows
    assert len({r["request_id"] for r in rows}) >= 6
