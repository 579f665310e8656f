"""A FHIR Bulk Data Access server (IG v2.0.0 $export) for what no real peer here does.

SEKMET 0.1.1 implements the kick-off, status polling (202 with ``X-Progress`` and
``Retry-After: 1``), manifests, NDJSON files, ``_type``/``_since`` and ``DELETE``; it does not
compress files, answer ``Range`` requests, serve slowly, list ``deleted`` resources, or write
error files for anything a client can cause with ``_type``/``_since``/``_outputFormat``. This
server follows the IG for those: ``Content-Encoding: gzip`` when asked, 206 answers to
``Range: bytes=N-``, files streamed in chunks with a delay, a ``deleted`` file of transaction
Bundles with DELETE entries, an error file of OperationOutcomes, ``requiresAccessToken`` with a
static bearer token, and it records every request so tests can check what the client sent.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.peers.asgi import ThreadedServer


def _outcome(text: str, severity: str = "error", code: str = "processing") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}],
    }


@dataclass
class BulkServerOptions:
    """How the server behaves: ``polls`` 202 answers before the manifest, each with
    ``Retry-After: retry_after``; ``token``: required bearer token (``requiresAccessToken``);
    ``gzip``: compress files for clients that accept it; ``ranges``: answer ``Range`` with 206;
    ``chunk``/``delay_s``: file bytes per chunk and the pause after each; ``errors``: diagnostics
    written to the error file; ``deleted``: ``Type/id`` listed as deleted when ``_since`` is
    given; ``complete``: False keeps every export in progress.

    Hostile behaviours: ``status_location``: the kick-off's ``Content-Location`` instead of this
    server's status URL; ``x_progress``: the ``X-Progress`` text; ``redirect_to``: files answer
    302 to this URL (``{name}`` replaced by the file's name) unless asked with ``?hop=1``;
    ``blank_lines``: newlines appended to every output file; ``bad_type``: an extra output item
    with this ``type`` (its URL serves the Patient file)."""

    polls: int = 1
    retry_after: str = "1"
    token: str | None = None
    gzip: bool = False
    ranges: bool = True
    chunk: int = 4096
    delay_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    complete: bool = True
    status_location: str | None = None
    x_progress: str | None = None
    redirect_to: str | None = None
    blank_lines: int = 0
    bad_type: str | None = None


class BulkServer(ThreadedServer):
    """Serves ``resources`` (FHIR JSON) through ``$export`` at ``{url}/fhir``."""

    def __init__(self, resources: list[dict[str, Any]], options: BulkServerOptions) -> None:
        self.resources = resources
        self.options = options
        self.jobs: dict[str, dict[str, Any]] = {}
        self.kickoffs: list[dict[str, Any]] = []
        self.polls: list[float] = []
        self.deletes: list[str] = []
        self.file_requests: list[dict[str, str | None]] = []
        app = Starlette(
            routes=[
                Route("/fhir/$export", self.kickoff),
                Route("/fhir/Patient/$export", self.kickoff),
                Route("/fhir/Group/{group}/$export", self.kickoff),
                Route("/fhir/status/{job}", self.status, methods=["GET", "DELETE"]),
                Route("/fhir/files/{job}/{name}", self.file),
            ]
        )
        super().__init__(app)

    @property
    def base_url(self) -> str:
        return f"{self.url}/fhir"

    def __enter__(self) -> BulkServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _denied(self, request: Request) -> Response | None:
        if self.options.token and request.headers.get("authorization") != (
            f"Bearer {self.options.token}"
        ):
            return JSONResponse(_outcome("no or wrong token", code="login"), status_code=401)
        return None

    async def kickoff(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        if request.headers.get("prefer") != "respond-async":
            return JSONResponse(_outcome("Prefer: respond-async is required"), status_code=400)
        if "application/fhir+json" not in request.headers.get("accept", ""):
            return JSONResponse(_outcome("Accept: application/fhir+json"), status_code=400)
        params = dict(request.query_params)
        self.kickoffs.append({"path": request.url.path, **params})
        types = set(filter(None, params.get("_type", "").split(",")))
        since = params.get("_since")
        chosen = [
            r
            for r in self.resources
            if (not types or r["resourceType"] in types)
            and (since is None or r.get("meta", {}).get("lastUpdated", "") >= since)
        ]
        files: dict[str, bytes] = {}
        by_type: dict[str, list[str]] = defaultdict(list)
        for r in chosen:
            by_type[r["resourceType"]].append(json.dumps(r))
        for rtype, lines in by_type.items():
            files[f"{rtype}.ndjson"] = (
                "\n".join(lines) + "\n" * (1 + self.options.blank_lines)
            ).encode()
        job = secrets.token_hex(6)
        base = f"{self.base_url}/files/{job}"
        manifest: dict[str, Any] = {
            "transactionTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "request": str(request.url),
            "requiresAccessToken": bool(self.options.token),
            "output": [
                {"type": t, "url": f"{base}/{t}.ndjson", "count": len(v)}
                for t, v in by_type.items()
            ],
            "error": [],
        }
        if self.options.bad_type is not None and "Patient.ndjson" in files:
            files["bad.ndjson"] = files["Patient.ndjson"]
            manifest["output"].append({"type": self.options.bad_type, "url": f"{base}/bad.ndjson"})
        if self.options.errors:
            files["errors.ndjson"] = "".join(
                json.dumps(_outcome(text)) + "\n" for text in self.options.errors
            ).encode()
            manifest["error"].append({"type": "OperationOutcome", "url": f"{base}/errors.ndjson"})
        if since and self.options.deleted:
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {"request": {"method": "DELETE", "url": d}} for d in self.options.deleted
                ],
            }
            files["deleted.ndjson"] = (json.dumps(bundle) + "\n").encode()
            manifest["deleted"] = [{"type": "Bundle", "url": f"{base}/deleted.ndjson"}]
        self.jobs[job] = {"manifest": manifest, "files": files, "polls": self.options.polls}
        return Response(
            status_code=202,
            headers={
                # on the host the client asked (its Host header), as a server behind several names
                "Content-Location": self.options.status_location
                or f"{str(request.base_url).rstrip('/')}/fhir/status/{job}"
            },
        )

    async def status(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        job = self.jobs.get(request.path_params["job"])
        if job is None:
            return JSONResponse(_outcome("no such export", code="not-found"), status_code=404)
        if request.method == "DELETE":
            self.deletes.append(request.path_params["job"])
            del self.jobs[request.path_params["job"]]
            return JSONResponse(_outcome("cancelled", "information", "informational"), 202)
        self.polls.append(time.monotonic())
        if job["polls"] > 0 or not self.options.complete:
            job["polls"] -= 1
            done = self.options.polls - max(job["polls"], 0)
            return Response(
                status_code=202,
                headers={
                    "X-Progress": self.options.x_progress
                    or f"{done} of {self.options.polls + 1} steps",
                    "Retry-After": self.options.retry_after,
                },
            )
        return JSONResponse(job["manifest"])

    async def file(self, request: Request) -> Response:
        self.file_requests.append(
            {
                "name": request.path_params["name"],
                "range": request.headers.get("range"),
                "authorization": request.headers.get("authorization"),
                "accept-encoding": request.headers.get("accept-encoding"),
                "host": request.headers.get("host"),
                "hop": request.query_params.get("hop"),
            }
        )
        if self.options.redirect_to and not request.query_params.get("hop"):
            name = request.path_params["name"]
            return Response(
                status_code=302, headers={"Location": self.options.redirect_to.format(name=name)}
            )
        if denied := self._denied(request):
            return denied
        job = self.jobs.get(request.path_params["job"])
        data = job["files"].get(request.path_params["name"]) if job else None
        if data is None:
            return JSONResponse(_outcome("no such file", code="not-found"), status_code=404)
        status, headers = 200, {"Content-Type": "application/fhir+ndjson"}
        wanted = request.headers.get("range", "")
        if self.options.ranges and wanted.startswith("bytes=") and wanted.endswith("-"):
            start = int(wanted.removeprefix("bytes=").removesuffix("-"))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data = data[start:]
        elif self.options.gzip and "gzip" in request.headers.get("accept-encoding", ""):
            data = gzip.compress(data)
            headers["Content-Encoding"] = "gzip"
        headers["Content-Length"] = str(len(data))
        chunk, delay = self.options.chunk, self.options.delay_s

        async def body() -> Any:
            for i in range(0, len(data), chunk):
                yield data[i : i + chunk]
                if delay:
                    await asyncio.sleep(delay)

        return StreamingResponse(body(), status_code=status, headers=headers)


class SlowProxy(ThreadedServer):
    """A reverse proxy in front of a real server on 127.0.0.1:``target_port`` that passes every
    request through and sends the bodies of Bulk Data files (paths with ``/bulk-files/``, SEKMET's)
    ``chunk`` bytes at a time, ``delay_s`` apart: a real export that downloads slowly enough to be
    killed midway. Counts kick-offs (``$export`` requests) and file requests."""

    def __init__(self, target_port: int, *, chunk: int = 2048, delay_s: float = 0.05) -> None:
        self.target = f"http://127.0.0.1:{target_port}"
        self.chunk = chunk
        self.delay_s = delay_s
        self.kickoffs = 0
        self.file_requests = 0
        self.deletes = 0
        app = Starlette(
            routes=[Route("/{path:path}", self.forward, methods=["GET", "POST", "PUT", "DELETE"])]
        )
        super().__init__(app)

    def __enter__(self) -> SlowProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def forward(self, request: Request) -> Response:
        import httpx

        path = request.url.path
        query = f"?{request.url.query}" if request.url.query else ""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host",)}
        async with httpx.AsyncClient(timeout=120) as client:
            answer = await client.request(
                request.method,
                f"{self.target}{path}{query}",
                headers=headers,
                content=await request.body(),
            )
        if path.endswith("$export"):
            self.kickoffs += 1
        if request.method == "DELETE":
            self.deletes += 1
        kept = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")
        }
        data = answer.content
        if "/bulk-files/" not in path:
            return Response(data, status_code=answer.status_code, headers=kept)
        self.file_requests += 1

        async def body() -> Any:
            for i in range(0, len(data), self.chunk):
                yield data[i : i + self.chunk]
                await asyncio.sleep(self.delay_s)

        return StreamingResponse(body(), status_code=answer.status_code, headers=kept)
