"""CDS Hooks 2.0 over real HTTP: discovery, patient-view from prefetch and from a real FHIR server
(SEKMET) with the request's token, the time budget, malformed requests, and patient scoping."""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy

from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.store import FhirStore
from tests.conftest import LoadedServer
from tests.peers.issuer import Issuer
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, Running, api_settings

EHR = {"X-API-Key": EHR_KEY}
URL = "/cds-services/chartsight-patient-view"


def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in resources],
    }


def _prefetch(tommy: list[dict[str, Any]]) -> dict[str, Any]:
    """What an EHR would send for the discovery's prefetch templates."""
    of = lambda t: [r for r in tommy if r["resourceType"] == t]  # noqa: E731
    return {
        "patient": of("Patient")[0],
        "conditions": _bundle(of("Condition")),
        "observations": _bundle(
            sorted(of("Observation"), key=lambda r: r.get("effectiveDateTime", ""))[-100:]
        ),
        "medications": _bundle([r for r in of("MedicationRequest") if r["status"] == "active"]),
        "allergies": _bundle(
            [
                r
                for r in of("AllergyIntolerance")
                if r.get("clinicalStatus", {}).get("coding", [{}])[0].get("code") == "active"
            ]
        ),
    }


def _hook(patient: str = TOMMY_FRIESEN, **extra: Any) -> dict[str, Any]:
    return {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/dr-who", "patientId": patient},
        **extra,
    }


def test_discovery(service: Running):
    reply = httpx.get(f"{service.url}/cds-services")
    assert reply.status_code == 200
    (svc,) = reply.json()["services"]
    assert svc["hook"] == "patient-view" and svc["id"] == "chartsight-patient-view"
    assert set(svc["prefetch"]) == {
        "patient", "conditions", "observations", "medications", "allergies",
    }  # fmt: skip
    assert svc["prefetch"]["patient"] == "Patient/{{context.patientId}}"


def _cited(detail: str) -> list[str]:
    """The references the detail's bullets cite (each bullet ends in `` `Type/id` ``)."""
    return [
        line.rsplit("`", 2)[1]
        for line in detail.splitlines()
        if line.startswith("- ") and line.endswith("`")
    ]


def test_patient_view_from_prefetch_gives_a_cited_card(service: Running, tommy_json):
    prefetch = _prefetch(tommy_json)
    # a medication only the prefetch has: citing it proves the card was made from the prefetch
    prefetch["medications"]["entry"][0]["resource"] = {
        **prefetch["medications"]["entry"][0]["resource"],
        "id": "only-in-prefetch",
    }
    reply = httpx.post(
        f"{service.url}{URL}", json=_hook(prefetch=prefetch), headers=EHR, timeout=30
    )
    assert reply.status_code == 200, reply.text
    (card,) = reply.json()["cards"]
    assert uuid.UUID(card["uuid"]).version == 4
    # Tommy's newest disorder and his one abnormal laboratory result (HbA1c 6.277 %), whole
    assert len(card["summary"]) <= 140
    assert card["summary"].startswith("Active: Chronic congestive heart failure;")
    assert "Hemoglobin A1c/Hemoglobin.total in Blood 6.277 % (high)" in card["summary"]
    assert card["indicator"] == "info"
    assert card["source"] == {
        "label": "ChartSight", "url": "https://chartsight.example/model-card"
    }  # fmt: skip
    detail = card["detail"]
    for heading in ("**Active problems**", "**Abnormal latest results**", "**Active medications**"):
        assert heading in detail
    ids = {f"{r['resourceType']}/{r['id']}" for r in tommy_json} | {
        "MedicationRequest/only-in-prefetch"
    }
    cited = _cited(detail)
    bullets = [line for line in detail.splitlines() if line.startswith("- ")]
    assert len(cited) == len(bullets) and set(cited) <= ids  # a citation on every bullet
    active = {
        f"MedicationRequest/{r['id']}"
        for r in tommy_json
        if r["resourceType"] == "MedicationRequest" and r["status"] == "active"
    }
    assert active & set(cited) and "MedicationRequest/only-in-prefetch" in cited
    (link,) = card["links"]
    assert link["type"] == "smart" and link["url"] == "https://chartsight.example/launch"
    assert f"patient={TOMMY_FRIESEN}" in link["appContext"]


