"""The conversation threads' store failing under the HTTP service: an unreadable threads database is
a 503 in the documented Problem shape over REST, the answer stream and MCP (it was a plain-text
500); questions outside a thread still answer. MCP's ``thread`` argument has the REST limits."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.http.schemas import Problem
from tests.peers.issuer import Issuer
from tests.surfaces.http.conftest import EHR_KEY, Running, api_settings
from tests.surfaces.http.test_mcp import _http

EHR = {"X-API-Key": EHR_KEY}
ASK = {"patient": TOMMY_FRIESEN, "question": "What was his last HbA1c?"}


def _mcp_ask(running: Running, arguments: dict[str, Any]) -> Any:
    async def run() -> Any:
        async with _http(running, EHR_KEY) as client:
            return await client.call_tool("ask", arguments)

    return asyncio.run(run())


def test_an_unreadable_threads_database_is_a_503_problem(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer
):
    """The threads file is not SQLite (its header overwritten) when the service starts."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "threads.db").write_bytes(b"not a database " * 512)
    with Running(api_settings(home, demo_store, issuer)) as running:
        url = running.url
        broken = httpx.post(f"{url}/v1/ask", json={**ASK, "thread": "t1"}, headers=EHR, timeout=60)
        assert broken.status_code == 503, broken.text
        assert broken.headers["content-type"].startswith("application/json")
        detail = Problem.model_validate(broken.json()).detail
        assert (
            detail
            == "the conversation store cannot be read; try again later, or ask without a thread"
        )
        for internal in ("threads.db", str(home), "sqlite", "DatabaseError"):
            assert internal not in broken.text

        stream = httpx.post(
            f"{url}/v1/ask/stream", json={**ASK, "thread": "t2"}, headers=EHR, timeout=60
        )
        events = [json.loads(x[5:]) for x in stream.text.splitlines() if x.startswith("data:")]
        assert events[-1] == {"status": 503, "detail": detail}

        tool = _mcp_ask(running, {**ASK, "thread": "t3"})
        assert tool.is_error and tool.content[0].text.endswith(detail)

        # outside a thread nothing is read from the store: answered as before
        plain = httpx.post(f"{url}/v1/ask", json=ASK, headers=EHR, timeout=60)
        assert plain.status_code == 200 and plain.json()["citations"]


def test_mcp_thread_has_the_rest_limits(service: Running):
    """MCP's ``thread`` is at most 100 characters of ``[A-Za-z0-9._:-]``, as ``POST /v1/ask``
    takes it; the refusal names the argument and not the value sent."""
    for thread in ("x" * 101, "../../etc", "a b", "ünïcode"):
        refused = _mcp_ask(service, {**ASK, "thread": thread})
        assert refused.is_error, thread
        text = refused.content[0].text
        assert "thread" in text and thread not in text, text
        rest = httpx.post(f"{service.url}/v1/ask", json={**ASK, "thread": thread}, headers=EHR)
        assert rest.status_code == 422
    accepted = _mcp_ask(service, {**ASK, "thread": "visit-2024.01:a_b"})
    assert not accepted.is_error, accepted.content


def test_mcp_over_http_is_post_only(service: Running):
    """A GET (the stream of server-initiated messages) or DELETE (ending a session) on the
    stateless transport is 405 with ``Allow: POST`` at once; the SDK held a GET open forever."""
    for method in ("GET", "DELETE"):
        reply = httpx.request(
            method,
            f"{service.url}/mcp/",
            headers={**EHR, "Accept": "application/json, text/event-stream"},
            timeout=10,
        )
        assert reply.status_code == 405 and reply.headers["allow"] == "POST", reply.text
        Problem.model_validate(reply.json())
