"""An OAuth 2.0 authorization server for SMART Backend Services tests, built with authlib.

Client-credentials grant with ``private_key_jwt`` client authentication (RFC 7523), as SMART
Backend Services requires, plus a FHIR endpoint that answers only to tokens this server issued.
Runs under werkzeug on 127.0.0.1 in a background thread.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidClientError
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from flask import Flask, jsonify, request
from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError
from werkzeug.serving import make_server

from tests.peers.servers import free_port


@dataclass
class Client(ClientMixin):
    client_id: str
    public_key_pem: bytes
    scope: str = "system/*.read"

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return ""

    def get_allowed_scope(self, scope: str) -> str:
        allowed = set(self.scope.split())
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == JWTBearerClientAssertion.CLIENT_AUTH_METHOD

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


class ClientCredentials(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = [JWTBearerClientAssertion.CLIENT_AUTH_METHOD]  # noqa: RUF012


class SmartClientAssertion(JWTBearerClientAssertion):
    """``private_key_jwt`` client authentication as SMART requires it (RS384 or ES384, ``aud`` the
    token URL), checked against the client's registered public key (``client.public_key_pem``)."""

    def __init__(self, token_url: str) -> None:
        super().__init__()
        self.audience = token_url

    def validate_jti(self, claims: Any, jti: str) -> bool:
        return True

    def resolve_client_public_key(self, client: Any) -> bytes:
        return bytes(client.public_key_pem)

    def process_assertion_claims(self, assertion: str, resolve_key: Any) -> Any:
        # SMART signs with RS384 or ES384; joserfc's default set omits RS384.
        try:
            token = jose_jwt.decode(assertion, resolve_key, algorithms=["RS384", "ES384"])
        except JoseError as exc:
            raise InvalidClientError(description=exc.description) from exc
        self.verify_claims(token.claims)
        return token.claims

    def get_audiences(self) -> list[str]:
        return [self.audience]


@dataclass
class SmartAuthServer:
    clients: dict[str, Client] = field(default_factory=dict)
    expires_in: int = 3600
    issued: dict[str, float] = field(default_factory=dict)
    token_requests: int = 0
    fhir_requests: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.app = Flask("smart-auth")
        server = AuthorizationServer(
            self.app, query_client=self.clients.get, save_token=self._save_token
        )
        server.register_grant(ClientCredentials)
        outer = self
        server.register_client_auth_method(
            SmartClientAssertion.CLIENT_AUTH_METHOD, SmartClientAssertion(self.token_url)
        )
        server.register_token_generator(
            "default",
            lambda **kw: {
                "token_type": "Bearer",
                "access_token": secrets.token_hex(16),
                "expires_in": outer.expires_in,
                "scope": kw.get("scope") or "",
            },
        )

        @self.app.post("/token")
        def token() -> Any:
            outer.token_requests += 1
            return server.create_token_response()

        @self.app.get("/fhir/.well-known/smart-configuration")
        def smart_configuration() -> Any:
            return jsonify(
                {
                    "token_endpoint": outer.token_url,
                    "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                    "grant_types_supported": ["client_credentials"],
                }
            )

        @self.app.get("/fhir/Patient/<pid>")
        def patient(pid: str) -> Any:
            header = request.headers.get("Authorization", "")
            outer.fhir_requests.append(header or None)
            token = header.removeprefix("Bearer ")
            if outer.issued.get(token, 0) < time.monotonic():
                return jsonify(
                    {
                        "resourceType": "OperationOutcome",
                        "issue": [
                            {
                                "severity": "error",
                                "code": "login",
                                "diagnostics": "invalid or expired token",
                            }
                        ],
                    }
                ), 401
            return jsonify({"resourceType": "Patient", "id": pid})

        self.http = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def _save_token(self, token: dict[str, Any], req: Any) -> None:
        self.issued[token["access_token"]] = time.monotonic() + float(token["expires_in"])

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def fhir_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def __enter__(self) -> SmartAuthServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.shutdown()
        self.thread.join(10)