def test_patient_view_reads_the_fhir_server_with_the_requests_token(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, sekmet: LoadedServer
):
    settings = api_settings(
        tmp_path / "home", demo_store, issuer, cds_fhir_servers=[sekmet.base_url + "/"]
    )
    pid = sekmet.patient_ids[TOMMY_FRIESEN]
    hook = _hook(
        pid,
        fhirServer=sekmet.base_url,
        fhirAuthorization={
            "access_token": "opaque-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/*.read",
            "subject": "chartsight",
            "patient": pid,
        },
    )
    with Running(settings) as running:
        reply = httpx.post(f"{running.url}{URL}", json=hook, headers=EHR, timeout=60)
    assert reply.status_code == 200, reply.text
    (card,) = reply.json()["cards"]
    # SEKMET's copy of Tommy: its own ids, read with the request's token
    assert card["summary"].startswith("Active: Chronic congestive heart failure;")
    cited = _cited(card["detail"])
    assert any(c.startswith("Condition/") for c in cited)
    assert any(c.startswith("MedicationRequest/") for c in cited)


def test_an_unreachable_fhir_server_is_412_at_once_not_a_pending_card(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer
):
    """No prefetch and a listed fhirServer that refuses connections: the spec's 412 Precondition
    Failed, naming the FHIR server as the cause, well inside the card's 2 s budget (no retries),
    rather than a card saying the summary is still being read."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        base = f"http://127.0.0.1:{port}/fhir"
        settings = api_settings(
            tmp_path / "home", demo_store, issuer, cds_fhir_servers=[base], cds_budget_s=2.0
        )
        with Running(settings) as running:
            started = time.monotonic()
            reply = httpx.post(
                f"{running.url}{URL}", json=_hook(fhirServer=base, fhirAuthorization=_token()),
                headers=EHR, timeout=30,
            )  # fmt: skip
            took = time.monotonic() - started
    assert reply.status_code == 412, reply.text
    detail = reply.json()["detail"]
    assert "FHIR server named in fhirServer could not be reached" in detail
    assert "still reading" not in reply.text and str(port) not in detail
    assert took < 2.0


@pytest.mark.parametrize(
    "spelling",
    [
        "http://127.0.0.1:{port}/fhir",
        "http://localhost:{port}/fhir",
        "http://user:pw@127.0.0.1:{port}/fhir",
        "http://127.0.0.1:{port}/fhir/../admin",
    ],
)
def test_a_fhir_server_not_configured_is_refused_without_a_connection(
    service: Running, spelling: str
):
    """SSRF: a CDS request cannot make the service fetch a URL of its choosing (nor send its
    fhirAuthorization token there): 400, and the listener behind that URL sees no connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        hook = _hook(
            fhirServer=spelling.format(port=port),
            fhirAuthorization={
                "access_token": "secret-token", "token_type": "Bearer", "expires_in": 60,
                "scope": "patient/*.read", "subject": "x", "patient": TOMMY_FRIESEN,
            },
        )  # fmt: skip
        reply = httpx.post(f"{service.url}{URL}", json=hook, headers=EHR)
        assert reply.status_code == 400, reply.text
        assert "not a FHIR server this service is configured to read" in reply.json()["detail"]
        assert str(port) not in reply.text and "secret-token" not in reply.text
        assert "serve." not in reply.text  # the caller is told what it sent, not our settings
        with pytest.raises(TimeoutError):
            listener.accept()


def _token() -> dict[str, Any]:
    return {
        "access_token": "secret-token", "token_type": "Bearer", "expires_in": 60,
        "scope": "patient/*.read", "subject": "x", "patient": TOMMY_FRIESEN,
    }  # fmt: skip


