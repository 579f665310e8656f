"""An OpenAI-compatible Chat Completions server that misbehaves on purpose, run as its own process
on 127.0.0.1 (``python -m tests.peers.faulty_model PORT``; the ``FaultyModel`` context manager
starts and stops it). The request's ``model`` names the fault, so one server serves every test:

- ``ok``: a well-formed answer: the prompt's first computed fact, with its citation (so the
  verifier keeps it); streamed a word at a time when asked to stream.
- ``malformed``: HTTP 200 with a body that is not JSON (and stream chunks that are not JSON).
- ``cut``: the stream stops in the middle of a token's chunk, without ``[DONE]``; a plain answer
  is cut short of its ``Content-Length``.
- ``nodone``: the stream ends cleanly after two words, without ``[DONE]`` or a ``finish_reason``.
- ``endless``: the stream never ends (a token every 10 ms, forever); a plain answer's body never
  completes (a byte every 10 ms).
- ``huge``: a 4 MiB completion (``max_tokens`` ignored), streamed or not.
- ``loop``: every tool round asks for the same tool call again; the answer is ``ok``'s.
- ``badargs``: tool calls with arguments that are not JSON, not an object, fail the tool's schema,
  or name no tool; the answer is ``ok``'s.
- ``r429``: every other request (the 1st, 3rd, …) 429 with ``Retry-After: 1``, the rest ``ok``'s.
- ``r429-long``: always 429 with ``Retry-After: 3600``.
- ``r500``: always HTTP 500 (the OpenAI error shape).
- ``silent``: the request is read, then nothing is ever sent back.

Every text a fault writes contains ``UNVERIFIED`` or the test patient's name: neither may reach an
answer shown. ``GET /requests`` gives ``{fault: count}``; the model named ``switch`` does what
``PUT /fault`` ``{"fault": name}`` last chose (a service under test has one model name).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.peers.servers import free_port

MARK = "UNVERIFIED"
PATIENT_ECHO = "Tommy Friesen"  # what a model echoing its prompt would write
_FACT = re.compile(r"^Facts computed from the record:\n- (.+)$", re.MULTILINE)
HUGE_CHARS = 4 * 1024 * 1024


def _answer_text(body: dict[str, Any]) -> str:
    """The first computed fact of the prompt (it carries its ``[E1]`` citation)."""
    prompt = "\n".join(str(m.get("content") or "") for m in body.get("messages", []))
    found = _FACT.search(prompt)
    return found.group(1) if found and found.group(1) != "(none)" else "(none)"


def _completion(message: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


def _chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}) + "\n\n"


def _call(name: str, arguments: str, i: int) -> dict[str, Any]:
    return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


BAD_CALLS = [
    _call("latest_observation", '{"query": "HbA1c"', 1),  # not JSON
    _call("latest_observation", '["HbA1c"]', 2),  # not an object
    _call("latest_observation", '{"query": 7, "extra": {"x": 1}}', 3),  # fails the schema
    _call("drop_tables", "{}", 4),  # no such tool
]
LOOP_CALL = [_call("latest_observation", '{"query": "HbA1c"}', 1)]


class FaultApp:
    """The Starlette app; ``hits`` counts requests per fault."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/requests", self.requests, methods=["GET"]),
                Route("/fault", self.set_fault, methods=["PUT"]),
            ]
        )
        self.fault = "ok"  # what the model named "switch" does (a service has one model name)

    async def requests(self, request: Request) -> Response:
        return JSONResponse(dict(self.hits))

    async def set_fault(self, request: Request) -> Response:
        self.fault = (await request.json())["fault"]
        return Response(status_code=204)

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        fault = str(body.get("model") or "ok")
        if fault == "switch":
            fault = self.fault
        self.hits[fault] += 1
        n = self.hits[fault]
        stream = bool(body.get("stream"))
        if fault == "silent":
            await asyncio.sleep(3600)
        if fault == "r500":
            error = {"message": "internal error", "type": "server_error", "code": None}
            return JSONResponse({"error": error}, status_code=500)
        if fault == "r429-long" or (fault == "r429" and n % 2 == 1):
            error = {"message": "rate limited", "type": "rate_limit_error", "code": None}
            after = "3600" if fault == "r429-long" else "1"
            return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": after})
        if fault == "malformed":
            if stream:
                return StreamingResponse(_texts([f'data: {{"choices": [{{"delta": "{MARK}']))
            return Response(f'{{"choices": [{{"message": {{"content": "{PATIENT_ECHO}', 200)
        if fault == "cut":
            if stream:
                head = [_chunk(f"{MARK} "), _chunk(f"{PATIENT_ECHO} "), 'data: {"choices": [{"de']
                return StreamingResponse(_texts(head, close=True), media_type="text/event-stream")
            text = json.dumps(_completion({"role": "assistant", "content": MARK}, fault))
            return Response(text[:20], headers={"Content-Length": str(len(text))})
        if fault == "nodone" and stream:  # a clean end, but before the answer's end
            head = [_chunk(w + " ") for w in _answer_text(body).split(" ")[:2]]
            return StreamingResponse(_texts(head), media_type="text/event-stream")
        if fault == "endless":
            if stream:
                return StreamingResponse(
                    _endless(_chunk(f"{MARK} ")), media_type="text/event-stream"
                )
            return StreamingResponse(_endless(" "), media_type="application/json")
        if fault == "huge":
            sentence = f"{PATIENT_ECHO} is {MARK} [E1]. "
            text = sentence * (HUGE_CHARS // len(sentence))
            if stream:
                return StreamingResponse(
                    _texts([_chunk(text[i : i + 4096]) for i in range(0, len(text), 4096)]),
                    media_type="text/event-stream",
                )
            return JSONResponse(_completion({"role": "assistant", "content": text}, fault))
        if body.get("tools") and fault in ("loop", "badargs"):
            calls = LOOP_CALL if fault == "loop" else BAD_CALLS
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            return JSONResponse(_completion(message, fault))
        text = _answer_text(body)
        if stream:
            words = [_chunk(w + " ") for w in text.split(" ")] + ["data: [DONE]\n\n"]
            return StreamingResponse(_texts(words), media_type="text/event-stream")
        return JSONResponse(_completion({"role": "assistant", "content": text}, fault))


async def _texts(parts: list[str], close: bool = False) -> AsyncIterator[bytes]:
    for part in parts:
        yield part.encode()
        await asyncio.sleep(0)
    if close:  # the connection drops with the chunked body unfinished
        raise ConnectionResetError("cut on purpose")


async def _endless(part: str) -> AsyncIterator[bytes]:
    while True:
        yield part.encode()
        await asyncio.sleep(0.01)


class FaultyModel:
    """The fault server as a child process; ``base_url`` is its ``…/v1``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def hits(self) -> dict[str, int]:
        """Requests received so far, per fault."""
        return httpx.get(f"http://127.0.0.1:{self.port}/requests", timeout=5).json()

    def switch(self, fault: str) -> None:
        """What the model named ``switch`` does from now on."""
        httpx.put(f"http://127.0.0.1:{self.port}/fault", json={"fault": fault}, timeout=5)

    def __enter__(self) -> FaultyModel:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.faulty_model", str(self.port)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the fault-injecting model server exited")
            try:
                self.hits()
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("the fault-injecting model server did not start")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)


def _serve(port: int) -> None:
    import uvicorn

    uvicorn.run(FaultApp().app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
