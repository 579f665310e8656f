"""An OAuth2 token issuer for tests: an RSA key, its JWKS served over HTTP on 127.0.0.1, and
signed access tokens with SMART claims (scope, patient, fhirUser)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.peers.asgi import ThreadedServer


class Issuer:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "test-key-1"
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, use="sig", alg="RS256")
        self.jwks = {"keys": [jwk]}
        app = Starlette(routes=[Route("/jwks", lambda r: JSONResponse(self.jwks))])
        self.http = ThreadedServer(app)

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks"

    def token(self, scope: str, patient: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.url,
            "aud": "chartsight",
            "sub": "dr-who",
            "fhirUser": "Practitioner/dr-who",
            "client_id": "ehr-app",
            "scope": scope,
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        if patient:
            body["patient"] = patient
        body.update(claims)
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": self.kid})

    def __enter__(self) -> Issuer:
        self.http.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.stop()
