"""The SMART on FHIR app page for clinicians, launched from inside the EHR.

EHR launch (SMART App Launch 2.x): ``/launch?iss=…&launch=…`` discovers the EHR's
``.well-known/smart-configuration``, sends the browser to its authorization endpoint (authorization
code with PKCE S256, ``aud`` = the FHIR base, the ``launch`` context); ``/callback`` exchanges the
code for a token with the patient in context and opens ``/app``: a server-rendered page with the
patient banner, a question box, the answer streaming in, clickable citations (the cited resource's
evidence line and JSON), a small plot of the cited results when they are a series over time
(``/app/trend``: each point links to its citation), similar-case cards and the images used.

Approved write-back: when the launch's token may create DocumentReference and Provenance (SMART
``patient/DocumentReference.c patient/Provenance.c``, or v1 ``.write``) and names its user
(``fhirUser``), each answer is kept server-side as a draft (``drafts.py``) and the page offers
"Approve and save to chart"; after the clinician confirms, ``/app/save`` writes the draft as a
preliminary DocumentReference with its AI Provenance (``agent.provenance``), the clinician as
the verifier, to the EHR's FHIR server with the user's token, in one transaction.

The page reads the record from the EHR's own FHIR server with the user's token, never from
ChartSight's configured source, and every call is scoped to the launch's patient and to the
resource types the granted scopes allow (SMART v2 ``patient/Observation.rs``: ``readable``). Only
EHRs listed in ``serve.smart.issuers`` may launch it (a launch makes the server fetch from ``iss``).

The user is named by the EHR's OpenID Connect ``id_token`` (scopes ``openid fhirUser``), checked
against the EHR's keys (``jwks_uri``), issuer, the client id and the launch's ``nonce``; the
audit log's subject is that ``fhirUser`` (``Practitioner/123``). The app is a public client (PKCE),
or a confidential one: a client secret, or asymmetric (``private_key_jwt``: a signed client
assertion, ``connectors.auth.client_assertion``, with its public key at
``/.well-known/jwks.json``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import re
import secrets
import time
import weakref
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.resources import files
from typing import Annotated, Any
from urllib.parse import urlencode

import httpx
import jwt
from fastapi import APIRouter, Cookie, Depends, Header, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, select_autoescape
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse

from agent import (
    Answer,
    Approval,
    ChartSightError,
    FhirSource,
    ImageSet,
    PatientRecord,
    RecordScope,
    answer_bundle,
    cited_series,
    display_name,
    ehr_source,
    save_to_chart,
)
from connectors.auth import CLIENT_ASSERTION_TYPE, client_assertion, public_jwks
from connectors.errors import AuthError
from surfaces.http.deps import (
    Service,
    Svc,
    answer_stream,
    check_question,
    http_error,
    model_card_url,
)
from surfaces.http.drafts import Draft
from surfaces.http.limits import retry_after
from surfaces.http.middleware import note_caller
from surfaces.http.schemas import UNREADABLE_BODY, problem
from surfaces.http.security import (
    Forbidden,
    Principal,
    authorize,
    case_privacy,
    listed_fhir_base,
    may,
    readable,
)
from surfaces.plots import trend_svg
from surfaces.settings import SmartAppSettings

COOKIE = "chartsight_session"

# the errors of a page call that reads the launch patient's record from the EHR (``http_error``)
RECORD_ERRORS: dict[int | str, dict[str, Any]] = {
    401: problem("No live app session: launch ChartSight from the EHR."),
    404: problem("The launch's patient is not on the EHR's FHIR server."),
    502: problem("The EHR's FHIR server failed."),
}
_closing: set[asyncio.Future[None]] = set()  # FHIR clients of expired sessions being closed
log = logging.getLogger(__name__)

# the drafts being saved by this process, so that two saves of one draft run one after the other
# (a lock lives while a save holds or awaits it)
_saving: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def _note_page_user(
    request: Request, chartsight_session: Annotated[str | None, Cookie()] = None
) -> None:
    """For the request log's hashed ``caller`` (``middleware.note_caller``): the page's user
    (the session's ``fhirUser`` or token subject; every page session shares one SMART client id,
    so the user is what tells callers apart). Quiet when there is no live session: the route
    itself refuses it."""
    svc = getattr(request.app.state, "service", None)
    sessions = getattr(svc, "smart_sessions", None)
    session = sessions.sessions.get(chartsight_session or "") if sessions is not None else None
    if session is not None:
        note_caller(request.scope.setdefault("state", {}), session.user)


router = APIRouter(
    tags=["SMART app"], include_in_schema=True, dependencies=[Depends(_note_page_user)]
)


@dataclass
class _Pending:
    iss: str
    verifier: str
    token_endpoint: str
    nonce: str | None = None  # sent with `openid`: the id_token must carry it back
    issuer: str | None = None  # the EHR's OpenID issuer and keys (its SMART configuration)
    jwks_uri: str | None = None
    created: float = field(default_factory=time.monotonic)


# id_token signatures ChartSight accepts (SMART App Launch 2.2 requires RS256 support; never "none")
_ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "ES256", "ES384"]


@dataclass
class AppSession:
    """One clinician's session of the app after an EHR launch: the EHR's FHIR base (``iss``),
    the user's access token, the launch's patient, the granted scopes, the user (``fhirUser``),
    the expiry (``time.monotonic()`` seconds, at most 12 h after the launch), the CSRF token the
    page sends back, and the record, images and FHIR client kept for the session."""

    iss: str
    access_token: str
    patient: str
    scope: str
    user: str
    expires: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    record: PatientRecord | None = None
    images: ImageSet | None = None
    source: FhirSource | None = None

    def principal(self, client_id: str) -> Principal:
        """The session's caller for authorization and the audit log: the app's ``client_id``, the
        user, the granted scopes, bound to the launch's patient; its realm is the EHR, so two EHRs'
        users (or users without ``fhirUser``, all "SMART user") never share a thread."""
        return Principal(
            client_id, self.user, frozenset(self.scope.split()), self.patient, realm=self.iss
        )

    def readable(self) -> RecordScope:
        """What of the record the granted scopes let the page read (``security.readable``)."""
        return readable(self.principal(""))

    def fhir(self) -> FhirSource:
        """The EHR's FHIR server, read with the user's token."""
        if self.source is None:
            self.source = ehr_source(self.iss, self.access_token)
        return self.source


class Sessions:
    """Launch states and app sessions, in memory, bounded and expiring."""

    def __init__(self, max_items: int = 10_000) -> None:
        self.pending: dict[str, _Pending] = {}
        self.sessions: dict[str, AppSession] = {}
        self.max_items = max_items

    def add_pending(self, state: str, pending: _Pending) -> None:
        """Keep a launch under its OAuth ``state`` until the callback, dropping launches older
        than 10 minutes. Raises HTTP 503 when ``max_items`` launches are in progress."""
        now = time.monotonic()
        self.pending = {k: v for k, v in self.pending.items() if now - v.created < 600}
        if len(self.pending) >= self.max_items:
            raise HTTPException(503, "too many launches in progress")
        self.pending[state] = pending

    def add(self, session: AppSession) -> str:
        """Keep ``session`` and return its new id (the cookie's value, 32 random bytes in base64
        URL form). Expired sessions are dropped (their FHIR clients closed in the background),
        and the oldest when ``max_items`` are kept."""
        now = time.monotonic()
        for sid in [k for k, v in self.sessions.items() if v.expires < now]:
            expired = self.sessions.pop(sid)
            if expired.source is not None:
                _closing.add(task := asyncio.ensure_future(expired.source.aclose()))
                task.add_done_callback(_closing.discard)
        while len(self.sessions) >= self.max_items:
            self.sessions.pop(next(iter(self.sessions)))
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = session
        return sid

    def get(self, sid: str | None) -> AppSession:
        """The live session of the cookie ``sid``. Raises HTTP 401 when there is none or it has
        expired (the clinician launches the app from the EHR again)."""
        session = self.sessions.get(sid or "")
        if session is None or session.expires < time.monotonic():
            raise HTTPException(401, "no app session: launch ChartSight from the EHR")
        return session


def _sessions(svc: Service) -> Sessions:
    if svc.smart_sessions is None:
        svc.smart_sessions = Sessions()
    sessions: Sessions = svc.smart_sessions
    return sessions


def _redirect_uri(svc: Service, request: Request) -> str:
    base = svc.settings.serve.public_url or str(request.base_url).rstrip("/")
    return f"{base.rstrip('/')}/callback"


@router.get(
    "/launch",
    summary="SMART EHR launch: discovery, then authorization (PKCE).",
    responses={
        302: {"description": "To the EHR's authorization endpoint."},
        400: problem("This EHR (`iss`) is not configured for ChartSight."),
        502: problem("The EHR's SMART configuration cannot be read or lacks PKCE S256."),
        503: problem("Too many launches in progress."),
    },
)
async def launch(
    request: Request,
    svc: Svc,
    iss: Annotated[str, Query(max_length=500)],
    launch: Annotated[str, Query(max_length=500)],
) -> RedirectResponse:
    """302 to the EHR's authorization endpoint (authorization code with PKCE S256, ``aud`` the
    FHIR base, the ``launch`` context, ``serve.smart.scope``, a ``nonce`` when it holds
    ``openid``), found in ``{iss}/.well-known/smart-configuration`` (whose ``issuer`` and
    ``jwks_uri`` are kept to check the id_token). 400 when ``iss`` is not one of
    ``serve.smart.issuers``; 502 when the configuration cannot be read, lacks an endpoint, or the
    EHR does not support S256."""
    smart = svc.settings.serve.smart
    iss = iss.rstrip("/")
    if not listed_fhir_base(iss, smart.issuers):
        raise HTTPException(400, "this EHR (iss) is not configured for ChartSight")
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.get(f"{iss}/.well-known/smart-configuration")
            reply.raise_for_status()
            config = reply.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise HTTPException(
            502, f"the EHR's SMART configuration could not be read ({type(exc).__name__})"
        ) from exc
    if "S256" not in config.get("code_challenge_methods_supported", ["S256"]):
        raise HTTPException(502, "the EHR does not support PKCE S256")
    try:
        authorize_url, token_url = config["authorization_endpoint"], config["token_endpoint"]
    except KeyError as exc:
        raise HTTPException(502, f"the EHR's SMART configuration lacks {exc}") from exc
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    state = secrets.token_urlsafe(24)
    nonce = secrets.token_urlsafe(24) if "openid" in smart.scope.split() else None
    issuer, jwks_uri = config.get("issuer"), config.get("jwks_uri")
    _sessions(svc).add_pending(
        state,
        _Pending(
            iss,
            verifier,
            token_url,
            nonce,
            str(issuer) if issuer else None,
            str(jwks_uri) if jwks_uri else None,
        ),
    )
    params = {
        "response_type": "code",
        "client_id": smart.client_id,
        "redirect_uri": _redirect_uri(svc, request),
        "scope": smart.scope,
        "state": state,
        "aud": iss,
        "launch": launch,
        "code_challenge": challenge.decode().rstrip("="),
        "code_challenge_method": "S256",
    }
    if nonce is not None:
        params["nonce"] = nonce
    query = urlencode(params)
    return RedirectResponse(f"{authorize_url}?{query}", 302)


@router.get(
    "/callback",
    summary="SMART authorization callback: the code for a token.",
    responses={
        303: {"description": "To `/app`, with the session cookie."},
        400: problem("An unknown or expired launch, a refusal, or no patient in context."),
        502: problem("The EHR's token request or its id_token failed."),
        503: problem("The SMART client key cannot be read."),
    },
)
async def callback(
    request: Request,
    svc: Svc,
    state: Annotated[str, Query(max_length=200)] = "",
    code: Annotated[str, Query(max_length=2000)] = "",
    error: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Exchange the authorization code (with the PKCE verifier; a confidential client also
    authenticates: a signed ``client_assertion`` with ``serve.smart.private_key_path``, else HTTP
    Basic with ``client_secret``) for a token with the patient in context, open a session and 303
    to ``/app`` with its HttpOnly cookie. The session's user is the ``fhirUser`` of the token
    response's ``id_token`` (``_id_token_user``), else of the token response, else "SMART user".
    400 for an unknown or expired ``state`` (over 10 minutes), an EHR error, or a token without a
    patient; 502 when the token request fails or is refused, or the id_token is not valid; 503
    when the client key cannot be read."""
    pending = _sessions(svc).pending.pop(state, None)
    if pending is None or time.monotonic() - pending.created > 600:
        raise HTTPException(400, "unknown or expired launch; launch ChartSight again from the EHR")
    if error or not code:
        raise HTTPException(400, f"the EHR did not authorize the app: {error or 'no code'}")
    smart = svc.settings.serve.smart
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": _redirect_uri(svc, request),
        "client_id": smart.client_id,
        "code_verifier": pending.verifier,
    }
    headers = {}
    if smart.private_key_path is not None:  # confidential asymmetric: RFC 7523 assertion
        form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        form["client_assertion"] = client_assertion(
            smart.client_id, pending.token_endpoint, _private_key(smart), smart.algorithm,
            smart.key_id,
        )  # fmt: skip
    elif smart.client_secret is not None:  # a confidential client authenticates itself too
        pair = f"{smart.client_id}:{smart.client_secret.get_secret_value()}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    try:
        async with httpx.AsyncClient(timeout=15) as client:
            reply = await client.post(pending.token_endpoint, data=form, headers=headers)
            token = reply.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise HTTPException(502, f"the token request failed ({type(exc).__name__})") from exc
    if reply.status_code != 200 or "access_token" not in token:
        raise HTTPException(502, f"the EHR refused the token request: {token.get('error')}")
    if not token.get("patient"):
        raise HTTPException(400, "the launch carried no patient context")
    user = str(token.get("fhirUser") or token.get("user") or "SMART user")
    if token.get("id_token"):
        user = await _id_token_user(pending, str(token["id_token"]), smart.client_id)
    session = AppSession(
        iss=pending.iss,
        access_token=token["access_token"],
        patient=str(token["patient"]),
        scope=str(token.get("scope", "")),
        user=user,
        expires=time.monotonic() + min(float(token.get("expires_in", 3600)), 12 * 3600),
    )
    sid = _sessions(svc).add(session)
    response = RedirectResponse("/app", 303)
    secure = (svc.settings.serve.public_url or "").startswith("https://")
    response.set_cookie(COOKIE, sid, httponly=True, samesite="lax", secure=secure, path="/app")
    return response


