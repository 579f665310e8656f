"""The thread checkpointer's allow-list (``agent.service._serde``): rows an attacker writes into
the threads database cannot make ChartSight construct anything but plain values and the answer's
own models (``agent.answer.CHECKPOINT_TYPES``), whichever of LangGraph's encodings they use; the
answer's models come back as themselves. What is read back is validated (``agent.threads``): a
tampered thread is refused with ``DamagedThread``, and nothing else is lost (other threads answer,
the rows stay for the operator); an unreadable threads database is ``ThreadStoreError``."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ormsgpack
import pytest
from langgraph.checkpoint.serde.jsonplus import (
    EXT_CONSTRUCTOR_KW_ARGS,
    EXT_CONSTRUCTOR_POS_ARGS,
    EXT_CONSTRUCTOR_SINGLE_ARG,
    EXT_METHOD_SINGLE_ARG,
    EXT_PYDANTIC_V2,
    JsonPlusSerializer,
    _msgpack_enc,
)
from pydantic import BaseModel

from agent.answer import Answer, FactUsed, ToolCallMade
from agent.service import ChartSight
from agent.settings import Settings
from agent.threads import DamagedThread, ThreadStoreError
from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore

NOW = datetime(2021, 1, 1, tzinfo=UTC)
BUILT: list[Any] = []  # what a Tripwire's construction leaves behind


class Tripwire(BaseModel):
    """A class outside the allow-list: constructing it, in any way, is recorded in ``BUILT``."""

    arg: Any = None

    def __init__(self, arg: Any = None, **kw: Any) -> None:
        BUILT.append(arg)
        super().__init__(arg=arg)

    @classmethod
    def build(cls, arg: Any) -> Tripwire:
        return cls(arg)


class PickledTripwire:
    """Unpickled, it builds a Tripwire (pickle calls what ``__reduce__`` names)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return Tripwire.build, ("pickled",)


def _ext(code: int, payload: tuple[Any, ...]) -> ormsgpack.Ext:
    return ormsgpack.Ext(code, _msgpack_enc(payload))


HERE = (__name__, "Tripwire")
# an allow-listed model whose field holds a hostile object
NESTED = {
    "question": "q",
    "patient_id": "p",
    "text": _ext(EXT_CONSTRUCTOR_POS_ARGS, (*HERE, ["x"])),
}


@pytest.fixture
def settings(tmp_path: Path, demo_store: FhirStore) -> Settings:
    return Settings(home=tmp_path / "home", store={"url": str(demo_store.engine.url)})


def _ask(settings: Settings, question: str, thread: str) -> tuple[Answer, dict[str, Any]]:
    async def run() -> tuple[Answer, dict[str, Any]]:
        async with ChartSight(settings, now=NOW, use_index=False) as agent:
            answer = await agent.ask(TOMMY_FRIESEN, question, thread_id=thread)
            snapshot = await (await agent.open_threads()).aget_state(
                {"configurable": {"thread_id": thread}}
            )
            return answer, dict(snapshot.values)

    return asyncio.run(run())


def _tamper(settings: Settings, thread: str, change: Any) -> None:
    """Rewrite the thread's latest checkpoint row: ``change(checkpoint) -> (type, blob)``."""
    with sqlite3.connect(settings.home / "threads.db") as db:
        cid, kind, blob = db.execute(
            "SELECT checkpoint_id, type, checkpoint FROM checkpoints WHERE thread_id = ? "
            "ORDER BY checkpoint_id DESC LIMIT 1",
            (thread,),
        ).fetchone()
        checkpoint = JsonPlusSerializer(allowed_msgpack_modules=True).loads_typed((kind, blob))
        kind, blob = change(checkpoint)
        db.execute(
            "UPDATE checkpoints SET type = ?, checkpoint = ? WHERE thread_id = ? "
            "AND checkpoint_id = ?",
            (kind, blob, thread, cid),
        )


def test_a_thread_comes_back_as_the_answers_own_models(
    settings: Settings, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, "langgraph")
    _ask(settings, "What was his last HbA1c?", "t")
    answer, state = _ask(settings, "and before that?", "t")
    assert answer.citations and not answer.abstained
    assert isinstance(state["answer"], Answer)
    assert state["facts"] and all(isinstance(f, FactUsed) for f in state["facts"])
    assert state["tool_log"] and all(isinstance(c, ToolCallMade) for c in state["tool_log"])
    assert [h["question"] for h in state["history"]] == [
        "What was his last HbA1c?",
        "and before that?",
    ]
    assert not [r for r in caplog.records if "deserializ" in r.getMessage().lower()]


@pytest.mark.parametrize(
    "hostile",
    [
        _ext(EXT_CONSTRUCTOR_SINGLE_ARG, (*HERE, "single")),
        _ext(EXT_CONSTRUCTOR_POS_ARGS, (*HERE, ["positional"])),
        _ext(EXT_CONSTRUCTOR_KW_ARGS, (*HERE, {"arg": "keywords"})),
        _ext(EXT_PYDANTIC_V2, (*HERE, {"arg": "pydantic"}, None)),
        _ext(EXT_METHOD_SINGLE_ARG, (*HERE, "method", "build")),
        _ext(EXT_PYDANTIC_V2, ("agent.answer", "Answer", NESTED, None)),  # allowed, holding one
        # allowed, with a field of the wrong type: LangGraph rebuilds it with model_construct
        _ext(EXT_PYDANTIC_V2, ("agent.answer", "Answer", {**NESTED, "text": ["x"]}, None)),
    ],
    ids=["single-arg", "positional", "keywords", "pydantic", "method", "nested", "unvalidated"],
)
def test_a_tampered_msgpack_checkpoint_constructs_nothing_else(
    settings: Settings, hostile: ormsgpack.Ext
):
    _ask(settings, "What was his last HbA1c?", "t")

    def plant(checkpoint: dict[str, Any]) -> tuple[str, bytes]:
        values = checkpoint["channel_values"]
        values["answer"] = hostile
        values["history"] = [*values["history"], {"question": hostile, "answer": "x"}]
        return JsonPlusSerializer(allowed_msgpack_modules=True).dumps_typed(checkpoint)

    _tamper(settings, "t", plant)
    BUILT.clear()
    with pytest.raises(DamagedThread) as refused:
        _ask(settings, "What are his current medications?", "t")
    assert "damaged" in refused.value.public
    assert BUILT == []
    # nothing else is lost: another thread answers, and the damaged rows are still there
    answer, _ = _ask(settings, "What are his current medications?", "other")
    assert answer.question == "What are his current medications?" and answer.citations
    with sqlite3.connect(settings.home / "threads.db") as db:
        assert db.execute("SELECT count(*) FROM checkpoints WHERE thread_id = 't'").fetchone()[0]


