"""The audit log as FHIR R4 AuditEvents, following IHE Basic Audit Log Patterns (BALP 1.1), and
the auditors' search ``GET /fhir/AuditEvent``.

One ``audit_log`` row (``surfaces/http/audit.py``, the source of truth) is one AuditEvent:
``audit_event`` renders it the same way every time, for the search here and for the hospital's
audit repository (``forward.py``). The question's text never appears: the row holds only its
SHA-256, and the AuditEvent carries that hash, not even the question's length.

Sources: IHE ITI "Basic Audit Log Patterns" (BALP) 1.1, profiles ``IHE.BasicAudit.PatientQuery``
and ``IHE.BasicAudit.PatientRead`` (https://profiles.ihe.net/ITI/BALP/); FHIR R4 AuditEvent
(https://hl7.org/fhir/R4/auditevent.html) and its code systems; FHIR R4 search, date prefixes
(https://hl7.org/fhir/R4/search.html#prefix).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from fhir.resources.R4B.auditevent import AuditEvent

from agent import fhir_date
from surfaces.http.deps import Caller, Svc
from surfaces.http.security import may

router = APIRouter(tags=["audit"])

FHIR_JSON = "application/fhir+json"

# code systems (FHIR R4 terminology, DICOM part 16, IHE BALP)
AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
URI = "urn:ietf:rfc:3986"
BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."

# endpoint -> (restful-interaction subtype, AuditEvent.action, the request as BALP's query
# entity describes it). Asking, similar cases, CDS cards and MCP tools search the patient's
# compartment: BALP Query (subtype search, action E "Execute"); the page's banner, one resource
# and one image are reads: BALP Read (subtype read, action R "Read/View/Print"); saving to the
# chart and CDS feedback create (FHIR R4 AuditEventAction C).
_INTERACTIONS: dict[str, tuple[str, str, str]] = {
    "ask": ("search", "E", "POST /v1/ask"),
    "ask_stream": ("search", "E", "POST /v1/ask/stream"),
    "similar": ("search", "E", "GET /v1/patients/{patient}/similar"),
    "cds-patient-view": ("search", "E", "POST /cds-services/chartsight-patient-view"),
    "app_page": ("read", "R", "GET /app"),
    "app_ask": ("search", "E", "POST /app/ask"),
    "app_trend": ("search", "E", "POST /app/trend"),
    "app_resource": ("read", "R", "GET /app/resource/{type}/{id}"),
    "app_similar": ("search", "E", "GET /app/similar"),
    "app_image": ("read", "R", "GET /app/image"),
    "audit:search": ("search", "E", "GET /fhir/AuditEvent"),
    "cds:feedback": ("create", "C", "POST /cds-services/{id}/feedback"),
    "smart:save": ("create", "C", "POST /app/save"),
}
# outcome kinds -> AuditEvent.outcome (FHIR R4 audit-event-outcome): 0 success; 4 minor failure
# ("often equivalent to an HTTP 400 response": refused, not found, the client went away);
# 8 serious failure ("often equivalent to an HTTP 500": an error, no answer in time); 12 major
# failure (the system is no longer available). Any other kind (answered, abstained, saved, ...)
# is a success: the request was served.
_OUTCOMES = {
    "denied": "4",
    "not found": "4",
    "cancelled": "4",
    "invalid": "4",
    "error": "8",
    "timeout": "8",
    "over budget": "8",
    "unavailable": "12",
}
# a user named by a FHIR reference (SMART fhirUser: relative or absolute)
_USER_REFERENCE = re.compile(
    r"^(https?://\S+/)?(Practitioner|PractitionerRole|Patient|RelatedPerson|Person)/"
    r"[A-Za-z0-9\-.]{1,64}$"
)


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    return {"system": system, "code": code, **({"display": display} if display else {})}


def _aware(value: datetime) -> datetime:
    # SQLite hands back the UTC wall time without its offset
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _patient_reference(patient_id: str) -> dict[str, Any]:
    """The patient as recorded: an id (``Patient/<id>``) or, for a caller that named it by
    identifier, ``system|value`` (a logical reference by identifier). A key with a ``|`` but no
    value (``urn:x|``, as a refused caller may send it) names no identifier: it is kept as the
    reference's ``display``, the text the caller sent."""
    if "|" in patient_id:
        system, _, value = patient_id.partition("|")
        if not value:
            return {"type": "Patient", "display": patient_id}
        return {"type": "Patient", "identifier": {**({"system": system} if system else {}), "value": value}}  # fmt: skip
    return {"reference": f"Patient/{patient_id.removeprefix('Patient/')}"}