def _private_key(smart: SmartAppSettings) -> bytes:
    """The PEM of ``serve.smart.private_key_path``. Raises HTTP 503 when it cannot be read."""
    assert smart.private_key_path is not None
    try:
        return smart.private_key_path.expanduser().read_bytes()
    except OSError as exc:
        log.error("serve.smart.private_key_path cannot be read: %s", exc)  # the operator's
        raise HTTPException(503, "the SMART client key cannot be read") from exc


async def _id_token_user(pending: _Pending, id_token: str, client_id: str) -> str:
    """The user an EHR's OpenID Connect id_token names, once it is checked (SMART App Launch
    2.2, "Scopes for requesting identity data"; OpenID Connect Core 3.1.3.7): signed by a key of
    the EHR's ``jwks_uri`` (RS256/RS384/ES256/ES384, by ``kid``), ``iss`` the EHR's ``issuer``,
    ``aud`` the app's ``client_id``, not expired, and carrying the launch's ``nonce``. The user
    is its ``fhirUser`` (SMART v1 ``profile``), relative when under the EHR's FHIR base
    (``Practitioner/123``), else ``sub``. Raises HTTP 502 when it cannot be checked or is not
    valid."""
    if not pending.jwks_uri or not pending.issuer:
        raise HTTPException(
            502,
            "the EHR sent an id_token, but its SMART configuration names no issuer and jwks_uri",
        )
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            reply = await client.get(pending.jwks_uri, headers={"Accept": "application/json"})
            reply.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(reply.json()).keys
    except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
        raise HTTPException(
            502, f"the EHR's keys (jwks_uri) could not be read ({type(exc).__name__})"
        ) from exc
    try:
        kid = jwt.get_unverified_header(id_token).get("kid")
        candidates = [k for k in keys if kid is None or k.key_id == kid]
        if not candidates:
            raise jwt.InvalidTokenError("no key of the EHR has the id_token's kid")
        claims: dict[str, Any] = jwt.decode(
            id_token,
            candidates[0].key,
            algorithms=_ID_TOKEN_ALGORITHMS,
            audience=client_id,
            issuer=pending.issuer,
            leeway=60,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
        if pending.nonce is not None and claims.get("nonce") != pending.nonce:
            raise jwt.InvalidTokenError("the nonce is not the launch's")
    except jwt.PyJWTError as exc:
        raise HTTPException(502, f"the EHR's id_token is not valid: {exc}") from exc
    user = str(claims.get("fhirUser") or claims.get("profile") or claims["sub"])
    base = pending.iss.rstrip("/") + "/"
    return user[len(base) :] if user.startswith(base) else user


@router.get(
    "/.well-known/jwks.json",
    summary="The SMART app's public key set, for EHRs registering it as a private_key_jwt client.",
    responses={
        404: problem("This service is not a confidential SMART client (no key)."),
        503: problem("The SMART client key cannot be read."),
    },
)
async def jwks(svc: Svc) -> dict[str, Any]:
    """The JSON Web Key Set (RFC 7517) of the public half of ``serve.smart.private_key_path``
    (``{"keys": [{"kty", "n", "e" | "crv", "x", "y", "alg", "use": "sig", "kid"}]}``): what an EHR
    registers for ChartSight as a confidential asymmetric client (SMART App Launch 2.2,
    "client-confidential-asymmetric": the client publishes its keys at a JWKS URL). No
    credentials needed (public keys only). 404 when no key is configured; 503 when it cannot
    be read."""
    smart = svc.settings.serve.smart
    if smart.private_key_path is None:
        raise HTTPException(404, "this service is not a confidential SMART client (no key)")
    try:
        return public_jwks(_private_key(smart), smart.algorithm, smart.key_id)
    except AuthError as exc:
        raise HTTPException(503, "the SMART client key cannot be read") from exc


_TEMPLATES = Environment(autoescape=select_autoescape(default=True, default_for_string=True))


def _page(name: str) -> Any:
    text = files("surfaces.http").joinpath("templates", name).read_text(encoding="utf-8")
    return _TEMPLATES.from_string(text)


async def _audited_record(svc: Service, session: AppSession, endpoint: str) -> PatientRecord:
    """``_record``; when it cannot be read, an ``error`` audit row under ``endpoint`` and the
    error as ``http_error`` maps it."""
    try:
        return await _record(svc, session)
    except ChartSightError as exc:
        await _audit(svc, session, endpoint, "error", detail=type(exc).__name__)
        raise http_error(exc) from exc


async def _record(svc: Service, session: AppSession) -> PatientRecord:
    """The launch patient's record from the EHR, kept for the session: only the resource types
    the granted scopes allow (``readable``), as the page's answers are."""
    if session.record is None:
        session.record = await svc.agent.record(
            session.patient, source=session.fhir(), scope=session.readable()
        )
    return session.record


async def _audit(svc: Service, session: AppSession, endpoint: str, outcome: str, **kw: Any) -> None:
    """One audit row for a page call about the launch's patient, as the session's user and the
    app's client (``AuditLog.record``'s ``detail`` and ``answer`` in ``kw``)."""
    who = session.principal(svc.settings.serve.smart.client_id)
    await svc.audit.arecord(who, endpoint, outcome, patient_id=session.patient, **kw)


async def _session(svc: Service, sid: str | None, endpoint: str = "app") -> AppSession:
    session = _sessions(svc).get(sid)
    wait = svc.limiter.take(f"smart-app:{hashlib.sha256((sid or '').encode()).hexdigest()[:16]}")
    if wait > 0:
        raise HTTPException(
            429, "too many requests from this session", headers={"Retry-After": retry_after(wait)}
        )
    try:
        authorize(session.principal(svc.settings.serve.smart.client_id), session.patient)
    except Forbidden as exc:
        await _audit(svc, session, endpoint, "denied", detail=str(exc))
        raise HTTPException(403, exc.public) from exc
    return session


# a SMART ``fhirUser``: a FHIR reference (relative or absolute) to the user's own resource
_FHIR_USER = re.compile(
    r"(^|/)(Practitioner|PractitionerRole|RelatedPerson|Patient)/[A-Za-z0-9\-.]{1,64}$"
)


def _may_save(svc: Service, session: AppSession) -> bool:
    """Whether the session may save answers to the chart: its token grants create on
    DocumentReference and Provenance (``may``, SMART v1 or v2 scopes) and names its user as a
    FHIR reference (``fhirUser``), who is recorded as the approver."""
    who = session.principal(svc.settings.serve.smart.client_id)
    return (
        may(who, "DocumentReference", "c")
        and may(who, "Provenance", "c")
        and _FHIR_USER.search(session.user) is not None
    )


def _sid_digest(sid: str | None) -> str:
    return hashlib.sha256((sid or "").encode()).hexdigest()


@router.get(
    "/app",
    response_class=HTMLResponse,
    summary="The clinician's page.",
    responses=RECORD_ERRORS,
)
async def app_page(
    svc: Svc, chartsight_session: Annotated[str | None, Cookie()] = None
) -> HTMLResponse:
    """The page for the launch's patient (banner with name, sex, birth date and id; the question
    box), never cached. 401 without a live session; 429 past the session's rate; the record's
    errors as ``http_error`` maps them. Audited as ``app_page`` (the banner shows the patient)."""
    session = await _session(svc, chartsight_session, "app_page")
    record = await _audited_record(svc, session, "app_page")
    await _audit(svc, session, "app_page", "answered")
    patient = record.patient
    html = _page("app.html").render(
        name=display_name(patient),
        gender=patient.gender or "unknown sex",
        birth_date=str(patient.birthDate or "unknown"),
        patient_id=record.patient_id,
        user=session.user,
        csrf=session.csrf,
        max_chars=svc.settings.serve.max_question_chars,
        can_save=_may_save(svc, session),
    )
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


def _check_csrf(session: AppSession, token: str | None) -> None:
    if not token or not secrets.compare_digest(token, session.csrf):
        raise HTTPException(403, "missing or wrong CSRF token")


class PageAsk(BaseModel):
    """The page's question, and the thread to continue (the caller's own, about this patient)."""

    question: str = Field(min_length=1)
    thread: str | None = Field(default=None, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")


@router.post(
    "/app/ask",
    summary="The page's question: Server-Sent Events, then the answer.",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "The run's events, then `answer` (with `draft_id` when the session "
            "may save) or `error`.",
        },
        400: UNREADABLE_BODY,
        401: problem("No live app session: launch ChartSight from the EHR."),
    },
)
async def app_ask(
    body: PageAsk,
    svc: Svc,
    x_csrf_token: Annotated[str | None, Header()] = None,
    chartsight_session: Annotated[str | None, Cookie()] = None,
) -> EventSourceResponse:
    """The answer to the page's question about the launch's patient, read from the EHR with the
    user's token, as Server-Sent Events (``answer_stream``'s events, then ``answer`` or
    ``error``). When the session may save to the chart (``_may_save``) the answer is kept as a
    draft and its event carries ``draft_id``. 403 without the session's CSRF token
    (``X-CSRF-Token``); 422 for a question over ``serve.max_question_chars``."""
    session = await _session(svc, chartsight_session, "app_ask")
    _check_csrf(session, x_csrf_token)
    check_question(svc, body.question)
    who = session.principal(svc.settings.serve.smart.client_id)

    async def keep_draft(answer: Answer) -> dict[str, Any]:
        draft = await svc.drafts.akeep(
            answer, session_sha256=_sid_digest(chartsight_session), iss=session.iss,
            user=session.user,
        )  # fmt: skip
        return {"draft_id": draft}

    return answer_stream(
        svc, who, "app_ask", session.patient, body.question, body.thread,
        source=session.fhir(), keep=False,  # no thread: nothing kept, as over REST and MCP
        on_answer=keep_draft if _may_save(svc, session) else None,
    )  # fmt: skip


