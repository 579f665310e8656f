"""Bearer tokens and SMART Backend Services against an authlib authorization server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from connectors.errors import AuthError
from connectors.fhir_client import FhirClient
from connectors.settings import FhirServerSettings, SmartBackendSettings
from tests.peers.faulty import FaultyFhir
from tests.peers.smart_auth import Client, SmartAuthServer


def _keypair(tmp_path: Path, kind: str) -> tuple[Path, bytes]:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP384R1())
    )
    private = tmp_path / f"{kind}.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS384"), ("ec", "ES384")])
async def test_smart_backend_services_token_is_fetched_once_and_reused(tmp_path, kind, alg):
    private, public = _keypair(tmp_path, kind)
    with SmartAuthServer(clients={"chartsight": Client("chartsight", public)}) as auth:
        smart = SmartBackendSettings(
            client_id="chartsight", private_key_path=private, algorithm=alg
        )
        async with FhirClient(FhirServerSettings(url=auth.fhir_url, smart=smart)) as client:
            patients = await asyncio.gather(*(client.read("Patient", f"p{i}") for i in range(6)))
            await client.read("Patient", "again")
        assert [p.id for p in patients] == [f"p{i}" for i in range(6)]
        assert (
            auth.token_requests == 1
        )  # discovered via .well-known, then cached for all 7 requests
        assert len(auth.fhir_requests) == 7 and all(
            h and h.startswith("Bearer ") for h in auth.fhir_requests
        )


async def test_expired_token_is_replaced(tmp_path):
    private, public = _keypair(tmp_path, "rsa")
    # tokens live 31 s; the client renews 30 s before expiry, so every request after 1 s needs a new one
    with SmartAuthServer(clients={"cs": Client("cs", public)}, expires_in=31) as auth:
        smart = SmartBackendSettings(
            client_id="cs", private_key_path=private, token_url=auth.token_url
        )
        async with FhirClient(FhirServerSettings(url=auth.fhir_url, smart=smart)) as client:
            await client.read("Patient", "a")
            await asyncio.sleep(1.2)
            await client.read("Patient", "b")
        assert auth.token_requests == 2


async def test_wrong_key_is_an_auth_error(tmp_path):
    private, _ = _keypair(tmp_path, "rsa")
    _, other_public = _keypair(tmp_path / "..", "rsa")
    with SmartAuthServer(clients={"cs": Client("cs", other_public)}) as auth:
        smart = SmartBackendSettings(
            client_id="cs", private_key_path=private, token_url=auth.token_url
        )
        async with FhirClient(FhirServerSettings(url=auth.fhir_url, smart=smart)) as client:
            with pytest.raises(AuthError, match=r"token endpoint .*/token answered HTTP (400|401)"):
                await client.read("Patient", "a")


async def test_static_bearer_token_is_sent():
    with FaultyFhir() as server:
        settings = FhirServerSettings(url=server.url("ok"), token="s3cret")
        async with FhirClient(settings) as client:
            await client.read("Patient", "p1")
        assert server.auth_headers == ["Bearer s3cret"]
