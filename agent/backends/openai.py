"""Any OpenAI-compatible Chat Completions server: vLLM, TGI, Ollama, llama.cpp, hosted APIs.

Bounds: a reply over ``max_tokens`` × ``CHARS_PER_TOKEN`` characters is refused (a server that
ignores ``max_tokens``), and a stream ends within ``http.deadline_s``, at ``[DONE]`` or a
``finish_reason`` (else it was cut short: refused).

Retries (``retryable``): 429 (after its ``Retry-After``), 5xx and connection failures are sent
again, within ``model.http``'s retries and deadline; a 4xx, and a 5xx whose body says the request
failed validation (llama-cpp-python's server answers an invalid request with HTTP 500 and "N
validation errors"), are not: the same request would fail the same way. A request whose answer
timed out is not sent again either: the server may still be generating it, and a second copy
would queue behind the first (``RetryingHttp(retry_read_timeouts=False)``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx

from agent.backends import (
    BackendError,
    BackendSettings,
    Generation,
    Grounds,
    Message,
    ToolCall,
    ToolTurn,
)
from connectors.errors import ConnectorError
from connectors.http import RetryingHttp, retry_after_seconds
from connectors.settings import HttpSettings

_INVALID_REQUEST = re.compile(r"\bvalidation errors?\b|invalid_request_error", re.IGNORECASE)


# the longest a token's text is taken to be, in characters: tokenizers' vocabularies (SmolLM2's,
# Qwen2.5's, Llama 3's) hold almost only pieces of at most 16 characters
CHARS_PER_TOKEN = 16


def _wait(response: httpx.Response, http: HttpSettings, attempt: int) -> float:
    """Seconds before sending again: the answer's ``Retry-After``, else the backoff; at most
    ``http.backoff_max_s``."""
    after = retry_after_seconds(response.headers.get("Retry-After"))
    wait = after if after is not None else http.backoff_base_s * 2**attempt
    return min(wait, http.backoff_max_s)


def retryable(response: httpx.Response) -> bool:
    """Whether a model server's error answer is worth sending the request again: 429 and 5xx,
    unless the body says the request itself was invalid (a validation error)."""
    status = response.status_code
    if status == 429:
        return True
    return status >= 500 and not _INVALID_REQUEST.search(response.text[:2000])


def _content(message: Message, send_images: bool) -> Any:
    if not message.images or not send_images:
        return message.content
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}]
    for image in message.images:
        data = base64.b64encode(image.png_bytes()).decode()
        parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
    return parts


class OpenAIBackend:
    """Chat Completions over httpx, with the connectors' retries, deadlines and typed errors."""

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        key = (
            settings.api_key.get_secret_value()
            if settings.api_key
            else os.environ.get("OPENAI_API_KEY")
        )
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = RetryingHttp(
            settings.http, headers=headers, retryable=retryable, retry_read_timeouts=False
        )
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        # the model as answers, audit rows and FHIR Devices name it: never the server's address,
        # which is the deployment's network (an internal detail; the settings say where it is)
        self.name = f"openai:{settings.model or 'default'}"
        # the most characters a reply of max_tokens may have: a longer one comes from a server
        # that ignores max_tokens (and would only be cut by the verifier, at length)
        self.max_chars = settings.max_tokens * CHARS_PER_TOKEN

    def _body(self, messages: list[dict[str, Any]], stream: bool, **extra: Any) -> dict[str, Any]:
        """A Chat Completions request with the configured sampling and model."""
        body: dict[str, Any] = {
            "messages": messages,
            **extra,
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
            "stream": stream,
        }
        if self.settings.model:
            body["model"] = self.settings.model
        return body

    def _wire(self, messages: list[Message]) -> list[dict[str, Any]]:
        return [
            {"role": m.role, "content": _content(m, self.settings.send_images)} for m in messages
        ]

    async def _complete(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The reply and its first choice's message; typed errors for everything else."""
        try:
            response = await self.http.request("POST", self.url, json=body)
        except ConnectorError as exc:
            raise BackendError(f"model server {self.url}: {exc}") from exc
        if len(response.content) > self.max_chars * 4 + 65536:
            raise BackendError(
                f"model server {self.url} sent a {len(response.content)}-byte reply, over "
                f"max_tokens {self.settings.max_tokens}"
            )
        try:
            reply = response.json()
            message = reply["choices"][0]["message"]
            if not isinstance(message, dict):
                raise TypeError("message is not an object")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            # the body is the model's writing (it may echo the patient's chart): never quoted
            raise BackendError(
                f"model server {self.url} gave no chat completion ({type(exc).__name__} in a "
                f"{len(response.content)}-byte reply)"
            ) from exc
        text = message.get("content")
        if isinstance(text, str) and len(text) > self.max_chars:
            raise BackendError(
                f"model server {self.url} wrote {len(text)} characters, over max_tokens "
                f"{self.settings.max_tokens} (at most {self.max_chars})"
            )
        return reply, message

    async def generate(self, messages: list[Message], grounds: Grounds | None = None) -> Generation:
        """The server's chat completion for ``messages`` (images as data URLs when
        ``send_images``). Raises ``BackendError`` on an HTTP error, a timeout or a reply without
        a message."""
        reply, message = await self._complete(self._body(self._wire(messages), stream=False))
        return Generation(
            text=(message.get("content") or "").strip(),
            model=str(reply.get("model") or self.settings.model),
            usage=reply.get("usage") or {},
        )

    async def call_tools(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> ToolTurn:
        """One round of function calling: the model answers with text or with tool calls."""
        choice = self.settings.tool_choice
        body = self._body(
            messages,
            stream=False,
            tools=tools,
            tool_choice=choice
            if choice in ("auto", "required", "none")
            else {"type": "function", "function": {"name": choice}},
        )
        reply, message = await self._complete(body)
        try:
            calls = tuple(
                ToolCall(
                    id=str(call.get("id") or f"call_{i}"),
                    name=str(call["function"]["name"]),
                    arguments=call["function"].get("arguments") or "{}",
                )
                for i, call in enumerate(message.get("tool_calls") or [])
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise BackendError(f"model server {self.url} sent malformed tool calls") from exc
        return ToolTurn(
            text=(message.get("content") or "").strip(),
            calls=calls,
            model=str(reply.get("model") or self.settings.model),
        )

    async def stream(self, messages: list[Message]) -> AsyncIterator[str]:
        """The reply token by token (server-sent events). Before the first token, an error answer
        that ``retryable`` admits (429, 5xx) is sent again as ``generate``'s would be: after its
        ``Retry-After`` (at most ``http.backoff_max_s``), up to ``http.max_retries`` times. Raises
        ``BackendError`` when the stream breaks, ends without ``[DONE]`` or a ``finish_reason``
        (the answer may be cut short), runs past ``http.deadline_s`` in all, or past
        ``max_chars`` characters (a server that ignores ``max_tokens``)."""
        body = self._body(self._wire(messages), stream=True)
        http = self.settings.http
        written = 0
        try:
            async with asyncio.timeout(http.deadline_s):
                for attempt in range(http.max_retries + 1):
                    async with self.http.client.stream("POST", self.url, json=body) as response:
                        if not response.is_success:
                            await response.aread()
                            if retryable(response) and attempt < http.max_retries:
                                await asyncio.sleep(_wait(response, http, attempt))
                                continue
                            raise BackendError(
                                f"model server {self.url}: HTTP {response.status_code}"
                            )
                        async for line in response.aiter_lines():
                            if not line.startswith("data:"):
                                continue
                            data = line[5:].strip()
                            if data == "[DONE]":
                                return
                            choice = json.loads(data)["choices"][0]
                            delta = (choice.get("delta") or {}).get("content")
                            if delta:
                                written += len(delta)
                                if written > self.max_chars:
                                    raise BackendError(
                                        f"model server {self.url}: the stream ran past "
                                        f"{self.max_chars} characters (max_tokens "
                                        f"{self.settings.max_tokens})"
                                    )
                                yield delta
                            if choice.get("finish_reason"):
                                return
                        raise BackendError(
                            f"model server {self.url}: the stream ended before [DONE]"
                        )
        except TimeoutError as exc:
            raise BackendError(
                f"model server {self.url}: no complete stream within {http.deadline_s:g} s"
            ) from exc
        except (httpx.HTTPError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise BackendError(
                f"model server {self.url}: stream broke ({type(exc).__name__})"
            ) from exc

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.http.aclose()