class PageSave(BaseModel):
    """The clinician's approval of one draft the page was shown (``draft_id`` of its answer
    event); ``approved`` must be true: the page sends it only after the clinician confirmed."""

    draft: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    approved: bool = False


class Saved(BaseModel):
    """What ``/app/save`` wrote: the EHR's locations of the DocumentReference and the Provenance
    (``DocumentReference/123/_history/1``), who approved, and when (ISO 8601, UTC)."""

    document_reference: str
    provenance: str
    approver: str
    recorded: str


@router.post(
    "/app/save",
    response_model=Saved,
    summary="Save an approved answer to the chart.",
    responses={
        400: problem("Not approved, or a body that cannot be decoded."),
        401: problem("No live app session: launch ChartSight from the EHR."),
        404: problem("No such answer in this session."),
        409: problem("This answer was saved to the chart already."),
        502: problem("The EHR refused the write or failed."),
    },
)
async def app_save(
    body: PageSave,
    request: Request,
    svc: Svc,
    x_csrf_token: Annotated[str | None, Header()] = None,
    chartsight_session: Annotated[str | None, Cookie()] = None,
) -> Saved:
    """Write the session's draft ``body.draft`` to the EHR's chart as one transaction Bundle
    (``agent.answer_bundle``): the answer as a preliminary DocumentReference labelled AI-asserted,
    and its AI Provenance with the session's user (``fhirUser``) as the verifier agent and now as
    ``recorded``, sent to the launch's ``iss`` with the user's token. The text and citations are
    the stored draft's, never the browser's. The approval and its outcome are kept
    (``DraftStore.approve``) and audited as ``smart:save``. 400 without ``approved: true``; 403
    without the CSRF token, or when the token may not create DocumentReference and Provenance or
    names no user; 404 for a draft this session was not shown; 409 for a draft saved already
    (``_save_once``); the EHR's refusal as ``http_error`` maps it (502)."""
    session = await _session(svc, chartsight_session, "smart:save")
    _check_csrf(session, x_csrf_token)
    who = session.principal(svc.settings.serve.smart.client_id)
    if not _may_save(svc, session):
        await svc.audit.arecord(
            who, "smart:save", "denied", patient_id=session.patient, detail="no write scope"
        )
        raise HTTPException(
            403, "this launch may not save to the chart (it needs write scopes for "
            "DocumentReference and Provenance, and fhirUser)",
        )  # fmt: skip
    if body.approved is not True:
        await svc.audit.arecord(
            who, "smart:save", "refused", patient_id=session.patient, detail="not approved"
        )
        raise HTTPException(400, "a clinician's approval is required to save to the chart")
    draft = await asyncio.to_thread(svc.drafts.get, body.draft)
    if (
        draft is None
        or not secrets.compare_digest(draft.session_sha256, _sid_digest(chartsight_session))
        or draft.patient_id != session.patient
        or draft.iss != session.iss
    ):
        raise HTTPException(404, "no such answer in this session")
    lock = _saving.setdefault(draft.id, asyncio.Lock())
    async with lock:
        return await _save_once(svc, request, session, who, draft)


