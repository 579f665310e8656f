"""Model backends behind one interface, found by name in a registry.

Built in: ``evidence`` (the embedded default: a cited answer composed from the facts and evidence,
no model; ``agent.backends.evidence``), ``openai`` (any OpenAI-compatible Chat Completions server),
``llama-cpp`` (a GGUF file in-process) and ``transformers`` (a Hugging Face model in-process). Every
backend gets the prompt (``messages``) and the ``Grounds`` it was written from; a model writes from
the first, the evidence backend composes from the second. Installed packages add or replace
backends through the ``chartsight.backends`` entry point group (``register(registry)`` calling
``registry.add(name, factory)`` with a factory ``(BackendSettings) -> Backend``; see
``common.plugins``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, SecretStr

from agent.answer import FactUsed, SimilarCase
from common.plugins import PluginError, Registry
from connectors.errors import ChartSightError, ConfigurationError
from connectors.images import PatientImage
from connectors.settings import HttpSettings

log = logging.getLogger(__name__)


class BackendError(ChartSightError):
    """The model could not be reached or gave no usable answer."""


class BackendSettings(BaseModel):
    """Which model answers, and how to reach it."""

    name: Literal["evidence", "openai", "llama-cpp", "transformers"] | str = Field(
        default="evidence",
        description="'evidence' (no model: a templated, cited answer), 'openai' (an "
        "OpenAI-compatible server: vLLM, TGI, Ollama, llama.cpp, hosted APIs), 'llama-cpp' (a "
        "GGUF file in-process; model = its path), 'transformers' (a Hugging Face model in-process; "
        "model = an id or a folder), or a plug-in.",
    )
    model: str = Field(default="", description="Model name sent to the server.")
    base_url: str = Field(
        default="http://127.0.0.1:8000/v1", description="Root of the OpenAI-compatible API."
    )
    api_key: SecretStr | None = Field(
        default=None, description="Bearer key (or CHARTSIGHT_MODEL__API_KEY / OPENAI_API_KEY)."
    )
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=400, ge=1)
    send_images: bool = Field(default=True, description="Attach the patient's images (VLMs).")
    supports_tools: bool = Field(
        default=False,
        description="The model can call tools (OpenAI-style function calling): it then plans "
        "which of ChartSight's tools to call, in a bounded loop, on top of the rule planner.",
    )
    tool_choice: str = Field(
        default="auto",
        description="'auto' (the model decides), 'required', or one tool's name to make the "
        "model call that tool.",
    )
    time_limit_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds the model gets per question, its tool rounds, drafts, retries and "
        "waits on Retry-After together; past them the evidence answer is given, flagged as a "
        "fallback. None: only `http`'s bounds per request. The HTTP service bounds it further by "
        "its serve.request_timeout_s.",
    )
    max_tool_steps: int = Field(
        default=3, ge=1, le=10, description="Rounds of tool calls the model may make per question."
    )
    mmproj: str | None = Field(
        default=None, description="llama-cpp: the image projector file of a vision GGUF build."
    )
    context_tokens: int = Field(
        default=8192,
        ge=512,
        description="llama-cpp: context size in tokens, for the prompt and the answer together "
        "(an answer prompt is ~1-2.5k tokens, a retry adds the draft and the findings, the "
        "thread's turns come before; 8192 is SmolLM2's and Qwen2.5's trained context).",
    )
    evidence_tokens: int = Field(
        default=600,
        ge=50,
        description="Tokens (estimated as characters / 4) of evidence lines in the answer prompt, "
        "besides the facts: the lines the facts cite, then the lines that match the question "
        "(agent.answer_prompt).",
    )
    gguf_file: str | None = Field(
        default=None, description="transformers: a GGUF file inside the model folder."
    )
    http: HttpSettings = HttpSettings(timeout_s=120.0, deadline_s=300.0, max_retries=2)


@dataclass(frozen=True)
class Message:
    """One chat message; ``images`` travel with a user message to a vision-language model."""

    role: Literal["system", "user", "assistant"]
    content: str
    images: tuple[PatientImage, ...] = ()


@dataclass(frozen=True)
class Generation:
    """A backend's reply: its text, the model that wrote it, and token usage when it reports it."""

    text: str
    model: str
    usage: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCall:
    """One tool call the model asked for; ``arguments`` is the raw JSON text it wrote."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolTurn:
    """The model's reply when it was offered tools: text, tool calls, or both."""

    text: str
    calls: tuple[ToolCall, ...]
    model: str


