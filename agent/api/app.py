"""The HTTP service: ``POST /v1/ask`` (and its Server-Sent Events variant), similar cases, health,
CDS Hooks (``agent/api/cds.py``), the SMART app page (``agent/api/smart.py``) and MCP over streamable
HTTP (``agent/api/mcp.py``).

One ``ChartSight`` (source, model, index, checkpointer) is opened per process at start-up and shared
by every request; the CPU-bound steps of a question run in worker threads, off the event loop.
Every request that touches a patient is authenticated, authorized for that patient, rate limited
per client and written to the audit log. Logs carry no PHI: no names, no question or answer text,
no patient ids in paths (uvicorn's access log is off; this module logs the route template).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.answer import Answer
from agent.api.audit import AuditLog
from agent.api.limits import RateLimiter
from agent.api.security import Authenticator, AuthError, Forbidden, Principal, authorize
from agent.service import ChartSight
from agent.settings import Settings
from agent.tools import ToolError
from connectors.errors import (
    ChartSightError,
    ConfigurationError,
    ConnectorError,
    ResourceNotFound,
)
from retrieval.index import CaseFilter

log = logging.getLogger("chartsight.api")


# --- request and response shapes (they are the OpenAPI document) --------------------------------


class AskRequest(BaseModel):
    patient: str = Field(min_length=1, max_length=200, description="Patient id (or identifier).")
    question: str = Field(min_length=1, description="The clinician's question.")
    thread: str | None = Field(
        default=None,
        max_length=100,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Continue this conversation thread (yours, about this patient).",
    )


class CitationOut(BaseModel):
    reference: str
    text: str


class FactOut(BaseModel):
    tool: str
    statement: str
    value: Any = None
    unit: str | None = None
    date: str | None = None
    evidence: list[str]


class SimilarCaseOut(BaseModel):
    key: str
    score: float
    summary: str


class ImageOut(BaseModel):
    reference: str
    modality: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None


class AnswerOut(BaseModel):
    """A grounded answer: every sentence cites the patient's own resources."""

    question: str
    patient_id: str
    text: str
    citations: list[CitationOut]
    facts: list[FactOut]
    similar_cases: list[SimilarCaseOut]
    images: list[ImageOut]
    model: str
    prompt_version: str
    supported_fraction: float
    abstained: bool
    fallback_used: bool
    warnings: list[str]
    rejected: list[dict[str, Any]]
    latency_ms: dict[str, float]
    tool_calls: list[dict[str, Any]]
    thread_id: str | None
    created_at: str


class CaseHitOut(BaseModel):
    key: str
    patient_id: str
    score: float
    summary: str
    sex: str | None
    age_band: str | None
    modalities: list[str]
    label: str | None
    kind: str


class Problem(BaseModel):
    detail: str


# --- middleware ------------------------------------------------------------------------------------


