"""Any Hugging Face model in-process through transformers.

Vision-language models (MedGemma, LLaVA-Med in llava-hf form, Qwen2.5-VL, ...) load through
``AutoProcessor`` + ``AutoModelForImageTextToText``; text-only models through ``AutoTokenizer`` +
``AutoModelForCausalLM`` (a GGUF file too: ``model = "<folder>"`` with ``gguf_file``). ``model.model``
is a Hub id (with network access) or a local folder. GPU and bf16 when present.
"""

from __future__ import annotations

import threading
from typing import Any

from agent.backends import BackendError, BackendSettings, Generation, InProcessBackend, Message
from connectors.errors import ConfigurationError


class TransformersBackend(InProcessBackend):
    """A local Hugging Face model; one generation at a time, in a worker thread."""

    def __init__(self, settings: BackendSettings) -> None:
        import torch
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        if not settings.model:
            raise ConfigurationError(
                "the transformers backend needs model.model (an id or a folder)"
            )
        self.settings = settings
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        extra = {"gguf_file": settings.gguf_file} if settings.gguf_file else {}
        try:
            try:
                self.processor = AutoProcessor.from_pretrained(settings.model, **extra)
                self.model = AutoModelForImageTextToText.from_pretrained(
                    settings.model, dtype=dtype, **extra
                )
                self.vision = True
            except ValueError:  # not an image-text model: a plain causal LM
                self.processor = AutoTokenizer.from_pretrained(settings.model, **extra)
                self.model = AutoModelForCausalLM.from_pretrained(
                    settings.model, dtype=dtype, **extra
                )
                self.vision = False
        except OSError as exc:
            raise ConfigurationError(
                f"could not load {settings.model!r} with transformers (offline, or not a model "
                f"folder): {exc}"
            ) from exc
        self.model.to(self.device).eval()  # type: ignore[arg-type]
        self.name = f"transformers:{settings.model}"
        self._lock = threading.Lock()

    def inputs(self, messages: list[Message]) -> dict[str, Any]:
        """The model's inputs: the chat template applied, images processed next to the text."""
        images = []
        conversation = []
        for m in messages:
            send = self.vision and self.settings.send_images and m.images
            content: list[dict[str, Any]] = []
            if send:
                for image in m.images:
                    images.append(image.to_pil().convert("RGB"))
                    content.append({"type": "image"})
            content.append({"type": "text", "text": m.content})
            conversation.append({"role": m.role, "content": content if self.vision else m.content})
        prompt = self.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        if self.vision:
            batch = self.processor(images=images or None, text=prompt, return_tensors="pt")
        else:
            batch = self.processor(prompt, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def context_tokens(self) -> int | None:
        """Tokens the model reads at most (prompt and answer together): its (text) config's
        ``max_position_embeddings``; None when the config does not say."""
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        limit = getattr(text, "max_position_embeddings", None)
        return int(limit) if isinstance(limit, int) and limit > 0 else None

    def _complete(self, messages: list[Message]) -> Generation:
        import torch

        with self._lock, torch.inference_mode():
            batch = self.inputs(messages)
            prompt = int(batch["input_ids"].shape[1])
            limit = self.context_tokens()
            if limit is not None and prompt + self.settings.max_tokens > limit:
                # past its positions a model writes garbage or fails deep inside generate
                raise BackendError(
                    f"{self.name}: the prompt ({prompt} tokens) and the answer "
                    f"(model.max_tokens = {self.settings.max_tokens}) exceed the model's "
                    f"context of {limit} tokens"
                )
            output = self.model.generate(
                **batch,
                max_new_tokens=self.settings.max_tokens,
                do_sample=self.settings.temperature > 0,
                **(
                    {"temperature": self.settings.temperature}
                    if self.settings.temperature > 0
                    else {}
                ),
            )
        new = output[0][batch["input_ids"].shape[1] :]
        text = self.processor.decode(new, skip_special_tokens=True)
        return Generation(
            text=text.strip(), model=self.name, usage={"completion_tokens": int(new.shape[0])}
        )

    async def aclose(self) -> None:
        """Nothing to release: the weights go with the object."""
        return None
