"""Every operation of the HTTP service's OpenAPI document fuzzed with Schemathesis against the real
service (uvicorn, the demo store, a built similar-case index, a SMART EHR for the page's session):
REST, CDS Hooks, the FHIR AuditEvent search and the SMART page's endpoints, each case sent without
credentials, with a system key (and the page's live session and CSRF token) or with a key bound to
one patient. No response may be a 5xx; each must have a documented status, media type and schema;
each error body is the documented ``Problem`` shape and names nothing of the deployment.

Deterministic (the suite's Hypothesis profile: ``derandomize``, no example database), at most
``EXAMPLES`` generated cases per operation and credential kind, plus Schemathesis's coverage cases.
What it found is kept below as plain regression tests. A longer random hunt:
``CHARTSIGHT_HYPOTHESIS=explore pytest --timeout=0 tests/surfaces/http/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from typer.testing import CliRunner

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.cli import app as cli
from surfaces.http.app import create_app
from surfaces.http.schemas import Problem
from surfaces.settings import AppSettings
from tests.conftest import LoadedServer
from tests.peers.issuer import Issuer
from tests.peers.smart_ehr import SmartEhr
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, Running, api_settings

# generated cases per operation (each under one of the three credential kinds); the "explore"
# profile's own number for a long random hunt
EXPLORING = os.environ.get("CHARTSIGHT_HYPOTHESIS") == "explore"
EXAMPLES = settings.default.max_examples if EXPLORING else 20
MCP_EXAMPLES = settings.default.max_examples if EXPLORING else 60

# the document the service serves (it does not depend on the settings: checked below)
SPEC = create_app(AppSettings(home=Path(tempfile.gettempdir()) / "chartsight-openapi")).openapi()
schema = schemathesis.openapi.from_dict(SPEC)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass
class Target:
    """The running service and a live SMART page session (its cookie and CSRF token)."""

    running: Running
    session: str
    csrf: str


def _page_session(running: Running, ehr: SmartEhr, patient: str) -> tuple[str, str]:
    """A real EHR launch of the page (as a browser follows it): the session cookie and the
    page's CSRF token."""
    client = httpx.Client(base_url=running.url, follow_redirects=False, timeout=60)
    launched = client.get("/launch", params={"iss": ehr.fhir_url, "launch": ehr.launch(patient)})
    authorized = httpx.get(launched.headers["location"], follow_redirects=False)
    back = client.get(authorized.headers["location"])
    assert back.status_code == 303, back.text
    page = client.get("/app")
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
    assert found
    return client.cookies["chartsight_session"], found.group(1)


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory,
    demo_store: FhirStore,
    issuer: Issuer,
    sekmet: LoadedServer,
) -> Iterator[Target]:
    """The service with a built similar-case index and a SMART EHR (over SEKMET) allowed to
    launch the page, and one live page session for Tommy Friesen."""
    home = tmp_path_factory.mktemp("fuzz-home")
    env = {"CHARTSIGHT_HOME": str(home), "CHARTSIGHT_STORE__URL": str(demo_store.engine.url)}
    built = CliRunner().invoke(cli, ["index", "build"], env=env)  # similar cases answer
    assert built.exit_code == 0, built.output
    settings_ = api_settings(home, demo_store, issuer, rate_burst=100_000)
    running = Running(settings_)
    settings_.serve.public_url = running.url
    with SmartEhr(sekmet.base_url, f"{running.url}/callback") as ehr:
        settings_.serve.smart.issuers = [ehr.fhir_url]
        with running:
            sid, csrf = _page_session(running, ehr, sekmet.patient_ids[TOMMY_FRIESEN])
            yield Target(running, sid, csrf)


def _internals(target: Target) -> list[str]:
    """What no response body may name: the deployment's paths, database, servers, code."""
    settings_ = target.running.settings
    return [
        str(settings_.home),
        str(settings_.store.url),
        "sqlite",
        "Traceback",
        'File "',
        "127.0.0.1",
    ]


def check_error_body(target: Target, response: Any, fhir: bool = False) -> None:
    """An error's body is JSON in the ``Problem`` shape (``detail``: a sentence, or a list of
    field problems), or under ``/fhir/`` a FHIR ``OperationOutcome`` (what the FHIR RESTful API
    returns), and names nothing internal."""
    if response.status_code < 400:
        return
    kind = next((v[0] for k, v in response.headers.items() if k.lower() == "content-type"), "")
    if fhir and kind.startswith("application/fhir+json"):
        outcome = response.json()
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"], outcome
    else:
        assert kind.startswith("application/json"), (response.status_code, kind, response.text)
        Problem.model_validate(response.json())
    for internal in _internals(target):
        assert internal not in response.text, (internal, response.text)


