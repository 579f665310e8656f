"""CDS Hooks 2.0 (https://cds-hooks.hl7.org/2.0/): discovery, a ``patient-view`` service that
returns one card summarising the patient's chart, and the feedback endpoint.

Every call may carry the JWT a trusted CDS Client signs (``cds_trust``: iss allow-list, JWK Set or
an allowed ``jku``, ``aud`` the URL called, ``exp``, ``jti`` never seen before); with
``serve.cds.signed_only`` nothing else is accepted, otherwise the service's API keys and SMART
bearer tokens are accepted too.

The record comes from the request's ``prefetch`` when the EHR sent it (the service asks for the
Patient, active Conditions, recent Observations and active MedicationRequests), otherwise from the
request's ``fhirServer`` with its ``fhirAuthorization`` token. When neither gives the record (no
data, or the FHIR server cannot be reached or refuses) the answer is 412 Precondition Failed
naming why, as the spec requires. If the card is not ready within the configured budget (default
2 s), the EHR gets an information card saying so at once (it links to the SMART app).

Every card has a ``uuid``, remembered with its patient and caller (``cds_store``), so that the
feedback endpoint (``POST …/feedback``) accepts outcomes only for cards this service issued;
feedback is stored append-only, audited (``cds:feedback``) and read back with ``GET …/feedback``.
Requests and responses follow the spec's JSON shapes: a malformed request gets a 400 naming what
is wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from agent import ChartSightError, PrefetchSource, RecordScope
from connectors.errors import ConnectorError, HttpStatusError, TransportError
from connectors.fhir_client import FhirClient
from connectors.settings import FhirServerSettings, HttpSettings
from retrieval.cases import chart_sections
from retrieval.evidence import record_evidence
from surfaces.http.cds_card import CardText, compose_card
from surfaces.http.deps import Service, Svc, allowed, principal
from surfaces.http.limits import retry_after
from surfaces.http.security import Principal, Unauthenticated, listed_fhir_base, readable

log = logging.getLogger("chartsight.api")

SERVICE_ID = "chartsight-patient-view"
PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "conditions": "Condition?patient={{context.patientId}}&clinical-status=active",
    "observations": "Observation?patient={{context.patientId}}&_sort=-date&_count=100",
    "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
    "allergies": "AllergyIntolerance?patient={{context.patientId}}&clinical-status=active",
}

router = APIRouter(tags=["CDS Hooks"])


# --- the spec's shapes ------------------------------------------------------------------------------


class FhirAuthorization(BaseModel):
    """The hook request's ``fhirAuthorization``: an OAuth 2.0 bearer token for ``fhirServer``,
    its lifetime in seconds, scopes and subject, and the patient it is bound to, if any."""

    model_config = ConfigDict(extra="allow")
    access_token: str = Field(min_length=1)
    token_type: Literal["Bearer"]
    expires_in: int
    scope: str
    subject: str
    patient: str | None = None


class PatientViewContext(BaseModel):
    """``patient-view``'s context: the user (``Practitioner/123``), the patient's id and the
    encounter, if any."""

    model_config = ConfigDict(extra="allow")
    userId: str = Field(min_length=1)
    patientId: str = Field(min_length=1, max_length=200)
    encounterId: str | None = None


class HookRequest(BaseModel):
    """A CDS Hooks 2.0 request: the hook, its instance id, where the record may be read
    (``fhirServer`` with ``fhirAuthorization``) and the ``prefetch`` results keyed as in
    ``PREFETCH`` (a null result allowed)."""

    model_config = ConfigDict(extra="allow")
    hook: str
    hookInstance: uuid.UUID
    fhirServer: AnyHttpUrl | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: PatientViewContext
    prefetch: dict[str, dict[str, Any] | None] | None = None


class Source(BaseModel):
    """A card's source: the label the EHR shows, a link about it and a coded topic."""

    label: str
    url: str | None = None
    topic: dict[str, str] | None = None


class Link(BaseModel):
    """A card's link: ``absolute`` to a web page, or ``smart`` to launch a SMART app (with its
    ``appContext``)."""

    label: str
    url: str
    type: Literal["absolute", "smart"]
    appContext: str | None = None


class Card(BaseModel):
    """A CDS Hooks card: its ``uuid`` (what feedback names), a summary of at most 140
    characters, a markdown detail, an indicator (info, warning, critical), its source and
    links."""

    uuid: str
    summary: str = Field(max_length=140)
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    links: list[Link] = []


