"""Encoder throughput: images/s and texts/s at several batch sizes.

  - efficientnet-lite0   the embedded image encoder (packaged ImageNet weights), through ChartSight
  - ViT-B/16 @ 224       BiomedCLIP's image tower architecture, random weights (compute does not
                         depend on weight values), through open_clip; fp16 + channels-last on GPU
  - minilm               the embedded text encoder, through ChartSight
Results are appended to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from retrieval.encoders import EncoderRegistry  # noqa: E402
from retrieval.settings import EncoderSettings  # noqa: E402

TEXT = (
    "2019-03-02 Hemoglobin A1c/Hemoglobin.total in Blood (LOINC 4548-4) 8.1 % (high; usual range "
    "4–5.6) [Observation/abc]"
)


def rate(fn, n: int, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def vit_b16(device: str, batch: int, fp16: bool) -> float:
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None).visual.eval().to(device)
    dtype = torch.float16 if fp16 else torch.float32
    model = model.to(dtype)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    if device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.inference_mode():
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return rate(run, batch)


def minilm_arch(device: str, batch: int, fp16: bool, tokens: int = 64) -> float:
    """all-MiniLM-L6-v2's network (6 layers, 384 wide) with random weights on ready token ids."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    dtype = torch.float16 if fp16 else torch.float32
    model = BertModel(config).eval().to(device=device, dtype=dtype)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), device=device)
    mask = torch.ones_like(ids)

    def run() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return rate(run, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--text-batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    rows = []
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray((rng.random((512, 512)) * 255).astype("uint8"))
        for _ in range(max(args.image_batches))
    ]
    for batch in args.image_batches:
        enc = EncoderRegistry(EncoderSettings(device=device, batch_size=batch)).image(
            "efficientnet-lite0"
        )
        rows.append(
            (
                "efficientnet-lite0 (incl. preprocessing)",
                device,
                batch,
                rate(lambda b=batch, e=enc: e.encode_images(pictures[:b]), batch),
                "images/s",
            )
        )
    for batch in args.image_batches:
        rows.append(
            (
                "ViT-B/16 224 px, fp32 (BiomedCLIP image tower)",
                device,
                batch,
                vit_b16(device, batch, False),
                "images/s",
            )
        )
        if device.startswith("cuda"):
            rows.append(
                (
                    "ViT-B/16 224 px, fp16 (BiomedCLIP image tower)",
                    device,
                    batch,
                    vit_b16(device, batch, True),
                    "images/s",
                )
            )
    for batch in args.text_batches:
        try:
            enc = EncoderRegistry(EncoderSettings(device=device, batch_size=batch)).text("minilm")
        except Exception as exc:  # the packaged weights are not installed (e.g. a bare GPU box)
            print(f"minilm skipped: {exc}", file=sys.stderr)
            break
        texts = [f"{TEXT} {i}" for i in range(batch)]
        rows.append(
            (
                "minilm (all-MiniLM-L6-v2)",
                device,
                batch,
                rate(lambda t=texts, e=enc: e.encode_texts(t), batch),
                "texts/s",
            )
        )
    if device.startswith("cuda"):
        for batch in [*args.text_batches, 256]:
            rows.append(
                (
                    "MiniLM-L6 network, fp16, 64 tokens, random weights",
                    device,
                    batch,
                    minilm_arch(device, batch, True),
                    "texts/s",
                )
            )
    report = (
        f"\n## Encoders — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads. Best of 3 "
        "after a warm-up; images are 512×512 grey pictures resized by each encoder's own transform "
        "(the ViT and MiniLM-network rows time the network alone on ready tensors).\n\n"
        "| encoder | device | batch | throughput |\n|---|---|---|---|\n"
        + "\n".join(f"| {name} | {dev} | {b} | {r:,.1f} {unit} |" for name, dev, b, r, unit in rows)
        + "\n"
    )
    print(report)
    with args.results.open("a") as fh:
        fh.write(report)


if __name__ == "__main__":
    main()