def test_a_configured_fhir_server_with_a_query_or_fragment_is_refused(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer
):
    """The caller's spelling of fhirServer is the base every request is built on: a listed server
    with ``?…`` or ``#…`` appended would send each search to the base path with a query of the
    caller's choosing (``/fhir?x=/Patient/…``). 400, and no connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        base = f"http://127.0.0.1:{listener.getsockname()[1]}/fhir"
        settings = api_settings(tmp_path / "home", demo_store, issuer, cds_fhir_servers=[base])
        with Running(settings) as running:
            for spelling in (f"{base}?_x=@127.0.0.1:9", f"{base}#@127.0.0.1:9"):
                hook = _hook(fhirServer=spelling, fhirAuthorization=_token())
                reply = httpx.post(f"{running.url}{URL}", json=hook, headers=EHR)
                assert reply.status_code == 400, (spelling, reply.text)
                assert "not a FHIR server" in reply.json()["detail"]
        with pytest.raises(TimeoutError):
            listener.accept()


def test_a_configured_fhir_server_cannot_redirect_the_service_elsewhere(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer
):
    """SSRF through a listed server: a 3xx from it to another address is not followed (the
    request would reach an address neither the operator nor the EHR listed). The card request
    fails with 502 and the redirect's target sees no connection."""
    with socket.socket() as target:
        target.bind(("127.0.0.1", 0))
        target.listen(8)
        target.settimeout(0.5)
        elsewhere = f"http://127.0.0.1:{target.getsockname()[1]}/internal"

        class Redirect(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(302)
                self.send_header("Location", elsewhere + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        redirector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        threading.Thread(target=redirector.serve_forever, daemon=True).start()
        try:
            base = f"http://127.0.0.1:{redirector.server_address[1]}/fhir"
            settings = api_settings(tmp_path / "home", demo_store, issuer, cds_fhir_servers=[base])
            with Running(settings) as running:
                hook = _hook(fhirServer=base, fhirAuthorization=_token())
                reply = httpx.post(f"{running.url}{URL}", json=hook, headers=EHR, timeout=60)
        finally:
            redirector.shutdown()
            redirector.server_close()
        assert reply.status_code == 412, reply.text  # CDS Hooks 2.0: the data could not be had
        assert "answered HTTP 302" in reply.json()["detail"]
        assert str(target.getsockname()[1]) not in reply.text
        with pytest.raises(TimeoutError):
            target.accept()


def test_a_slow_answer_gets_an_information_card_in_budget(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, tommy_json
):
    settings = api_settings(tmp_path / "home", demo_store, issuer, cds_budget_s=0.01)
    with Running(settings) as running:
        reply = httpx.post(
            f"{running.url}{URL}", json=_hook(prefetch=_prefetch(tommy_json)), headers=EHR
        )
    assert reply.status_code == 200
    (card,) = reply.json()["cards"]
    assert card["indicator"] == "info" and "still reading" in card["summary"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h.pop("hookInstance"), "hookInstance"),
        (lambda h: h.update(hookInstance="not-a-uuid"), "hookInstance"),
        (lambda h: h["context"].pop("patientId"), "patientId"),
        (lambda h: h.update(hook="order-select"), "patient-view"),
        (lambda h: h.update(fhirServer="not a url"), "fhirServer"),
        (lambda h: h.update(fhirAuthorization={"access_token": "x"}), "fhirAuthorization"),
    ],
)
def test_malformed_hook_requests_get_400(service: Running, change: Any, message: str):
    hook = _hook()
    change(hook)
    reply = httpx.post(f"{service.url}{URL}", json=hook, headers=EHR)
    assert reply.status_code == 400 and message in reply.json()["detail"]
    for body in (b"{", b"[" * 100_000 + b"]" * 100_000):  # not JSON; nested past the parser
        not_json = httpx.post(
            f"{service.url}{URL}", content=body, headers={**EHR, "content-type": "application/json"}
        )
        assert not_json.status_code == 400, not_json.text
        assert "recursion" not in not_json.text


