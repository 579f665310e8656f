"""Trusting CDS Clients (CDS Hooks 2.0, "Trusting CDS Clients"): the JWT an EHR signs on every
call (``Authorization: Bearer <JWT>``), verified against the clients configured in
``serve.cds.clients``.

A JWT is accepted when its ``iss`` is a configured client; its header names a ``kid`` (and an
asymmetric ``alg``: the spec forbids ``none`` and HMAC); its public key comes from the client's
JWK Set (``jwks_url`` or ``jwks``) or from the ``jku`` header, but only when that URL is the
client's ``jwks_url`` or listed in its ``jku`` (any other is refused before a connection is
made: a JWT cannot make the service fetch a URL of its choosing); the signature verifies; ``aud``
is the URL of the endpoint called (``{public_url}/cds-services/{id}``); ``exp``, ``iat`` and
``jti`` are present, it has not expired and lives no longer than ``serve.cds.max_lifetime_s``;
``tenant`` (optional) is one the client lists, when it lists any; and its ``jti`` has not been
seen before from that ``iss`` (``CdsStore.first_use``, in SQL shared by every worker).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import jwt
from jwt import PyJWKClient, PyJWKSet

from surfaces.http.cds_store import CdsStore
from surfaces.http.security import Principal, Unauthenticated, fhir_base
from surfaces.settings import CdsClient, CdsSettings


def _short(value: object) -> str:
    return repr(str(value)[:120])


def same_url(a: str, b: str) -> bool:
    """Whether two URLs name one endpoint: scheme and host case-insensitive, the default port and
    a trailing slash ignored (``security.fhir_base``, RFC 3986 6.2.3); a query, a fragment or a
    userinfo part makes them differ (``https://ehr/jwks?x=…`` is not ``https://ehr/jwks``)."""
    try:
        extra = [(p.username, p.password, p.query, p.fragment) for p in map(urlsplit, (a, b))]
        return extra[0] == extra[1] and fhir_base(a) == fhir_base(b)
    except ValueError:  # a malformed port
        return False


class CdsTrust:
    """Verifies CDS Client JWTs (see the module's description) for the clients of
    ``settings.clients``, with ``store`` remembering each ``jti`` until it expires. Key sets
    fetched from a URL are cached per URL for 5 minutes (a JWT naming an unknown ``kid`` makes at
    most one refetch per 30 s)."""

    def __init__(self, settings: CdsSettings, store: CdsStore) -> None:
        self.settings = settings
        self.store = store
        self.clients = {c.iss: c for c in settings.clients}
        self._key_sets: dict[str, PyJWKClient] = {}

    def client_of(self, token: str) -> CdsClient | None:
        """The configured client whose ``iss`` the token's (still unverified) payload names, or
        None (not a JWT, or from no configured client)."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return None
        iss = claims.get("iss")
        return self.clients.get(iss) if isinstance(iss, str) else None

    def _key_url(self, client: CdsClient, header: dict[str, Any]) -> str | None:
        jku = header.get("jku")
        if jku is None:
            return client.jwks_url
        allowed = [u for u in (client.jwks_url, *client.jku) if u]
        if not isinstance(jku, str) or not any(same_url(jku, u) for u in allowed):
            raise Unauthenticated(
                f"the JWT's jku {_short(jku)} is not a JWK Set URL configured for this CDS client; "
                "it was not fetched"
            )
        return jku

    def _signing_key(self, client: CdsClient, url: str | None, kid: str) -> Any:
        try:
            if url is None:
                assert client.jwks is not None  # CdsClient requires jwks_url or jwks
                for key in PyJWKSet.from_dict(client.jwks).keys:
                    if key.key_id == kid:
                        return key.key
                raise Unauthenticated(f"no key {_short(kid)} in the CDS client's JWK Set")
            fetcher = self._key_sets.get(url)
            if fetcher is None:
                fetcher = PyJWKClient(url, cache_keys=True, lifespan=300, timeout=5)
                self._key_sets[url] = fetcher
            return fetcher.get_signing_key(kid).key
        except jwt.PyJWKClientConnectionError as exc:
            raise Unauthenticated("the CDS client's JWK Set could not be fetched") from exc
        except (jwt.PyJWKClientError, jwt.PyJWKSetError) as exc:
            raise Unauthenticated(
                f"no key {_short(kid)} in the CDS client's JWK Set ({exc})"
            ) from exc

    async def verify(self, token: str, audiences: list[str]) -> Principal:
        """The CDS Client a JWT authenticates, as a ``Principal`` (kind ``cds-client``: client id
        the configured ``client_id`` or ``iss``, subject the JWT's ``sub`` or the client, scopes
        the client's ``scopes``, realm ``iss`` plus the ``tenant``). ``audiences``: the URLs the
        JWT's ``aud`` may name (the endpoint called). Raises ``Unauthenticated`` naming the first
        check that failed; the ``jti`` is recorded only once every other check passed."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the bearer token is not a JWT ({exc})") from exc
        client = self.client_of(token)
        if client is None:
            raise Unauthenticated("the JWT's iss is not a trusted CDS client")
        alg = header.get("alg")
        if alg not in self.settings.algorithms:
            raise Unauthenticated(
                f"the JWT's alg {_short(alg)} is not accepted (asymmetric only: "
                f"{', '.join(self.settings.algorithms)})"
            )
        if header.get("typ") not in (None, "JWT"):
            raise Unauthenticated(f"the JWT's typ is {_short(header.get('typ'))}, not JWT")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("the JWT's header has no kid (CDS Hooks requires one)")
        url = self._key_url(client, header)
        key = await asyncio.to_thread(self._signing_key, client, url, kid)
        claims = self._decode(token, key, alg, client)
        aud = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if not any(isinstance(a, str) and same_url(a, u) for a in aud for u in audiences):
            raise Unauthenticated(
                f"the JWT's aud is not the URL of the endpoint called ({audiences[0]})"
            )
        if not isinstance(claims["exp"], int | float) or not isinstance(claims["iat"], int | float):
            raise Unauthenticated("the JWT's exp and iat must be numbers (seconds since the epoch)")
        if claims["exp"] - claims["iat"] > self.settings.max_lifetime_s:
            raise Unauthenticated(
                f"the JWT lives longer than {self.settings.max_lifetime_s:g} s (exp - iat); "
                "sign a short-lived JWT for each call"
            )
        tenant = claims.get("tenant")
        if client.tenants and tenant not in client.tenants:
            raise Unauthenticated(f"the JWT's tenant {_short(tenant)} is not one this client has")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise Unauthenticated("the JWT's jti must be a non-empty string")
        exp = datetime.fromtimestamp(claims["exp"] + self.settings.leeway_s, UTC)
        if not await self.store.afirst_use(client.iss, jti, exp):
            raise Unauthenticated("the JWT's jti was used before (a replay): sign one per call")
        name = client.client_id or client.iss
        return Principal(
            name,
            str(claims.get("sub") or name),
            frozenset(client.scopes.split()),
            kind="cds-client",
            realm=client.iss + (f" tenant={tenant}" if tenant else ""),
        )

    def _decode(self, token: str, key: Any, alg: str, client: CdsClient) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=client.iss,
                leeway=self.settings.leeway_s,
                options={
                    "require": ["iss", "aud", "exp", "iat", "jti"],
                    "verify_aud": False,  # checked after, against the URL called (same_url)
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("the JWT has expired (exp)") from exc
        except jwt.InvalidSignatureError as exc:
            raise Unauthenticated(
                "the JWT's signature does not verify with the CDS client's key"
            ) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(
                f"the JWT has no {exc.claim} claim (CDS Hooks requires it)"
            ) from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthenticated("the JWT's iat is in the future") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid JWT: {exc}") from exc
        return claims
