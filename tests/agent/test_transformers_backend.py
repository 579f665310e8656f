"""The transformers backend with a tiny random-weight VLM built from a config (the code path
MedGemma, LLaVA-Med and Qwen2.5-VL take, whose weights cannot be downloaded here)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.backends import BackendError, BackendSettings, Message, create_backend
from agent.grounding import verify
from agent.service import ChartSight
from agent.settings import Settings
from connectors.demo import TOMMY_FRIESEN
from connectors.images import ImageProvenance, PatientImage
from connectors.store import FhirStore

WORDS = [
    "<unk>",
    "<pad>",
    "<s>",
    "</s>",
    "<image>",
    "user",
    "assistant",
    "system",
    ":",
    "what",
    "was",
    "his",
    "last",
    "a1c",
    "hba1c",
    "?",
    "the",
    "is",
    "%",
    ".",
    "[",
    "]",
    "observation",
    "patient",
    "latest",
    "answer",
    "cite",
    "evidence",
]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
    "{{ c['text'] }} {% endif %}{% endfor %}{% endif %} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaVA-architecture model (CLIP vision tower + Llama) with random weights, and its
    processor, saved like a Hub folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=16,
        vision_feature_select_strategy="default",
        chat_template=TEMPLATE,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        ),
        image_token_index=vocab["<image>"],
        image_seq_length=4,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vlm")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _image() -> PatientImage:
    pixels = (np.random.default_rng(0).random((48, 40)) * 255).astype("uint8")
    return PatientImage(pixels, "CT", "image/png", ImageProvenance("Media/x", "test"))


def test_image_and_text_reach_the_model_and_the_output_is_parsed(tiny_vlm: Path):
    backend = create_backend(
        BackendSettings(name="transformers", model=str(tiny_vlm), max_tokens=6)
    )
    assert backend is not None and backend.name == f"transformers:{tiny_vlm}"
    messages = [
        Message("system", "answer"),
        Message("user", "what was his last a1c ?", (_image(),)),
    ]
    inputs = backend.inputs(messages)  # type: ignore[attr-defined]
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)
    image_token = backend.processor.tokenizer.convert_tokens_to_ids("<image>")  # type: ignore[attr-defined]
    assert int((inputs["input_ids"] == image_token).sum()) == 4  # one per image patch
    reply = asyncio.run(backend.generate(messages))
    assert isinstance(reply.text, str) and reply.usage["completion_tokens"] >= 1
    assert reply.model == backend.name


def test_the_graph_runs_through_a_transformers_vlm(
    tiny_vlm: Path, tmp_path: Path, demo_store: FhirStore
):
    settings = Settings(home=tmp_path / "home", store={"url": str(demo_store.engine.url)})
    settings.model.name = "transformers"
    settings.model.model = str(tiny_vlm)
    settings.model.max_tokens = 8

    async def run():  # type: ignore[no-untyped-def]
        async with ChartSight(settings, now=datetime(2021, 1, 1, tzinfo=UTC)) as agent:
            return await agent.ask(TOMMY_FRIESEN, "Show me his imaging and his last a1c")

    answer = asyncio.run(run())
    # random weights write nonsense: the verifier removes it and the evidence answer stands in
    assert answer.model.startswith(("transformers:", "evidence (fallback from transformers:"))
    assert answer.images and answer.images[0].reference == "Media/demo-ct-small"
    assert (
        verify(answer.text, {c.reference: c.text for c in answer.citations}).supported_fraction
        == 1.0
    )


def test_a_prompt_and_answer_past_the_models_positions_are_refused(tiny_vlm: Path):
    backend = create_backend(
        BackendSettings(name="transformers", model=str(tiny_vlm), max_tokens=4090)
    )
    assert backend.context_tokens() == 4096  # type: ignore[attr-defined]
    messages = [Message("system", "answer"), Message("user", "what was his last a1c ?")]
    with pytest.raises(BackendError, match=r"exceed the model's context of 4096 tokens"):
        asyncio.run(backend.generate(messages))