async def _save_once(
    svc: Service, request: Request, session: AppSession, who: Principal, draft: Draft
) -> Saved:
    """``app_save``'s write of ``draft``, unless it was saved already: 409, naming the
    DocumentReference saved then, with nothing sent (a repeated or replayed request, a second
    click, must not put a second copy of the answer in the chart). Runs under the draft's lock,
    so that concurrent saves of one draft in this process see each other's outcome."""
    approvals = await asyncio.to_thread(svc.drafts.approvals, draft.id)
    done = [a for a in approvals if a["outcome"] == "saved"]
    if done:
        await svc.audit.arecord(
            who, "smart:save", "refused", patient_id=session.patient, detail="saved already"
        )
        first = (done[0]["locations"] or ["the chart"])[0]
        raise HTTPException(409, f"this answer was saved to the chart already ({first})")
    approval = Approval(approver=session.user, at=datetime.now(UTC))
    bundle = answer_bundle(
        draft.answer, bundle_type="transaction", model_card_url=model_card_url(svc, request),
        approval=approval,
    )  # fmt: skip
    answer_json = draft.answer.model_dump(mode="json")
    try:
        locations = await save_to_chart(session.fhir(), bundle)
    except ChartSightError as exc:
        await svc.drafts.aapprove(
            draft.id, approver=session.user, at=approval.at, outcome="failed", bundle=bundle,
            detail=type(exc).__name__,
        )  # fmt: skip
        await svc.audit.arecord(
            who, "smart:save", "error", patient_id=session.patient, answer=answer_json,
            detail=type(exc).__name__,
        )  # fmt: skip
        raise http_error(exc) from exc
    await svc.drafts.aapprove(
        draft.id, approver=session.user, at=approval.at, outcome="saved", bundle=bundle,
        locations=locations,
    )  # fmt: skip
    await svc.audit.arecord(
        who, "smart:save", "saved", patient_id=session.patient, answer=answer_json,
        detail=" ".join(locations),
    )  # fmt: skip
    doc, prov = [*locations, "", ""][:2]
    return Saved(
        document_reference=doc,
        provenance=prov,
        approver=session.user,
        recorded=approval.at.isoformat(timespec="seconds"),
    )


