"""ASGI middleware of the HTTP service: the request body limit and the access log (one JSON line
per request: route template, status, time, request id, hashed caller; no patient ids, no PHI),
which also feeds the Prometheus metrics (``metrics.py``), and the request id that the audit log
records with each row."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import observe

if TYPE_CHECKING:  # metrics.py counts the audit log, which reads the request id from here
    from surfaces.http.metrics import Metrics

log = logging.getLogger("chartsight.api")


def request_log_to_stderr() -> None:
    """Write the request log (logger ``chartsight.api``, ``AccessLog``) to standard error as bare
    JSON lines, one per request with nothing around it, at INFO whatever the root logger's level,
    through a handler of its own (not propagated): a log collector reads each line as JSON. The
    root's handlers would not do: the MCP SDK installs a Rich console handler in a process that
    has none yet (a ``--workers`` worker), which wraps each line at 80 columns and adds the time,
    level and source line. Called by ``chartsight serve`` and in each worker; idempotent."""
    if any(getattr(h, "chartsight_request_log", False) for h in log.handlers):
        return
    handler = logging.StreamHandler()  # sys.stderr
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.chartsight_request_log = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# the request being served (its ``x-request-id``), for the audit rows written while serving it
_REQUEST_ID: ContextVar[str | None] = ContextVar("chartsight_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being served (what ``AccessLog`` sends back as
    ``x-request-id``: the caller's own header, at most 64 characters, else 16 random hex digits),
    or None outside a request (the CLI, MCP over stdio). Tasks and worker threads started while
    serving it inherit it (``contextvars``)."""
    return _REQUEST_ID.get()


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


CALLER = "chartsight.caller"  # request state key: the authenticated caller's client id


def note_caller(state: dict[str, Any], client_id: str) -> None:
    """Record the authenticated caller in the request's ASGI state (``scope["state"]``, what
    ``request.state`` writes to), for ``AccessLog``'s hashed ``caller``; called by the
    authentication dependency (``deps.principal``) and by any route that authenticates
    otherwise."""
    state[CALLER] = client_id


def caller_hash(salt: bytes, client_id: str) -> str:
    """The caller's id in logs: the first 16 hex digits (64 bits) of SHA-256 of ``salt`` followed
    by the client id's UTF-8 bytes. The same client gives the same hash under one salt
    (``serve.ops.log_salt``, or a random one per process), and the id cannot be read back."""
    return hashlib.sha256(salt + client_id.encode()).hexdigest()[:16]


class AccessLog:
    """One JSON log line per request (logger ``chartsight.api``, level INFO), without PHI:
    ``{"event": "request", "method", "route" (the template, never the patient id in the path;
    under a mount its path first: ``/mcp/``, ``/docs-assets``; ``null`` when nothing matched),
    "status", "duration_ms", "request_id", "caller"}``, ``caller`` being ``caller_hash`` of the
    authenticated client id (``null`` before or without authentication). The request id is the
    caller's ``x-request-id`` (cut to 64 characters) or a new one, sent back as ``x-request-id``
    and readable while the request is served through ``current_request_id``.
    With ``metrics``, each request is counted and timed there, and its work reports to it
    (``common.observe``). Pure ASGI, so that streaming responses still see a client's
    disconnect."""

    def __init__(self, app: ASGIApp, salt: bytes = b"", metrics: Metrics | None = None) -> None:
        self.app = app
        self.salt = salt or os.urandom(16)
        self.metrics = metrics

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

        token = _REQUEST_ID.set(rid)
        root = scope.get("root_path", "")
        observer = self.metrics.observe if self.metrics is not None else None
        try:
            with observe.observing(observer) if observer else contextlib.nullcontext():
                await self.app(scope, receive, send_with_id)
        finally:
            _REQUEST_ID.reset(token)
            seconds = time.perf_counter() - start
            # the route's template, never the patient id; under a mount (MCP, the docs' assets)
            # the mount's path (which the router adds to root_path) before the inner route's
            mount = scope.get("root_path", "")[len(root) :]
            inner = getattr(scope.get("route"), "path", None)
            route = mount + inner if inner is not None else (mount or None)
            client = (scope.get("state") or {}).get(CALLER)
            log.info(
                "%s",
                json.dumps(
                    {
                        "event": "request",
                        "method": scope.get("method"),
                        "route": route,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 1),
                        "request_id": rid,
                        "caller": caller_hash(self.salt, client) if client else None,
                    }
                ),
            )
            if self.metrics is not None:
                self.metrics.request_done(
                    scope.get("method", ""), route or "unmatched", status, seconds
                )
