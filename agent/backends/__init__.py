"""Model backends behind one interface, found by name in a registry.

Built in: ``evidence`` (the embedded default: a templated answer from facts and evidence, no model),
``openai`` (any OpenAI-compatible Chat Completions server) and ``llama-cpp`` (a GGUF file
in-process). Installed packages add backends
through the ``chartsight.backends`` entry point group: the entry point's name is the backend's, its
value a factory ``(BackendSettings) -> Backend``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field, SecretStr

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
    max_tool_steps: int = Field(
        default=3, ge=1, le=10, description="Rounds of tool calls the model may make per question."
    )
    mmproj: str | None = Field(
        default=None, description="llama-cpp: the image projector file of a vision GGUF build."
    )
    context_tokens: int = Field(default=4096, ge=512, description="llama-cpp: context size.")
    gguf_file: str | None = Field(
        default=None, description="transformers: a GGUF file inside the model folder."
    )
    http: HttpSettings = HttpSettings(timeout_s=120.0, deadline_s=300.0, max_retries=2)


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    content: str
    images: tuple[PatientImage, ...] = ()


@dataclass(frozen=True)
class Generation:
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


class Backend(Protocol):
    name: str

    async def generate(self, messages: list[Message]) -> Generation:
        """The model's reply to the conversation."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ToolCallingBackend(Protocol):
    """A backend whose model can call tools. ``messages`` and ``tools`` are in the OpenAI Chat
    Completions wire format (the ``tools`` entries as ``Tool.schema()`` gives them)."""

    name: str
    settings: BackendSettings

    async def call_tools(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> ToolTurn: ...


def tool_calling(backend: Backend | None) -> ToolCallingBackend | None:
    """The backend, when it is configured to call tools and can; else None."""
    if isinstance(backend, ToolCallingBackend) and backend.settings.supports_tools:
        return backend
    return None


Factory = Callable[[BackendSettings], Backend]


def _builtin() -> dict[str, Factory]:
    from agent.backends.llamacpp import LlamaCppBackend
    from agent.backends.openai import OpenAIBackend
    from agent.backends.transformers import TransformersBackend

    return {
        "openai": OpenAIBackend,
        "llama-cpp": LlamaCppBackend,
        "transformers": TransformersBackend,
    }


def create_backend(settings: BackendSettings) -> Backend | None:
    """The configured model backend; None for the embedded evidence answer."""
    if settings.name == "evidence":
        return None
    factories: dict[str, Factory] = _builtin()
    for ep in entry_points(group="chartsight.backends"):
        factories.setdefault(ep.name, ep.load())
    factory = factories.get(settings.name)
    if factory is None:
        raise ConfigurationError(
            f"unknown model backend {settings.name!r}; known: evidence, {', '.join(sorted(factories))}"
        )
    return factory(settings)
