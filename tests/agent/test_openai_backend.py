"""The OpenAI-compatible backend against a scripted server and the real llama.cpp server: which
failures are sent again (429 after its Retry-After, 5xx, connection failures) and which are not (a
4xx, a request the server found invalid, an answer that timed out), and what the graph reports."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.backends import BackendError, BackendSettings, Message
from agent.backends.openai import OpenAIBackend
from agent.service import ChartSight
from agent.settings import Settings
from connectors.demo import TOMMY_FRIESEN
from connectors.settings import HttpSettings
from connectors.store import FhirStore
from tests.agent.test_ask import NOW
from tests.peers.scripted_model import ScriptedModel, call

MESSAGES = [Message("system", "Answer briefly."), Message("user", "What was his last HbA1c?")]


def _generate(model: ScriptedModel, **http: float) -> str:
    settings = BackendSettings(
        name="openai",
        base_url=model.base_url,
        http=HttpSettings(
            **{"timeout_s": 10.0, "deadline_s": 20.0, "max_retries": 2, "backoff_base_s": 0.01}
            | http
        ),
    )

    async def run() -> str:
        backend = OpenAIBackend(settings)
        try:
            return (await backend.generate(MESSAGES)).text
        finally:
            await backend.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (400, "This model's maximum context length is 2048 tokens."),
        (404, "The model `medgemma` does not exist"),
        (422, "messages: field required"),
        # llama-cpp-python's server answers a request that fails its schema with HTTP 500
        (500, "7 validation errors:\n  {'type': 'literal_error', ...}"),
    ],
)
def test_a_request_the_server_refuses_is_not_sent_again(status: int, message: str):
    with (
        ScriptedModel([[]], ["unused"], errors=[(status, message, {})] * 3) as model,
        pytest.raises(BackendError, match=f"HTTP {status}") as info,
    ):
        _generate(model)
    assert len(model.requests) == 1
    assert message.splitlines()[0] in str(info.value)  # the server's own reason is passed on


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_server_error_is_sent_again(status: int):
    with ScriptedModel([[]], ["Fine."], errors=[(status, "overloaded", {})]) as model:
        assert _generate(model) == "Fine."
    assert len(model.requests) == 2


def test_429_is_sent_again_after_its_retry_after():
    with ScriptedModel([[]], ["Fine."], errors=[(429, "slow down", {"Retry-After": "1"})]) as m:
        start = time.monotonic()
        assert _generate(m) == "Fine."
        waited = time.monotonic() - start
    assert len(m.requests) == 2 and waited >= 1.0


def test_an_answer_that_times_out_is_not_asked_for_twice():
    # the server is still writing the first answer: a second copy would only queue behind it
    with ScriptedModel([[]], ["Too late."], delay_s=1.5) as model:
        with pytest.raises(BackendError, match="no answer within 0.5 s"):
            _generate(model, timeout_s=0.5)
        time.sleep(1.2)  # anything sent again would have arrived by now
    assert len(model.requests) == 1


def test_a_server_that_is_not_there_is_tried_again():
    settings = BackendSettings(
        name="openai",
        base_url="http://127.0.0.1:9/v1",  # nothing listens there
        http=HttpSettings(timeout_s=2, deadline_s=10, max_retries=2, backoff_base_s=0.01),
    )

    async def run() -> None:
        backend = OpenAIBackend(settings)
        try:
            await backend.generate(MESSAGES)
        finally:
            await backend.aclose()

    with pytest.raises(BackendError, match="connection failed.*after 3 attempts"):
        asyncio.run(run())


@pytest.fixture
def settings(tmp_path: Path, demo_store: FhirStore) -> Settings:
    s = Settings(home=tmp_path / "home", store={"url": str(demo_store.engine.url)})
    s.model.name = "openai"
    s.model.http.deadline_s = 20
    return s


def _ask(settings: Settings, question: str):  # type: ignore[no-untyped-def]
    async def run():  # type: ignore[no-untyped-def]
        async with ChartSight(settings, now=NOW) as agent:
            return await agent.ask(TOMMY_FRIESEN, question)

    return asyncio.run(run())


def test_generate_latency_sums_the_draft_and_the_retry(settings: Settings):
    # the first draft cites nothing, so the graph asks again with the verifier's findings
    with ScriptedModel([[]], ["He is fine.", "He is fine."], delay_s=0.4) as model:
        settings.model.base_url = model.base_url
        answer = _ask(settings, "What was his last HbA1c?")
    assert len(model.requests) == 2
    assert answer.latency_ms["generate"] >= 800.0  # both answers' 0.4 s, not the last alone
    # the answer names the model, never the model server's address
    assert "openai:default" in answer.model and "127.0.0.1" not in answer.model_dump_json()


def test_a_refused_request_falls_back_at_once(settings: Settings):
    with ScriptedModel([[]], ["unused"], errors=[(400, "bad request", {})] * 3) as model:
        settings.model.base_url = model.base_url
        answer = _ask(settings, "What was his last HbA1c?")
    assert len(model.requests) == 1
    assert answer.fallback_used and answer.supported_fraction == 1.0
    assert any("HTTP 400" in w and "bad request" in w for w in answer.warnings)
    assert "127.0.0.1" not in answer.model_dump_json()  # nor in the fallback's warnings


def test_the_tool_loop_sends_an_empty_content_with_its_tool_calls(settings: Settings):
    settings.model.supports_tools = True
    settings.model.max_tool_steps = 2
    turns = [[call("latest_observation", '{"query": "HbA1c"}', "c1")], []]
    with ScriptedModel(turns, ["He is fine."]) as model:
        settings.model.base_url = model.base_url
        _ask(settings, "What was his last HbA1c?")
    assert len(model.tool_requests) == 2
    said = [m for m in model.tool_requests[1]["messages"] if m["role"] == "assistant"]
    assert said and said[0]["content"] == "" and said[0]["tool_calls"][0]["id"] == "c1"