class CardsResponse(BaseModel):
    """A service's response: the cards (none when there is nothing to say)."""

    cards: list[Card]


class ServiceDescription(BaseModel):
    """One service in the discovery response: its hook, id, title, description, the prefetch
    templates it asks for, and what it needs to be granted."""

    hook: str
    id: str
    title: str
    description: str
    prefetch: dict[str, str]
    usageRequirements: str | None = None


class Discovery(BaseModel):
    """The discovery response (``GET /cds-services``): the services offered."""

    services: list[ServiceDescription]


class Coding(BaseModel):
    """CDS Hooks' Coding: a ``code`` in a ``system``, with an optional ``display``."""

    model_config = ConfigDict(extra="allow")
    code: str = Field(min_length=1, max_length=200)
    system: str = Field(min_length=1, max_length=400)
    display: str | None = Field(default=None, max_length=400)


class OverrideReason(BaseModel):
    """Why the user overrode a card: the reason picked (a Coding) and/or their comment."""

    model_config = ConfigDict(extra="allow")
    reason: Coding | None = None
    userComment: str | None = Field(default=None, max_length=4000)


class AcceptedSuggestion(BaseModel):
    """A suggestion the user accepted, by its ``uuid``."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=200)


class Feedback(BaseModel):
    """One card's outcome (CDS Hooks 2.0 Feedback): the card's ``uuid``, ``accepted`` (with the
    accepted suggestions, required then) or ``overridden`` (with an optional reason), and when
    the user acted (an ISO 8601 timestamp with its offset)."""

    model_config = ConfigDict(extra="allow")
    card: str = Field(min_length=1, max_length=36)
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: datetime


class FeedbackRequest(BaseModel):
    """The feedback endpoint's body: ``{"feedback": [Feedback, ...]}`` (1 to 100 items)."""

    model_config = ConfigDict(extra="allow")
    feedback: list[Feedback] = Field(min_length=1, max_length=100)


class FeedbackRecorded(BaseModel):
    """The feedback endpoint's answer: how many outcomes were stored."""

    recorded: int


class StoredFeedback(Feedback):
    """Feedback as stored: the spec's fields plus when it was received, the card's patient and
    the client that sent it."""

    receivedAt: datetime
    patient: str
    client: str


class FeedbackList(BaseModel):
    """``GET …/feedback``: the stored feedback, newest first."""

    feedback: list[StoredFeedback]


# --- who may call: CDS Client JWTs, else the service's credentials --------------------------------


def _audiences(request: Request, svc: Service, *paths: str) -> list[str]:
    """The URLs a CDS Client JWT's ``aud`` may name for this call: the endpoint's URL under
    ``serve.public_url`` (how EHRs reach the service) or, without one, the request's base URL."""
    base = (svc.settings.serve.public_url or str(request.base_url)).rstrip("/")
    return [base + path for path in paths]