CREDENTIALS = ("none", "system", "bound")


def _send(case: Any, target: Target, who: str, real_patient: bool = False) -> Any:
    """``case`` sent as ``who``: no credentials (whatever cookie Schemathesis made up); a system
    key with the page's live session and CSRF token; or a key bound to one patient with the same
    session. Credentials Schemathesis generated are replaced. ``real_patient`` puts a demo
    patient's id where the case names a patient (a JSON body's ``patient``, the ``patient_id``
    path parameter), so that fuzzed questions, threads and filters reach a real record."""
    if real_patient:
        if isinstance(case.body, dict) and "patient" in case.body:
            case.body = {**case.body, "patient": TOMMY_FRIESEN}
        if case.path_parameters and "patient_id" in case.path_parameters:
            case.path_parameters = {**case.path_parameters, "patient_id": TOMMY_FRIESEN}
    headers = {
        k: v
        for k, v in (case.headers or {}).items()
        if k.lower() not in ("x-api-key", "authorization", "x-csrf-token")
    }
    if who != "none":
        headers["X-API-Key"] = EHR_KEY if who == "system" else BOUND_KEY
        headers["X-CSRF-Token"] = target.csrf
        case.cookies = {**(case.cookies or {}), "chartsight_session": target.session}
    case.headers = headers
    response = case.call_and_validate(base_url=target.running.url, checks=CHECKS, timeout=120)
    check_error_body(target, response, fhir=case.path.startswith("/fhir/"))
    return response


@schema.parametrize()
@schema.given(who=st.sampled_from(CREDENTIALS), real_patient=st.booleans())
@settings(max_examples=EXAMPLES)
@pytest.mark.slow
def test_every_operation_fuzzed(case: Any, who: str, real_patient: bool, target: Target) -> None:
    """No 5xx, and a documented status, media type and schema for every generated case."""
    _send(case, target, who, real_patient)


def test_the_fuzzed_document_is_the_one_served(target: Target) -> None:
    """The document fuzzed above (built without the test's settings) is what the running service
    serves, and it covers every route but the undocumented ones (docs pages, /metrics, /mcp)."""
    served = httpx.get(f"{target.running.url}/openapi.json").json()
    assert served == SPEC
    assert len(SPEC["paths"]) >= 20


# What the fuzzer found (seed: the suite's derandomized profile), as plain requests: each answered
# with a status its operation did not document, or an error in a media type it did not document.
NOT_UTF8 = b"\xff\xfe\x9a not UTF-8"
FOUND: list[tuple[str, str, dict[str, Any], int]] = [
    # FastAPI refuses a body it cannot decode with 400 before reading a field (was undocumented)
    ("POST", "/v1/ask", {"content": NOT_UTF8, "key": True}, 400),
    ("POST", "/v1/ask/stream", {"content": NOT_UTF8, "key": True}, 400),
    ("POST", "/app/trend", {"content": NOT_UTF8, "session": True}, 400),
    ("POST", "/app/save", {"content": NOT_UTF8, "session": True}, 400),
    # the SMART launch and callback refuse an unknown EHR or launch with 400 (was undocumented)
    ("GET", "/launch", {"params": {"iss": "", "launch": ""}}, 400),
    ("GET", "/callback", {}, 400),
    # no SMART client key configured: 404 (was undocumented)
    ("GET", "/.well-known/jwks.json", {}, 404),
    # the page without a session: a JSON 401, documented as text/html (the page's own type)
    ("GET", "/app", {}, 401),
    # a 422 is the Problem shape, documented as FastAPI's HTTPValidationError
    ("GET", "/launch", {}, 422),
]