# how the page names the shaded band: the lab's own range, or terms.toml's usual adult range
_RANGE_NAMES = {"ref": "reference range", "usual range": "usual range"}


class PageTrend(BaseModel):
    """The references an answer cites (``Citation.reference``: ``Type/id``, at most 2,000)."""

    references: list[Annotated[str, Field(max_length=200)]] = Field(max_length=2000)


@router.post(
    "/app/trend",
    summary="A plot of the answer's cited results over time, or nothing.",
    response_class=Response,
    responses={
        200: {"content": {"image/svg+xml": {}}, "description": "The trend plot (SVG)."},
        204: {"description": "The citations are no series of one measured concept."},
        400: UNREADABLE_BODY,
        **RECORD_ERRORS,
    },
)
async def app_trend(
    body: PageTrend,
    svc: Svc,
    x_csrf_token: Annotated[str | None, Header()] = None,
    chartsight_session: Annotated[str | None, Cookie()] = None,
) -> Response:
    """An SVG (``image/svg+xml``, about 480×200 px, ``surfaces.plots.trend_svg``) of the cited
    results of one measured concept over time, read from the launch patient's record
    (``agent.cited_series``: at least 3 cited Observations with exact numeric values; references
    not in this patient's record are ignored), with the lab's reference range (else the usual
    range) shaded and each point linked to ``#Observation/<id>``; 204 when the citations are no
    such series. 403 without the session's CSRF token; the record's errors as ``http_error``
    maps them. Audited as ``app_trend``, with the plotted references as the cited ones."""
    session = await _session(svc, chartsight_session, "app_trend")
    _check_csrf(session, x_csrf_token)
    record = await _audited_record(svc, session, "app_trend")
    series = cited_series(record, body.references)
    plotted = [{"reference": ref} for _, _, ref in series.points] if series else []
    await _audit(svc, session, "app_trend", "answered", answer={"citations": plotted})
    if series is None:
        return Response(status_code=204, headers={"Cache-Control": "no-store"})
    svg = await asyncio.to_thread(
        trend_svg, series.points, title=series.name, unit=series.unit or "",
        low=series.low, high=series.high, range_label=_RANGE_NAMES.get(series.range_label or "", ""),
    )  # fmt: skip
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