async def cds_principal(
    request: Request, svc: Service, paths: tuple[str, ...], *, required: bool = True
) -> Principal | None:
    """The caller of a CDS Hooks endpoint: a bearer JWT from a configured CDS Client (or any
    bearer token under ``serve.cds.signed_only``) is verified by ``CdsTrust.verify`` with ``aud``
    one of ``paths`` under the service's URL; else (unless ``signed_only``) the service's own
    credentials (``deps.principal``: API key, SMART bearer token). ``required=False`` (discovery)
    lets a call without a CDS Client JWT in as None. 401 naming the failed check; 429 over the
    client's rate."""
    signed_only = svc.settings.serve.cds.signed_only
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    token = token.strip()
    bearer = scheme.lower() == "bearer" and bool(token)
    if bearer and (signed_only or svc.cds_trust.client_of(token) is not None):
        try:
            who = await svc.cds_trust.verify(token, _audiences(request, svc, *paths))
        except Unauthenticated as exc:
            raise HTTPException(401, exc.public, headers={"WWW-Authenticate": "Bearer"}) from exc
    elif signed_only:
        if not required:
            return None
        raise HTTPException(
            401,
            "this service accepts only JWTs signed by a trusted CDS client "
            "(Authorization: Bearer <JWT>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    elif not required:
        return None
    else:
        return await principal(request, svc)
    wait = svc.limiter.take(who.client_id)
    if wait > 0:
        raise HTTPException(
            429, "too many requests from this client", headers={"Retry-After": retry_after(wait)}
        )
    return who


async def _caller(request: Request, svc: Service, *paths: str) -> Principal:
    who = await cds_principal(request, svc, paths)
    assert who is not None  # required=True: None is never returned
    return who


# --- routes ----------------------------------------------------------------------------------------


def _usage(svc: Service) -> str:
    """Discovery's ``usageRequirements``: what this deployment needs of a CDS Client, in words
    (no setting names): the data, and a signed JWT only when it requires one."""
    text = (
        "Send the prefetch, or grant patient/*.read (or user/*.read) on a FHIR server this "
        "service is configured to read."
    )
    if svc.settings.serve.cds.signed_only:
        text += " Sign each call with a JWT of a CDS Client this service trusts."
    return text + f" Feedback: POST /cds-services/{SERVICE_ID}/feedback."


# the CDS operations authenticate in their handlers (a CDS Client JWT, an API key or a SMART
# token): declared here so the OpenAPI document and the docs page's "Authorize" know it
_SECURED: dict[str, Any] = {"security": [{"apiKey": []}, {"bearerJWT": []}]}


@router.get("/cds-services", response_model=Discovery, summary="CDS Hooks discovery.")
async def discovery(request: Request, svc: Svc) -> Discovery:
    """The one service ChartSight offers: ``patient-view``, with the prefetch templates of its
    Patient, active Conditions, the 100 latest Observations, active MedicationRequests and active
    AllergyIntolerances. Open to any caller, but a CDS Client JWT sent with it is verified (``aud``
    ``…/cds-services``), and under ``serve.cds.signed_only`` one is required (401 otherwise)."""
    if svc.settings.serve.cds.signed_only:
        await _caller(request, svc, "/cds-services")
    else:
        await cds_principal(request, svc, ("/cds-services",), required=False)
    return Discovery(
        services=[
            ServiceDescription(
                hook="patient-view",
                id=SERVICE_ID,
                title="ChartSight patient summary",
                description="The patient's most relevant active problems and abnormal latest "
                "results in the summary; active problems, abnormal results, active medications "
                "and allergies in the detail, each citing the patient's own resource.",
                prefetch=PREFETCH,
                usageRequirements=_usage(svc),
            )
        ]
    )


@router.post(
    f"/cds-services/{SERVICE_ID}",
    response_model=CardsResponse,
    response_model_exclude_none=True,
    summary="patient-view: one card summarising the patient's chart, every fact cited.",
    openapi_extra=_SECURED,
    responses={
        400: {"description": "A malformed hook request."},
        412: {"description": "No prefetch, and the FHIR server could not be read."},
    },
)
async def patient_view(request: Request, svc: Svc) -> CardsResponse:
    """One card about ``context.patientId`` (``cds_card.compose_card``: the most relevant active
    problems and abnormal latest results as the summary, a cited bullet per fact as the markdown
    detail, ``source`` linking the model card, and with a public URL a link that launches the
    SMART app), its ``uuid`` remembered for feedback. The record is the prefetch when it holds
    the Patient, else the request's ``fhirServer`` (only one configured in
    ``serve.cds_fhir_servers`` or ``fhir.url``) read with ``fhirAuthorization``. Past
    ``serve.cds_budget_s`` (default 2 s) the card says the summary is not ready. 400 for a
    malformed request, another hook or an unlisted ``fhirServer``; 401 for a CDS Client JWT that
    fails a check; 403 when the caller or the token may not read this patient; 412 when no
    prefetch holds the Patient and the FHIR server is absent, unreachable or refuses."""
    who = await _caller(request, svc, f"/cds-services/{SERVICE_ID}")
    try:
        # RecursionError: JSON nested deeper than the parser's stack (a body of "[[[[…")
        hook = HookRequest.model_validate(json.loads(await request.body()))
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"malformed CDS Hooks request: {_first_error(exc)}") from exc
    if hook.hook != "patient-view":
        raise HTTPException(400, f"this service answers the patient-view hook, not {hook.hook!r}")
    pid = hook.context.patientId
    auth = hook.fhirAuthorization
    if auth is not None and auth.patient and auth.patient != pid:
        await svc.audit.arecord(
            who, "cds-patient-view", "denied", patient_id=pid,
            detail="fhirAuthorization is bound to another patient",
        )  # fmt: skip
        raise HTTPException(403, "fhirAuthorization is bound to another patient")
    await allowed(svc, who, "cds-patient-view", pid)
    try:
        source = _source(svc, hook, pid)
    except HTTPException as exc:  # a fhirServer this service may not read
        await svc.audit.arecord(
            who, "cds-patient-view", "denied", patient_id=pid, detail=str(exc.detail)
        )
        raise
    if source is None:
        await svc.audit.arecord(who, "cds-patient-view", "no data", patient_id=pid)
        raise HTTPException(
            412, "no data: send prefetch with the Patient, or fhirServer with fhirAuthorization"
        )
    kind = "summary"
    try:
        text = await asyncio.wait_for(
            _card_text(svc, source, pid, readable(who), _allergies_read(hook, source)),
            svc.settings.serve.cds_budget_s,
        )
    except TimeoutError:
        kind, text = "pending", _pending_text()
    except ConnectorError as exc:
        await svc.audit.arecord(
            who, "cds-patient-view", "error", patient_id=pid, detail=type(exc).__name__
        )
        raise HTTPException(412, _unreadable(exc, fhir=hook.fhirServer is not None)) from exc
    except ChartSightError as exc:
        await svc.audit.arecord(
            who, "cds-patient-view", "error", patient_id=pid, detail=type(exc).__name__
        )
        raise HTTPException(502, f"the patient's record could not be read: {exc.public}") from exc
    finally:
        await source.aclose()
    card = Card(
        uuid=str(uuid.uuid4()),
        summary=text.summary,
        detail=text.detail,
        indicator=text.indicator,
        source=_card_source(request, svc),
        links=_app_link(request, svc, pid),
    )
    await svc.cds_store.aissued(
        card.uuid, service_id=SERVICE_ID, hook_instance=str(hook.hookInstance), patient_id=pid,
        client_id=who.client_id, realm=who.realm, kind=kind, cited=text.cited,
    )  # fmt: skip
    await svc.audit.arecord(
        who, "cds-patient-view", "over budget" if kind == "pending" else "answered",
        patient_id=pid, answer={"citations": [{"reference": r} for r in text.cited]},
        detail=f"card {card.uuid}",
    )  # fmt: skip
    return CardsResponse(cards=[card])