def test_a_request_without_data_is_412(service: Running):
    """Neither prefetch nor fhirServer: a well-formed request the service cannot answer, which
    CDS Hooks 2.0 answers with 412 Precondition Failed."""
    reply = httpx.post(f"{service.url}{URL}", json=_hook(), headers=EHR)
    assert reply.status_code == 412 and "no data" in reply.json()["detail"]


def test_the_cds_service_is_patient_scoped(service: Running, tommy_json):
    bound = {"X-API-Key": BOUND_KEY}
    other = _hook(MARTINA_MURAZIK, prefetch=_prefetch(tommy_json))
    assert httpx.post(f"{service.url}{URL}", json=other, headers=bound).status_code == 403
    assert httpx.post(f"{service.url}{URL}", json=_hook()).status_code == 401
    mismatch = _hook(
        fhirServer="http://127.0.0.1:9/fhir",
        fhirAuthorization={
            "access_token": "t", "token_type": "Bearer", "expires_in": 60,
            "scope": "patient/*.read", "subject": "x", "patient": MARTINA_MURAZIK,
        },
    )  # fmt: skip
    assert httpx.post(f"{service.url}{URL}", json=mismatch, headers=EHR).status_code == 403


def test_the_card_leaves_out_voided_and_refuted_data(service: Running, tommy_json):
    """An EHR's prefetch with an entered-in-error diagnosis, a refuted one and an entered-in-error
    medication: the card names none of them as the patient's."""
    prefetch = _prefetch(tommy_json)
    subject = {"reference": f"Patient/{TOMMY_FRIESEN}"}
    prefetch["conditions"]["entry"] += [
        {"resource": {"resourceType": "Condition", "id": "voided-dx", "subject": subject,
                      "code": {"text": "Lung cancer"}, "recordedDate": "2021-01-01",
                      "verificationStatus": {"coding": [{"code": "entered-in-error"}]}}},
        {"resource": {"resourceType": "Condition", "id": "refuted-dx", "subject": subject,
                      "code": {"text": "Tuberculosis"}, "recordedDate": "2021-01-02",
                      "clinicalStatus": {"coding": [{"code": "active"}]},
                      "verificationStatus": {"coding": [{"code": "refuted"}]}}},
    ]  # fmt: skip
    prefetch["medications"]["entry"].append(
        {"resource": {"resourceType": "MedicationRequest", "id": "voided-rx", "subject": subject,
                      "status": "entered-in-error", "intent": "order", "authoredOn": "2021-01-01",
                      "medicationCodeableConcept": {"text": "Warfarin 5 mg"}}}
    )  # fmt: skip
    reply = httpx.post(
        f"{service.url}{URL}", json=_hook(prefetch=prefetch), headers=EHR, timeout=30
    )
    assert reply.status_code == 200, reply.text
    (card,) = reply.json()["cards"]
    shown = card["summary"] + card["detail"]
    for gone in ("Lung cancer", "Tuberculosis", "Warfarin", "voided-dx", "refuted-dx", "voided-rx"):
        assert gone not in shown


def test_record_text_in_the_card_is_literal_markdown(service: Running, tommy_json):
    """The card's detail is markdown the EHR renders: text from the record (a name, a coding's
    display) must not become an image fetched from another host, a link or HTML."""
    hostile = (
        "Hypertension ![x](https://evil.example/beacon.png) [open](javascript:alert(1)) "
        "<img src=x onerror=alert(2)>\n# Heading"
    )
    prefetch = _prefetch(tommy_json)
    prefetch["patient"] = {**prefetch["patient"], "name": [{"text": hostile}]}
    prefetch["conditions"]["entry"].append(
        {"resource": {"resourceType": "Condition", "id": "hostile-dx",
                      "subject": {"reference": f"Patient/{TOMMY_FRIESEN}"},
                      "clinicalStatus": {"coding": [{"code": "active"}]},
                      "code": {"coding": [{"system": "http://snomed.info/sct",
                                           "code": "38341003", "display": hostile}]},
                      "recordedDate": "2026-01-01"}}
    )  # fmt: skip
    reply = httpx.post(
        f"{service.url}{URL}", json=_hook(prefetch=prefetch), headers=EHR, timeout=30
    )
    assert reply.status_code == 200, reply.text
    detail = reply.json()["cards"][0]["detail"]
    assert "evil.example" in detail  # the text is shown, as text
    unescaped = re.sub(r"\\.", "", detail)  # the markup left once escaped characters are out
    for markup in ("![", "](", "<img", "\n# Heading"):
        assert markup not in unescaped, markup
    assert r"\!\[x\]\(https://evil.example/beacon.png\)" in detail


