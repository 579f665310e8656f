"""What the HTTP routes share (``app.py``, ``cds.py``, ``smart.py``, and MCP mounted at ``/mcp/``):
the service container, the authenticated caller, authorization for a patient, the mapping of
ChartSight's errors to HTTP statuses, and the Server-Sent Events answer stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import anyio
from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sse_starlette.sse import EventSourceResponse

from agent import (
    Answer,
    ChartSight,
    ChartSightError,
    ConfigurationError,
    ConnectorError,
    FhirSource,
    NotPermitted,
    QuestionError,
    ResourceNotFound,
    ThreadStoreError,
    ToolError,
    scrub,
)
from surfaces.http.audit import AuditLog
from surfaces.http.cds_store import CdsStore
from surfaces.http.cds_trust import CdsTrust
from surfaces.http.drafts import DraftStore
from surfaces.http.limits import RateLimiter, retry_after
from surfaces.http.middleware import note_caller
from surfaces.http.security import (
    Authenticator,
    Forbidden,
    Principal,
    Unauthenticated,
    authorize,
    case_privacy,
    patient_levels,
    readable,
    thread_key,
)
from surfaces.settings import AppSettings

log = logging.getLogger(__name__)


class Service:
    """What the routes share: the agent, security, limits, the audit log, and the CDS Hooks
    services' store and client trust."""

    def __init__(self, settings: AppSettings, agent: ChartSight) -> None:
        self.settings = settings
        self.agent = agent
        self.auth = Authenticator(settings.serve.auth)
        self.limiter = RateLimiter(settings.serve.rate_per_minute, settings.serve.rate_burst)
        # the drafts: the SMART page's AI drafts and their approvals
        self.audit, self.drafts, self.cds_store = self.databases(settings)
        self.smart_sessions: Any = None  # the SMART app's launches and sessions (smart.py)
        self.cds_trust = CdsTrust(settings.serve.cds, self.cds_store)

    @staticmethod
    def databases(settings: AppSettings) -> tuple[AuditLog, DraftStore, CdsStore]:
        """The service's SQL stores, opened (tables and triggers created when missing): the
        audit log and the drafts at ``serve.audit_url`` (default ``sqlite:///<home>/audit.db``),
        the CDS Hooks store at ``serve.cds.database_url`` (default ``<home>/cds.db``). Every
        worker process of ``chartsight serve --workers N`` opens the same ones. Raises
        SQLAlchemy's errors when a database cannot be opened."""
        home = settings.home.expanduser()
        home.mkdir(parents=True, exist_ok=True)
        database = settings.serve.audit_url or f"sqlite:///{home / 'audit.db'}"
        cds = settings.serve.cds.database_url or f"sqlite:///{home / 'cds.db'}"
        return AuditLog(database), DraftStore(database), CdsStore(cds)


def service(request: Request) -> Service:
    """The process's ``Service``, opened by the app's lifespan."""
    svc: Service = request.app.state.service
    return svc


# The OpenAPI security schemes (components.securitySchemes), applied to every operation that
# depends on ``principal``, so the docs page's "Authorize" button sends them. The credentials
# themselves are read from the headers by ``Authenticator.from_headers``, as before (these
# declarations never refuse a request: auto_error=False).
API_KEY = APIKeyHeader(
    name="X-API-Key",
    scheme_name="apiKey",
    description="A service account's key (`chartsight api-key`; its SHA-256 in "
    "`[[serve.auth.api_keys]]`).",
    auto_error=False,
)
BEARER = HTTPBearer(
    scheme_name="bearerJWT",
    bearerFormat="JWT",
    description="An OAuth2 access token (JWT) from the configured issuer (`serve.auth.issuer`), "
    "validated against its JWKS; SMART scopes decide what it may read.",
    auto_error=False,
)


