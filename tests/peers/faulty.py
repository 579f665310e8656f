"""A small ASGI FHIR server that misbehaves on purpose (429, 503, slow, truncated, bad JSON, bad paging).

Runs under uvicorn on 127.0.0.1 in a background thread; the first path segment picks the fault.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.peers.asgi import ThreadedServer

FHIR = "application/fhir+json"


def _obs(i: int, valid: bool = True) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"o{i}",
        "status": "final",
        "code": {"text": "x"},
    }
    if not valid:
        obs["status"] = {"not": "a code"}
    return obs


def _bundle(
    entries: list[dict[str, Any]], total: int | None = None, next_url: str | None = None
) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in entries],
    }
    if total is not None:
        bundle["total"] = total
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


class FaultyFhir:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.auth_headers: list[str | None] = []
        self.app = Starlette(routes=[Route("/{fault}/{path:path}", self.handle)])
        self.http = ThreadedServer(self.app)
        self.port = self.http.port

    def url(self, fault: str) -> str:
        return f"http://127.0.0.1:{self.port}/{fault}"

    def __enter__(self) -> FaultyFhir:
        self.http.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.stop()

    async def handle(self, request: Request) -> Response:
        fault = request.path_params["fault"]
        path = request.path_params["path"]
        self.hits[fault] += 1
        self.auth_headers.append(request.headers.get("authorization"))
        n = self.hits[fault]
        patient = {"resourceType": "Patient", "id": "p1", "gender": "female"}
        if path == "metadata":
            return JSONResponse(
                {
                    "resourceType": "CapabilityStatement",
                    "status": "active",
                    "kind": "instance",
                    "fhirVersion": "4.0.1",
                    "format": ["json"],
                    "date": "2026-01-01",
                },
                media_type=FHIR,
            )
        if fault == "ok":
            return JSONResponse(patient, media_type=FHIR)
        if fault == "r429":
            if n == 1:
                return Response(status_code=429, headers={"Retry-After": "1"})
            return JSONResponse(patient, media_type=FHIR)
        if fault == "flaky":
            if n <= 2:
                return Response(status_code=503)
            return JSONResponse(patient, media_type=FHIR)
        if fault == "down":
            return JSONResponse(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {"severity": "error", "code": "transient", "diagnostics": "maintenance"}
                    ],
                },
                status_code=503,
                media_type=FHIR,
            )
        if fault == "missing":
            return JSONResponse(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [
                        {
                            "severity": "error",
                            "code": "not-found",
                            "diagnostics": "Patient/p9 not found",
                        }
                    ],
                },
                status_code=404,
                media_type=FHIR,
            )
        if fault == "slow":
            await asyncio.sleep(30)
            return JSONResponse(patient, media_type=FHIR)
        if fault == "drip":

            async def drip():
                yield b'{"resourceType": "Patient", '
                for _ in range(300):
                    await asyncio.sleep(0.1)
                    yield b" "
                yield b'"id": "p1"}'

            return StreamingResponse(drip(), media_type=FHIR)
        if fault == "truncated":
            body = b'{"resourceType": "Patient", "id": "p1"}'
            return Response(body[:15], headers={"Content-Length": str(len(body))}, media_type=FHIR)
        if fault == "badjson":
            return Response(b'{"resourceType": "Pati', media_type=FHIR)
        if fault == "notbundle":
            return JSONResponse(patient, media_type=FHIR)
        if fault == "nolinks":  # full pages, no next link, no total, _offset ignored
            return JSONResponse(_bundle([_obs(i) for i in range(5)]), media_type=FHIR)
        if fault == "invalid":
            return JSONResponse(
                _bundle([_obs(1), _obs(2, valid=False), _obs(3)], total=3), media_type=FHIR
            )
        if fault == "loop":
            return JSONResponse(_bundle([_obs(n)], next_url=str(request.url)), media_type=FHIR)
        return Response(status_code=400)