# a FHIR R4 string holds at least one character that is not whitespace other than space, CR,
# LF and tab (FHIR R4 datatypes.html#string, regex ``[ \r\n\t\S]+``)
_FHIR_STRING = re.compile(r"[ \r\n\t\S]")


def _fhir_strings(value: Any) -> Any:
    r"""``value`` (JSON: dicts, lists, strings, numbers, booleans) with every string made a valid
    FHIR string: a lone UTF-16 surrogate (from a caller's undecodable input) becomes ``?``, and a
    string with no character FHIR allows (empty, or only a vertical tab) becomes its Python
    ``ascii`` spelling (``''``, ``'\x0b'``). Audit rows hold what callers sent (a refused request
    is recorded too); rendered as is, one such row made every audit search that included it,
    and the forwarding of every later row, fail."""
    if isinstance(value, str):
        text = value.encode("utf-8", "replace").decode()
        return text if _FHIR_STRING.search(text) else ascii(text)
    if isinstance(value, dict):
        return {k: _fhir_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fhir_strings(v) for v in value]
    return value


def audit_event(row: dict[str, Any], service_url: str = "urn:chartsight") -> dict[str, Any]:
    """The FHIR R4 AuditEvent (JSON, validated with ``fhir.resources``) of one ``audit_log`` row
    (``AuditLog.rows``/``search``: ``id``, ``at``, ``client_id``, ``subject``, ``endpoint``,
    ``patient_id``, ``question_sha256``, ``cited``, ``model``, ``prompt_version``, ``outcome``,
    ``detail``, ``request_id``), as recorded by the ChartSight service at ``service_url``.

    Following IHE BALP 1.1 (profiles PatientQuery and PatientRead; claimed in ``meta.profile``
    only for a success, as BALP's profiles fix ``outcome`` 0 and leave failures to FHIR core's
    access-denied pattern):

    - ``type`` ``rest`` (audit-event-type, "RESTful Operation"); ``subtype`` the FHIR
      restful-interaction (``search`` for asking, similar cases, CDS cards and MCP tools;
      ``read`` for the page's banner, a resource or an image; ``create`` for saving and
      feedback), ``action`` E, R or C (AuditEventAction) to match;
    - ``recorded`` the row's time (UTC); ``outcome`` 0, 4, 8 or 12 by the row's outcome kind
      (audit-event-outcome: denied/not found/cancelled 4, error/timeout/over budget 8), with the
      kind and detail (an error's class name, a refusal's reason) as ``outcomeDesc``;
    - agents: the client application (DICOM 110153 "Source Role ID" for a query, 110152
      "Destination Role ID" for a read, as BALP's Query and Read profiles assign them;
      ``who.identifier`` its client id); ChartSight itself as the other role (``who`` its URL,
      ``network`` type 5 URI); the user (v3-ParticipationType IRCP "information recipient",
      ``requestor`` true; ``who`` the SMART ``fhirUser`` reference, else the token's subject as
      an identifier). A service account (API key) is its own user: the client is the requestor;
    - ``source``: ``observer`` ChartSight (by its URL), ``site`` its host, ``type`` 4
      "Application Server" (security-source-type);
    - entities: the patient (audit-entity-type 1 Person, object-role 1 Patient, ``what`` the
      Patient); the request id (BALP's ``transaction`` slice: BasicAuditEntityType
      ``XrequestId``, ``what.identifier.value``); for a query, BALP's ``query`` entity (type 2
      System Object, role 24 Query) whose ``query`` is the base64 of the request line and the
      question's SHA-256 (the raw request is never kept: it holds the question), its
      ``description`` the request line; each cited or shown resource (type 2, role 4 Domain
      Resource).

    Not recorded (not in the row): the client's network address, roles and purpose of use.
    Every string is made a valid FHIR string (``_fhir_strings``): a row holds what a caller sent.
    Raises pydantic's ``ValidationError`` if the result were not a valid R4 AuditEvent."""
    endpoint = str(row["endpoint"])
    tool = endpoint.removeprefix("mcp:")
    subtype, action, line = _INTERACTIONS.get(
        endpoint,
        ("search", "E", f"MCP tools/call {tool}" if endpoint.startswith("mcp:") else endpoint),
    )
    outcome = _OUTCOMES.get(str(row["outcome"]), "0")
    read = subtype == "read"
    host = urlsplit(service_url).hostname or service_url
    chartsight = {"identifier": {"system": URI, "value": service_url}, "display": "ChartSight"}
    client_id, subject = str(row["client_id"]), str(row["subject"])
    own_user = subject == client_id
    # BALP: a query's client is the Source Role ID and the server the Destination; a read's
    # roles are the other way round (the data flows to the client)
    source_role = {"coding": [_coding(DICOM, "110153", "Source Role ID")]}
    destination_role = {"coding": [_coding(DICOM, "110152", "Destination Role ID")]}
    agents: list[dict[str, Any]] = [
        {
            "type": destination_role if read else source_role,
            "who": {"identifier": {"value": client_id}, "display": client_id},
            "requestor": own_user,
        },
        {
            "type": source_role if read else destination_role,
            "who": chartsight,
            "requestor": False,
            "network": {"address": service_url, "type": "5"},
        },
    ]
    if not own_user:
        who = (
            {"reference": subject}
            if _USER_REFERENCE.match(subject)
            else {"identifier": {"value": subject}}
        )
        agents.append(
            {
                "type": {"coding": [_coding(PARTICIPATION, "IRCP", "information recipient")]},
                "who": {**who, "display": subject},
                "requestor": True,
            }
        )
    entities: list[dict[str, Any]] = []
    if row.get("patient_id"):
        entities.append(
            {
                "what": _patient_reference(str(row["patient_id"])),
                "type": _coding(ENTITY_TYPE, "1", "Person"),
                "role": _coding(OBJECT_ROLE, "1", "Patient"),
            }
        )
    if row.get("request_id"):
        entities.append(
            {
                "what": {"identifier": {"value": str(row["request_id"])}},
                "type": _coding(BALP_ENTITY_TYPE, "XrequestId", "X-Request-Id"),
            }
        )
    if not read:
        request = line + (
            f"\nquestion-sha256: {row['question_sha256']}" if row.get("question_sha256") else ""
        )
        entities.append(
            {
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "24", "Query"),
                "description": line,
                "query": base64.b64encode(request.encode()).decode(),
            }
        )
    cited = json.loads(row.get("cited") or "[]")
    if read and not cited and row.get("patient_id") and endpoint == "app_page":
        cited = [_patient_reference(str(row["patient_id"])).get("reference")]
    for reference in [c for c in cited if c]:
        entities.append(
            {
                "what": {"reference": reference},
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
            }
        )
    described = " ".join(str(x) for x in (row["outcome"], row.get("detail")) if x)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row["id"]),
        "type": _coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
        "subtype": [_coding(RESTFUL_INTERACTION, subtype, subtype)],
        "action": action,
        "recorded": _aware(row["at"]).astimezone(UTC).isoformat(),
        "outcome": outcome,
        "outcomeDesc": described,
        "agent": agents,
        "source": {
            "site": host,
            "observer": chartsight,
            "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
        },
        "entity": entities,
    }
    if outcome == "0" and row.get("patient_id") and action in ("E", "R"):
        event["meta"] = {"profile": [BALP + ("PatientRead" if read else "PatientQuery")]}
    event = _fhir_strings(event)
    AuditEvent.model_validate(event)
    return event


