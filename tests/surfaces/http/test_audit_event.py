"""Every access to patient data is audited (REST, CDS Hooks, MCP and each SMART page call) with
the HTTP request's id; the rows read back as FHIR R4 AuditEvents (IHE BALP) through
``GET /fhir/AuditEvent`` for auditors holding an AuditEvent scope."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.http.security import key_digest
from surfaces.settings import ApiKey
from tests.conftest import LoadedServer
from tests.peers.issuer import Issuer
from tests.peers.smart_ehr import SmartEhr
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, Running, api_settings
from tests.surfaces.http.test_mcp import _http
from tests.surfaces.http.test_service import _audit as _rows
from tests.surfaces.http.test_smart_app import _page_session

EHR = {"X-API-Key": EHR_KEY}
AUDITOR_KEY = "test-auditor-key"  # user/AuditEvent.rs: reads the audit trail, no records
AUDITOR = {"X-API-Key": AUDITOR_KEY}
CLERK_KEY = "test-clerk-key"  # user/Observation.rs: user-level, but no AuditEvent


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
    settings.serve.auth.api_keys.append(
        ApiKey(client_id="clerk", key_sha256=key_digest(CLERK_KEY), scopes="user/Observation.rs")
    )
    running = Running(settings)
    settings.serve.public_url = running.url
    with SmartEhr(sekmet.base_url, f"{running.url}/callback") as ehr:
        settings.serve.smart.issuers = [ehr.fhir_url]
        with running:
            yield running, ehr, sekmet.patient_ids[TOMMY_FRIESEN]


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


def _search(running: Running, headers: dict[str, str], **params: Any) -> httpx.Response:
    return httpx.get(f"{running.url}/fhir/AuditEvent", params=params, headers=headers, timeout=60)


def test_auditors_read_balp_audit_events_without_the_question(launched: Any, issuer: Issuer):
    running, _, _ = launched
    question = f"What was his last HbA1c? ({uuid.uuid4().hex[:6]})"
    token = issuer.token("user/*.read", fhirUser="Practitioner/dr-audit", client_id="ehr-app")
    rid = f"ask-{uuid.uuid4().hex[:8]}"
    answer = httpx.post(
        f"{running.url}/v1/ask",
        json={"patient": TOMMY_FRIESEN, "question": question},
        headers={"Authorization": f"Bearer {token}", "X-Request-Id": rid},
        timeout=120,
    )
    assert answer.status_code == 200
    cited = {c["reference"] for c in answer.json()["citations"]}
    assert cited

    now = datetime.now(UTC)
    reply = _search(
        running,
        AUDITOR,
        patient=TOMMY_FRIESEN,
        date=[f"ge{(now - timedelta(hours=1)):%Y-%m-%dT%H:%M}Z", f"lt{(now + timedelta(days=1)):%Y-%m-%d}"],
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/fhir+json")
    assert question not in reply.text and "HbA1c" not in reply.text
    bundle = Bundle.model_validate(reply.json())
    assert bundle.type == "searchset"
    events = [e["resource"] for e in reply.json()["entry"]]
    for event in events:
        AuditEvent.model_validate(event)
        assert event["type"]["code"] == "rest"
        patient = [e for e in event["entity"] if e.get("role", {}).get("code") == "1"]
        assert [p["what"]["reference"] for p in patient] == [f"Patient/{TOMMY_FRIESEN}"]
    (ask,) = [
        e for e in events
        if any(x.get("what", {}).get("identifier", {}).get("value") == rid for x in e["entity"])
    ]  # fmt: skip
    assert ask["outcome"] == "0" and ask["action"] == "E"
    assert ask["subtype"][0]["code"] == "search"
    assert ask["meta"]["profile"] == [
        "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientQuery"
    ]
    user = [a for a in ask["agent"] if a["type"]["coding"][0]["code"] == "IRCP"]
    assert [(u["who"]["reference"], u["requestor"]) for u in user] == [
        ("Practitioner/dr-audit", True)
    ]
    client = [a for a in ask["agent"] if a["type"]["coding"][0]["code"] == "110153"]
    assert client[0]["who"]["identifier"]["value"] == "ehr-app"
    assert ask["source"]["observer"]["identifier"]["value"] == running.url
    query = [e for e in ask["entity"] if e.get("role", {}).get("code") == "24"]
    decoded = base64.b64decode(query[0]["query"]).decode()
    assert hashlib.sha256(question.encode()).hexdigest() in decoded
    assert {
        e["what"]["reference"] for e in ask["entity"] if e.get("role", {}).get("code") == "4"
    } == cited
    # the denial in the first test reads as a minor failure (4), without a BALP profile claim
    denied = _search(running, AUDITOR, patient=TOMMY_FRIESEN, _count=1000).json()["entry"]
    refused = [e["resource"] for e in denied if e["resource"]["outcome"] == "4"]
    assert refused and all("meta" not in r for r in refused)


def test_date_prefixes_and_paging(launched: Any):
    running, _, _ = launched
    today = f"{datetime.now(UTC):%Y-%m-%d}"
    every = [e["resource"]["id"] for e in _search(running, AUDITOR, _count=1000).json()["entry"]]
    assert len(every) >= 5
    assert [int(i) for i in every] == sorted(int(i) for i in every)

    def ids(*dates: str) -> list[str]:
        reply = _search(running, AUDITOR, date=list(dates), _count=1000)
        assert reply.status_code == 200, reply.text
        return [e["resource"]["id"] for e in reply.json()["entry"]]

    # each search is itself audited: compare against the rows that existed before it
    assert ids(today)[: len(every)] == every  # eq: within the day
    assert ids(f"le{today}")[: len(every)] == every
    assert ids(f"ge{today}")[: len(every)] == every
    assert ids(f"gt{today}") == [] and ids(f"lt{today}") == []
    assert ids("lt2000-01") == []
    for bad in ("sa2026", "2026-13-01", "ge-yesterday"):  # a prefix we lack, no such month
        assert _search(running, AUDITOR, date=bad).status_code == 400

    # paging: two at a time, following next links, gives the same events once each
    seen: list[str] = []
    url: str | None = f"{running.url}/fhir/AuditEvent?_count=2"
    while url and len(seen) < len(every):
        page = httpx.get(url, headers=AUDITOR, timeout=60).json()
        assert len(page["entry"]) <= 2
        seen += [e["resource"]["id"] for e in page["entry"]]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert seen[: len(every)] == every


def test_only_auditors_read_the_audit_trail_and_refusals_are_audited(launched: Any):
    running, _, _ = launched
    # a patient-level grant, or a user-level one for other types, is refused
    for headers in ({"X-API-Key": BOUND_KEY}, {"X-API-Key": CLERK_KEY}):
        reply = _search(running, headers, patient=TOMMY_FRIESEN)
        assert reply.status_code == 403
        assert reply.json()["resourceType"] == "OperationOutcome"
    assert _search(running, {}).status_code == 401
    # reading records (system/*.read, the EHR plug-in) is not reading the audit trail
    assert _search(running, EHR, patient=TOMMY_FRIESEN).status_code == 403
    searches = [
        (r["client_id"], r["outcome"]) for r in _rows(running) if r["endpoint"] == "audit:search"
    ]
    assert ("bound", "denied") in searches and ("clerk", "denied") in searches
    assert ("auditor", "answered") in searches and ("ehr", "denied") in searches


def test_what_a_refused_caller_sends_cannot_break_the_audit_trail(launched: Any, issuer: Issuer):
    """A patient-bound key naming a patient ``urn:x|`` (an identifier without a value), and a
    token whose client and user are blank, are refused and audited as sent; such a row used to
    make every audit search that included it a 500 (and stop forwarding at it), hiding the
    whole trail from auditors."""
    running, _, _ = launched
    blank = issuer.token("patient/*.rs", TOMMY_FRIESEN, client_id="", sub="", fhirUser="")
    for patient, headers in (
        ("urn:x|", {"X-API-Key": BOUND_KEY}),
        ("someone-else", {"Authorization": f"Bearer {blank}"}),
    ):
        reply = httpx.post(
            f"{running.url}/v1/ask",
            json={"patient": patient, "question": "What is his latest HbA1c?"},
            headers=headers,
        )
        assert reply.status_code == 403
    reply = _search(running, AUDITOR, _count=1000)
    assert reply.status_code == 200, reply.text
    events = [e["resource"] for e in reply.json()["entry"]]
    for event in events:
        AuditEvent.model_validate(event)
    patients = [
        x["what"] for e in events for x in e["entity"] if x.get("role", {}).get("code") == "1"
    ]
    assert {"type": "Patient", "display": "urn:x|"} in patients
    assert _search(running, AUDITOR, patient="urn:x|").json()["entry"]
    (nameless,) = _search(running, AUDITOR, patient="someone-else").json()["entry"]
    assert nameless["resource"]["agent"][0]["who"] == {
        "identifier": {"value": "''"},
        "display": "''",
    }


@pytest.mark.parametrize(
    "params",
    [
        {"_cursor": str(10**23)},
        {"_cursor": str(2**31)},  # past PostgreSQL's INTEGER
        {"date": "9999-12-31T23:59:59.999999"},
        {"date": "le9999-12-31T23:00:00-05:00"},
        {"date": "ge0001-01-01T00:00:00+14:00"},
    ],
)
def test_search_values_past_the_ends_of_time_are_refused_not_a_500(
    launched: Any, params: dict[str, str]
):
    running, _, _ = launched
    reply = _search(running, AUDITOR, **params)
    assert reply.status_code in (400, 422), reply.text
    if "date" in params:
        assert reply.json()["resourceType"] == "OperationOutcome"


def test_an_access_by_identifier_is_found_by_the_patients_id(launched: Any, tommy_json: Any):
    """A caller may name its patient by identifier (``system|value``); a successful MCP read so
    named used to be audited under the identifier only, so an auditor's search by the patient's
    id did not find it."""
    running, _, _ = launched
    patient = next(r for r in tommy_json if r["resourceType"] == "Patient")
    ident = next(i for i in patient["identifier"] if i.get("system") and i.get("value"))
    key = f"{ident['system']}|{ident['value']}"

    async def mcp() -> Any:
        async with _http(running, BOUND_KEY) as client:
            return await client.call_tool("patient_facts", {"patient": key, "tool": "demographics"})

    assert not asyncio.run(mcp()).is_error
    found = _search(running, AUDITOR, patient=TOMMY_FRIESEN, _count=1000).json()["entry"]
    reads = [
        e["resource"]
        for e in found
        if e["resource"]["outcome"] == "0"
        and any(
            x.get("description") == "MCP tools/call patient_facts" for x in e["resource"]["entity"]
        )
    ]
    assert reads
