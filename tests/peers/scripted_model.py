"""An OpenAI-compatible Chat Completions server that replies from a script, for tests that need a
model to make exact tool calls (a real small model's choices are not predictable enough to test
the loop's edges). Runs under uvicorn on 127.0.0.1 in a background thread and records every request.

A request that offers ``tools`` takes the next entry of ``tool_turns`` (the last repeats); any other
request takes the next entry of ``answers``. ``errors`` (status, message, headers) answer the first
requests instead, in the OpenAI error shape, as a failing or overloaded server would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.peers.asgi import ThreadedServer


def call(name: str, arguments: str, id: str) -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _events(text: str) -> Iterator[str]:
    """The text as Chat Completions stream chunks, a word at a time."""
    for word in text.split(" "):
        chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


class ScriptedModel:
    def __init__(
        self,
        tool_turns: list[list[dict[str, Any]]],
        answers: list[str],
        delay_s: float = 0.0,
        errors: list[tuple[int, str, dict[str, str]]] | None = None,
    ) -> None:
        self.delay_s = delay_s  # a slow model: each reply waits this long
        self.errors = list(errors or [])
        self.tool_turns = tool_turns
        self.answers = answers
        self.requests: list[dict[str, Any]] = []
        app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])
        self.http = ThreadedServer(app)

    @property
    def base_url(self) -> str:
        return f"{self.http.url}/v1"

    @property
    def tool_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("tools")]

    def __enter__(self) -> ScriptedModel:
        self.http.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.stop()

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if len(self.requests) <= len(self.errors):
            status, text, headers = self.errors[len(self.requests) - 1]
            error = {"message": text, "type": "server_error", "param": None, "code": None}
            return JSONResponse({"error": error}, status_code=status, headers=headers)
        if body.get("tools"):
            n = len(self.tool_requests) - 1
            calls = self.tool_turns[min(n, len(self.tool_turns) - 1)]
            message: dict[str, Any] = {"role": "assistant", "content": None if calls else "done"}
            if calls:
                message["tool_calls"] = calls
        else:
            n = len(self.requests) - len(self.tool_requests) - 1
            message = {"role": "assistant", "content": self.answers[min(n, len(self.answers) - 1)]}
            if body.get("stream"):
                return StreamingResponse(
                    _events(message["content"]), media_type="text/event-stream"
                )
        return JSONResponse(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "model": "scripted",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
        )
