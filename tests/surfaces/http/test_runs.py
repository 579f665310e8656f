"""How the service treats runs: a client that goes away cancels its run, a model slower than the
time limit gives way to the evidence answer in time, a run over the time limit ends in 504, and a
client over its rate gets 429 with Retry-After."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from tests.peers.faulty import FaultyFhir
from tests.peers.issuer import Issuer
from tests.peers.scripted_model import ScriptedModel
from tests.surfaces.http.conftest import EHR_KEY, Running, api_settings

EHR = {"X-API-Key": EHR_KEY}
BODY = {"patient": TOMMY_FRIESEN, "question": "What was his last HbA1c?"}


def _outcomes(running: Running) -> list[str]:
    engine = sa.create_engine(f"sqlite:///{running.settings.home / 'audit.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT outcome FROM audit_log ORDER BY id")).fetchall()
    engine.dispose()
    return [r[0] for r in rows]


@pytest.fixture
def slow_model() -> ScriptedModel:
    with ScriptedModel([[]], ["An answer [Patient/x]."], delay_s=5.0) as model:
        yield model


def test_a_client_that_disconnects_cancels_its_run(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, slow_model: ScriptedModel
):
    settings = api_settings(tmp_path / "home", demo_store, issuer)
    settings.model.name = "openai"
    settings.model.base_url = slow_model.base_url
    with Running(settings) as running:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while the model writes
            httpx.post(f"{running.url}/v1/ask", json=BODY, headers=EHR, timeout=4.0)
        deadline = time.monotonic() + 10
        while "cancelled" not in _outcomes(running) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _outcomes(running) == ["cancelled"]
        assert len(slow_model.requests) == 1
        # the run stopped: no retry, no fallback answer written after the model would have replied
        time.sleep(6)
        assert len(slow_model.requests) == 1 and _outcomes(running) == ["cancelled"]


def test_a_model_slower_than_the_time_limit_gives_way_to_the_evidence_answer_in_time(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, slow_model: ScriptedModel
):
    # the model takes 5 s; the caller waits 3 s, of which the model gets 2.4 s
    settings = api_settings(tmp_path / "home", demo_store, issuer, request_timeout_s=3.0)
    settings.model.name = "openai"
    settings.model.base_url = slow_model.base_url
    with Running(settings) as running:
        start = time.monotonic()
        reply = httpx.post(f"{running.url}/v1/ask", json=BODY, headers=EHR, timeout=30)
        assert reply.status_code == 200 and time.monotonic() - start < 3.5
        answer = reply.json()
        assert answer["fallback_used"] and answer["citations"]
        assert any("within this question's 3 s" in w for w in answer["warnings"])
        assert _outcomes(running) == ["answered"]


def test_a_run_over_the_time_limit_ends_in_504(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer
):
    with FaultyFhir() as fhir:  # the patient's record takes 30 s to come
        settings = api_settings(tmp_path / "home", demo_store, issuer, request_timeout_s=1.0)
        settings.fhir.url = fhir.url("slow")
        with Running(settings) as running:
            start = time.monotonic()
            reply = httpx.post(f"{running.url}/v1/ask", json=BODY, headers=EHR, timeout=30)
            assert reply.status_code == 504 and time.monotonic() - start < 2.5
            assert reply.json() == {"detail": "no answer within the time limit"}
            assert _outcomes(running) == ["timeout"]


def test_rate_limits_are_per_client(tmp_path: Path, demo_store: FhirStore, issuer: Issuer):
    settings = api_settings(tmp_path / "home", demo_store, issuer, rate_burst=3, rate_per_minute=6)
    with Running(settings) as running:
        codes = [
            httpx.post(f"{running.url}/v1/ask", json=BODY, headers=EHR).status_code
            for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429]
        limited = httpx.post(f"{running.url}/v1/ask", json=BODY, headers=EHR)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        # another client is not held back by this one
        other = {"Authorization": f"Bearer {issuer.token('user/*.read', client_id='other')}"}
        assert httpx.post(f"{running.url}/v1/ask", json=BODY, headers=other).status_code == 200


def test_a_stream_client_that_goes_away_cancels_its_run(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, slow_model: ScriptedModel
):
    settings = api_settings(tmp_path / "home", demo_store, issuer)
    settings.model.name = "openai"
    settings.model.base_url = slow_model.base_url
    with Running(settings) as running:
        with httpx.stream(
            "POST", f"{running.url}/v1/ask/stream", json=BODY, headers=EHR, timeout=30
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data:") and '"node": "generate"' in line:
                    break  # generation has started: leave
        deadline = time.monotonic() + 10
        while "cancelled" not in _outcomes(running) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _outcomes(running) == ["cancelled"]
        time.sleep(6)  # past the model's reply: no retry, no answer recorded
        assert len(slow_model.requests) <= 1 and _outcomes(running) == ["cancelled"]