# --- FHIR search on the audit trail -------------------------------------------------------------

_PREFIXES = ("eq", "ge", "gt", "le", "lt")


class SearchError(ValueError):
    """A search parameter this endpoint cannot read (HTTP 400 with an OperationOutcome)."""


def date_interval(value: str) -> tuple[str, datetime, datetime]:
    """A FHIR ``date`` search value (``ge2026-01-01``, ``2026-03``, ``lt2026-01-02T10:00Z``) as
    ``(prefix, start, end)``: the prefix (``eq`` when none) and the interval [start, end) the
    value's precision spans, timezone-aware (a value without an offset is UTC): a year, a month,
    a day, a minute, a second, or a microsecond (FHIR R4 search.html#date: "the precision of the
    value determines the range"), both in UTC. Raises ``SearchError`` for a prefix other than eq,
    ge, gt, le, lt, a value that is not a FHIR date, or one whose interval ends past year 9999
    or starts before year 1 in UTC (``9999-12-31T23:59:59.999999``, ``0001-01-01T00:00+14:00``).
    """
    prefix = value[:2] if value[:2].isalpha() else "eq"
    text = value[2:] if value[:2].isalpha() else value
    if prefix not in _PREFIXES:
        raise SearchError(f"date prefix {prefix!r} is not supported (eq, ge, gt, le, lt)")
    when = fhir_date(text)
    if when is None:
        raise SearchError(f"{text!r} is not a FHIR date")
    clock = text.partition("T")[2]
    if "." in clock:
        step = timedelta(microseconds=1)
    elif re.match(r"^\d\d:\d\d:\d\d", clock):
        step = timedelta(seconds=1)
    else:
        step = timedelta(minutes=1)
    try:  # an instant's end, or either end in UTC, can fall outside years 1 to 9999
        end = when.end if when.precision != "time" else when.start + step
        return prefix, when.start.astimezone(UTC), end.astimezone(UTC)
    except OverflowError as exc:
        raise SearchError(f"{text!r} is outside the dates this search can compare") from exc