@router.get(
    "/app/resource/{resource_type}/{resource_id}",
    summary="A cited resource's JSON.",
    response_class=Response,
    responses={
        200: {
            "content": {"application/fhir+json": {"schema": {"type": "object"}}},
            "description": "The FHIR R4 resource.",
        },
        **RECORD_ERRORS,
        404: problem("No such resource in this patient's record."),
    },
)
async def app_resource(
    resource_type: Annotated[str, Path(pattern=r"^[A-Z][A-Za-z]+$")],
    resource_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9\-.]{1,64}$")],
    svc: Svc,
    chartsight_session: Annotated[str | None, Cookie()] = None,
) -> Response:
    """A cited resource's JSON (``application/fhir+json``), only from the launch patient's
    record. 404 when the record holds no such resource. Audited as ``app_resource``, the
    resource as the cited one."""
    session = await _session(svc, chartsight_session, "app_resource")
    record = await _audited_record(svc, session, "app_resource")
    wanted = f"{resource_type}/{resource_id}"
    for res in record.resources():
        if f"{res.get_resource_type()}/{res.id}" == wanted:  # only this patient's resources
            shown = {"citations": [{"reference": wanted}]}
            await _audit(svc, session, "app_resource", "answered", answer=shown)
            return Response(
                res.model_dump_json(indent=2, exclude_none=True), media_type="application/fhir+json"
            )
    await _audit(svc, session, "app_resource", "not found")
    raise HTTPException(404, f"{wanted} is not in this patient's record")