async def principal(
    request: Request,
    svc: Annotated[Service, Depends(service)],
    _key: Annotated[str | None, Security(API_KEY)] = None,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None,
) -> Principal:
    """The authenticated, rate-limited caller (401, 429 otherwise), noted in the request's state
    for the access log's hashed ``caller`` (``middleware.note_caller``)."""
    try:
        who = svc.auth.from_headers(
            request.headers.get("authorization"), request.headers.get("x-api-key")
        )
    except Unauthenticated as exc:
        raise HTTPException(401, exc.public, headers={"WWW-Authenticate": "Bearer"}) from exc
    note_caller(request.scope.setdefault("state", {}), who.client_id)
    wait = svc.limiter.take(who.client_id)
    if wait > 0:
        raise HTTPException(
            429, "too many requests from this client", headers={"Retry-After": retry_after(wait)}
        )
    return who


Caller = Annotated[Principal, Depends(principal)]
Svc = Annotated[Service, Depends(service)]


async def authorize_key(agent: ChartSight, who: Principal, patient: str) -> None:
    """``authorize`` for a patient key as callers send it: a caller bound to a patient may name
    that patient by an identifier (``system|value``) as well as by id; the key is resolved to the
    Patient id only when it is not the bound id itself (and a failed resolution is a refusal,
    naming no other patient). Raises ``Forbidden``."""
    try:
        authorize(who, patient)
    except Forbidden:
        if who.patient is None or not patient_levels(who):
            raise
        try:
            resolved = await agent.patient_id(patient)
        except ChartSightError:
            resolved = None
        if resolved != who.patient:
            raise


async def record_id(agent: ChartSight, who: Principal, patient: str) -> str:
    """The Patient id of the record served for the key ``patient`` (an id, or an identifier
    ``system|value`` that ``authorize_key`` accepted): what a successful access is audited
    under, so that an auditor's ``GET /fhir/AuditEvent?patient=<id>`` finds it however the
    caller named the patient. Read from the record the request has just used (the agent's cache,
    ``settings.cache_ttl_s``, for the caller's ``readable`` scope); the key itself when that
    record cannot be read."""
    try:
        return (await agent.record(patient, scope=readable(who))).patient_id
    except ChartSightError:
        return patient


async def allowed(
    svc: Service, who: Principal, endpoint: str, patient: str, question: str | None = None
) -> None:
    """403 (audited) unless the caller may read the patient."""
    try:
        await authorize_key(svc.agent, who, patient)
    except Forbidden as exc:
        await svc.audit.arecord(
            who, endpoint, "denied", patient_id=patient, question=question, detail=str(exc)
        )
        raise HTTPException(403, exc.public) from exc


def model_card_url(svc: Service, request: Request) -> str:
    """The absolute URL of ChartSight's model card (``GET /model-card``): under
    ``serve.public_url`` when set, else the request's own base URL."""
    base = svc.settings.serve.public_url or str(request.base_url)
    return f"{base.rstrip('/')}/model-card"


def check_question(svc: Service, question: str) -> None:
    """422 when the question is longer than ``serve.max_question_chars`` characters (the
    settings' default 2000): a longer text is not a question, and it would fill the model's
    prompt."""
    limit = svc.settings.serve.max_question_chars
    if len(question) > limit:
        raise HTTPException(422, f"the question is over {limit} characters")


# How long a caller is asked to wait (Retry-After, seconds) while a database is unavailable: a
# PostgreSQL restart takes a few seconds, and the pools reconnect on the next request after it.
DATABASE_RETRY_S = 5
DATABASE_UNAVAILABLE = "a database this service needs is unavailable; try again shortly"


