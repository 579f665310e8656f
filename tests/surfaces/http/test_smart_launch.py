"""SMART App Launch 2.2 on the app page, over plain HTTP against the SMART EHR peer
(tests/peers/smart_ehr.py): the user named by a checked OpenID Connect id_token (``openid
fhirUser``) in the audit log, a confidential asymmetric client (``private_key_jwt``) beside the
public PKCE one, and v2 granular scopes limiting what the page reads."""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from tests.conftest import LoadedServer
from tests.peers.issuer import Issuer
from tests.peers.smart_ehr import SmartEhr
from tests.surfaces.http.conftest import Running, api_settings

GRANULAR = "launch openid fhirUser patient/Patient.rs patient/Observation.rs patient/Condition.rs"


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, demo_store: FhirStore, issuer: Issuer
) -> Iterator[Running]:
    settings = api_settings(tmp_path_factory.mktemp("launch-home"), demo_store, issuer)
    service = Running(settings)
    settings.serve.public_url = service.url
    with service:
        yield service


def _ehr(running: Running, sekmet: LoadedServer, **kw: Any) -> SmartEhr:
    ehr = SmartEhr(sekmet.base_url, f"{running.url}/callback", **kw)
    running.settings.serve.smart.issuers.append(ehr.fhir_url)
    return ehr


def _launch(running: Running, ehr: SmartEhr, pid: str) -> tuple[httpx.Client, httpx.Response]:
    """An EHR launch through to the callback's answer (303 to /app, or an error)."""
    client = httpx.Client(base_url=running.url, follow_redirects=False, timeout=120)
    start = client.get("/launch", params={"iss": ehr.fhir_url, "launch": ehr.launch(pid)})
    assert start.status_code == 302, start.text
    granted = httpx.get(start.headers["location"], follow_redirects=False)
    assert granted.status_code == 302, granted.text
    return client, client.get(granted.headers["location"])


def _ask(client: httpx.Client, question: str) -> dict[str, Any]:
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/app").text)
    assert csrf
    reply = client.post(
        "/app/ask", json={"question": question}, headers={"X-CSRF-Token": csrf.group(1)}
    )
    found = re.search(r"event: answer\r?\ndata: (.*)", reply.text)
    assert found, reply.text[-500:]
    data: dict[str, Any] = json.loads(found.group(1))
    return data


def _audit(running: Running) -> list[dict[str, Any]]:
    engine = sa.create_engine(f"sqlite:///{running.settings.home / 'audit.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM audit_log ORDER BY id")).mappings().all()
    engine.dispose()
    return [dict(r) for r in rows]


def test_the_audit_names_the_user_of_the_id_token(running: Running, sekmet: LoadedServer):
    pid = sekmet.patient_ids[TOMMY_FRIESEN]
    with _ehr(running, sekmet) as ehr:
        client = httpx.Client(base_url=running.url, follow_redirects=False)
        start = client.get("/launch", params={"iss": ehr.fhir_url, "launch": ehr.launch(pid)})
        query = parse_qs(urlsplit(start.headers["location"]).query)
        assert {"openid", "fhirUser"} <= set(query["scope"][0].split()) and query["nonce"][0]
        client, back = _launch(running, ehr, pid)
        assert back.status_code == 303, back.text
        _ask(client, "How old is he?")
    rows = [r for r in _audit(running) if r["endpoint"] == "app_ask"]
    assert rows and rows[-1]["subject"] == "Practitioner/dr-who"
    assert rows[-1]["patient_id"] == pid


def test_the_pages_request_log_lines_name_their_user_hashed(
    running: Running, sekmet: LoadedServer, caplog: pytest.LogCaptureFixture
):
    from surfaces.http.middleware import caller_hash

    pid = sekmet.patient_ids[TOMMY_FRIESEN]
    with _ehr(running, sekmet) as ehr, caplog.at_level(logging.INFO, logger="chartsight.api"):
        client, back = _launch(running, ehr, pid)
        assert back.status_code == 303, back.text
        _ask(client, "How old is he?")
    lines = [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "chartsight.api" and r.getMessage().startswith("{")
    ]
    page = [x for x in lines if x["route"] in ("/app", "/app/ask")]
    assert len(page) >= 2 and all(x["caller"] for x in page)  # was null for every page request
    assert len({x["caller"] for x in page}) == 1
    assert "dr-who" not in caplog.text  # hashed: the user is not written
    salt = running.settings.serve.ops.log_salt
    if salt is not None:
        assert page[0]["caller"] == caller_hash(
            salt.get_secret_value().encode(), "Practitioner/dr-who"
        )


def test_an_id_token_that_does_not_check_out_is_refused(running: Running, sekmet: LoadedServer):
    pid = sekmet.patient_ids[TOMMY_FRIESEN]
    with _ehr(running, sekmet) as ehr:
        # signed by a key the EHR does not publish at its jwks_uri
        ehr.id_token_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        client, back = _launch(running, ehr, pid)
        assert back.status_code == 502 and "id_token" in back.json()["detail"]
        assert client.cookies.get("chartsight_session") is None


def _pem(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_a_confidential_asymmetric_client_launches_with_its_key(
    running: Running, sekmet: LoadedServer, tmp_path: Path
):
    pid = sekmet.patient_ids[TOMMY_FRIESEN]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    smart = running.settings.serve.smart
    assert httpx.get(f"{running.url}/.well-known/jwks.json").status_code == 404  # none yet
    with _ehr(running, sekmet, client_public_key_pem=public) as ehr:
        # as a public client (no assertion) the EHR refuses the token request
        _, refused = _launch(running, ehr, pid)
        assert refused.status_code == 502
        try:
            smart.private_key_path, smart.key_id = _pem(key, tmp_path / "key.pem"), "cs-1"
            jwks = httpx.get(f"{running.url}/.well-known/jwks.json").json()
            (jwk,) = jwks["keys"]
            assert jwk["kid"] == "cs-1" and jwk["alg"] == "RS384" and "d" not in jwk
            assert (
                int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=="), "big")
                == key.public_key().public_numbers().n
            )
            client, back = _launch(running, ehr, pid)
            assert back.status_code == 303, back.text
            assert client.get("/app").status_code == 200
            # another key: the assertion does not verify, the launch fails
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            smart.private_key_path = _pem(other, tmp_path / "other.pem")
            client, wrong = _launch(running, ehr, pid)
            assert wrong.status_code == 502 and client.cookies.get("chartsight_session") is None
        finally:
            smart.private_key_path, smart.key_id = None, None


def test_granular_scopes_limit_the_page(running: Running, sekmet: LoadedServer):
    pid = sekmet.patient_ids[TOMMY_FRIESEN]
    smart = running.settings.serve.smart
    with _ehr(running, sekmet, scope=GRANULAR) as ehr:
        try:
            smart.scope = GRANULAR
            client, back = _launch(running, ehr, pid)
            assert back.status_code == 303, back.text
            answer = _ask(client, "What medications is he taking?")
        finally:
            smart.scope = "launch openid fhirUser patient/*.read"
        refs = [c["reference"] for c in answer["citations"]]
        assert not any(r.startswith("MedicationRequest/") for r in refs)
        assert any("SMART scopes" in w and "MedicationRequest" in w for w in answer["warnings"])
        # the page asked the EHR for no medication, and shows no similar cases (every type)
        asked = {p.split("/", 1)[0].split("?", 1)[0] for p in ehr.fhir_requests}
        assert asked <= {"Patient", "Observation", "Condition"}, asked
        assert not any("$everything" in p for p in ehr.fhir_requests)
        assert client.get("/app/similar").status_code == 403
