"""Authentication and patient-scoped authorization.

A caller is a ``Principal``: a service account (API key) or a user or app holding an OAuth2 bearer
JWT from the configured issuer (a SMART authorization server), validated against its JWKS. What it
may read follows SMART scopes: ``patient/*.read`` (or SMART v2 ``patient/*.rs``) reads only the
patient of its launch context (the token's ``patient`` claim); ``user/*.read`` and ``system/*.read``
read any patient. SMART v2 granular scopes (``patient/Observation.rs``, optionally restricted by
``?category=…``) read only their resource types (``readable``), and need ``Patient.rs`` (or a ``*``
scope) to read a patient at all. Every endpoint, the MCP tools and the CDS service call
``authorize``, and pass ``readable`` to the agent.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from jwt import PyJWKClient

from agent import CasePrivacy, ChartSightError, RecordScope
from surfaces.settings import AuthSettings

# scopes that let ChartSight read a whole record, every resource type: SMART v1 `read` or `*`,
# SMART v2 permissions that include read and search (`rs`, `cruds`, ...)
_READ_ALL = re.compile(r"^(patient|user|system)/\*\.(read|\*|c?r?u?d?s?)$")
# any SMART resource scope: level / resource type or * . v1 permission (read, write, *) or v2
# permissions (c, r, u, d, s in that order), optionally with v2 query parameters (`?category=…`)
_RESOURCE_SCOPE = re.compile(
    r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.(read|write|\*|c?r?u?d?s?)(\?.*)?$"
)
_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}


class Unauthenticated(ChartSightError):
    """No valid credentials (HTTP 401)."""


class Forbidden(ChartSightError):
    """Valid credentials, but not for this (HTTP 403)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, and what they may read."""

    client_id: str  # the API key's client, or the token's client_id/azp/sub
    subject: str  # the user (fhirUser/sub) or the client itself
    scopes: frozenset[str]
    patient: str | None = None  # the launch context's patient, for patient-level scopes
    kind: str = "jwt"  # "jwt" | "api-key" | "anonymous" | "local"
    realm: str = ""  # where the identity comes from: the EHR's FHIR base for a SMART session

    @property
    def levels(self) -> set[str]:
        """The SMART levels (patient, user, system) at which it may read whole records."""
        out = set()
        for scope in self.scopes:
            m = _READ_ALL.match(scope)
            if m is None:
                continue
            permission = m.group(2)
            if permission in ("read", "*") or {"r", "s"} <= set(permission):
                out.add(m.group(1))
        return out


def scope_permissions(scope: str) -> tuple[str, str, str, str] | None:
    """A SMART resource scope split into ``(level, resource type or "*", permissions, query)``:
    permissions as SMART v2 letters (``"rs"``; v1 ``read`` → ``"rs"``, ``write`` → ``"cud"``,
    ``*`` → ``"cruds"``), the v2 query (``"category=laboratory"``) or ``""``. ``None`` for anything
    else (``openid``, ``launch/patient``, a malformed scope). Source: SMART App Launch 2.2,
    "Scopes and Launch Context" (v1 and v2 scope syntax)."""
    m = _RESOURCE_SCOPE.match(scope)
    if m is None or not m.group(3):
        return None
    level, rtype, permission, query = m.groups()
    return level, rtype, _V1_PERMISSIONS.get(permission, permission), (query or "")[1:]


def may(
    principal: Principal,
    resource_type: str,
    permissions: str = "rs",
    levels: set[str] | None = None,
    *,
    wildcard: bool = True,
) -> bool:
    """Whether one of ``principal``'s scopes grants every permission in ``permissions`` (SMART v2
    letters, e.g. ``"rs"`` read and search, ``"c"`` create) on ``resource_type`` (``*`` scopes
    included unless ``wildcard`` is false: a grant that must name the type, such as reading the
    audit trail) without a query restriction, at one of ``levels`` (default any of patient, user,
    system). A patient-level grant still reads only its launch patient (``authorize``)."""
    for scope in principal.scopes:
        parsed = scope_permissions(scope)
        if parsed is None:
            continue
        level, rtype, granted, query = parsed
        if levels is not None and level not in levels:
            continue
        named = rtype == resource_type or (wildcard and rtype == "*")
        if named and not query and set(permissions) <= set(granted):
            return True
    return False


def _category_tokens(query: str) -> frozenset[str] | None:
    """The category tokens of a SMART v2 scope query that restricts only by category
    (``category=laboratory``, ``category=http://…|vital-signs,laboratory``: a comma is an OR,
    FHIR R4 search 3.1.1.4); None for any other query (another parameter, a repeated one, a
    modifier such as ``category:not``), which ChartSight cannot enforce."""
    pairs = parse_qsl(query, keep_blank_values=True)
    if len(pairs) != 1 or pairs[0][0] != "category" or not pairs[0][1]:
        return None
    tokens = frozenset(t for t in pairs[0][1].split(",") if t)
    return tokens or None


def readable(principal: Principal) -> RecordScope:
    """What of a patient's record ``principal``'s scopes let ChartSight read (read and search,
    ``rs``, at any level: ``authorize`` decides which patients): ``RecordScope()`` (every type)
    for a ``*`` scope (``patient/*.read``, ``user/*.rs``, ...); else the types of its resource
    scopes without a query (``patient/Observation.rs`` → ``Observation``), and types of scopes
    restricted by category (``patient/Observation.rs?category=laboratory``) limited to those
    categories. A scope with any other query grants nothing here: ChartSight cannot enforce it.
    Source: SMART App Launch 2.2, "Scopes and Launch Context" (v2 finer-grained scopes)."""
    types: set[str] = set()
    categories: dict[str, set[str]] = {}
    for scope in principal.scopes:
        parsed = scope_permissions(scope)
        if parsed is None or not {"r", "s"} <= set(parsed[2]):
            continue
        _, rtype, _, query = parsed
        if not query:
            if rtype == "*":
                return RecordScope()
            types.add(rtype)
        elif rtype != "*" and (tokens := _category_tokens(query)) is not None:
            categories.setdefault(rtype, set()).update(tokens)
    limited = tuple(
        (t, frozenset(toks)) for t, toks in sorted(categories.items()) if t not in types
    )
    return RecordScope(frozenset(types), limited)


def patient_levels(principal: Principal) -> set[str]:
    """The SMART levels (patient, user, system) at which ``principal`` may read and search
    Patient resources (``Patient.rs``, ``Patient.read`` or a ``*`` scope): without one, no
    question about a patient can be answered."""
    return {lv for lv in ("patient", "user", "system") if may(principal, "Patient", "rs", {lv})}


def authorize(principal: Principal, patient_id: str) -> None:
    """Raise ``Forbidden`` unless ``principal`` may read ``patient_id``'s record: a scope that
    reads Patient resources (``patient_levels``; what else of the record it reads is
    ``readable``'s), at the user or system level for any patient, at the patient level for the
    launch context's patient only."""
    levels = patient_levels(principal)
    if not levels:
        raise Forbidden(
            "the token's scopes do not allow reading the patient (ChartSight needs "
            "patient/*.rs, or patient/Patient.rs with the resource types to read; "
            "user/ or system/ alike)"
        )
    if levels & {"user", "system"}:
        return  # the user's (or system's) own access to the EHR governs which patients
    if principal.patient is None:
        raise Forbidden("a patient-level token without a patient in its launch context")
    if principal.patient != patient_id:
        raise Forbidden("the token is bound to another patient")


def case_privacy(principal: Principal) -> CasePrivacy:
    """How similar cases are shown to ``principal``: in full (keys, patient ids, summaries) at the
    user or system level, whose access to any patient the EHR governs; "generalised" (no ids, no
    dates, no free text: ``retrieval.index.generalised_hit``) to a caller bound to one patient,
    who has no right to another patient's record. Every surface applies this one rule."""
    return "full" if principal.levels & {"user", "system"} else "generalised"


def fhir_base(url: str) -> str:
    """A FHIR base URL in the form two spellings of one server share: scheme and host lower-cased,
    the scheme's default port dropped, no trailing slash, no query or fragment (RFC 3986 6.2.3)."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    port = parts.port
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if port is None or port == default else f"{host}:{port}"
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


def listed_fhir_base(url: str, allowed: list[str]) -> bool:
    """Whether ``url`` is one of the ``allowed`` FHIR base URLs (compared by ``fhir_base``; a
    userinfo part, another port or a longer path is another server). A base URL with a query or
    a fragment is refused: a FHIR base has neither (FHIR R4 http 3.1.0.1.1), and the caller's
    spelling is the one requests are built on, so ``…/fhir?x=`` would send every search to
    ``/fhir`` with a query of the caller's choosing."""
    try:
        parts = urlsplit(url.strip())
        if parts.username is not None or "?" in url or "#" in url:
            return False
        wanted = fhir_base(url)
        return any(wanted == fhir_base(a) for a in allowed)
    except ValueError:  # a malformed port
        return False


def thread_key(principal: Principal, patient: str, thread: str) -> str:
    """A conversation's checkpoint key: private to the caller (its kind of credential, realm,
    client and subject: two EHRs' users, or an API key and a token of the same name, never share
    one) and the patient (another caller's thread id, or the same id about another patient, is a
    different conversation)."""
    who = (principal.kind, principal.realm, principal.client_id, principal.subject)
    digest = hashlib.sha256("\x00".join((*who, patient, thread)).encode())
    return digest.hexdigest()[:32]


def key_digest(key: str) -> str:
    """An API key's SHA-256 as 64 lower-case hex digits: what the settings keep
    (``serve.auth.api_keys[].key_sha256``), never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    """Turns a request's credentials into a Principal."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._jwks = (
            PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300)
            if settings.jwks_url
            else None
        )

    def from_headers(self, authorization: str | None, api_key: str | None) -> Principal:
        """The caller of a request from its ``X-API-Key`` header (checked first) or its
        ``Authorization: Bearer <token>`` header; with neither, the anonymous local caller
        (``user/*.read``) when ``serve.auth.anonymous`` is set. Raises ``Unauthenticated`` for a
        malformed header, an unknown key, an invalid token, or no credentials."""
        if api_key:
            return self.api_key(api_key)
        if authorization:
            scheme, _, credentials = authorization.partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
            return self.bearer(credentials.strip())
        if self.settings.anonymous:
            return Principal("anonymous", "anonymous", frozenset({"user/*.read"}), kind="anonymous")
        raise Unauthenticated("credentials required: a bearer token or an X-API-Key header")

    def api_key(self, key: str) -> Principal:
        """The service account whose configured ``key_sha256`` is the key's digest (compared in
        constant time), with its scopes and bound patient. Raises ``Unauthenticated`` for an
        unknown key."""
        digest = key_digest(key)
        for entry in self.settings.api_keys:
            if hmac.compare_digest(entry.key_sha256.lower(), digest):
                return Principal(
                    entry.client_id,
                    entry.client_id,
                    frozenset(entry.scopes.split()),
                    entry.patient,
                    kind="api-key",
                )
        raise Unauthenticated("unknown API key")

    def bearer(self, token: str) -> Principal:
        """The caller of a JWT signed by a key of ``serve.auth.jwks_url``, from
        ``serve.auth.issuer`` (and for ``audience`` when one is set), with ``exp`` and ``iss``
        required: client from ``client_id``/``azp``/``sub``, user from ``fhirUser``/``sub``,
        scopes from ``scope`` or ``scp`` (a space-separated string, RFC 8693 4.2, or a list of
        strings), the launch's ``patient`` (SMART App Launch token response claims). Raises
        ``Unauthenticated`` when no issuer is configured, the signing key is not found, the token
        is invalid or expired, or its scope claim is anything else (a number, an object)."""
        if self._jwks is None or not self.settings.issuer:
            raise Unauthenticated("bearer tokens are not accepted here (no issuer is configured)")
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=self.settings.algorithms,
                issuer=self.settings.issuer,
                audience=self.settings.audience,
                leeway=self.settings.leeway_s,
                options={
                    "require": ["exp", "iss"],
                    "verify_aud": self.settings.audience is not None,
                },
            )
        except jwt.PyJWKClientError as exc:
            raise Unauthenticated(f"the token's signing key could not be found: {exc}") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from exc
        scope = claims.get("scope") or claims.get("scp") or ""
        if isinstance(scope, str):
            scopes = frozenset(scope.split())
        elif isinstance(scope, list) and all(isinstance(s, str) for s in scope):
            scopes = frozenset(scope)
        else:  # a number, an object, a list holding one: no scopes can be read from it
            raise Unauthenticated(
                "invalid token: its scope claim is neither a space-separated string nor a list "
                "of strings"
            )
        client = str(claims.get("client_id") or claims.get("azp") or claims.get("sub") or "")
        subject = str(claims.get("fhirUser") or claims.get("sub") or client)
        patient = claims.get("patient")
        return Principal(client, subject, scopes, str(patient) if patient else None)