def _outage_kinds() -> tuple[type[Exception], ...]:
    """The exceptions that mean a database could not be reached or used right now (as opposed
    to a query it refused): SQLAlchemy's OperationalError (connection refused or dropped, SQLite
    busy), InterfaceError (a closed connection), TimeoutError (no pooled connection in time) and
    DisconnectionError; sqlite3's OperationalError (the thread store, through aiosqlite); and,
    where installed, psycopg's OperationalError (``AdminShutdown`` at a restart,
    ``psycopg_pool.PoolTimeout``) and InterfaceError."""
    import sqlite3

    from sqlalchemy import exc as sa_exc

    kinds: list[type[Exception]] = [
        sa_exc.OperationalError,
        sa_exc.InterfaceError,
        sa_exc.TimeoutError,
        sa_exc.DisconnectionError,
        sqlite3.OperationalError,
    ]
    try:
        import psycopg
    except ImportError:  # PostgreSQL support not installed
        return tuple(kinds)
    return (*kinds, psycopg.OperationalError, psycopg.InterfaceError)


DATABASE_OUTAGE = _outage_kinds()


def database_unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling (``__cause__``,
    ``__context__``, up to 8 deep), is one of ``DATABASE_OUTAGE``."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, DATABASE_OUTAGE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def unavailable() -> HTTPException:
    """503 with ``Retry-After: DATABASE_RETRY_S`` and ``DATABASE_UNAVAILABLE`` as its detail (no
    database name, URL or driver message)."""
    return HTTPException(503, DATABASE_UNAVAILABLE, headers={"Retry-After": str(DATABASE_RETRY_S)})


