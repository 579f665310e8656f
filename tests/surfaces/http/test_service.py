"""The HTTP service end to end over real HTTP: answers, streaming, similar cases, health, OpenAPI,
authentication and patient-scoped authorization, limits, the audit log, and no PHI in logs."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.http.schemas import Problem
from tests.agent.test_ask import _a1cs
from tests.peers.issuer import Issuer
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, Running, api_settings, ask_events

EHR = {"X-API-Key": EHR_KEY}
BOUND = {"X-API-Key": BOUND_KEY}
A1C_Q = "What was his last HbA1c?"


def _ask(service: Running, headers: dict[str, str], patient: str = TOMMY_FRIESEN, **body: Any):  # type: ignore[no-untyped-def]
    return httpx.post(
        f"{service.url}/v1/ask",
        json={"patient": patient, "question": A1C_Q, **body},
        headers=headers,
        timeout=60,
    )


def _audit(service: Running) -> list[dict[str, Any]]:
    engine = sa.create_engine(f"sqlite:///{service.settings.home / 'audit.db'}")
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM audit_log"))]
    engine.dispose()
    return rows


def test_health_readiness_and_openapi(service: Running):
    assert httpx.get(f"{service.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{service.url}/readyz").json()
    assert ready["status"] == "ready" and ready["audit"] == "ok"
    spec = httpx.get(f"{service.url}/openapi.json").json()
    assert {
        "/v1/ask",
        "/v1/ask/stream",
        "/v1/patients/{patient_id}/similar",
        "/cds-services",
    } <= set(spec["paths"])
    ask = spec["paths"]["/v1/ask"]["post"]
    assert ask["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/Answer"
    )
    assert {"401", "403", "429"} <= set(ask["responses"])
    answer = spec["components"]["schemas"]["Answer"]["properties"]
    assert {"text", "citations", "facts", "supported_fraction", "tool_calls"} <= set(answer)


def test_ask_answers_cites_and_is_audited_without_the_question_text(
    service: Running, tommy_json: list[dict[str, Any]]
):
    newest = _a1cs(tommy_json)[0]
    reply = _ask(service, EHR)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert f"{newest['valueQuantity']['value']:.4g} %" in data["text"]
    assert [c["reference"] for c in data["citations"]] == [f"Observation/{newest['id']}"]
    assert reply.headers["x-request-id"]
    row = [r for r in _audit(service) if r["endpoint"] == "ask"][-1]
    assert row["client_id"] == "ehr" and row["patient_id"] == TOMMY_FRIESEN
    assert row["outcome"] == "answered" and row["model"] == "evidence"
    assert row["question_sha256"] == hashlib.sha256(A1C_Q.encode()).hexdigest()
    assert json.loads(row["cited"]) == [f"Observation/{newest['id']}"]
    assert A1C_Q not in json.dumps(row, default=str)


def test_the_answer_streams_as_server_sent_events(service: Running):
    events = ask_events(service.url, {"patient": TOMMY_FRIESEN, "question": A1C_Q}, EHR)
    kinds = [k for k, _ in events]
    assert kinds[0] == "node_started" and kinds[-1] == "answer"
    assert {"plan", "facts", "evidence", "verified"} <= set(kinds)
    assert events[-1][1]["citations"]


def test_credentials_are_required_and_checked(service: Running, issuer: Issuer):
    assert _ask(service, {}).status_code == 401
    assert _ask(service, {"X-API-Key": "nope"}).status_code == 401
    assert _ask(service, {"Authorization": "Basic abc"}).status_code == 401
    expired = issuer.token("user/*.read", exp=1_000_000)
    assert _ask(service, {"Authorization": f"Bearer {expired}"}).status_code == 401
    wrong_aud = issuer.token("user/*.read", aud="someone-else")
    assert _ask(service, {"Authorization": f"Bearer {wrong_aud}"}).status_code == 401
    forged = issuer.token("user/*.read")[:-4] + "AAAA"
    assert _ask(service, {"Authorization": f"Bearer {forged}"}).status_code == 401
    no_read = issuer.token("launch openid fhirUser")
    reply = _ask(service, {"Authorization": f"Bearer {no_read}"})
    assert reply.status_code == 403 and "scopes" in reply.json()["detail"]


@pytest.mark.parametrize("kind", ["api-key", "jwt"])
def test_a_patient_bound_credential_reads_only_its_patient_everywhere(
    service: Running, issuer: Issuer, kind: str
):
    headers = (
        BOUND
        if kind == "api-key"
        else {"Authorization": f"Bearer {issuer.token('patient/*.read', TOMMY_FRIESEN)}"}
    )
    assert _ask(service, headers).status_code == 200
    assert _ask(service, headers, patient=MARTINA_MURAZIK).status_code == 403
    stream = httpx.post(
        f"{service.url}/v1/ask/stream",
        json={"patient": MARTINA_MURAZIK, "question": "age?"},
        headers=headers,
    )
    assert stream.status_code == 403
    similar = httpx.get(f"{service.url}/v1/patients/{MARTINA_MURAZIK}/similar", headers=headers)
    assert similar.status_code == 403
    client = "bound" if kind == "api-key" else "ehr-app"
    denied = [r for r in _audit(service) if r["outcome"] == "denied" and r["client_id"] == client]
    assert {r["endpoint"] for r in denied if r["patient_id"] == MARTINA_MURAZIK} >= {
        "ask",
        "ask_stream",
        "similar",
    }


def test_user_and_v2_scopes(service: Running, issuer: Issuer):
    user = {"Authorization": f"Bearer {issuer.token('openid fhirUser user/*.read')}"}
    assert _ask(service, user, patient=MARTINA_MURAZIK).status_code == 200
    v2 = {"Authorization": f"Bearer {issuer.token('patient/*.rs', MARTINA_MURAZIK)}"}
    assert _ask(service, v2, patient=MARTINA_MURAZIK).status_code == 200
    assert _ask(service, v2).status_code == 403
    write_only = {"Authorization": f"Bearer {issuer.token('patient/*.cud', TOMMY_FRIESEN)}"}
    assert _ask(service, write_only).status_code == 403


@pytest.mark.parametrize("scope", [5, [{"resource": "Patient"}], ["patient/*.read", 3]])
def test_a_token_whose_scope_claim_is_not_scopes_is_401_not_500(
    service: Running, issuer: Issuer, scope: object
):
    """A scope claim that is a number, or a list holding something other than strings, used to
    fail inside the service (TypeError, 500)."""
    token = issuer.token(scope, TOMMY_FRIESEN)  # type: ignore[arg-type]
    reply = _ask(service, {"Authorization": f"Bearer {token}"})
    assert reply.status_code == 401 and "scope claim" in reply.json()["detail"]
    listed = issuer.token(["patient/*.read"], TOMMY_FRIESEN)  # type: ignore[arg-type]
    assert _ask(service, {"Authorization": f"Bearer {listed}"}).status_code == 200


def test_request_limits(service: Running):
    huge = httpx.post(
        f"{service.url}/v1/ask",
        content=b'{"patient": "x", "question": "' + b"a" * 100_000 + b'"}',
        headers={**EHR, "Content-Type": "application/json"},
    )
    assert huge.status_code == 413

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"patient": "x", "question": "'
        for _ in range(100):
            yield b"a" * 1000
        yield b'"}'

    chunked = httpx.post(
        f"{service.url}/v1/ask",
        content=chunks(),
        headers={**EHR, "Content-Type": "application/json"},
    )
    assert chunked.status_code == 413
    long_q = _ask(service, EHR, question="why? " * 1000)
    assert long_q.status_code == 422 and "characters" in long_q.text
    bad_thread = _ask(service, EHR, thread="../../etc")
    assert bad_thread.status_code == 422
    # a misspelt field is named, not ignored (the conversation would silently start anew)
    misspelt = _ask(service, EHR, thread_id="visit-1")
    assert misspelt.status_code == 422
    assert misspelt.json()["detail"][0]["loc"] == ["body", "thread_id"]
    missing = _ask(service, EHR, patient="no-such-patient")
    assert missing.status_code == 404


def test_threads_are_private_to_their_caller(service: Running, issuer: Issuer, tommy_json):
    a1cs = _a1cs(tommy_json)
    first = _ask(service, EHR, thread="t1")
    assert first.status_code == 200 and first.json()["thread_id"] == "t1"
    follow = _ask(service, EHR, thread="t1", question="and before that?").json()
    assert follow["citations"][0]["reference"] == f"Observation/{a1cs[1]['id']}"
    # another caller using the same thread id starts its own conversation
    other = {"Authorization": f"Bearer {issuer.token('user/*.read', sub='dr-no')}"}
    theirs = _ask(service, other, thread="t1", question="and before that?").json()
    assert f"Observation/{a1cs[1]['id']}" not in {c["reference"] for c in theirs["citations"]}


def test_no_phi_in_the_logs(service: Running, caplog: pytest.LogCaptureFixture):
    question = "What was his last HbA1c? (Tommy Friesen, secret-marker-42)"
    with caplog.at_level(logging.INFO):  # the default level
        assert _ask(service, EHR, question=question).status_code == 200
        httpx.get(f"{service.url}/v1/patients/{TOMMY_FRIESEN}/similar", headers=EHR)
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    text = "\n".join(r.getMessage() for r in server_side)
    assert '"method": "POST", "route": "/v1/ask", "status": 200' in text  # requests are logged
    for phi in ("secret-marker-42", "Tommy", "Friesen", TOMMY_FRIESEN, "HbA1c"):
        assert phi not in text


def test_the_audit_log_is_append_only(service: Running):
    _ask(service, EHR)
    engine = sa.create_engine(f"sqlite:///{service.settings.home / 'audit.db'}")
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_log SET outcome = 'x'"))
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_log"))
    engine.dispose()


def test_errors_name_what_was_sent_never_internals(
    service: Running, tmp_path: Path, demo_store: FhirStore, issuer: Issuer
):
    """Error bodies say what the caller sent and what went wrong: no store path, server URL,
    port or setting (the operator's log and terminal keep the full message)."""
    missing = _ask(service, EHR, patient="no-such-patient")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "Patient/no-such-patient was not found"
    home = str(service.settings.home)
    for internal in (home, "sqlite", "store.db", "/tmp", "file:"):
        assert internal not in missing.text
    # an upstream FHIR server that is down: 502 without its address
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    settings = api_settings(tmp_path / "home", demo_store, issuer)
    settings.fhir.url = f"http://127.0.0.1:{port}/secret-fhir"
    settings.fhir.http.max_retries = 0
    with Running(settings) as running:
        down = _ask(running, EHR)
    assert down.status_code == 502, down.text
    for internal in ("127.0.0.1", str(port), "secret-fhir", "http://"):
        assert internal not in down.text
    assert "could not be reached" in down.json()["detail"]


def test_a_value_json_cannot_encode_gets_422_not_500(service: Running):
    """A lone UTF-16 surrogate (``"\\ud800"``) is valid JSON but no valid string: 422 naming
    the field, not a 500 from echoing it back; the body repeats none of the caller's input."""
    body = b'{"patient": "\\ud800", "question": "secret-marker-7 \\udfff"}'
    reply = httpx.post(
        f"{service.url}/v1/ask",
        content=body,
        headers={**EHR, "content-type": "application/json"},
    )
    assert reply.status_code == 422, reply.text
    assert ["body", "patient"] in [e["loc"] for e in reply.json()["detail"]]
    assert "secret-marker-7" not in reply.text and "input" not in reply.text
    # the body is the documented error shape (a list of field problems was not a Problem)
    Problem.model_validate(reply.json())
    spec = httpx.get(f"{service.url}/openapi.json").json()
    documented = spec["paths"]["/v1/ask"]["post"]["responses"]["422"]["content"]
    assert documented["application/json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert "anyOf" in spec["components"]["schemas"]["Problem"]["properties"]["detail"]


def test_a_blank_question_is_the_callers_to_fix(service: Running):
    """A question of spaces only is 422 (what was sent), not a 500 (a failure of the service),
    over REST and in the stream's error event."""
    blank = _ask(service, EHR, question="   ")
    assert blank.status_code == 422, blank.text
    assert "the question is empty" in blank.json()["detail"]
    stream = httpx.post(
        f"{service.url}/v1/ask/stream",
        json={"patient": TOMMY_FRIESEN, "question": " \t "},
        headers=EHR,
        timeout=30,
    )
    assert '"status": 422' in stream.text, stream.text


def test_rate_limit_says_how_long_to_wait(tmp_path: Path, demo_store: FhirStore, issuer: Issuer):
    """429 with ``Retry-After`` in whole seconds, never 0: a wait of 0.1 s still says 1. Over
    HTTP a token comes back every second (slow enough that a loaded machine's requests still
    meet an empty bucket), and the header says 1."""
    from surfaces.http.limits import RateLimiter, retry_after

    assert [retry_after(w) for w in (0.0, 0.1, 0.99, 1.0, 1.01, 59.5)] == [
        "1", "1", "1", "1", "2", "60",
    ]  # fmt: skip
    limiter = RateLimiter(rate_per_minute=600, burst=1)
    assert limiter.take("a") == 0 and 0 < limiter.take("a") <= 0.1
    settings = api_settings(tmp_path / "home", demo_store, issuer, rate_burst=1)
    settings.serve.rate_per_minute = 60
    with Running(settings) as running:
        url = f"{running.url}/v1/patients/{TOMMY_FRIESEN}/similar"
        replies = [httpx.get(url, headers=EHR) for _ in range(3)]
    limited = [r for r in replies if r.status_code == 429]
    assert limited and all(r.headers["retry-after"] == "1" for r in limited)


def test_a_bound_key_reads_its_patient_by_identifier_too(
    service: Running, tommy_json, issuer: Issuer
):
    """A key bound to a patient may name that patient by identifier (system|value) as well as by
    id; another patient's identifier is refused (403), naming no one."""
    patient = next(r for r in tommy_json if r["resourceType"] == "Patient")
    ident = next(i for i in patient["identifier"] if i.get("system") and i.get("value"))
    key = f"{ident['system']}|{ident['value']}"
    assert _ask(service, EHR, patient=key).status_code == 200
    assert _ask(service, BOUND, patient=key).status_code == 200
    token = {"Authorization": f"Bearer {issuer.token('patient/*.read', TOMMY_FRIESEN)}"}
    assert _ask(service, token, patient=key).status_code == 200
    other = _ask(service, BOUND, patient=f"{ident['system']}|no-such-value")
    assert other.status_code == 403 and "another patient" in other.json()["detail"]