@pytest.mark.parametrize(("method", "path", "how", "status"), FOUND)
def test_what_the_fuzzer_found_is_documented(
    target: Target, method: str, path: str, how: dict[str, Any], status: int
) -> None:
    """Each request the fuzzer found answered with an undocumented status or media type: now
    documented as the Problem shape under ``application/json``, which is what it sends."""
    headers = {"content-type": "application/json"}
    if how.get("key"):
        headers["X-API-Key"] = EHR_KEY
    if how.get("session"):
        headers |= {"X-CSRF-Token": target.csrf, "Cookie": f"chartsight_session={target.session}"}
    reply = httpx.request(
        method,
        f"{target.running.url}{path}",
        content=how.get("content"),
        params=how.get("params"),
        headers=headers,
        timeout=60,
    )
    assert reply.status_code == status, reply.text
    documented = SPEC["paths"][path][method.lower()]["responses"][str(status)]["content"]
    assert documented == {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert reply.headers["content-type"].startswith("application/json")
    Problem.model_validate(reply.json())


def test_no_similar_case_index_is_a_documented_503(service: Running) -> None:
    """Found by the fuzzer against a service without a similar-case index: 503 (not
    configured), which the operation did not document."""
    reply = httpx.get(
        f"{service.url}/v1/patients/{TOMMY_FRIESEN}/similar", headers={"X-API-Key": EHR_KEY}
    )
    assert reply.status_code == 503, reply.text
    assert "index" in Problem.model_validate(reply.json()).detail  # type: ignore[operator]
    assert "503" in SPEC["paths"]["/v1/patients/{patient_id}/similar"]["get"]["responses"]


# --- MCP over streamable HTTP: JSON-RPC, not OpenAPI ----------------------------------------------

MCP_TOOLS = ["patient_evidence", "patient_facts", "fact_tools", "similar_cases", "ask", "nope"]
MCP_ARGS = ["patient", "question", "thread", "tool", "arguments", "k", "token_budget"]
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_arguments = st.dictionaries(st.sampled_from(MCP_ARGS) | st.text(max_size=8), _json, max_size=5)
_tool_call = st.fixed_dictionaries(
    {
        "jsonrpc": st.just("2.0"),
        "id": st.integers(0, 2**31) | st.text(max_size=10),
        "method": st.just("tools/call"),
        "params": st.fixed_dictionaries(
            {"name": st.sampled_from(MCP_TOOLS), "arguments": _arguments}
        ),
    }
)
_other = st.fixed_dictionaries(
    {
        "jsonrpc": st.sampled_from(["2.0", "1.0"]),
        "id": st.integers(0, 9) | st.none(),
        "method": st.sampled_from(["tools/list", "ping", "initialize", "resources/list", "x"]),
        "params": _json,
    }
)
MCP_MESSAGE = st.one_of(_tool_call, _tool_call, _other, _json)  # tools/call half the time


def _jsonrpc_replies(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an MCP reply: its JSON body, or each SSE event's ``data``."""
    if response.headers["content-type"].startswith("text/event-stream"):
        lines = response.text.splitlines()
        return [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert response.headers["content-type"].startswith("application/json"), (
        response.status_code,
        response.headers.get("content-type"),
        response.text,
    )
    return [response.json()] if response.content else []


@given(
    message=MCP_MESSAGE,
    who=st.sampled_from(CREDENTIALS),
    real_patient=st.booleans(),
    method=st.sampled_from(["POST", "POST", "POST", "GET", "DELETE"]),
)
@settings(max_examples=MCP_EXAMPLES)
@pytest.mark.slow
def test_mcp_over_http_fuzzed(
    target: Target, message: Any, who: str, real_patient: bool, method: str
) -> None:
    """Generated JSON-RPC messages (``tools/call`` with arbitrary arguments, other methods,
    any JSON) sent to ``/mcp/``: never a 5xx or a hang; an HTTP error is the Problem shape (401,
    405) or a JSON-RPC error; a 200 carries one JSON-RPC 2.0 response with the request's
    ``id`` and either a ``result`` (a tool's failure being ``isError`` content) or an ``error``
    with an integer ``code``; nothing internal in any of it, and no argument's value echoed in an
    error."""
    params = message.get("params") if isinstance(message, dict) else None
    arguments = params.get("arguments") if isinstance(params, dict) else None
    if real_patient and isinstance(arguments, dict):
        arguments["patient"] = TOMMY_FRIESEN
    headers = {"Accept": "application/json, text/event-stream"}
    if who != "none":
        headers["X-API-Key"] = EHR_KEY if who == "system" else BOUND_KEY
    response = httpx.request(
        method, f"{target.running.url}/mcp/", json=message, headers=headers, timeout=60
    )
    assert response.status_code < 500, response.text
    for internal in _internals(target):
        assert internal not in response.text, (internal, response.text)
    if response.status_code in (401, 405):
        Problem.model_validate(response.json())
        return
    replies = _jsonrpc_replies(response)
    if response.status_code >= 400:
        assert all(r["jsonrpc"] == "2.0" and isinstance(r["error"]["code"], int) for r in replies)
        return
    if not replies:  # a notification or a response sent to the server: nothing comes back
        assert response.status_code in (200, 202), response.text
        return
    (reply,) = replies
    assert reply["jsonrpc"] == "2.0" and reply["id"] == message["id"], reply
    assert ("result" in reply) != ("error" in reply), reply
    if "error" in reply:
        assert isinstance(reply["error"]["code"], int) and reply["error"]["message"], reply
    elif reply["result"].get("isError"):
        text = " ".join(c.get("text", "") for c in reply["result"]["content"])
        for value in (arguments or {}).values():
            if isinstance(value, str) and len(value) >= 6 and value != TOMMY_FRIESEN:
                assert value not in text, (value, text)