def http_error(exc: ChartSightError) -> HTTPException:
    """The HTTP status for a ChartSight error: 403 more than the caller's scopes grant, 404 no
    such resource, 422 a tool's arguments or a question that cannot be asked (empty), 503 with
    Retry-After when it was caused by a database being unavailable (``unavailable``), 502 the
    patient source failed, 503 not configured or the conversation store unreadable
    (``ThreadStoreError``), else 500 (a damaged thread: ``DamagedThread``)."""
    log.debug("%s: %s", type(exc).__name__, exc)  # the full message, for the operator
    if database_unavailable(exc.__cause__):
        return unavailable()
    if isinstance(exc, NotPermitted):
        return HTTPException(403, exc.public)
    if isinstance(exc, ResourceNotFound):
        return HTTPException(404, exc.public)
    if isinstance(exc, ToolError | QuestionError):
        return HTTPException(422, exc.public)
    if isinstance(exc, ConnectorError):
        return HTTPException(502, exc.public)
    if isinstance(exc, ConfigurationError | ThreadStoreError):
        return HTTPException(503, exc.public)
    return HTTPException(500, exc.public)


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the request body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, work: Awaitable[Any], limit_s: float) -> Any:
    """``work``'s result; cancelled when the client disconnects (None then) or after ``limit_s``."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=limit_s, return_when="FIRST_COMPLETED")
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if gone in done:
            return None
        raise TimeoutError
    finally:
        gone.cancel()


def _public(data: dict[str, Any]) -> dict[str, Any]:
    """A run event's data as a caller outside may see it: a ``reason`` (``fallback``,
    ``tool_planner_failed``: a backend's error, which names the model server's URL) without URLs
    or file paths (``connectors.errors.scrub``)."""
    reason = data.get("reason")
    return {**data, "reason": scrub(reason)} if isinstance(reason, str) else data


def _stream_error(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """The ``error`` event for a failure that is not a ChartSight error: status 503 and
    ``DATABASE_UNAVAILABLE`` when a database is unavailable (``database_unavailable``), else
    500 "the answer failed"."""
    if database_unavailable(exc):
        return "error", {"status": 503, "detail": DATABASE_UNAVAILABLE}
    return "error", {"status": 500, "detail": "the answer failed"}


def answer_stream(
    svc: Service,
    who: Principal,
    endpoint: str,
    patient: str,
    question: str,
    thread: str | None,
    *,
    source: FhirSource | None = None,
    keep: bool = True,
    on_answer: Callable[[Answer], Awaitable[dict[str, Any]]] | None = None,
) -> EventSourceResponse:
    """``who``'s question about ``patient`` answered as Server-Sent Events: the run's events as
    they happen (``node_started``, ``token``, ``verified``, ...: ``{"event": kind, "data": JSON}``),
    then ``answer`` (the answer's JSON, ``thread_id`` the caller's own ``thread``) or ``error``
    (``{"status", "detail"}``: 504 past ``serve.request_timeout_s``, else ``http_error``'s).
    ``thread`` is kept apart per caller and patient (``security.thread_key``); the similar cases
    shown follow ``case_privacy(who)``, and the answer is built only from the resource types its
    scopes grant (``readable(who)``); ``source`` and ``keep`` are ``ChartSight.ask``'s;
    ``on_answer`` is given the answer as produced and its result is added to the ``answer``
    event's data (the SMART page's ``draft_id``: ``smart.py``). The run
    is audited under ``endpoint`` (answered, abstained, error, timeout, cancelled) and is stopped
    when the client goes away. Authorization (``allowed``) and ``check_question`` come first, in
    the route."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    thread_id = thread_key(who, patient, thread) if thread else None

    async def run() -> None:
        try:
            answer = await asyncio.wait_for(
                svc.agent.ask(
                    patient,
                    question,
                    thread_id=thread_id,
                    on_event=lambda kind, data: queue.put_nowait((kind, _public(data))),
                    source=source,
                    keep=keep,
                    case_privacy=case_privacy(who),
                    scope=readable(who),
                    time_limit_s=svc.settings.serve.request_timeout_s,
                ),
                svc.settings.serve.request_timeout_s,
            )
        except TimeoutError:
            await svc.audit.arecord(who, endpoint, "timeout", patient_id=patient, question=question)
            queue.put_nowait(("error", {"status": 504, "detail": "no answer in time"}))
            return
        except ChartSightError as exc:
            err = http_error(exc)
            await svc.audit.arecord(
                who, endpoint, "error", patient_id=patient, question=question,
                detail=type(exc).__name__,
            )  # fmt: skip
            queue.put_nowait(("error", {"status": err.status_code, "detail": err.detail}))
            return
        except Exception as exc:  # e.g. the thread store failing: the stream must still end
            log.warning(
                "%s failed: %s", endpoint, type(exc).__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )  # fmt: skip
            queue_error = _stream_error(exc)
            await svc.audit.arecord(
                who, endpoint, "error", patient_id=patient, question=question,
                detail=type(exc).__name__,
            )  # fmt: skip
            queue.put_nowait(queue_error)
            return
        data = answer.shown(thread).model_dump(mode="json")
        if on_answer is not None:
            try:
                data.update(await on_answer(answer))
            except Exception as exc:  # the answer is still shown, without what on_answer adds
                log.warning("%s: keeping the answer failed: %s", endpoint, type(exc).__name__)
        await svc.audit.arecord(
            who, endpoint, "abstained" if answer.abstained else "answered",
            patient_id=answer.patient_id, question=question, answer=data,
        )  # fmt: skip
        queue.put_nowait(("answer", data))

    async def audited_run() -> None:
        try:
            await run()
        except Exception as exc:  # the audit log failing: no answer is shown unaudited
            log.warning("%s: the audit log failed: %s", endpoint, type(exc).__name__)
            queue.put_nowait(_stream_error(exc))

    async def events() -> AsyncIterator[dict[str, str]]:
        task = asyncio.ensure_future(audited_run())
        try:
            while True:
                kind, data = await queue.get()
                yield {"event": kind, "data": json.dumps(data, default=str)}
                if kind in ("answer", "error"):
                    return
        finally:
            if not task.done():  # the client went away mid-stream: stop the run
                task.cancel()
                with anyio.CancelScope(shield=True):  # the stream's scope is cancelled
                    try:
                        await svc.audit.arecord(
                            who, endpoint, "cancelled", patient_id=patient, question=question
                        )
                    except Exception as exc:  # nobody is listening to be told
                        log.warning("%s: the audit log failed: %s", endpoint, type(exc).__name__)

    return EventSourceResponse(events(), ping=15)