def test_a_model_rebuilt_without_validation_is_refused(settings: Settings):
    """Only the answer's ``supported_fraction`` is of the wrong type: LangGraph's reader falls
    back to ``model_construct`` and hands back an Answer that never validated."""
    _ask(settings, "What was his last HbA1c?", "t")

    def plant(checkpoint: dict[str, Any]) -> tuple[str, bytes]:
        answer = checkpoint["channel_values"]["answer"]
        fields = {**answer.model_dump(), "supported_fraction": "all of it"}
        checkpoint["channel_values"]["answer"] = Answer.model_construct(**fields)
        return JsonPlusSerializer(allowed_msgpack_modules=True).dumps_typed(checkpoint)

    _tamper(settings, "t", plant)
    with pytest.raises(DamagedThread) as refused:
        _ask(settings, "and before that?", "t")
    assert "answer (Answer supported_fraction)" in str(refused.value)
    assert "damaged" in refused.value.public


def test_an_unreadable_threads_database_is_a_thread_store_error(settings: Settings):
    """The threads file overwritten with something that is not SQLite: ``ThreadStoreError``,
    whose public message names no file; a question outside any thread still answers."""
    _ask(settings, "What was his last HbA1c?", "t")
    (settings.home / "threads.db").write_bytes(b"not a database " * 512)
    with pytest.raises(ThreadStoreError) as failed:
        _ask(settings, "and before that?", "t")
    assert "threads.db" not in failed.value.public and "/" not in failed.value.public

    async def outside_a_thread() -> Answer:
        async with ChartSight(settings, now=NOW, use_index=False) as agent:
            return await agent.ask(TOMMY_FRIESEN, "What was his last HbA1c?", keep=False)

    assert asyncio.run(outside_a_thread()).citations


@pytest.mark.parametrize("encoding", ["pickle", "json"])
def test_a_pickled_or_json_constructor_checkpoint_is_refused(settings: Settings, encoding: str):
    _ask(settings, "What was his last HbA1c?", "t")

    def plant(checkpoint: dict[str, Any]) -> tuple[str, bytes]:
        if encoding == "pickle":
            return "pickle", pickle.dumps(PickledTripwire())
        values = {
            "question": {"lc": 2, "type": "constructor", "id": [*HERE], "args": ["lc2"]},
            "history": [{"lc": 1, "type": "constructor", "id": [*HERE], "kwargs": {}}],
        }
        doc = {**checkpoint, "channel_values": values}
        return "json", json.dumps(doc, default=str).encode()

    _tamper(settings, "t", plant)
    BUILT.clear()
    with pytest.raises(DamagedThread):
        _ask(settings, "and before that?", "t")
    assert BUILT == []


def test_threads_open_on_first_use_once(settings: Settings, tmp_path: Path):
    """A question outside any thread never opens the threads database (the CLI's ``ask`` pays
    nothing for it); callers arriving together share one checkpointer; a database that cannot
    be opened is ``ThreadStoreError``, and the next call tries again."""

    async def run() -> None:
        async with ChartSight(settings, now=NOW, use_index=False) as agent:
            answer = await agent.ask(TOMMY_FRIESEN, "What was his last HbA1c?", keep=False)
            assert answer.citations and not (settings.home / "threads.db").exists()
            graphs = await asyncio.gather(*(agent.open_threads() for _ in range(4)))
            assert len({id(g) for g in graphs}) == 1 and (settings.home / "threads.db").exists()

        blocked = tmp_path / "a-file"
        blocked.write_text("")
        settings.threads = str(blocked / "threads.db")  # its folder cannot be made
        async with ChartSight(settings, now=NOW, use_index=False) as agent:
            for _ in range(2):
                with pytest.raises(ThreadStoreError):
                    await agent.ask(TOMMY_FRIESEN, "What was his last HbA1c?", thread_id="t")
            blocked.unlink()
            blocked.mkdir()
            answer = await agent.ask(TOMMY_FRIESEN, "What was his last HbA1c?", thread_id="t")
            assert answer.thread_id == "t"

    asyncio.run(run())


def test_closing_while_threads_are_opening_keeps_no_connection(settings: Settings):
    """A caller gives up while the checkpointer is still being opened and ChartSight closes: the
    attempt is cancelled with it and leaves no connection (thread) open behind it."""

    async def run() -> None:
        before = threading.active_count()
        agent = ChartSight(settings, now=NOW, use_index=False)
        await agent.__aenter__()
        waiting = asyncio.ensure_future(agent.open_threads())
        await asyncio.sleep(0)
        waiting.cancel()
        await agent.__aexit__(None, None, None)
        await asyncio.sleep(1)
        assert threading.active_count() <= before

    asyncio.run(run())
