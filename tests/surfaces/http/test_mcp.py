"""The MCP server, driven by the official package's own client: over streamable HTTP inside the
service (authenticated, patient-scoped, audited) and over stdio (``chartsight mcp``)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.store import FhirStore
from tests.agent.test_ask import _a1cs
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, Running

TOOLS = {"patient_evidence", "patient_facts", "fact_tools", "similar_cases", "ask"}


def _payload(result: Any) -> Any:
    """A tool result's structured content (or its text parsed as JSON)."""
    if result.structured_content is not None:
        data = result.structured_content
        return data.get("result", data) if isinstance(data, dict) else data
    return json.loads(result.content[0].text)


def _http(service: Running, key: str | None) -> Any:
    headers = {"X-API-Key": key} if key else {}
    return Client(
        streamable_http_client(f"{service.url}/mcp/", http_client=create_mcp_http_client(headers))
    )


def test_mcp_over_http_with_the_package_client(service: Running, tommy_json):
    newest = _a1cs(tommy_json)[0]

    async def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with _http(service, EHR_KEY) as client:
            out["tools"] = {t.name for t in (await client.list_tools()).tools}
            facts = await client.call_tool(
                "patient_facts",
                {
                    "patient": TOMMY_FRIESEN,
                    "tool": "latest_observation",
                    "arguments": {"query": "A1c"},
                },
            )
            out["facts"] = _payload(facts)
            evidence = await client.call_tool(
                "patient_evidence", {"patient": TOMMY_FRIESEN, "question": "last HbA1c"}
            )
            out["evidence"] = _payload(evidence)
            answer = await client.call_tool(
                "ask", {"patient": TOMMY_FRIESEN, "question": "What was his last HbA1c?"}
            )
            out["answer"] = _payload(answer)
            bad = await client.call_tool(
                "patient_facts", {"patient": TOMMY_FRIESEN, "tool": "drop_tables"}
            )
            out["bad"] = bad
        return out

    out = asyncio.run(run())
    assert out["tools"] >= TOOLS
    assert isinstance(out["facts"], list), out["facts"]
    (fact,) = out["facts"]
    assert fact["evidence"] == [f"Observation/{newest['id']}"]
    assert out["evidence"][0]["id"] == f"Observation/{newest['id']}"
    assert out["answer"]["citations"][0]["reference"] == f"Observation/{newest['id']}"
    assert out["bad"].is_error and "drop_tables" in out["bad"].content[0].text


def test_mcp_tools_are_authenticated_and_patient_scoped(service: Running):
    async def run() -> tuple[Any, Any]:
        async with _http(service, BOUND_KEY) as client:
            own = await client.call_tool("patient_facts", {"patient": TOMMY_FRIESEN, "tool": "age"})
            other = await client.call_tool(
                "ask", {"patient": MARTINA_MURAZIK, "question": "How old is she?"}
            )
        return own, other

    own, other = asyncio.run(run())
    assert not own.is_error
    assert other.is_error and "forbidden" in other.content[0].text
    # the session itself needs credentials: initialize and tools/list too, not only tool calls
    initialize = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "probe", "version": "1"}},
    }  # fmt: skip
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}
    accept = {"Accept": "application/json, text/event-stream"}
    for message in (initialize, listing):
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer not-a-jwt"}):
            reply = httpx.post(f"{service.url}/mcp/", json=message, headers={**accept, **headers})
            assert reply.status_code == 401, reply.text
            assert (
                "unauthorized" in reply.json()["detail"]
                and "Bearer" in reply.headers["www-authenticate"]
            )
    authorised = httpx.post(
        f"{service.url}/mcp/", json=initialize, headers={**accept, "X-API-Key": BOUND_KEY}
    )
    assert authorised.status_code == 200


def test_mcp_ask_keeps_nothing_outside_a_thread(service: Running, tommy_json):
    """One retention rule for every surface: an MCP question without ``thread`` writes no
    checkpoint (as over REST); with ``thread`` a follow-up continues, private to the caller."""
    import sqlite3

    def checkpoints() -> int:
        db = service.settings.home / "threads.db"
        if not db.exists():
            return 0
        with sqlite3.connect(db) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            return (
                conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
                if "checkpoints" in tables
                else 0
            )

    a1cs = _a1cs(tommy_json)

    async def run() -> tuple[int, Any, Any]:
        async with _http(service, EHR_KEY) as client:
            before = checkpoints()
            await client.call_tool(
                "ask", {"patient": TOMMY_FRIESEN, "question": "What was his last HbA1c?"}
            )
            unchanged = checkpoints() - before
            await client.call_tool(
                "ask",
                {"patient": TOMMY_FRIESEN, "question": "What was his last HbA1c?", "thread": "m1"},
            )
            follow = await client.call_tool(
                "ask", {"patient": TOMMY_FRIESEN, "question": "and before that?", "thread": "m1"}
            )
        assert checkpoints() > before  # a thread is kept (so the count above could move)
        async with _http(service, BOUND_KEY) as client:  # another caller, same thread id
            theirs = await client.call_tool(
                "ask", {"patient": TOMMY_FRIESEN, "question": "and before that?", "thread": "m1"}
            )
        return unchanged, _payload(follow), _payload(theirs)

    unchanged, follow, theirs = asyncio.run(run())
    assert unchanged == 0
    assert follow["citations"][0]["reference"] == f"Observation/{a1cs[1]['id']}"
    assert f"Observation/{a1cs[1]['id']}" not in {c["reference"] for c in theirs["citations"]}


def test_mcp_over_stdio(tmp_path: Path, demo_store: FhirStore):
    exe = shutil.which("chartsight", path=str(Path(sys.executable).parent))
    assert exe, "the chartsight console script"
    params = StdioServerParameters(
        command=exe,
        args=["mcp"],
        env={
            **os.environ,
            "CHARTSIGHT_HOME": str(tmp_path / "home"),
            "CHARTSIGHT_STORE__URL": str(demo_store.engine.url),
            "HF_HUB_OFFLINE": "1",
        },
    )

    async def run() -> tuple[set[str], Any]:
        async with Client(params) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            facts = await client.call_tool(
                "patient_facts", {"patient": TOMMY_FRIESEN, "tool": "active_medications"}
            )
            return tools, facts

    tools, facts = asyncio.run(run())
    assert tools >= TOOLS
    assert not facts.is_error and all(
        e.startswith("MedicationRequest/") for f in _payload(facts) for e in f["evidence"]
    )
