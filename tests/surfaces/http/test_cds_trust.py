"""Trusting CDS Clients (CDS Hooks 2.0) over real HTTP: an EHR's RSA key with its JWK Set served
over HTTP, JWTs signed with it on each call, and each check the service makes (iss, kid and key,
jku, signature, aud, exp and lifetime, jti replay across workers, tenant, alg)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.settings import CdsClient, CdsSettings
from tests.peers.asgi import ThreadedServer
from tests.peers.issuer import Issuer
from tests.surfaces.http.conftest import EHR_KEY, Running, api_settings
from tests.surfaces.http.test_cds_hooks import URL, _hook, _prefetch

PUBLIC = "https://chartsight.example"  # api_settings' serve.public_url: the URL EHRs call
SERVICE_AUD = f"{PUBLIC}{URL}"
TENANT = "hospital-north"


class CountingJwks:
    """A JWK Set served over HTTP that counts its fetches: another key pair, as an attacker's
    ``jku`` would name, or a second URL a client is allowed to name."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "other-key"
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS384")
        self.fetches = 0

        def jwks(request: Request) -> JSONResponse:
            self.fetches += 1
            return JSONResponse({"keys": [jwk]})

        self.http = ThreadedServer(Starlette(routes=[Route("/jwks", jwks)]))

    @property
    def url(self) -> str:
        return f"{self.http.url}/jwks"


def sign(
    ehr: Issuer,
    aud: str = SERVICE_AUD,
    *,
    key: Any = None,
    headers: dict[str, Any] | None = None,
    algorithm: str = "RS384",
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    """A CDS Client JWT as the spec's example has it (iss, aud, exp 60 s on, iat, jti, tenant),
    signed with the EHR's key (``key`` to use another) under its ``kid``."""
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": ehr.url, "sub": "ehr-cds-client", "aud": aud, "exp": now + 60, "iat": now,
        "jti": str(uuid.uuid4()), "tenant": TENANT, **claims,
    }  # fmt: skip
    for name in drop:
        body.pop(name)
    return jwt.encode(
        body,
        key if key is not None else ehr.key,
        algorithm=algorithm,
        headers={"kid": ehr.kid, "typ": "JWT", **(headers or {})},
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def ehr() -> Iterator[Issuer]:
    with Issuer() as server:  # the EHR: its own key pair and JWK Set URL
        yield server


@pytest.fixture(scope="module")
def rogue() -> Iterator[CountingJwks]:
    jwks = CountingJwks()
    jwks.http.start()
    yield jwks
    jwks.http.stop()


def _settings(home: Path, store: FhirStore, issuer: Issuer, ehr: Issuer, **cds: Any) -> Any:
    client = CdsClient(
        iss=ehr.url, jwks_url=ehr.jwks_url, tenants=[TENANT], client_id="north-ehr",
        **cds.pop("client", {}),
    )  # fmt: skip
    return api_settings(
        home, store, issuer, rate_burst=10_000, cds=CdsSettings(clients=[client], **cds)
    )


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory, demo_store: FhirStore, issuer: Issuer, ehr: Issuer
) -> Iterator[Running]:
    """The service trusting the EHR, accepting only signed calls."""
    home = tmp_path_factory.mktemp("cds-signed")
    with Running(_settings(home, demo_store, issuer, ehr, signed_only=True)) as running:
        yield running