class BodyLimit:
    """Refuses request bodies over the limit with 413, whether or not they declare a length.
    ``larger`` gives path prefixes their own limit (CDS Hooks prefetch can be megabytes)."""

    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        self.app = app
        self.default = max_bytes
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = next((n for p, n in self.larger.items() if path.startswith(p)), self.default)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        # read the body first (it is small by definition), so an oversized chunked upload is
        # refused before the app sees any of it
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            if len(body) > limit:
                await _too_large(send, limit)
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: disconnects

        await self.app(scope, replay, send)


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """One log line per request: method, the route's template (never the patient id in the path),
    status and time, and a request id (also sent back as ``x-request-id``). Pure ASGI, so that
    streaming responses still see a client's disconnect."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            log.info(
                "%s %s %s %.0f ms rid=%s",
                scope.get("method"),
                getattr(route, "path", "-"),  # the template, never the patient id
                status,
                (time.perf_counter() - start) * 1000,
                rid,
            )


# --- the app -------------------------------------------------------------------------------------


class Service:
    """What the routes share: the agent, security, limits and the audit log."""

    def __init__(self, settings: Settings, agent: ChartSight) -> None:
        self.settings = settings
        self.agent = agent
        self.auth = Authenticator(settings.serve.auth)
        self.limiter = RateLimiter(settings.serve.rate_per_minute, settings.serve.rate_burst)
        home = settings.home.expanduser()
        home.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(settings.serve.audit_url or f"sqlite:///{home / 'audit.db'}")
        self.smart_sessions: Any = None  # the SMART app's launches and sessions (smart.py)

    def thread_key(self, principal: Principal, patient: str, thread: str) -> str:
        """Threads are private to the caller and the patient: another caller's thread id, or the
        same id about another patient, is a different conversation."""
        digest = hashlib.sha256(f"{principal.subject}\x00{patient}\x00{thread}".encode())
        return digest.hexdigest()[:32]


def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


async def principal(request: Request, svc: Annotated[Service, Depends(service)]) -> Principal:
    """The authenticated, rate-limited caller (401, 429 otherwise)."""
    try:
        who = svc.auth.from_headers(
            request.headers.get("authorization"), request.headers.get("x-api-key")
        )
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc
    wait = svc.limiter.take(who.client_id)
    if wait > 0:
        raise HTTPException(
            429, "too many requests from this client", headers={"Retry-After": f"{wait:.0f}"}
        )
    return who


Caller = Annotated[Principal, Depends(principal)]
Svc = Annotated[Service, Depends(service)]


async def allowed(
    svc: Service, who: Principal, endpoint: str, patient: str, question: str | None = None
) -> None:
    """403 (audited) unless the caller may read the patient."""
    try:
        authorize(who, patient)
    except Forbidden as exc:
        await svc.audit.arecord(
            who, endpoint, "denied", patient_id=patient, question=question, detail=str(exc)
        )
        raise HTTPException(403, str(exc)) from exc


def http_error(exc: ChartSightError) -> HTTPException:
    if isinstance(exc, ResourceNotFound):
        return HTTPException(404, str(exc))
    if isinstance(exc, ToolError):
        return HTTPException(422, str(exc))
    if isinstance(exc, ConnectorError):
        return HTTPException(502, str(exc))
    if isinstance(exc, ConfigurationError):
        return HTTPException(503, str(exc))
    return HTTPException(500, str(exc))


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


EventSink = Callable[[str, dict[str, Any]], None]


def answer_stream(
    svc: Service,
    who: Principal,
    endpoint: str,
    patient: str,
    question: str,
    thread: str | None,
    ask: Callable[[EventSink], Awaitable[Answer]],
) -> EventSourceResponse:
    """A question answered as Server-Sent Events: the run's events as they happen, then
    ``answer`` (or ``error``). The run has the service's time limit, is audited, and is stopped
    when the client goes away."""
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    async def run() -> None:
        try:
            answer = await asyncio.wait_for(
                ask(lambda kind, data: queue.put_nowait((kind, data))),
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
        data = answer.to_dict()
        data["thread_id"] = thread
        await svc.audit.arecord(
            who, endpoint, "abstained" if answer.abstained else "answered",
            patient_id=answer.patient_id, question=question, answer=data,
        )  # fmt: skip
        queue.put_nowait(("answer", data))

    async def events() -> AsyncIterator[dict[str, str]]:
        task = asyncio.ensure_future(run())
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
                    await svc.audit.arecord(
                        who, endpoint, "cancelled", patient_id=patient, question=question
                    )

    return EventSourceResponse(events(), ping=15)


def create_app(settings: Settings, agent: ChartSight | None = None) -> FastAPI:
    """The ASGI app. ``agent`` (opened by the caller) is used as is; else one is opened at start."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            opened = agent if agent is not None else ChartSight(settings)
            if agent is None:
                await stack.enter_async_context(opened)
            svc = Service(settings, opened)
            stack.callback(svc.audit.close)
            app.state.service = svc
            from agent.api.mcp import mcp_lifespan

            await stack.enter_async_context(mcp_lifespan(app))
            yield

    # a library that logs its SQL operations with their arguments would log checkpointed state
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLogger().level))
    app = FastAPI(
        title="ChartSight",
        version="1",
        summary="Grounded answers to clinicians' questions about one patient, citing the "
        "patient's own FHIR resources.",
        lifespan=lifespan,
        responses={
            401: {"model": Problem, "description": "No or invalid credentials."},
            403: {"model": Problem, "description": "Not allowed for this patient."},
            413: {"model": Problem, "description": "Request body too large."},
            429: {"model": Problem, "description": "Rate limit; see Retry-After."},
        },
    )
    app.add_middleware(AccessLog)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.serve.max_body_bytes,
        larger={"/cds-services/": settings.serve.cds_max_body_bytes},
    )

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: the agent is open and the patient source and audit log answer.",
        responses={503: {"model": Problem}},
    )
    async def readyz(request: Request) -> Any:
        svc: Service | None = getattr(request.app.state, "service", None)
        if svc is None:
            return JSONResponse({"status": "starting"}, 503)
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(asyncio.to_thread(svc.audit.rows, 1), 5)
            checks["audit"] = "ok"
        except Exception as exc:
            checks["audit"] = f"failing: {type(exc).__name__}"
        rt = svc.agent.runtime
        checks["agent"] = "ok" if rt is not None else "not open"
        checks["model"] = rt.backend.name if rt is not None and rt.backend else "evidence"
        ok = all(v == "ok" for k, v in checks.items() if k != "model")
        return JSONResponse(
            {"status": "ready" if ok else "not ready", **checks}, 200 if ok else 503
        )

    @app.post(
        "/v1/ask",
        response_model=AnswerOut,
        tags=["ask"],
        summary="A grounded answer to a question about one patient.",
        responses={
            404: {"model": Problem, "description": "No such patient."},
            422: {"model": Problem, "description": "A malformed request or too long a question."},
            499: {"model": Problem, "description": "The client went away; the run was stopped."},
            502: {"model": Problem, "description": "The patient source failed."},
            504: {"model": Problem, "description": "No answer within the time limit."},
        },
    )
    async def ask(body: AskRequest, request: Request, who: Caller, svc: Svc) -> Any:
        limit = svc.settings.serve.max_question_chars
        if len(body.question) > limit:
            raise HTTPException(422, f"the question is over {limit} characters")
        await allowed(svc, who, "ask", body.patient, body.question)
        thread = svc.thread_key(who, body.patient, body.thread) if body.thread else None
        try:
            answer: Answer | None = await run_unless_disconnected(
                request,
                svc.agent.ask(body.patient, body.question, thread_id=thread, keep=False),
                svc.settings.serve.request_timeout_s,
            )
        except TimeoutError as exc:
            await svc.audit.arecord(
                who, "ask", "timeout", patient_id=body.patient, question=body.question
            )
            raise HTTPException(504, "no answer within the time limit") from exc
        except ChartSightError as exc:
            await svc.audit.arecord(
                who, "ask", "error", patient_id=body.patient, question=body.question,
                detail=type(exc).__name__,
            )  # fmt: skip
            raise http_error(exc) from exc
        if answer is None:  # the client went away: the run was cancelled
            await svc.audit.arecord(
                who, "ask", "cancelled", patient_id=body.patient, question=body.question
            )
            return JSONResponse({"detail": "client disconnected"}, 499)
        data = answer.to_dict()
        data["thread_id"] = body.thread
        await svc.audit.arecord(
            who,
            "ask",
            "abstained" if answer.abstained else "answered",
            patient_id=answer.patient_id,
            question=body.question,
            answer=data,
        )
        return data

    @app.post(
        "/v1/ask/stream",
        tags=["ask"],
        summary="The same answer as Server-Sent Events: graph progress and tokens, then `answer`.",
        response_class=EventSourceResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "Events `node_started`, `node_finished`, `plan`, `facts`, "
                "`evidence`, `tool_calls`, `token`, `verified`, `fallback`, ...; then `answer` "
                "(the AnswerOut JSON) or `error`.",
            }
        },
    )
    async def ask_stream(body: AskRequest, who: Caller, svc: Svc) -> EventSourceResponse:
        limit = svc.settings.serve.max_question_chars
        if len(body.question) > limit:
            raise HTTPException(422, f"the question is over {limit} characters")
        await allowed(svc, who, "ask_stream", body.patient, body.question)
        thread = svc.thread_key(who, body.patient, body.thread) if body.thread else None
        return answer_stream(
            svc,
            who,
            "ask_stream",
            body.patient,
            body.question,
            body.thread,
            lambda on_event: svc.agent.ask(
                body.patient, body.question, thread_id=thread, on_event=on_event, keep=False
            ),
        )

    @app.get(
        "/v1/patients/{patient_id}/similar",
        response_model=list[CaseHitOut],
        tags=["retrieval"],
        summary="Past cases most similar to the patient's (images and summary), own cases left out.",
    )
    async def similar(
        patient_id: str,
        who: Caller,
        svc: Svc,
        k: Annotated[int, Query(ge=1, le=50)] = 5,
        modality: str | None = None,
        sex: Literal["male", "female", "other", "unknown"] | None = None,
        age_band: Annotated[str | None, Query(pattern=r"^\d{1,3}-\d{1,3}$|^\d{1,3}\+$")] = None,
    ) -> Any:
        await allowed(svc, who, "similar", patient_id)
        try:
            hits = await svc.agent.similar(
                patient_id, k, CaseFilter(modality=modality, sex=sex, age_band=age_band)
            )
        except ChartSightError as exc:
            raise http_error(exc) from exc
        await svc.audit.arecord(who, "similar", "answered", patient_id=patient_id)
        return [asdict(h) for h in hits]

    from agent.api.cds import router as cds_router
    from agent.api.mcp import mount_mcp
    from agent.api.smart import router as smart_router

    app.include_router(cds_router)
    app.include_router(smart_router)
    mount_mcp(app)
    return app
