"""Authorization for FHIR servers: a static bearer token, or SMART Backend Services."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx

from connectors.errors import AuthError
from connectors.settings import FhirServerSettings, SmartBackendSettings

# A token is refreshed this long before it expires, so no request goes out with a dead one.
EXPIRY_MARGIN_S = 30.0


# RFC 7523 section 2.2: how a client assertion is named in a token request
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def client_assertion(
    client_id: str, token_url: str, private_key_pem: bytes, algorithm: str, key_id: str | None
) -> str:
    """A client assertion (RFC 7523 section 3) authenticating ``client_id`` to the token endpoint
    ``token_url``, as SMART asymmetric client authentication requires (SMART App Launch 2.2,
    "client-confidential-asymmetric" and Backend Services): ``iss`` = ``sub`` = the client id,
    ``aud`` = the token URL, a fresh ``jti``, ``iat`` now and ``exp`` 5 minutes later (the most
    SMART allows), signed with ``private_key_pem`` (PEM, RSA or EC) by ``algorithm`` (RS384 or
    ES384), ``kid`` in the header when given. Raises ``AuthError`` when the key cannot sign."""
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": now + 300,
        "iat": now,
        "jti": uuid.uuid4().hex,
    }
    import jwt  # (imported when a key is used: a question from the local store never signs)

    headers = {"kid": key_id} if key_id else None
    try:
        return jwt.encode(claims, private_key_pem, algorithm=algorithm, headers=headers)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise AuthError(f"cannot sign the client assertion: {exc}") from exc


def public_jwks(private_key_pem: bytes, algorithm: str, key_id: str | None) -> dict[str, Any]:
    """The JSON Web Key Set (RFC 7517) of the public half of ``private_key_pem`` (RSA or EC),
    ``{"keys": [{"kty", ..., "alg": algorithm, "use": "sig", "kid": key_id}]}``: what an EHR
    registers for a client that authenticates with ``client_assertion``. Raises ``AuthError`` for
    a key that cannot be read."""
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        public = load_pem_private_key(private_key_pem, password=None).public_key()
        jwk = json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(public))
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise AuthError(f"cannot read the private key: {exc}") from exc
    jwk.update(alg=algorithm, use="sig", **({"kid": key_id} if key_id else {}))
    return {"keys": [jwk]}


class BearerAuth(httpx.Auth):
    """A static bearer token."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """httpx's hook: send ``request`` once with ``Authorization: Bearer {token}``."""
        request.headers["Authorization"] = self._header
        yield request


class SmartBackendAuth(httpx.Auth):
    """SMART Backend Services: client-credentials grant with a signed JWT (RFC 7523).

    The access token is cached until shortly before it expires, shared by concurrent requests,
    and fetched again once if the server answers 401.
    """

    requires_response_body = True

    def __init__(self, settings: SmartBackendSettings, fhir_base_url: str) -> None:
        self.settings = settings
        self.fhir_base_url = fhir_base_url.rstrip("/")
        self._key = settings.private_key_path.read_bytes()
        self._token: str | None = None
        self._expires_at = 0.0
        self._token_url = settings.token_url
        self._lock = asyncio.Lock()

    def _assertion(self, token_url: str) -> str:
        s = self.settings
        try:
            return client_assertion(s.client_id, token_url, self._key, s.algorithm, s.key_id)
        except AuthError as exc:
            raise AuthError(f"{s.private_key_path}: {exc}") from exc

    def _token_request(self, token_url: str) -> httpx.Request:
        return httpx.Request(
            "POST",
            token_url,
            data={
                "grant_type": "client_credentials",
                "scope": self.settings.scope,
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": self._assertion(token_url),
            },
            headers={"Accept": "application/json"},
        )

    def _take_token(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise AuthError(
                f"token endpoint {response.request.url} answered HTTP {response.status_code}: "
                f"{response.text[:200]}"
            )
        try:
            body = response.json()
            token = body["access_token"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError(f"token endpoint {response.request.url} sent no access_token") from exc
        self._token = str(token)
        self._expires_at = time.monotonic() + float(body.get("expires_in", 300))

    def _valid(self) -> bool:
        return self._token is not None and time.monotonic() < self._expires_at - EXPIRY_MARGIN_S

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """httpx's hook: send ``request`` with ``Authorization: Bearer {access token}``, first
        fetching a token when none is cached or it expires within ``EXPIRY_MARGIN_S`` (the token
        endpoint from ``fhir.smart.token_url``, else from ``.well-known/smart-configuration``,
        SMART App Launch 2.0, conformance.html); on a 401 answer, fetch a new token and send once
        more. Raises ``AuthError`` when no token endpoint is named or the endpoint refuses."""
        for attempt in range(2):
            async with self._lock:
                if attempt == 1 or not self._valid():
                    if self._token_url is None:
                        url = f"{self.fhir_base_url}/.well-known/smart-configuration"
                        conf = yield httpx.Request(
                            "GET", url, headers={"Accept": "application/json"}
                        )
                        await conf.aread()  # an overridden async flow gets unread responses
                        try:
                            self._token_url = str(conf.json()["token_endpoint"])
                        except (ValueError, KeyError, TypeError) as exc:
                            raise AuthError(
                                f"{url} (HTTP {conf.status_code}) names no token_endpoint; "
                                "set fhir.smart.token_url"
                            ) from exc
                    token_response = yield self._token_request(self._token_url)
                    await token_response.aread()
                    self._take_token(token_response)
            request.headers["Authorization"] = f"Bearer {self._token}"
            response = yield request
            if response.status_code != 401:
                return

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """httpx's hook for a synchronous client: always raises ``AuthError`` (the token cache is
        guarded by an asyncio lock, so only ``httpx.AsyncClient`` is supported)."""
        raise AuthError("SmartBackendAuth works with the async client only")


def fhir_auth(settings: FhirServerSettings, base_url: str) -> httpx.Auth | None:
    """The authorization ``settings`` name for the FHIR server at ``base_url``: SMART Backend
    Services (``settings.smart``) first, else the static bearer ``settings.token``, else ``None``
    (anonymous). Raises ``OSError`` when the SMART private key file cannot be read."""
    if settings.smart is not None:
        return SmartBackendAuth(settings.smart, base_url)
    if settings.token is not None:
        return BearerAuth(settings.token.get_secret_value())
    return None