def _call(running: Running, token: str, tommy_json: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(
        f"{running.url}{URL}", json=_hook(prefetch=_prefetch(tommy_json)), headers=bearer(token),
        timeout=30,
    )  # fmt: skip


def test_a_signed_call_gets_a_card_and_its_jti_only_once(signed: Running, ehr: Issuer, tommy_json):
    token = sign(ehr)
    first = _call(signed, token, tommy_json)
    assert first.status_code == 200, first.text
    (card,) = first.json()["cards"]
    assert card["summary"].startswith("Active: ")
    replay = _call(signed, token, tommy_json)
    assert replay.status_code == 401
    assert "jti was used before" in replay.json()["detail"]


def test_a_jti_is_refused_by_another_worker_sharing_the_database(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, ehr: Issuer, tommy_json
):
    """Two service processes' worth of state (two apps) on one CDS database, as workers behind a
    load balancer: a JWT used on one is a replay on the other; and the record outlives a
    restart."""
    url = f"sqlite:///{tmp_path / 'shared-cds.db'}"
    token = sign(ehr)
    with Running(_settings(tmp_path / "a", demo_store, issuer, ehr, database_url=url)) as a:
        assert _call(a, token, tommy_json).status_code == 200
    with Running(_settings(tmp_path / "b", demo_store, issuer, ehr, database_url=url)) as b:
        again = _call(b, token, tommy_json)
    assert again.status_code == 401 and "used before" in again.json()["detail"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ehr, rogue: sign(ehr, iss="https://other-ehr.example"), "not a trusted CDS client"),
        (lambda ehr, rogue: sign(ehr, aud=f"{PUBLIC}/cds-services/another"), "aud is not the URL"),
        (lambda ehr, rogue: sign(ehr, aud=f"https://elsewhere.example{URL}"), "aud is not the URL"),
        (
            lambda ehr, rogue: sign(ehr, iat=int(time.time()) - 300, exp=int(time.time()) - 100),
            "expired",
        ),
        (lambda ehr, rogue: sign(ehr, exp=int(time.time()) + 3600), "lives longer than 300 s"),
        (lambda ehr, rogue: sign(ehr, drop=("jti",)), "no jti claim"),
        (lambda ehr, rogue: sign(ehr, drop=("exp",)), "no exp claim"),
        (lambda ehr, rogue: sign(ehr, drop=("aud",)), "no aud claim"),
        (lambda ehr, rogue: sign(ehr, key=rogue.key), "signature does not verify"),
        (lambda ehr, rogue: sign(ehr, headers={"kid": "unknown-kid"}), "no key 'unknown-kid'"),
        (lambda ehr, rogue: sign(ehr, tenant="hospital-south"), "tenant 'hospital-south'"),
        (
            lambda ehr, rogue: sign(ehr, key="a-shared-secret-of-32-bytes-length", algorithm="HS256"),
            "alg 'HS256' is not accepted",
        ),
        (lambda ehr, rogue: "not-a-jwt", "not a JWT"),
    ],
    ids=[
        "wrong-iss", "wrong-aud", "aud-on-another-host", "expired", "long-lived", "no-jti",
        "no-exp", "no-aud", "bad-signature", "unknown-kid", "wrong-tenant", "hmac", "garbage",
    ],
)  # fmt: skip
def test_a_jwt_failing_a_check_is_401_naming_it(
    signed: Running, ehr: Issuer, rogue: CountingJwks, tommy_json, make: Any, message: str
):
    reply = _call(signed, make(ehr, rogue), tommy_json)
    assert reply.status_code == 401, reply.text
    assert message in reply.json()["detail"], reply.json()
    assert reply.headers["www-authenticate"] == "Bearer"
    assert "Traceback" not in reply.text and "serve." not in reply.text


def test_a_jku_not_configured_is_refused_without_fetching_it(
    signed: Running, ehr: Issuer, rogue: CountingJwks, tommy_json
):
    """An attacker signs with its own key and points ``jku`` at its own JWK Set: refused, and
    the service never fetches that URL (the counter stays at zero)."""
    before = rogue.fetches
    token = sign(ehr, key=rogue.key, headers={"kid": rogue.kid, "jku": rogue.url})
    reply = _call(signed, token, tommy_json)
    assert reply.status_code == 401
    assert "jku" in reply.json()["detail"] and "was not fetched" in reply.json()["detail"]
    # the client's own JWK Set URL with a query of the sender's choosing is another URL
    spelled = sign(ehr, headers={"jku": f"{ehr.jwks_url}?from={rogue.url}"})
    assert _call(signed, spelled, tommy_json).status_code == 401
    assert rogue.fetches == before


def test_a_jku_the_client_may_name_is_used(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, ehr: Issuer, tommy_json
):
    """A key set at a second URL listed in the client's ``jku``: a JWT naming it is verified with
    its key, fetched from there."""
    second = CountingJwks()
    second.http.start()
    try:
        settings = _settings(
            tmp_path / "home", demo_store, issuer, ehr, client={"jku": [second.url]}
        )
        token = sign(ehr, key=second.key, headers={"kid": second.kid, "jku": second.url})
        with Running(settings) as running:
            reply = _call(running, token, tommy_json)
    finally:
        second.http.stop()
    assert reply.status_code == 200, reply.text
    assert second.fetches == 1


def test_signed_only_refuses_other_credentials_and_guards_discovery(signed: Running, ehr: Issuer):
    api_key = httpx.post(
        f"{signed.url}{URL}", json=_hook(), headers={"X-API-Key": EHR_KEY}, timeout=30
    )
    assert api_key.status_code == 401
    assert "accepts only JWTs signed by a trusted CDS client" in api_key.json()["detail"]
    assert "serve." not in api_key.text  # no setting names in what a caller reads
    assert httpx.get(f"{signed.url}/cds-services").status_code == 401
    wrong = httpx.get(f"{signed.url}/cds-services", headers=bearer(sign(ehr)))
    assert wrong.status_code == 401 and "aud" in wrong.json()["detail"]  # the service's URL
    ok = httpx.get(
        f"{signed.url}/cds-services", headers=bearer(sign(ehr, aud=f"{PUBLIC}/cds-services"))
    )
    assert ok.status_code == 200 and ok.json()["services"][0]["id"] == "chartsight-patient-view"