# what ``_outcome`` sends, as the OpenAPI document describes it (FHIR R4 OperationOutcome: an
# ``issue`` list of ``severity``, ``code`` and ``diagnostics``)
OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"const": "OperationOutcome"},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"type": "string"},
                    "code": {"type": "string"},
                    "diagnostics": {"type": "string"},
                },
            },
        },
    },
}


def _outcome(status: int, code: str, text: str) -> JSONResponse:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    return JSONResponse(body, status, media_type=FHIR_JSON)


def service_url(svc: Any, request: Request) -> str:
    """This service's URL as audit records name it: ``serve.public_url``, else the request's own
    base URL (no trailing slash)."""
    return str(svc.settings.serve.public_url or request.base_url).rstrip("/")


@router.get(
    "/fhir/AuditEvent",
    summary="The audit trail as FHIR AuditEvents (IHE BALP), for auditors.",
    response_class=JSONResponse,
    responses={
        200: {"content": {FHIR_JSON: {}}, "description": "A searchset Bundle."},
        400: {
            "content": {FHIR_JSON: {"schema": OUTCOME_SCHEMA}},
            "description": "A search parameter that cannot be read (OperationOutcome).",
        },
        403: {
            "content": {FHIR_JSON: {"schema": OUTCOME_SCHEMA}},
            "description": "The caller holds no user- or system-level AuditEvent scope "
            "(OperationOutcome).",
        },
    },
)
async def search_audit_events(
    request: Request,
    who: Caller,
    svc: Svc,
    patient: Annotated[str | None, Query(max_length=200)] = None,
    date: Annotated[list[str] | None, Query(max_length=60)] = None,
    count: Annotated[int, Query(alias="_count", ge=1, le=1000)] = 100,
    # an audit_log id: a SQL INTEGER (PostgreSQL's int4, whose range SQLite's also covers); a
    # larger one failed in the database with a 500
    cursor: Annotated[int, Query(alias="_cursor", ge=0, le=2**31 - 1)] = 0,
) -> JSONResponse:
    """A FHIR searchset Bundle (``application/fhir+json``) of the AuditEvents (``audit_event``)
    about ``patient`` (an id or ``Patient/<id>``; all patients without it) recorded within every
    ``date`` (repeatable, FHIR date prefixes eq, ge, gt, le, lt: ``date=ge2026-01-01&date=lt
    2026-02-01``), oldest first, ``_count`` per page (1 to 1000, default 100) with a ``next``
    link (``_cursor``, the last id shown) while more match. Only for callers granted
    ``user/AuditEvent.rs`` or ``system/AuditEvent.rs`` (SMART v1 ``read`` counts; a ``*`` scope
    does not: the scope must name AuditEvent); else 403. Every search, and every refusal, is itself audited
    (``audit:search``). 400 (an OperationOutcome) for a date that cannot be read."""
    # the audit trail is not clinical data: a scope must name it (``system/*.read``, an EHR
    # plug-in's read of records, does not let it read who looked at whom)
    if not may(who, "AuditEvent", "rs", levels={"user", "system"}, wildcard=False):
        await svc.audit.arecord(
            who, "audit:search", "denied", patient_id=patient,
            detail="no user- or system-level AuditEvent read scope",
        )  # fmt: skip
        return _outcome(403, "forbidden", "reading the audit trail needs user/AuditEvent.rs")
    try:
        dates = [date_interval(d) for d in date or []]
    except SearchError as exc:
        return _outcome(400, "invalid", str(exc))
    if patient is not None and any(ord(c) < 32 or ord(c) == 127 for c in patient):
        # no id or identifier holds one, and PostgreSQL's text cannot hold NUL
        return _outcome(400, "invalid", "the patient parameter holds a control character")
    rows = await asyncio.to_thread(
        svc.audit.search, patient=patient, dates=dates, after_id=cursor, limit=count + 1
    )
    await svc.audit.arecord(who, "audit:search", "answered", patient_id=patient)
    base = service_url(svc, request)
    page, more = rows[:count], len(rows) > count
    params = [(k, v) for k, v in request.query_params.multi_items() if k != "_cursor"]
    links = [{"relation": "self", "url": str(request.url)}]
    if more:
        query = urlencode([*params, ("_cursor", str(page[-1]["id"]))])
        links.append({"relation": "next", "url": f"{base}/fhir/AuditEvent?{query}"})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [
            {
                "fullUrl": f"{base}/fhir/AuditEvent/{r['id']}",
                "resource": audit_event(r, base),
                "search": {"mode": "match"},
            }
            for r in page
        ],
    }
    return JSONResponse(bundle, media_type=FHIR_JSON)