@router.post(
    f"/cds-services/{SERVICE_ID}/feedback",
    response_model=FeedbackRecorded,
    summary="CDS Hooks feedback: accepted or overridden outcomes of this service's cards.",
    openapi_extra=_SECURED,
    responses={
        400: {"description": "A malformed feedback request."},
        404: {"description": "A card this service did not issue to the caller."},
    },
)
async def post_feedback(request: Request, svc: Svc) -> FeedbackRecorded:
    """Store the outcomes of cards (CDS Hooks 2.0 "Feedback"), append-only, one audit row
    (``cds:feedback``) each. Every ``card`` must be a ``uuid`` this service issued to the same
    client (a CDS Client's card, to that client and tenant: its realm; otherwise to the same API
    key or token client): an unknown one is 404 and nothing of the request is stored. The caller must be allowed the
    card's patient (403). An ``accepted`` outcome needs ``acceptedSuggestions`` (400). Callers
    authenticate as for the service (a CDS Client JWT's ``aud`` is the feedback URL or the
    service's)."""
    service = f"/cds-services/{SERVICE_ID}"
    who = await _caller(request, svc, f"{service}/feedback", service)
    try:
        body = FeedbackRequest.model_validate(json.loads(await request.body()))
    except (ValueError, RecursionError) as exc:
        raise HTTPException(400, f"malformed feedback: {_first_error(exc)}") from exc
    for item in body.feedback:
        if item.outcome == "accepted" and not item.acceptedSuggestions:
            raise HTTPException(
                400, f"card {item.card}: an accepted outcome needs acceptedSuggestions"
            )
    issued = await svc.cds_store.acards([f.card for f in body.feedback])
    for item in body.feedback:
        card = issued.get(item.card)
        if (
            card is None
            or card["service_id"] != SERVICE_ID
            or card["client_id"] != who.client_id[:200]
            or card["realm"] != who.realm[:400]  # a CDS client's iss and tenant: one hospital
        ):
            raise HTTPException(
                404, f"no card {item.card!r} was issued by this service to this client; "
                "nothing was recorded",
            )  # fmt: skip
        await allowed(svc, who, "cds:feedback", card["patient_id"])
    await svc.cds_store.aadd_feedback([_feedback_row(svc, who, f, issued) for f in body.feedback])
    for item in body.feedback:
        reason = item.overrideReason.reason if item.overrideReason else None
        await svc.audit.arecord(
            who, "cds:feedback", item.outcome, patient_id=issued[item.card]["patient_id"],
            detail=f"card {item.card}" + (f" reason {reason.system}|{reason.code}" if reason else ""),
        )  # fmt: skip
    return FeedbackRecorded(recorded=len(body.feedback))