def test_signed_feedback_from_the_client_the_card_was_issued_to(
    signed: Running, ehr: Issuer, tommy_json
):
    card = _call(signed, sign(ehr), tommy_json).json()["cards"][0]
    item = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-11-30T03:00Z"}
    reply = httpx.post(
        f"{signed.url}{URL}/feedback", json={"feedback": [item]},
        headers=bearer(sign(ehr, aud=f"{SERVICE_AUD}/feedback")),
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    listed = httpx.get(
        f"{signed.url}{URL}/feedback", params={"card": card["uuid"]},
        headers=bearer(sign(ehr, aud=f"{SERVICE_AUD}/feedback")),
    )  # fmt: skip
    assert listed.status_code == 200, listed.text
    (stored,) = listed.json()["feedback"]
    assert stored["client"] == "north-ehr" and stored["patient"] == TOMMY_FRIESEN


def test_without_signed_only_api_keys_still_work_beside_signed_calls(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, ehr: Issuer, tommy_json
):
    with Running(_settings(tmp_path / "home", demo_store, issuer, ehr)) as running:
        by_key = httpx.post(
            f"{running.url}{URL}", json=_hook(prefetch=_prefetch(tommy_json)),
            headers={"X-API-Key": EHR_KEY}, timeout=30,
        )  # fmt: skip
        signed_ok = _call(running, sign(ehr), tommy_json)
        signed_bad = _call(running, sign(ehr, aud="https://elsewhere.example"), tommy_json)
        open_discovery = httpx.get(f"{running.url}/cds-services")
    assert by_key.status_code == 200 and signed_ok.status_code == 200
    assert signed_bad.status_code == 401 and "aud" in signed_bad.json()["detail"]
    assert open_discovery.status_code == 200


def test_same_url_ignores_spelling_but_not_a_query_or_userinfo():
    from surfaces.http.cds_trust import same_url

    assert same_url("HTTPS://EHR.example:443/jwks/", "https://ehr.example/jwks")
    for other in (
        "https://ehr.example/jwks?x=1",
        "https://ehr.example/jwks#k",
        "https://user@ehr.example/jwks",
        "https://ehr.example:8443/jwks",
        "https://ehr.example/jwks/other",
    ):
        assert not same_url(other, "https://ehr.example/jwks"), other


def test_feedback_only_from_the_tenant_the_card_was_issued_to(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, ehr: Issuer, tommy_json
):
    """A CDS client serving several tenants (hospitals), none listed: a card issued to one
    tenant used to take feedback signed for another tenant of the same client, and each tenant
    read every tenant's feedback."""
    client = CdsClient(iss=ehr.url, jwks_url=ehr.jwks_url, client_id="shared-ehr")
    settings = api_settings(
        tmp_path / "home", demo_store, issuer, rate_burst=10_000,
        cds=CdsSettings(clients=[client], signed_only=True),
    )  # fmt: skip
    with Running(settings) as running:
        card = _call(running, sign(ehr, tenant="hospital-north"), tommy_json).json()["cards"][0]
        item = {
            "card": card["uuid"],
            "outcome": "overridden",
            "outcomeTimestamp": "2026-11-30T03:00Z",
        }

        def feedback(tenant: str) -> httpx.Response:
            token = sign(ehr, aud=f"{SERVICE_AUD}/feedback", tenant=tenant)
            return httpx.post(
                f"{running.url}{URL}/feedback", json={"feedback": [item]}, headers=bearer(token)
            )

        assert feedback("hospital-south").status_code == 404
        assert feedback("hospital-north").status_code == 200

        def listed(tenant: str) -> list[dict[str, Any]]:
            token = sign(ehr, aud=f"{SERVICE_AUD}/feedback", tenant=tenant)
            reply = httpx.get(f"{running.url}{URL}/feedback", headers=bearer(token))
            assert reply.status_code == 200, reply.text
            return reply.json()["feedback"]  # type: ignore[no-any-return]

        # the other hospital does not read this one's feedback (patients, clinicians' comments)
        assert listed("hospital-south") == []
        assert [f["card"] for f in listed("hospital-north")] == [card["uuid"]]
