"""Any GGUF model in-process through llama-cpp-python (``pip install llama-cpp-python``).

``model.model`` is the path of the GGUF file; ``model.base_url`` is unused. With
``model.mmproj`` (an image projector file, as MedGemma's and LLaVA's GGUF builds ship) images are
passed to the model through llama.cpp's LLaVA-style chat handler.
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

from agent.backends import BackendError, BackendSettings, Generation, InProcessBackend, Message
from connectors.errors import ConfigurationError


class LlamaCppBackend(InProcessBackend):
    """A local GGUF model; generation runs in a worker thread, one request at a time."""

    def __init__(self, settings: BackendSettings) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ConfigurationError(
                "the llama-cpp backend needs `pip install llama-cpp-python`"
            ) from exc
        path = Path(settings.model).expanduser()
        if not path.is_file():
            raise ConfigurationError(f"model.model must be a GGUF file; {path} does not exist")
        handler = None
        if settings.mmproj:
            from llama_cpp.llama_chat_format import Llava15ChatHandler

            handler = Llava15ChatHandler(clip_model_path=str(Path(settings.mmproj).expanduser()))
        self.settings = settings
        self.llm = Llama(
            model_path=str(path),
            n_ctx=settings.context_tokens,
            chat_handler=handler,
            verbose=False,
        )
        self.vision = handler is not None
        self.name = f"llama-cpp:{path.name}"
        self._lock = threading.Lock()

    def _messages(self, messages: list[Message]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in messages:
            if m.images and self.vision and self.settings.send_images:
                parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}]
                for image in m.images:
                    data = base64.b64encode(image.png_bytes()).decode()
                    parts.append(
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
                    )
                out.append({"role": m.role, "content": parts})
            else:
                out.append({"role": m.role, "content": m.content})
        return out

    def _complete(self, messages: list[Message]) -> Generation:
        with self._lock:
            reply = self.llm.create_chat_completion(
                messages=self._messages(messages),  # type: ignore[arg-type]
                temperature=self.settings.temperature,
                max_tokens=self.settings.max_tokens,
            )
        try:
            text = reply["choices"][0]["message"]["content"] or ""  # type: ignore[index]
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(f"{self.name} gave no chat completion") from exc
        return Generation(text=text.strip(), model=self.name, usage=dict(reply.get("usage") or {}))  # type: ignore[union-attr]

    async def aclose(self) -> None:
        """Free the llama.cpp model (its weights and context)."""
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
