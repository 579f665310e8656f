"""CDS Hooks 2.0: discovery and a ``patient-view`` service that returns one card with ChartSight's
grounded summary of the patient.

The record comes from the request's ``prefetch`` when the EHR sent it (the service asks for the
Patient, active Conditions, recent Observations and active MedicationRequests), otherwise from the
request's ``fhirServer`` with its ``fhirAuthorization`` token. If the answer is not ready within the
configured budget (default 2 s), the EHR gets an information card saying so at once, and the run is
stopped (the card links to the SMART app, where the clinician can ask without the EHR's deadline).

Requests and responses follow the spec's JSON shapes (https://cds-hooks.org/specification/current/):
a malformed request gets a 400 naming what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError

from agent import Answer, ChartSightError, PrefetchSource, ehr_source
from agent.grounding import citations, split_sentences, uncited
from retrieval.evidence import clean_text
from surfaces.http.deps import Caller, Service, Svc, allowed
from surfaces.http.security import case_privacy, listed_fhir_base, readable

log = logging.getLogger("chartsight.api")

SERVICE_ID = "chartsight-patient-view"
PREFETCH = {
    "patient": "Patient/{{context.patientId}}",
    "conditions": "Condition?patient={{context.patientId}}&clinical-status=active",
    "observations": "Observation?patient={{context.patientId}}&_sort=-date&_count=100",
    "medications": "MedicationRequest?patient={{context.patientId}}&status=active",
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
    """A CDS Hooks card: a summary of at most 140 characters, a markdown detail, an indicator
    (info, warning, critical), its source and links."""

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


# --- routes ----------------------------------------------------------------------------------------


@router.get("/cds-services", response_model=Discovery, summary="CDS Hooks discovery.")
async def discovery() -> Discovery:
    """The one service ChartSight offers: ``patient-view``, with the prefetch templates of its
    Patient, active Conditions, the 100 latest Observations and active MedicationRequests."""
    return Discovery(
        services=[
            ServiceDescription(
                hook="patient-view",
                id=SERVICE_ID,
                title="ChartSight patient summary",
                description="A grounded summary of the patient's active problems, medications and "
                "latest abnormal results, every statement citing the patient's own resources.",
                prefetch=PREFETCH,
                usageRequirements="Grant patient/*.read (or user/*.read) for the fhirServer path.",
            )
        ]
    )


@router.post(
    f"/cds-services/{SERVICE_ID}",
    response_model=CardsResponse,
    response_model_exclude_none=True,
    summary="patient-view: one card with ChartSight's cited summary.",
    responses={400: {"description": "A malformed hook request."}},
)
async def patient_view(request: Request, who: Caller, svc: Svc) -> CardsResponse:
    """One info card with ChartSight's answer to ``serve.cds_question`` about
    ``context.patientId``: the first sentence as the summary, each sentence with the references
    it cites and the cited evidence lines as the markdown detail, and (with ``serve.public_url``)
    a link that launches the SMART app. The record is the prefetch when it holds the Patient,
    else the request's ``fhirServer`` (only one configured in ``serve.cds_fhir_servers`` or
    ``fhir.url``) read with ``fhirAuthorization``. Past ``serve.cds_budget_s`` (default 2 s) the
    card says the summary is not ready and the run is stopped. 400 for a malformed request,
    another hook, an unlisted ``fhirServer`` or no data; 403
    when the caller or the token may not read this patient; 502 when the record cannot be
    read."""
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
        raise HTTPException(403, "fhirAuthorization is bound to another patient")
    await allowed(svc, who, "cds-patient-view", pid)
    source = _source(svc, hook, pid)
    if source is None:
        raise HTTPException(
            400, "no data: send prefetch with the Patient, or fhirServer with fhirAuthorization"
        )
    question = svc.settings.serve.cds_question
    try:
        answer = await asyncio.wait_for(
            svc.agent.ask(
                pid,
                question,
                source=source,
                keep=False,
                case_privacy=case_privacy(who),
                scope=readable(who),
            ),
            svc.settings.serve.cds_budget_s,
        )
    except TimeoutError:
        await svc.audit.arecord(who, "cds-patient-view", "over budget", patient_id=pid)
        return CardsResponse(cards=[_pending_card(svc, pid)])
    except ChartSightError as exc:
        await svc.audit.arecord(
            who, "cds-patient-view", "error", patient_id=pid, detail=str(exc)[:200]
        )
        raise HTTPException(502, f"the patient's record could not be read: {exc.public}") from exc
    finally:
        await source.aclose()
    await svc.audit.arecord(
        who, "cds-patient-view", "abstained" if answer.abstained else "answered",
        patient_id=pid, question=question, answer=answer.model_dump(mode="json"),
    )  # fmt: skip
    return CardsResponse(cards=[_answer_card(svc, pid, answer.shown(None))])


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
    send the fhirAuthorization token to) a URL of its choosing."""
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
                "fhirServer is not a FHIR server this service is configured to read "
                "(serve.cds_fhir_servers); send prefetch instead",
            )
        auth = hook.fhirAuthorization
        return ehr_source(str(hook.fhirServer), auth.access_token if auth else None)
    return None


