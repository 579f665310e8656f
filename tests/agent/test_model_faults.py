"""Questions asked of a model server that misbehaves (``tests.peers.faulty_model``, its own process):
malformed JSON, a stream cut mid-token or never ending, an enormous completion, a tool-call loop,
invalid tool arguments, 429 with ``Retry-After``, 500s, a server that never answers. Each question
ends within its time limit in a verified answer or the evidence answer flagged as a fallback, and
no sentence the fault server wrote (``MARK``, the echoed patient name) is ever in the answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.answer import Answer
from agent.grounding import verify
from agent.service import ChartSight
from agent.settings import Settings
from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from tests.agent.test_ask import NOW
from tests.peers.faulty_model import MARK, PATIENT_ECHO, FaultyModel

QUESTION = "What was his last HbA1c?"


@pytest.fixture(scope="module")
def faulty() -> Iterator[FaultyModel]:
    with FaultyModel() as server:
        yield server


def _settings(home: Path, store: FhirStore, model: FaultyModel, fault: str) -> Settings:
    s = Settings(home=home, store={"url": str(store.engine.url)})
    s.model.name = "openai"
    s.model.base_url = model.base_url
    s.model.model = fault
    s.model.http.max_retries = 2
    s.model.http.backoff_base_s = 0.01
    return s


def _ask(
    settings: Settings, *, stream: bool = False, time_limit_s: float | None = None
) -> tuple[Answer, list[tuple[str, dict[str, Any]]], float]:
    """The answer, its stream events and the seconds ``ask`` took: the time the caller waits,
    which ``time_limit_s`` bounds (opening and closing ``ChartSight`` are not part of it)."""
    events: list[tuple[str, dict[str, Any]]] = []

    async def run() -> tuple[Answer, float]:
        async with ChartSight(settings, now=NOW) as agent:
            start = time.monotonic()
            answer = await agent.ask(
                TOMMY_FRIESEN,
                QUESTION,
                on_event=(lambda k, d: events.append((k, d))) if stream else None,
                time_limit_s=time_limit_s,
            )
            return answer, time.monotonic() - start

    answer, took = asyncio.run(run())
    return answer, events, took


def _shown_verified(answer: Answer) -> None:
    """The answer shows only sentences that rest on what they cite, none of the fault's text."""
    assert answer.text and not answer.abstained
    assert MARK not in answer.text and PATIENT_ECHO not in answer.text
    cited = {c.reference: c.text for c in answer.citations}
    assert verify(answer.text, cited).supported_fraction == 1.0


def _fell_back(answer: Answer) -> None:
    _shown_verified(answer)
    assert answer.fallback_used and answer.model.startswith("evidence (fallback")
    assert any("could not answer" in w for w in answer.warnings)


def test_a_well_behaved_model_is_verified(tmp_path: Path, demo_store: FhirStore, faulty):
    for stream in (False, True):
        answer, _, _ = _ask(_settings(tmp_path, demo_store, faulty, "ok"), stream=stream)
        _shown_verified(answer)
        assert not answer.fallback_used and answer.model == "openai:ok"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("fault", ["malformed", "cut", "r500", "huge"])
def test_a_broken_reply_falls_back(
    tmp_path: Path, demo_store: FhirStore, faulty: FaultyModel, fault: str, stream: bool
):
    answer, events, took = _ask(_settings(tmp_path, demo_store, faulty, fault), stream=stream)
    _fell_back(answer)
    assert took < 30
    assert not any(MARK in str(d) for k, d in events if k != "token")


def test_a_stream_that_ends_before_done_falls_back(
    tmp_path: Path, demo_store: FhirStore, faulty: FaultyModel
):
    # the two words it sent are not the answer: they are not verified as one, they are refused
    answer, events, _ = _ask(_settings(tmp_path, demo_store, faulty, "nodone"), stream=True)
    _fell_back(answer)
    assert [k for k, _ in events].count("token") == 2


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("fault", ["endless", "silent"])
def test_a_reply_that_never_ends_falls_back_within_the_time_limit(
    tmp_path: Path, demo_store: FhirStore, faulty: FaultyModel, fault: str, stream: bool
):
    settings = _settings(tmp_path, demo_store, faulty, fault)  # model.http: 120 s, 300 s
    answer, _, took = _ask(settings, stream=stream, time_limit_s=6)
    _fell_back(answer)
    assert took < 6


def test_a_tool_call_loop_stops_at_max_tool_steps(tmp_path: Path, demo_store: FhirStore, faulty):
    settings = _settings(tmp_path, demo_store, faulty, "loop")
    settings.model.supports_tools = True
    settings.model.max_tool_steps = 3
    before = faulty.hits().get("loop", 0)
    answer, _, took = _ask(settings, time_limit_s=20)
    by_model = [c for c in answer.tool_calls if c.by == "model"]
    assert len(by_model) == 3 and not any(c.error for c in by_model)
    assert faulty.hits()["loop"] - before == 4  # three tool rounds, then the answer
    _shown_verified(answer)
    assert not answer.fallback_used and took < 20


def test_invalid_tool_arguments_are_told_to_the_model_not_run(
    tmp_path: Path, demo_store: FhirStore, faulty: FaultyModel
):
    settings = _settings(tmp_path, demo_store, faulty, "badargs")
    settings.model.supports_tools = True
    settings.model.max_tool_steps = 2
    answer, _, _ = _ask(settings)
    by_model = [c for c in answer.tool_calls if c.by == "model"]
    assert len(by_model) == 8 and all(c.error for c in by_model)  # four bad calls, two rounds
    _shown_verified(answer)
    assert not answer.fallback_used


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_429_is_asked_again_after_its_retry_after(
    tmp_path: Path, demo_store: FhirStore, faulty: FaultyModel, stream: bool
):
    before = faulty.hits().get("r429", 0)
    answer, _, took = _ask(_settings(tmp_path, demo_store, faulty, "r429"), stream=stream)
    _shown_verified(answer)
    assert not answer.fallback_used
    assert faulty.hits()["r429"] - before == 2 and took >= 1.0  # 429, a second apart, then 200


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_429_whose_retry_after_outlasts_the_question_falls_back_in_time(
    tmp_path: Path, demo_store: FhirStore, faulty: FaultyModel, stream: bool
):
    settings = _settings(tmp_path, demo_store, faulty, "r429-long")
    settings.model.http.backoff_max_s = 60  # Retry-After: 3600 is waited on up to a minute
    answer, _, took = _ask(settings, stream=stream, time_limit_s=5)
    _fell_back(answer)
    assert took < 5