@router.get(
    "/app/similar",
    summary="Similar cases for the launch's patient.",
    responses={
        **RECORD_ERRORS,
        503: problem("No similar-case index has been built (`chartsight index build`)."),
    },
)
async def app_similar(
    svc: Svc, chartsight_session: Annotated[str | None, Cookie()] = None
) -> list[dict[str, Any]]:
    """The 4 cases most similar to the launch's patient, as ``CaseHit`` plus ``thumbnail``
    (a PNG data URL, or null): in full with a thumbnail for a caller who may read other
    patients' records, else generalised without one (``case_privacy``); 403 when the granted
    scopes cover only some resource types. Audited as ``app_similar``."""
    session = await _session(svc, chartsight_session, "app_similar")
    privacy = case_privacy(session.principal(svc.settings.serve.smart.client_id))
    try:
        hits = await svc.agent.similar(
            session.patient, 4, source=session.fhir(), case_privacy=privacy,
            scope=session.readable(),
        )  # fmt: skip
    except ChartSightError as exc:
        await _audit(svc, session, "app_similar", "error", detail=type(exc).__name__)
        raise http_error(exc) from exc
    await _audit(svc, session, "app_similar", "answered")
    out = []
    for hit in hits:
        item = asdict(hit)
        # another patient's picture is not shown to a caller bound to one patient
        thumb = svc.agent.thumbnail(hit.key) if privacy == "full" else None
        item["thumbnail"] = (
            f"data:image/png;base64,{base64.b64encode(thumb).decode()}" if thumb else None
        )
        out.append(item)
    return out