def _card_source(svc: Service) -> Source:
    return Source(label="ChartSight", url=svc.settings.serve.public_url)


def _app_link(svc: Service, pid: str) -> list[Link]:
    base = svc.settings.serve.public_url
    if not base:
        return []
    return [
        Link(
            label="Ask ChartSight about this patient",
            url=f"{base.rstrip('/')}/launch",
            type="smart",
            appContext=urlencode({"patient": pid}),
        )
    ]


def _answer_card(svc: Service, pid: str, answer: Answer) -> Card:
    text = answer.text
    first = text.split(". ")[0]
    summary = ("ChartSight: " + _uncite(first))[:139]
    lines = [f"- {_markdown_text(_uncite(s))} {_refs(s)}" for s in _sentences(text)]
    cites = "\n".join(f"- `{c.reference}`: {_markdown_text(c.text)}" for c in answer.citations[:20])
    detail = "\n".join(lines) + ("\n\n**Evidence**\n\n" + cites if cites else "")
    if answer.warnings:
        detail += "\n\n_" + _markdown_text("; ".join(answer.warnings[:3])) + "_"
    return Card(
        uuid=str(uuid.uuid4()),
        summary=clean_text(summary, 140),
        detail=detail,
        indicator="info",
        source=_card_source(svc),
        links=_app_link(svc, pid),
    )


def _pending_card(svc: Service, pid: str) -> Card:
    return Card(
        uuid=str(uuid.uuid4()),
        summary="ChartSight is still reading this chart; open the app for the answer.",
        detail="The summary was not ready within the time the EHR allows for this card.",
        indicator="info",
        source=_card_source(svc),
        links=_app_link(svc, pid),
    )


def _sentences(text: str) -> list[str]:
    return split_sentences(text)


def _refs(sentence: str) -> str:
    return " ".join(f"[{r}]" for r in citations(sentence))


# CommonMark/GFM characters that start markup (links, images, emphasis, code, HTML, tables)
_MARKDOWN = re.compile(r"([\\`*_\[\]()<>!#|~&{}])")


def _markdown_text(text: str) -> str:
    """``text`` from the record (a note, a coding's display, a name) as literal markdown: every
    character that starts markup backslash-escaped (CommonMark 2.4), whitespace runs (line breaks
    too) made one space. A record is not the card's author: without this, a display such as
    ``![x](https://host/beacon)`` or ``<img onerror=…>`` would render in the EHR as an image
    fetched from that host, a link or HTML."""
    return _MARKDOWN.sub(r"\\\1", " ".join(text.split()))


def _uncite(sentence: str) -> str:
    return " ".join(uncited(sentence).split())
