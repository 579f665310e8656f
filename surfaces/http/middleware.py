"""ASGI middleware of the HTTP service: the request body limit and the access log (route
templates, status and time only: no patient ids, no PHI), and the request id that the audit log
records with each row."""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("chartsight.api")

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


class AccessLog:
    """One log line per request: method, the route's template (never the patient id in the path),
    status and time, and a request id (also sent back as ``x-request-id``, and readable while the
    request is served through ``current_request_id``). Pure ASGI, so that streaming responses
    still see a client's disconnect."""

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

        token = _REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _REQUEST_ID.reset(token)
            route = scope.get("route")
            log.info(
                "%s %s %s %.0f ms rid=%s",
                scope.get("method"),
                getattr(route, "path", "-"),  # the template, never the patient id
                status,
                (time.perf_counter() - start) * 1000,
                rid,
            )
