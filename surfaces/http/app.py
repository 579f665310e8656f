"""The HTTP service's routes: ``POST /v1/ask`` (and its Server-Sent Events variant), similar
cases, health, CDS Hooks (``cds.py``), the SMART app page (``smart.py``) and MCP over streamable
HTTP (``surfaces/mcp.py``). What the routes share is in ``deps.py``.

One ``ChartSight`` (source, model, index, checkpointer) is opened per process at start-up and shared
by every request; the CPU-bound steps of a question run in worker threads, off the event loop.
Every request that touches a patient is authenticated, authorized for that patient, rate limited
per client and written to the audit log. Logs carry no PHI: no names, no question or answer text,
no patient ids in paths (uvicorn's access log is off; ``middleware.py`` logs the route template).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

from agent import Answer, CaseFilter, CaseHit, ChartSight, ChartSightError, answer_bundle, scrub
from common import observe
from surfaces.http.auditevent import router as audit_router
from surfaces.http.cds import router as cds_router
from surfaces.http.deps import (
    DATABASE_OUTAGE,
    Caller,
    Service,
    Svc,
    allowed,
    answer_stream,
    check_question,
    http_error,
    model_card_url,
    record_id,
    run_unless_disconnected,
    unavailable,
)
from surfaces.http.forward import AuditForwarder
from surfaces.http.metrics import CONTENT_TYPE, Metrics, counted, may_scrape
from surfaces.http.middleware import AccessLog, BodyLimit, request_log_to_stderr
from surfaces.http.schemas import UNREADABLE_BODY, AskRequest, Problem, problem
from surfaces.http.security import case_privacy, readable, thread_key
from surfaces.http.smart import router as smart_router
from surfaces.mcp import mcp_lifespan, mount_mcp
from surfaces.model_card import card_html, model_card
from surfaces.settings import AppSettings

# Swagger UI and ReDoc, served from the fastapi-offline package's copies (Swagger UI: Apache-2.0;
# ReDoc: MIT) instead of FastAPI's default CDN, so the docs pages load inside a hospital network
log = logging.getLogger(__name__)
DOCS_ASSETS = "/docs-assets"


def _wants_fhir(accept: str) -> bool:
    """Whether an ``Accept`` header asks for FHIR JSON before plain JSON: its first media type
    (by order, then ``q``) that is ``application/fhir+json`` or ``application/json``."""
    ranked = []
    for n, part in enumerate(accept.split(",")):
        kind, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if kind.lower() in ("application/fhir+json", "application/json") and q > 0:
            ranked.append((-q, n, kind.lower()))
    return bool(ranked) and min(ranked)[2] == "application/fhir+json"


async def _stop(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# ``chartsight serve --workers N`` (N > 1): the file holding the pickled ``AppSettings`` each
# worker process builds its app from (written by the command, private to its user)
SETTINGS_FILE_ENV = "CHARTSIGHT_SERVE_SETTINGS_FILE"


def app_from_environment() -> FastAPI:
    """The app of one worker process of ``chartsight serve --workers N``: ``create_app`` with the
    ``AppSettings`` the command built (its TOML file, environment and options): their fields,
    validated already, read from the pickle file named by ``CHARTSIGHT_SERVE_SETTINGS_FILE``
    (uvicorn's factory, called once in each worker; the environment is not read again). Raises
    ``RuntimeError`` when the variable is not set."""
    path = os.environ.get(SETTINGS_FILE_ENV)
    if not path:
        raise RuntimeError(f"{SETTINGS_FILE_ENV} is not set: start workers with chartsight serve")
    with open(path, "rb") as fh:  # written by this user's own `chartsight serve`, mode 0600
        fields = pickle.load(fh)
    settings = AppSettings.model_construct(**fields)
    request_log_to_stderr()
    return create_app(settings)


def create_app(settings: AppSettings, agent: ChartSight | None = None) -> FastAPI:
    """The ASGI app. ``agent`` (opened by the caller) is used as is; else one is opened at start.
    Besides the API: ``/docs`` and ``/redoc`` with local assets (``serve.ops.docs``),
    ``/model-card`` (HTML) and ``/model-card.json``, and ``/metrics`` (``serve.ops.metrics``)."""
    ops = settings.serve.ops
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            opened = agent if agent is not None else ChartSight(settings)
            if agent is None:
                await stack.enter_async_context(opened)
            await opened.open_threads()  # a threads database it cannot reach stops the start
            svc = Service(settings, opened)
            stack.callback(svc.audit.close)
            stack.callback(svc.drafts.close)
            stack.callback(svc.cds_store.close)
            svc.audit = counted(svc.audit, metrics)  # outcomes by endpoint, for /metrics
            app.state.service = svc
            # work started from the lifespan (MCP's sessions) reports to this app's metrics
            stack.enter_context(observe.observing(metrics.observe))
            repository = settings.serve.audit.repository
            if repository is not None:  # the audit repository, fed in the background
                own_url = settings.serve.public_url or (
                    f"http://{settings.serve.host}:{settings.serve.port}"
                )
                forwarder = AuditForwarder(svc.audit, repository, own_url.rstrip("/"))
                app.state.audit_forwarder = forwarder
                stack.push_async_callback(_stop, asyncio.ensure_future(forwarder.run()))
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
        docs_url=None,  # served below with local assets
        redoc_url=None,
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
        responses={
            401: {"model": Problem, "description": "No or invalid credentials."},
            403: {"model": Problem, "description": "Not allowed for this patient."},
            413: {"model": Problem, "description": "Request body too large."},
            429: {"model": Problem, "description": "Rate limit; see Retry-After."},
            503: {
                "model": Problem,
                "description": "A database the service needs (store, threads, audit log) is "
                "unavailable; see Retry-After.",
            },
        },
    )

    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        """503 with Retry-After (``deps.unavailable``) for a database that cannot be reached or
        used right now (``deps.DATABASE_OUTAGE``), instead of a 500: the pools reconnect once
        it is back. Nothing of the driver's message (hosts, SQL, parameters) is sent."""
        log.warning("a database is unavailable: %s", type(exc).__name__)
        error = unavailable()
        return JSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)

    for kind in DATABASE_OUTAGE:
        app.add_exception_handler(kind, database_down)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming where and what is wrong (``type``, ``loc``, ``msg``), without echoing the
        caller's input: FastAPI's default body repeats it, and a value JSON cannot encode (a lone
        UTF-16 surrogate such as ``"\\ud800"`` in the patient id) turned the 422 into a 500."""
        errors = [
            {"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        """Any error no route turned into a status: 500 in the documented ``Problem`` shape
        (Starlette's default is a plain-text body), naming nothing of the error; the operator's
        log has the traceback (Starlette's ``ServerErrorMiddleware`` logs it after this)."""
        return JSONResponse({"detail": "internal error"}, 500)

    salt = ops.log_salt.get_secret_value().encode() if ops.log_salt else b""
    app.add_middleware(AccessLog, salt=salt, metrics=metrics)
    app.state.metrics = metrics
    if ops.docs:
        _docs_pages(app)
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.serve.max_body_bytes,
        larger={"/cds-services/": settings.serve.cds_max_body_bytes},
    )

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        """``{"status": "ok"}`` whenever the process serves requests; no credentials needed."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: the agent is open and the audit log answers (the patient source is "
        "reached per request: CDS prefetch and EHR-named servers need no configured one).",
        responses={503: {"model": Problem}},
    )
    async def readyz(request: Request) -> Any:
        """``{"status": "ready", "audit": "ok", "agent": "ok", "model": <backend>}``, or 503 with
        ``"not ready"`` (or ``"starting"``) and the failing check: the audit log must answer a
        read within 5 s and the agent be open. No credentials needed."""
        svc: Service | None = getattr(request.app.state, "service", None)
        if svc is None:
            return JSONResponse({"status": "starting"}, 503)
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(asyncio.to_thread(svc.audit.rows, 1), 5)
            checks["audit"] = "ok"
        except Exception as exc:
            checks["audit"] = f"failing: {type(exc).__name__}"
        checks["agent"] = "ok" if svc.agent.is_open else "not open"
        # the backend's name without the model server's URL or a model file's path (this answer
        # needs no credentials)
        checks["model"] = scrub(svc.agent.model_name)
        ok = all(v == "ok" for k, v in checks.items() if k != "model")
        return JSONResponse(
            {"status": "ready" if ok else "not ready", **checks}, 200 if ok else 503
        )

    @app.get(
        "/model-card",
        tags=["model card"],
        summary="The model card (HTML): ONC HTI-1 decision support source attributes.",
        response_class=HTMLResponse,
    )
    async def model_card_page() -> HTMLResponse:
        """ChartSight's model card as a page without external assets: intended use and users,
        out-of-scope uses, known risks and limits, inputs, fairness, validation with its measured
        numbers (from benchmarks/results.md), maintenance; and this deployment's model backend,
        model and prompt version. No credentials needed."""
        return HTMLResponse(card_html(model_card(settings)))

    @app.get(
        "/model-card.json",
        tags=["model card"],
        summary="The model card as JSON (the same attributes, by id).",
    )
    async def model_card_json() -> dict[str, Any]:
        """The card's JSON: ``name``, ``summary``, ``regulation``, ``version``, ``deployment``
        (``backend``, ``model``, ``prompt_version``), ``attributes`` (``id``, ``group``, ``cfr``,
        ``title``, ``text``) and ``measures`` (``name``, ``section``, ``right``, ``of``,
        ``result``, ``quotes``). No credentials needed."""
        return model_card(settings)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text exposition of this process's metrics (``metrics.py``); 404 unless
        ``serve.ops.metrics`` lets this client in (loopback peer, or its bearer token)."""
        peer = request.client.host if request.client else None
        if not may_scrape(ops, peer, request.headers.get("authorization")):
            raise HTTPException(404, "Not Found")
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.post(
        "/v1/ask",
        response_model=Answer,
        tags=["ask"],
        summary="A grounded answer to a question about one patient.",
        responses={
            200: {
                "content": {
                    "application/fhir+json": {
                        "schema": {"type": "object", "description": "A FHIR R4 Bundle."}
                    }
                },
                "description": "The Answer JSON; with `Accept: application/fhir+json`, the "
                "answer as a FHIR R4 `collection` Bundle: a DocumentReference (docStatus "
                "preliminary, labelled AI-asserted) and its AI Provenance (HL7 AI Transparency "
                "on FHIR).",
            },
            400: UNREADABLE_BODY,
            404: {"model": Problem, "description": "No such patient."},
            422: {"model": Problem, "description": "A malformed request or too long a question."},
            499: {"model": Problem, "description": "The client went away; the run was stopped."},
            500: problem("The thread's saved state is damaged (start a new thread)."),
            502: {"model": Problem, "description": "The patient source failed."},
            503: problem("The conversation store cannot be read, or no model is configured."),
            504: {"model": Problem, "description": "No answer within the time limit."},
        },
    )
    async def ask(body: AskRequest, request: Request, who: Caller, svc: Svc) -> Any:
        """The answer to ``question`` about ``patient``: its text, every sentence citing the
        patient's resources (``citations``), the structured facts, similar cases and images it
        used, the model and prompt version, and warnings. A caller whose SMART scopes grant only
        some resource types (``patient/Observation.rs``) gets an answer built from those alone,
        with a warning naming the rest. Without ``thread`` nothing is kept;
        with one, the conversation continues (private to the caller and the patient). Every
        request is audited (the question's SHA-256, never its text). A request that accepts
        ``application/fhir+json`` (and not ``application/json`` first) gets the answer as a FHIR
        R4 ``collection`` Bundle instead (``agent.answer_bundle``: the DocumentReference and its
        AI Provenance, the Device linked to ``/model-card``)."""
        check_question(svc, body.question)
        await allowed(svc, who, "ask", body.patient, body.question)
        thread = thread_key(who, body.patient, body.thread) if body.thread else None
        try:
            answer: Answer | None = await run_unless_disconnected(
                request,
                svc.agent.ask(
                    body.patient,
                    body.question,
                    thread_id=thread,
                    keep=False,
                    case_privacy=case_privacy(who),
                    scope=readable(who),
                    time_limit_s=svc.settings.serve.request_timeout_s,
                ),
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
        answer = answer.shown(body.thread)  # the caller's own thread name, no internal URLs
        await svc.audit.arecord(
            who,
            "ask",
            "abstained" if answer.abstained else "answered",
            patient_id=answer.patient_id,
            question=body.question,
            answer=answer.model_dump(mode="json"),
        )
        if _wants_fhir(request.headers.get("accept", "")):
            bundle = answer_bundle(answer, model_card_url=model_card_url(svc, request))
            return JSONResponse(bundle, media_type="application/fhir+json")
        return answer

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
                "(the Answer JSON) or `error`.",
            },
            400: UNREADABLE_BODY,
        },
    )
    async def ask_stream(body: AskRequest, who: Caller, svc: Svc) -> EventSourceResponse:
        """The run of ``POST /v1/ask`` as it happens: each event's ``data`` is JSON; the last
        event is ``answer`` (the Answer JSON) or ``error`` (``{"status", "detail"}``: 504 past
        the time limit, else the status ``/v1/ask`` would return). Closing the connection stops
        the run."""
        check_question(svc, body.question)
        await allowed(svc, who, "ask_stream", body.patient, body.question)
        return answer_stream(
            svc, who, "ask_stream", body.patient, body.question, body.thread, keep=False
        )

    @app.get(
        "/v1/patients/{patient_id}/similar",
        response_model=list[CaseHit],
        tags=["retrieval"],
        summary="Past cases most similar to the patient's (images and summary), own cases left out.",
        responses={
            404: problem("No such patient."),
            502: problem("The patient source failed."),
            503: problem("No similar-case index has been built (`chartsight index build`)."),
        },
    )
    async def similar(
        patient_id: Annotated[str, Path(max_length=200)],
        who: Caller,
        svc: Svc,
        k: Annotated[int, Query(ge=1, le=50)] = 5,
        modality: str | None = None,
        sex: Literal["male", "female", "other", "unknown"] | None = None,
        age_band: Annotated[str | None, Query(pattern=r"^\d{1,3}-\d{1,3}$|^\d{1,3}\+$")] = None,
    ) -> Any:
        """Up to ``k`` past cases (1 to 50) nearest the patient's own in the similar-case index,
        best first, optionally only of a modality (``CT``), sex or age band (``70-79``, ``90+``).
        A caller bound to one patient sees them generalised: no case keys, patient ids, dates or
        free text. 403 for a caller whose scopes grant only some resource types (a case
        summarises every type of another record)."""
        await allowed(svc, who, "similar", patient_id)
        try:
            hits = await svc.agent.similar(
                patient_id,
                k,
                CaseFilter(modality=modality, sex=sex, age_band=age_band),
                case_privacy=case_privacy(who),
                scope=readable(who),
            )
        except ChartSightError as exc:
            await svc.audit.arecord(
                who, "similar", "error", patient_id=patient_id, detail=type(exc).__name__
            )
            raise http_error(exc) from exc
        served = await record_id(svc.agent, who, patient_id)
        await svc.audit.arecord(who, "similar", "answered", patient_id=served)
        return hits

    app.include_router(cds_router)
    app.include_router(audit_router)
    app.include_router(smart_router)
    mount_mcp(app)
    app.openapi = lambda: _json_problems(FastAPI.openapi(app))  # type: ignore[method-assign]
    return app


PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
FASTAPI_422 = {"$ref": "#/components/schemas/HTTPValidationError"}


def _json_problems(spec: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with every error response (status 400 and above) that returns a
    ``Problem`` listed as ``application/json`` only: FastAPI lists an error's model under the
    operation's own media type (``text/html`` for the SMART page, ``image/svg+xml``,
    ``text/event-stream``), which is not what an error sends. A 422 is ``Problem`` too (what
    ``invalid_request`` sends; FastAPI documents its own ``HTTPValidationError``, whose items
    carry the ``input`` this service never echoes), and that model is dropped. Changes ``spec``
    in place (FastAPI caches it) and returns it."""
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if not status.isdigit() or int(status) < 400:
                    continue
                if any(c.get("schema") in (PROBLEM_REF, FASTAPI_422) for c in content.values()):
                    response["content"] = {"application/json": {"schema": PROBLEM_REF}}
    schemas = spec.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec


def _docs_pages(app: FastAPI) -> None:
    """``/docs`` (Swagger UI, with its OAuth2 redirect page) and ``/redoc``, their scripts, styles
    and icon served from the installed fastapi-offline package under ``DOCS_ASSETS``: every URL
    the pages load is on this service (Swagger UI's online validator is off)."""
    assets = files("fastapi_offline").joinpath("static")
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} API",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} API",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