@router.get(
    "/app/image",
    summary="A thumbnail of one of the patient's images.",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The thumbnail (PNG)."},
        **RECORD_ERRORS,
        404: problem("No such image of this patient."),
    },
)
async def app_image(
    svc: Svc,
    ref: Annotated[str, Query(max_length=200)],
    sop: Annotated[str | None, Query(max_length=128)] = None,
    chartsight_session: Annotated[str | None, Cookie()] = None,
) -> Response:
    """A PNG thumbnail (at most 256×256 pixels) of the patient's image from the FHIR resource
    ``ref`` (and the DICOM SOP instance ``sop``, for a study). 404 when the patient has no such
    image. Audited as ``app_image``, the image's resource as the cited one."""
    session = await _session(svc, chartsight_session, "app_image")
    record = await _audited_record(svc, session, "app_image")
    if session.images is None:
        try:
            session.images = await svc.agent.images(
                record, source=session.fhir(), scope=session.readable()
            )
        except ChartSightError as exc:
            await _audit(svc, session, "app_image", "error", detail=type(exc).__name__)
            raise http_error(exc) from exc
    for image in session.images.images:
        p = image.provenance
        if p.fhir_reference == ref and (sop is None or p.sop_instance_uid == sop):
            shown = {"citations": [{"reference": ref}]}
            await _audit(svc, session, "app_image", "answered", answer=shown)
            picture = image.to_pil()
            picture.thumbnail((256, 256))
            buf = io.BytesIO()
            picture.convert("L" if picture.mode not in ("RGB", "L") else picture.mode).save(
                buf, format="PNG"
            )
            return Response(buf.getvalue(), media_type="image/png")
    await _audit(svc, session, "app_image", "not found")
    raise HTTPException(404, "no such image of this patient")
