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
    async def run() -> tuple[Any, Any, Any]:
        async with _http(service, BOUND_KEY) as client:
            own = await client.call_tool("patient_facts", {"patient": TOMMY_FRIESEN, "tool": "age"})
            other = await client.call_tool(
                "ask", {"patient": MARTINA_MURAZIK, "question": "How old is she?"}
            )
        async with _http(service, None) as client:
            anonymous = await client.call_tool(
                "patient_facts", {"patient": TOMMY_FRIESEN, "tool": "age"}
            )
        return own, other, anonymous

    own, other, anonymous = asyncio.run(run())
    assert not own.is_error
    assert other.is_error and "forbidden" in other.content[0].text
    assert anonymous.is_error and "unauthorized" in anonymous.content[0].text


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