@router.get(
    f"/cds-services/{SERVICE_ID}/feedback",
    response_model=FeedbackList,
    response_model_exclude_none=True,
    summary="The stored feedback on this service's cards (user or system scopes).",
    openapi_extra=_SECURED,
)
async def get_feedback(
    request: Request,
    svc: Svc,
    card: Annotated[str | None, Query(max_length=36, description="A card's uuid.")] = None,
    outcome: Literal["accepted", "overridden"] | None = None,
    patient: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[datetime | None, Query(description="Received at or after (ISO 8601).")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> FeedbackList:
    """Feedback on this service's cards, newest first, filtered by card ``uuid``, ``outcome``,
    ``patient`` and ``since`` (received at or after): for reviewing how clinicians used the cards
    (override rates and reasons). Needs a user- or system-level read scope (403 otherwise: it
    spans patients); a CDS client reads only the feedback on cards issued to it and its tenant
    (its realm). Audited as ``cds:feedback`` ``read``."""
    who = await _caller(request, svc, f"/cds-services/{SERVICE_ID}/feedback")
    if not who.levels & {"user", "system"}:
        await svc.audit.arecord(who, "cds:feedback", "denied", patient_id=patient)
        raise HTTPException(403, "reading feedback needs a user/ or system/ read scope")
    # a CDS client (an EHR, possibly serving several hospitals as tenants) reads the feedback on
    # its own cards only; the service's own credentials (API keys, tokens) read all of it
    theirs = (who.client_id, who.realm) if who.kind == "cds-client" else None
    rows = await svc.cds_store.afeedback(
        SERVICE_ID, card=card, outcome=outcome, patient_id=patient, since=since, limit=limit,
        issued_to=theirs,
    )  # fmt: skip
    await svc.audit.arecord(
        who, "cds:feedback", "read", patient_id=patient, detail=f"{len(rows)} rows"
    )
    return FeedbackList(feedback=[_stored(r) for r in rows])


def _feedback_row(
    svc: Service, who: Principal, item: Feedback, issued: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    reason = item.overrideReason
    coding = reason.reason if reason else None
    when = item.outcomeTimestamp
    return {
        "service_id": SERVICE_ID,
        "card": item.card,
        "patient_id": issued[item.card]["patient_id"],
        "client_id": who.client_id[:200],
        "subject": who.subject[:400],
        "outcome": item.outcome,
        "accepted_suggestions": json.dumps([s.id for s in item.acceptedSuggestions or []]),
        "override_system": coding.system if coding else None,
        "override_code": coding.code if coding else None,
        "override_display": coding.display if coding else None,
        "user_comment": reason.userComment if reason else None,
        "outcome_timestamp": when if when.tzinfo else when.replace(tzinfo=UTC),
    }


def _stored(row: dict[str, Any]) -> StoredFeedback:
    coding = (
        Coding(code=row["override_code"], system=row["override_system"],
               display=row["override_display"])
        if row["override_code"] else None
    )  # fmt: skip
    reason = (
        OverrideReason(reason=coding, userComment=row["user_comment"])
        if coding or row["user_comment"]
        else None
    )
    return StoredFeedback(
        card=row["card"],
        outcome=row["outcome"],
        acceptedSuggestions=[AcceptedSuggestion(id=s) for s in row["accepted_suggestions"]] or None,
        overrideReason=reason,
        outcomeTimestamp=_utc(row["outcome_timestamp"]),
        receivedAt=_utc(row["received_at"]),
        patient=row["patient_id"],
        client=row["client_id"],
    )


def _utc(when: datetime) -> datetime:
    """A stored time as UTC (SQLite hands back naive datetimes; they were stored in UTC)."""
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError | RequestValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        return f"{where}: {err.get('msg')}"
    if isinstance(exc, RecursionError):
        return "the JSON is nested too deeply"
    return str(exc)


def _source(svc: Service, hook: HookRequest, pid: str) -> Any:
    """The prefetch when it holds the patient, else the request's fhirServer, but only when it is
    one the service is configured to read (``serve.cds_fhir_servers`` or ``fhir.url``): any other
    URL is refused before a connection is made, so a request cannot make the service fetch (and
    send the fhirAuthorization token to) a URL of its choosing. The server is read without
    following redirects, without retries and with each request's timeout inside the card's
    budget: a server that cannot be reached fails at once (412), rather than outlasting the
    budget."""
    if hook.prefetch:
        prefetched = PrefetchSource(hook.prefetch)
        if prefetched.has_patient(pid):
            return prefetched
    if hook.fhirServer is not None:
        allowed = list(svc.settings.serve.cds_fhir_servers)
        if svc.settings.fhir.url:
            allowed.append(str(svc.settings.fhir.url))
        if not listed_fhir_base(str(hook.fhirServer), allowed):
            raise HTTPException(
                400,
                "fhirServer is not a FHIR server this service is configured to read; send "
                "prefetch instead",
            )
        auth = hook.fhirAuthorization
        budget = svc.settings.serve.cds_budget_s
        http = HttpSettings(
            follow_redirects=False, max_retries=0, timeout_s=budget * 0.8, deadline_s=budget
        )
        return FhirClient(
            FhirServerSettings(
                url=str(hook.fhirServer).rstrip("/"),
                token=SecretStr(auth.access_token) if auth else None,
                http=http,
            )
        )
    return None


def _unreadable(exc: ConnectorError, *, fhir: bool) -> str:
    """A 412's detail: which source failed and how, without its URL (``exc.public`` names none)."""
    if not fhir:
        return f"the prefetch could not be read: {exc.public}; send it again or send fhirServer"
    if isinstance(exc, TransportError):
        return (
            "the FHIR server named in fhirServer could not be reached in time; no card could be "
            "made (send prefetch, or retry when the server is up)"
        )
    if isinstance(exc, HttpStatusError):
        return (
            f"the FHIR server named in fhirServer answered HTTP {exc.status} when the patient's "
            "record was read (is fhirAuthorization valid for this patient?)"
        )
    return f"the FHIR server named in fhirServer could not be read: {exc.public}"


def _allergies_read(hook: HookRequest, source: Any) -> bool:
    """Whether the record read for the card includes the allergies: from a FHIR server always;
    from prefetch only when the EHR sent the ``allergies`` template's result (an EHR that follows
    an older discovery, or drops it, sends none)."""
    return not isinstance(source, PrefetchSource) or "allergies" in (hook.prefetch or {})


async def _card_text(
    svc: Service, source: Any, pid: str, scope: RecordScope, allergies_read: bool = True
) -> CardText:
    """The card's composed text from the patient's record as ``source`` gives it, only what the
    caller's ``scope`` admits (SMART granular scopes)."""
    record = await svc.agent.record(pid, source=source, scope=scope)
    return await asyncio.to_thread(
        lambda: compose_card(chart_sections(record, record_evidence(record)), allergies_read)
    )


def _pending_text() -> CardText:
    return CardText(
        summary="ChartSight is still reading this chart; open the app for the summary.",
        detail="The summary was not ready within the time the EHR allows for this card.",
        indicator="info",
    )


def _base(request: Request, svc: Service) -> str:
    return (svc.settings.serve.public_url or str(request.base_url)).rstrip("/")


def _card_source(request: Request, svc: Service) -> Source:
    """The card's source: ChartSight, linking its model card (``/model-card``: intended use,
    inputs, limits and validation, HTI-1 source attributes)."""
    return Source(label="ChartSight", url=f"{_base(request, svc)}/model-card")


def _app_link(request: Request, svc: Service, pid: str) -> list[Link]:
    return [
        Link(
            label="Ask ChartSight about this patient",
            url=f"{_base(request, svc)}/launch",
            type="smart",
            appContext=urlencode({"patient": pid}),
        )
    ]