def test_a_prefetch_with_another_patients_data_or_a_broken_bundle(service: Running, tommy_json):
    """A prefetch is the EHR's, not always right: a Condition in another patient's compartment
    (a search run without the patient) is not put on this patient's card, and a Bundle whose
    ``entry`` is not a list is one invalid item, not a 500."""
    prefetch = _prefetch(tommy_json)
    prefetch["conditions"]["entry"].append(
        {"resource": {"resourceType": "Condition", "id": "elsewhere-dx",
                      "subject": {"reference": f"Patient/{MARTINA_MURAZIK}"},
                      "clinicalStatus": {"coding": [{"code": "active"}]},
                      "code": {"text": "Marker-condition of another chart"},
                      "recordedDate": "2026-01-01"}}
    )  # fmt: skip
    prefetch["observations"] = {"resourceType": "Bundle", "type": "searchset", "entry": "x"}
    reply = httpx.post(
        f"{service.url}{URL}", json=_hook(prefetch=prefetch), headers=EHR, timeout=30
    )
    assert reply.status_code == 200, reply.text
    detail = reply.json()["cards"][0]["detail"]
    assert "Marker-condition" not in detail and "Condition/elsewhere-dx]" not in detail
    assert "`Condition/" in detail  # Tommy's own conditions are still there


# --- feedback (CDS Hooks 2.0 "Feedback") -----------------------------------------------------------


def _card(service: Running, tommy_json: list[dict[str, Any]]) -> dict[str, Any]:
    reply = httpx.post(
        f"{service.url}{URL}", json=_hook(prefetch=_prefetch(tommy_json)), headers=EHR, timeout=30
    )
    assert reply.status_code == 200, reply.text
    card: dict[str, Any] = reply.json()["cards"][0]
    return card


def _audit_rows(service: Running, endpoint: str) -> list[dict[str, Any]]:
    engine = sqlalchemy.create_engine(f"sqlite:///{service.settings.home / 'audit.db'}")
    with engine.connect() as conn:
        rows = conn.execute(
            sqlalchemy.text("SELECT * FROM audit_log WHERE endpoint = :e ORDER BY id"),
            {"e": endpoint},
        )
        out = [dict(r._mapping) for r in rows]
    engine.dispose()
    return out


def test_feedback_on_a_card_is_stored_audited_and_queryable(service: Running, tommy_json):
    card = _card(service, tommy_json)
    overridden = {
        "card": card["uuid"],
        "outcome": "overridden",
        "overrideReason": {
            "reason": {"system": "http://example.org/override", "code": "not-relevant",
                       "display": "Not relevant to this visit"},
            "userComment": "Seen by cardiology yesterday",
        },
        "outcomeTimestamp": "2026-11-30T03:00:00Z",
    }  # fmt: skip
    accepted = {
        "card": card["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": "s-1"}],
        "outcomeTimestamp": "2026-11-30T03:01:00+00:00",
    }  # fmt: skip
    reply = httpx.post(
        f"{service.url}{URL}/feedback", json={"feedback": [overridden, accepted]}, headers=EHR
    )
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"recorded": 2}

    listed = httpx.get(
        f"{service.url}{URL}/feedback", params={"card": card["uuid"]}, headers=EHR
    ).json()["feedback"]
    assert [f["outcome"] for f in listed] == ["accepted", "overridden"]  # newest first
    (stored,) = [f for f in listed if f["outcome"] == "overridden"]
    assert stored["overrideReason"] == overridden["overrideReason"]
    assert stored["patient"] == TOMMY_FRIESEN and stored["client"] == "ehr"
    assert stored["outcomeTimestamp"].startswith("2026-11-30T03:00:00")
    only = httpx.get(
        f"{service.url}{URL}/feedback",
        params={"card": card["uuid"], "outcome": "accepted"},
        headers=EHR,
    ).json()["feedback"]
    assert [f["acceptedSuggestions"] for f in only] == [[{"id": "s-1"}]]

    audited = [
        r for r in _audit_rows(service, "cds:feedback") if card["uuid"] in (r["detail"] or "")
    ]
    assert sorted(r["outcome"] for r in audited) == ["accepted", "overridden"]
    assert any("http://example.org/override|not-relevant" in r["detail"] for r in audited)
    assert all(r["patient_id"] == TOMMY_FRIESEN and r["client_id"] == "ehr" for r in audited)
    issued = [
        r for r in _audit_rows(service, "cds-patient-view") if card["uuid"] in (r["detail"] or "")
    ]
    assert len(issued) == 1 and issued[0]["outcome"] == "answered"


