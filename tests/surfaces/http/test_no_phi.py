"""No PHI where it does not belong: ``chartsight serve`` run as its own process at its default log
level, in front of a model server that misbehaves (``tests.peers.faulty_model``), is sent a mix of
the service's traffic (answers, their stream, CDS Hooks, MCP, the SMART page's JSON endpoints, and
errors of every kind: unknown patients, bad credentials, another patient's record, too long a
question, malformed JSON, a model that fails); then every line the process wrote (its logs, at
the levels ``serve`` sets), every error body, the MCP errors and ``/metrics`` are searched for the
demo patients' names, birth dates, identifiers and record ids (read from the store) and for the
question texts sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.http.security import key_digest
from tests.peers.faulty_model import FaultyModel
from tests.peers.servers import free_port
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, patient_phi
from tests.surfaces.http.test_cds_hooks import URL as CDS_URL
from tests.surfaces.http.test_cds_hooks import _hook, _prefetch

EHR = {"X-API-Key": EHR_KEY}
BOUND = {"X-API-Key": BOUND_KEY}  # Tommy's only


class Serving:
    """``chartsight serve`` in a child process, its output (stdout and stderr) kept."""

    def __init__(self, home: Path, store: FhirStore, model: FaultyModel) -> None:
        self.port = free_port()
        self.log = home / "serve.log"
        config = home / "chartsight.toml"
        keys = [
            {"client_id": "ehr", "key_sha256": key_digest(EHR_KEY), "scopes": "system/*.read"},
            {
                "client_id": "bound",
                "key_sha256": key_digest(BOUND_KEY),
                "scopes": "patient/*.read",
                "patient": TOMMY_FRIESEN,
            },
        ]
        config.write_text(
            f"home = {json.dumps(str(home))}\n"
            f"[store]\nurl = {json.dumps(str(store.engine.url))}\n"
            f'[model]\nname = "openai"\nbase_url = "{model.base_url}"\nmodel = "switch"\n'
            "[serve]\nrequest_timeout_s = 8.0\nrate_burst = 10000\n"
            'public_url = "https://chartsight.example"\n'
            + "".join(
                "[[serve.auth.api_keys]]\n"
                + "".join(f"{k} = {json.dumps(v)}\n" for k, v in key.items())
                for key in keys
            )
        )
        self.command = [
            sys.executable, "-m", "surfaces.cli", "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Serving:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("CHARTSIGHT_CONFIG", None)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chartsight serve exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("chartsight serve did not become ready")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="module")
def faulty() -> Iterator[FaultyModel]:
    with FaultyModel() as server:
        yield server


def _mcp(url: str, headers: dict[str, str], calls: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Each tool call's JSON-RPC reply text, over one streamable-HTTP session."""
    accept = {"Accept": "application/json, text/event-stream", **headers}
    init = {
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "phi-scan", "version": "1"}},
    }  # fmt: skip
    with httpx.Client(base_url=url, timeout=30, headers=accept) as client:
        opened = client.post("/mcp/", json=init)
        session = opened.headers.get("mcp-session-id")
        if session:
            client.headers["mcp-session-id"] = session
        client.post("/mcp/", json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        replies = [opened.text]
        for i, (tool, args) in enumerate(calls, start=1):
            body = {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                    "params": {"name": tool, "arguments": args}}  # fmt: skip
            replies.append(client.post("/mcp/", json=body).text)
    return replies


def _rpc(reply: str) -> dict[str, Any]:
    """A JSON-RPC reply, sent as JSON or as one server-sent event."""
    for line in reply.splitlines():
        if line.startswith("data:"):
            return json.loads(line[5:])
    return json.loads(reply)


def test_no_phi_in_logs_error_bodies_metrics_or_errors(
    tmp_path: Path, demo_store: FhirStore, faulty: FaultyModel, tommy_json: list[dict[str, Any]]
):
    phi = patient_phi(demo_store)
    assert {TOMMY_FRIESEN, MARTINA_MURAZIK} <= phi and len(phi) > 10
    tommy = next(r for r in tommy_json if r["resourceType"] == "Patient")
    given, family = tommy["name"][0]["given"][0], tommy["name"][0]["family"]
    questions = [
        "What was his last HbA1c?",
        f"Is {given} {family} (born {tommy['birthDate']}) on metformin? marker-q1",
        "Which allergies does he have? marker-q2",
    ]
    shown: list[str] = []  # what left the service where no PHI may be: error bodies, MCP errors
    (tmp_path / "home").mkdir()
    with Serving(tmp_path / "home", demo_store, faulty) as serving:
        url = serving.url

        def post(path: str, body: Any, headers: dict[str, str], **kw: Any) -> httpx.Response:
            reply = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30, **kw)
            if reply.status_code >= 400:
                shown.append(reply.text)
            return reply

        for fault, question in zip(["ok", "huge", "malformed"], questions, strict=True):
            faulty.switch(fault)
            ask = {"patient": TOMMY_FRIESEN, "question": question}
            assert post("/v1/ask", ask, EHR).status_code == 200
            with httpx.stream("POST", f"{url}/v1/ask/stream", json=ask, headers=EHR) as stream:
                assert stream.status_code == 200
                assert "event: answer" in "".join(stream.iter_text())
        faulty.switch("r500")
        for question in questions:
            # a question about a patient not there, another patient's record, no credentials,
            # too long a question, a patient id too long, an unknown thread turn
            post("/v1/ask", {"patient": "Patient/no-such", "question": question}, EHR)
            post("/v1/ask", {"patient": MARTINA_MURAZIK, "question": question}, BOUND)
            post("/v1/ask", {"patient": TOMMY_FRIESEN, "question": question}, {})
            post("/v1/ask", {"patient": TOMMY_FRIESEN, "question": question * 200}, EHR)
            post("/v1/ask", {"patient": TOMMY_FRIESEN + "x" * 300, "question": question}, EHR)
            post("/v1/ask", {"patient": TOMMY_FRIESEN, "question": question, "x": [1]}, EHR)
        raw = f'{{"patient": "{TOMMY_FRIESEN}", "question": "{questions[1]}"'  # not JSON
        bad = httpx.post(
            f"{url}/v1/ask", content=raw, headers={**EHR, "Content-Type": "application/json"}
        )
        assert bad.status_code == 422
        shown.append(bad.text)
        for path in (
            f"/v1/patients/{TOMMY_FRIESEN}/similar",
            f"/v1/patients/{MARTINA_MURAZIK}/similar",
            f"/app/resource/Patient/{TOMMY_FRIESEN}",
            "/app/similar",
            f"/app/image?ref=Patient/{TOMMY_FRIESEN}",
        ):
            for headers in (EHR, BOUND):
                reply = httpx.get(f"{url}{path}", headers=headers, timeout=30)
                if reply.status_code >= 400:
                    shown.append(reply.text)
        for path, body in (
            ("/app/ask", {"question": questions[1], "thread": "t"}),
            ("/app/trend", {"citations": [f"Patient/{TOMMY_FRIESEN}"]}),
            ("/app/save", {"draft": TOMMY_FRIESEN, "approved": True}),
        ):
            post(path, body, EHR)
        # CDS Hooks: a card from prefetch, another patient's for the bound key, a bad hook
        prefetch = _prefetch(tommy_json)
        assert post(CDS_URL, _hook(prefetch=prefetch), EHR).status_code == 200
        post(CDS_URL, _hook(MARTINA_MURAZIK, prefetch=prefetch), BOUND)
        post(CDS_URL, _hook(prefetch={"patient": {**tommy, "birthDate": "not a date"}}), EHR)
        post(CDS_URL, {"hook": "patient-view", "context": {"patientId": TOMMY_FRIESEN}}, EHR)
        # MCP: an answer (the model failing), a tool error, another patient, bad arguments
        replies = _mcp(url, EHR, [
            ("ask", {"patient": TOMMY_FRIESEN, "question": questions[1]}),
            ("patient_facts", {"patient": TOMMY_FRIESEN, "tool": "no_such_tool", "arguments": {}}),
            ("patient_facts", {"patient": "Patient/no-such", "tool": "demographics"}),
            ("ask", {"patient": TOMMY_FRIESEN}),
        ]) + _mcp(url, BOUND, [
            ("ask", {"patient": MARTINA_MURAZIK, "question": questions[2]}),
        ])  # fmt: skip
        failed = [r for r in map(_rpc, replies) if "error" in r or r["result"].get("isError")]
        assert len(failed) >= 4
        shown += [json.dumps(r) for r in failed]
        metrics = httpx.get(f"{url}/metrics", timeout=10)
        assert metrics.status_code == 200 and "chartsight" in metrics.text
        shown.append(metrics.text)
    logged = serving.log.read_text()
    assert '"route": "/v1/ask"' in logged  # the request log was written, at the default level
    assert len(shown) > 20
    where = {"log": logged, "bodies": "\n".join(shown)}
    leaks = [
        (place, value)
        for place, text in where.items()
        for value in sorted(phi | set(questions) | {"marker-q1", "marker-q2"})
        if value in text
    ]
    assert not leaks, leaks