@dataclass(frozen=True)
class Grounds:
    """What an answer is written from (the graph's state for one question): the tools' facts, the
    ranked evidence lines by id with their scores (``{"score", "lexical", "dense", "code", ...}``),
    and the similar cases."""

    facts: tuple[FactUsed, ...] = ()
    evidence: dict[str, str] = field(default_factory=dict)
    evidence_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    similar: tuple[SimilarCase, ...] = ()


class Backend(Protocol):
    """A model backend. ``generate`` returns the reply to ``messages`` (the prompt built from
    ``grounds``); raises ``BackendError`` when the model cannot be reached or gives no usable
    answer (the graph then falls back to the evidence backend and says so)."""

    name: str

    async def generate(self, messages: list[Message], grounds: Grounds | None = None) -> Generation:
        """The model's reply to the conversation."""
        ...

    async def aclose(self) -> None:
        """Release the model (connections, weights)."""
        ...


@runtime_checkable
class ToolCallingBackend(Protocol):
    """A backend whose model can call tools. ``messages`` and ``tools`` are in the OpenAI Chat
    Completions wire format (the ``tools`` entries as ``Tool.schema()`` gives them)."""

    name: str
    settings: BackendSettings

    async def call_tools(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> ToolTurn:
        """One round of the model choosing tools: the reply to ``messages`` with ``tools``
        offered. Raises ``BackendError`` when the server fails or replies with no message."""
        ...


def tool_calling(backend: Backend | None) -> ToolCallingBackend | None:
    """The backend, when it is configured to call tools and can; else None."""
    if isinstance(backend, ToolCallingBackend) and backend.settings.supports_tools:
        return backend
    return None


class InProcessBackend:
    """A model run in this process (llama.cpp, transformers): subclasses implement the blocking
    ``_complete(messages) -> Generation``, which runs off the event loop; its ``RuntimeError`` or
    ``ValueError`` becomes a ``BackendError`` naming the backend."""

    name: str

    def _complete(self, messages: list[Message]) -> Generation:
        raise NotImplementedError

    async def generate(self, messages: list[Message], grounds: Grounds | None = None) -> Generation:
        """The model's reply to ``messages`` (``grounds`` are in the prompt already)."""
        try:
            return await asyncio.to_thread(self._complete, messages)
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"{self.name}: {exc}") from exc


Factory = Callable[[BackendSettings], Backend]


def _evidence(settings: BackendSettings) -> Backend:
    from agent.backends.evidence import EvidenceBackend

    return EvidenceBackend()


def _openai(settings: BackendSettings) -> Backend:
    from agent.backends.openai import OpenAIBackend

    return OpenAIBackend(settings)


def _llama_cpp(settings: BackendSettings) -> Backend:
    from agent.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(settings)


def _transformers(settings: BackendSettings) -> Backend:
    from agent.backends.transformers import TransformersBackend

    return TransformersBackend(settings)


class BackendRegistry(Registry[Factory]):
    """Backend factories by name (``chartsight.backends`` plug-ins); each module is imported only
    when its backend is created."""

    kind = "model backend"
    group = "chartsight.backends"

    def check(self, name: str, item: Factory) -> None:
        """A backend is registered as a factory ``(BackendSettings) -> Backend``."""
        super().check(name, item)
        if not callable(item):
            raise PluginError(f"model backend {name!r} must be a factory, not {item!r}")


def default_backends(*, plugins: bool = True) -> BackendRegistry:
    """The built-in backends, then (``plugins``) the installed ones."""
    reg = BackendRegistry()
    for name, factory in (
        ("evidence", _evidence),
        ("openai", _openai),
        ("llama-cpp", _llama_cpp),
        ("transformers", _transformers),
    ):
        reg.add(name, factory)
    if plugins:
        reg.load_entry_points()
    return reg


def create_backend(settings: BackendSettings, registry: BackendRegistry | None = None) -> Backend:
    """The configured model backend. Raises ``ConfigurationError`` for an unknown name (naming
    the known ones)."""
    registry = registry or default_backends()
    factory = registry.get(settings.name)
    if factory is None:
        raise ConfigurationError(
            f"unknown model backend {settings.name!r}; known: {', '.join(registry.names())}"
        )
    return factory(settings)
