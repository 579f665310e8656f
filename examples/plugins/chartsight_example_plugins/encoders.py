"""A plug-in text encoder: ``char-ngrams[:<dim>]``, character trigrams hashed into ``dim``
dimensions (default 256), L2-normalised: a lexical encoder that needs no model file."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from retrieval.encoders import EncoderFactories, EncoderInfo


class CharNgrams:
    """Texts → float32 vectors of shape (n, dim), unit length (zero for an empty text)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.info = EncoderInfo("char-ngrams", str(dim), dim, f"char-ngrams:{dim}")

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """One row per text: counts of its hashed trigrams (blake2b, stable across runs)."""
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            if not text.strip():
                continue  # nothing to say: the zero vector
            padded = f"  {text.strip().lower()} "
            for j in range(len(padded) - 2):
                h = hashlib.blake2b(padded[j : j + 3].encode(), digest_size=4).digest()
                out[i, int.from_bytes(h, "little") % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)


def char_ngrams(argument: str, settings: Any) -> CharNgrams:
    """The factory: ``argument`` is the dimension ("" → 256)."""
    return CharNgrams(int(argument) if argument else 256)


def register(registry: EncoderFactories) -> None:
    """The ``chartsight.encoders`` entry point."""
    registry.add("char-ngrams", char_ngrams)