def test_feedback_on_a_card_never_issued_is_404_and_nothing_is_stored(service: Running, tommy_json):
    card = _card(service, tommy_json)
    unknown = str(uuid.uuid4())
    batch = [
        {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-30T03:00:00Z"},
        {"card": unknown, "outcome": "overridden", "outcomeTimestamp": "2026-11-30T03:00:00Z"},
    ]
    reply = httpx.post(f"{service.url}{URL}/feedback", json={"feedback": batch}, headers=EHR)
    assert reply.status_code == 404 and unknown in reply.json()["detail"]
    listed = httpx.get(
        f"{service.url}{URL}/feedback", params={"card": card["uuid"]}, headers=EHR
    ).json()["feedback"]
    assert listed == []  # the known card's item was not stored either


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"outcome": "accepted"}, "acceptedSuggestions"),
        ({"outcome": "ignored"}, "outcome"),
        ({"outcomeTimestamp": "yesterday"}, "outcomeTimestamp"),
        ({"card": None}, "card"),
    ],
)
def test_malformed_feedback_is_400(service: Running, tommy_json, item: Any, message: str):
    card = _card(service, tommy_json)
    good = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-30T03:00Z"}
    reply = httpx.post(
        f"{service.url}{URL}/feedback", json={"feedback": [{**good, **item}]}, headers=EHR
    )
    assert reply.status_code == 400, reply.text
    assert message in reply.json()["detail"]


def test_feedback_is_the_issuing_clients_and_reading_it_needs_user_or_system_scope(
    service: Running, tommy_json
):
    """A card issued to the EHR's key: another client (a key bound to the same patient) cannot
    post feedback on it (404, as for a card never issued), nor list feedback (403: it spans
    patients); without credentials, 401."""
    card = _card(service, tommy_json)
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-30T03:00Z"}
    bound = {"X-API-Key": BOUND_KEY}
    posted = httpx.post(f"{service.url}{URL}/feedback", json={"feedback": [item]}, headers=bound)
    assert posted.status_code == 404, posted.text
    assert httpx.get(f"{service.url}{URL}/feedback", headers=bound).status_code == 403
    assert httpx.post(f"{service.url}{URL}/feedback", json={"feedback": [item]}).status_code == 401


def test_issued_cards_and_feedback_are_append_only(service: Running, tommy_json):
    card = _card(service, tommy_json)
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-30T03:00Z"}
    assert (
        httpx.post(
            f"{service.url}{URL}/feedback", json={"feedback": [item]}, headers=EHR
        ).status_code
        == 200
    )
    engine = sqlalchemy.create_engine(f"sqlite:///{service.settings.home / 'cds.db'}")
    try:
        for statement in (
            "UPDATE cds_feedback SET outcome = 'accepted'",
            "DELETE FROM cds_feedback",
            "DELETE FROM cds_card",
        ):
            with (
                pytest.raises(sqlalchemy.exc.DatabaseError, match="append-only"),
                engine.begin() as conn,
            ):
                conn.execute(sqlalchemy.text(statement))
    finally:
        engine.dispose()
