"""A SMART on FHIR EHR for the app-launch tests, built from the SMART App Launch spec with authlib:
``.well-known/smart-configuration``, an authorization endpoint (authorization code with PKCE S256
required, the ``launch`` parameter resolved to a patient context, consent granted at once as a
signed-in clinician would), a token endpoint that returns the ``patient`` with the access token
and, when ``openid fhirUser`` were granted, an OpenID Connect ``id_token`` naming the user
(``fhirUser``; signed with the key at ``jwks_uri``), and a FHIR endpoint that checks that token and
forwards to a real FHIR server (SEKMET). A client registered with a public key
(``client_public_key_pem``) must authenticate with ``private_key_jwt`` (SMART
``client-confidential-asymmetric``), else it is a public client (PKCE only).

Runs under werkzeug on 127.0.0.1 in a background thread.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, grants
from authlib.oauth2.rfc7636 import CodeChallenge
from cryptography.hazmat.primitives.asymmetric import rsa
from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

from tests.peers.servers import free_port
from tests.peers.smart_auth import SmartClientAssertion


@dataclass
class Client(ClientMixin):
    client_id: str
    redirect_uri: str
    scope: str = (
        "launch openid fhirUser patient/*.read user/*.read "
        "patient/DocumentReference.c patient/Provenance.c"
    )
    public_key_pem: bytes | None = None  # registered for private_key_jwt: a confidential client

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_allowed_scope(self, scope: str) -> str:
        allowed = set(self.scope.split())
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri == self.redirect_uri

    def check_client_secret(self, client_secret: str) -> bool:
        return False

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.public_key_pem is not None:  # a confidential asymmetric client
            return method == SmartClientAssertion.CLIENT_AUTH_METHOD
        return method == "none"  # a public client: PKCE protects the code

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class Code(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    patient: str
    user: str
    code_challenge: str | None
    code_challenge_method: str | None
    nonce: str | None = None
    created: float = field(default_factory=time.monotonic)

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> None:
        return None


class SmartEhr:
    def __init__(
        self,
        fhir_base: str,
        redirect_uri: str,
        client_id: str = "chartsight",
        scope: str | None = None,
        client_public_key_pem: bytes | None = None,
    ) -> None:
        self.fhir_base = fhir_base.rstrip("/")
        self.port = free_port()
        self.client = Client(client_id, redirect_uri, public_key_pem=client_public_key_pem)
        if scope is not None:
            self.client.scope = scope
        self.user = "Practitioner/dr-who"  # the clinician signed in to the EHR
        # signs id_tokens; published at jwks_uri (a test may swap in another key: a forged token)
        self.id_token_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwks = {"keys": [self._jwk(self.id_token_key)]}
        self.launches: dict[str, str] = {}  # launch id → patient id
        self.codes: dict[str, Code] = {}
        self.tokens: dict[str, dict[str, Any]] = {}  # access token → its grant
        self.fhir_requests: list[str] = []
        self.transactions: list[dict[str, Any]] = []  # the transaction Bundles forwarded
        self.app = Flask("smart-ehr")
        outer = self

        class AuthCode(grants.AuthorizationCodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["none", SmartClientAssertion.CLIENT_AUTH_METHOD]  # noqa: RUF012

            def save_authorization_code(self, code: str, req: Any) -> None:
                launch = req.payload.data.get("launch", "")
                outer.codes[code] = Code(
                    code=code,
                    client_id=req.client.client_id,
                    redirect_uri=req.payload.redirect_uri,
                    scope=req.payload.scope,
                    patient=outer.launches[launch],
                    user=outer.user,
                    code_challenge=req.payload.data.get("code_challenge"),
                    code_challenge_method=req.payload.data.get("code_challenge_method"),
                    nonce=req.payload.data.get("nonce"),
                )

            def query_authorization_code(self, code: str, client: Client) -> Code | None:
                found = outer.codes.get(code)
                if found and found.client_id == client.client_id:
                    return found
                return None

            def delete_authorization_code(self, code: Code) -> None:
                outer.codes.pop(code.code, None)

            def authenticate_user(self, code: Code) -> str:
                return code.user

        def query_client(client_id: str) -> Client | None:
            return outer.client if client_id == outer.client.client_id else None

        def save_token(token: dict[str, Any], req: Any) -> None:
            code: Code = req.authorization_code
            token["patient"] = code.patient
            if "fhirUser" in code.scope.split():
                token["fhirUser"] = code.user
            if {"openid", "fhirUser"} <= set(token.get("scope", "").split()):
                token["id_token"] = outer.id_token(code)
            outer.tokens[token["access_token"]] = {
                "patient": code.patient,
                "scope": token.get("scope", ""),
                "expires": time.monotonic() + float(token["expires_in"]),
            }

        server = AuthorizationServer(self.app, query_client=query_client, save_token=save_token)
        server.register_grant(AuthCode, [CodeChallenge(required=True)])
        server.register_client_auth_method(
            SmartClientAssertion.CLIENT_AUTH_METHOD, SmartClientAssertion(f"{self.url}/token")
        )
        server.register_token_generator(
            "default",
            lambda **kw: {
                "token_type": "Bearer",
                "access_token": secrets.token_urlsafe(24),
                "expires_in": 3600,
                "scope": outer.client.get_allowed_scope(kw.get("scope") or ""),  # what it grants
            },
        )

        @self.app.get("/fhir/.well-known/smart-configuration")
        def smart_configuration() -> Any:
            return jsonify(
                {
                    "issuer": outer.url,
                    "authorization_endpoint": f"{outer.url}/authorize",
                    "token_endpoint": f"{outer.url}/token",
                    "jwks_uri": f"{outer.url}/jwks",
                    "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
                    "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                    "grant_types_supported": ["authorization_code"],
                    "scopes_supported": outer.client.scope.split(),
                    "response_types_supported": ["code"],
                    "code_challenge_methods_supported": ["S256"],
                    "capabilities": [
                        "launch-ehr",
                        "client-public",
                        "client-confidential-asymmetric",
                        "context-ehr-patient",
                        "sso-openid-connect",
                        "permission-v1",
                        "permission-v2",
                    ],
                }
            )

        @self.app.get("/jwks")
        def jwks() -> Any:
            return jsonify(outer.jwks)

        @self.app.get("/authorize")
        def authorize() -> Any:
            if request.args.get("aud") != outer.fhir_url:
                return jsonify({"error": "invalid_request", "detail": "aud"}), 400
            if request.args.get("launch") not in outer.launches:
                return jsonify({"error": "invalid_request", "detail": "launch"}), 400
            # the clinician is signed in to the EHR and the app is approved: grant at once
            return server.create_authorization_response(grant_user="Practitioner/dr-who")

        @self.app.post("/token")
        def token() -> Any:
            return server.create_token_response()

        def _granted() -> dict[str, Any] | None:
            """The live grant of the request's bearer token, or None."""
            grant = outer.tokens.get(
                request.headers.get("Authorization", "").removeprefix("Bearer ")
            )
            return grant if grant is not None and grant["expires"] >= time.monotonic() else None

        def _outcome(code: str, diagnostics: str, status: int) -> Any:
            issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
            return jsonify({"resourceType": "OperationOutcome", "issue": [issue]}), status

        @self.app.route("/fhir/<path:path>", methods=["GET"])
        def fhir(path: str) -> Any:
            if _granted() is None:
                return _outcome("login", "invalid token", 401)
            outer.fhir_requests.append(path)
            upstream = httpx.get(
                f"{outer.fhir_base}/{path}",
                params=list(request.args.items(multi=True)),
                headers={"Accept": "application/fhir+json"},
                timeout=60,
            )
            # links in bundles point back here, not at the server behind
            body = upstream.text.replace(outer.fhir_base, outer.fhir_url)
            return Response(body, upstream.status_code, content_type="application/fhir+json")

        @self.app.post("/fhir")
        def transaction() -> Any:
            grant = _granted()
            if grant is None:
                return _outcome("login", "invalid token", 401)
            bundle = request.get_json(force=True)
            scopes = set(grant["scope"].split())
            for entry in bundle.get("entry") or []:
                rtype = str((entry.get("request") or {}).get("url", "")).split("/")[0]
                if not scopes & {f"patient/{rtype}.{p}" for p in ("c", "cud", "cruds", "write")}:
                    return _outcome("forbidden", f"no scope to create {rtype}", 403)
            outer.transactions.append(bundle)
            upstream = httpx.post(
                outer.fhir_base,
                json=bundle,
                headers={"Content-Type": "application/fhir+json"},
                timeout=60,
            )
            body = upstream.text.replace(outer.fhir_base, outer.fhir_url)
            return Response(body, upstream.status_code, content_type="application/fhir+json")

        self.http = make_server("127.0.0.1", self.port, self.app, threaded=True)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fhir_url(self) -> str:
        return f"{self.url}/fhir"

    @staticmethod
    def _jwk(key: rsa.RSAPrivateKey) -> dict[str, Any]:
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        jwk.update(kid="ehr-id-token-key", use="sig", alg="RS256")
        return jwk

    def id_token(self, code: Code) -> str:
        """An OpenID Connect id_token for the code's user: ``iss`` this server, ``aud`` the
        client, the request's ``nonce``, ``fhirUser`` the user's absolute FHIR URL (SMART App
        Launch 2.2, "Scopes for requesting identity data")."""
        now = int(time.time())
        claims = {
            "iss": self.url,
            "sub": code.user,
            "aud": code.client_id,
            "iat": now,
            "exp": now + 300,
            "fhirUser": f"{self.fhir_url}/{code.user}",
        }
        if code.nonce:
            claims["nonce"] = code.nonce
        return jwt.encode(
            claims, self.id_token_key, algorithm="RS256", headers={"kid": "ehr-id-token-key"}
        )

    def launch(self, patient: str) -> str:
        """A launch id for the patient open in the EHR."""
        launch = secrets.token_urlsafe(12)
        self.launches[launch] = patient
        return launch

    def __enter__(self) -> SmartEhr:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.shutdown()
        self.thread.join(10)
