"""Fusion: a case's image and text vectors become one vector, and queries land in the same space."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from retrieval.cases import Case
from retrieval.encoders import EncoderInfo, ImageEncoder, TextEncoder
from retrieval.index.errors import CaseIndexError
from retrieval.settings import FusionSettings


def mean_direction(vectors: np.ndarray) -> np.ndarray:
    """The unit-length mean of ``vectors`` (shape (n, dim), n ≥ 1): one vector (dim,) for the
    images of one case. A zero mean stays zero (its norm is floored at 1e-12)."""
    mean = vectors.mean(axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


class Fusion:
    """Turns a case's image and text vectors into one vector, and queries into the same space.

    ``concat``: ``[wi·image, wt·text] / sqrt(wi² + wt²)``: the inner product of two fused vectors is
    the weighted mean of their image and text cosines; a part missing on either side adds 0.
    ``sum``: ``normalise(wi·image + wt·text)`` in a space both towers share (CLIP-style), where a
    text query finds images. ``auto`` picks ``sum`` when both encoders report one space and
    dimension, else ``concat``; ``sum`` over two spaces raises CaseIndexError.
    """

    def __init__(self, settings: FusionSettings, text: EncoderInfo, image: EncoderInfo) -> None:
        self.settings = settings
        self.text_info, self.image_info = text, image
        shared = text.space == image.space and text.dim == image.dim
        mode = settings.mode
        if mode == "auto":
            mode = "sum" if shared else "concat"
        if mode == "sum" and not shared:
            raise CaseIndexError(
                f"fusion mode 'sum' needs image and text encoders in one space; {image.name} and "
                f"{text.name} are not (use mode 'concat')"
            )
        self.mode = mode
        self.dim = text.dim if mode == "sum" else text.dim + image.dim

    def fuse(
        self,
        text: np.ndarray | None,
        image: np.ndarray | None,
        image_weight: float | None = None,
        text_weight: float | None = None,
    ) -> np.ndarray:
        """Fused rows, float32 of shape (n, ``self.dim``), from text rows (n, text dim) and image
        rows (n, image dim); ``text`` or ``image`` may be None (or hold zero rows for missing
        parts). The weights default to the fusion settings'; a weight of 0 drops that part."""
        wi = self.settings.image_weight if image_weight is None else image_weight
        wt = self.settings.text_weight if text_weight is None else text_weight
        n = (text if text is not None else image).shape[0]  # type: ignore[union-attr]
        t = text if text is not None and wt > 0 else np.zeros((n, self.text_info.dim), np.float32)
        i = (
            image
            if image is not None and wi > 0
            else np.zeros((n, self.image_info.dim), np.float32)
        )
        if self.mode == "sum":
            out = wi * i + wt * t
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            return (out / np.maximum(norms, 1e-12)).astype(np.float32)
        scale = 1.0 / math.sqrt(wi * wi + wt * wt) if wi or wt else 0.0
        return (np.hstack([wi * i, wt * t]) * scale).astype(np.float32)


def encode_cases(
    cases: Sequence[Case], text: TextEncoder, image: ImageEncoder, fusion: Fusion
) -> np.ndarray:
    """Fused vectors of cases, float32 (len(cases), ``fusion.dim``): ``text`` encodes the
    summaries, ``image`` the images, each case's image vectors become their unit mean
    (``mean_direction``; zero for a case without images), and ``fusion`` joins the two. What
    ``CaseIndex.encode`` does, and what a worker of a distributed build does with the same
    encoders."""
    texts = text.encode_texts([c.summary for c in cases])
    images = np.zeros((len(cases), image.info.dim), dtype=np.float32)
    flat = [im for c in cases for im in c.images]
    if flat:
        vectors = image.encode_images(flat)
        at = 0
        for row, case in enumerate(cases):
            if case.images:
                images[row] = mean_direction(vectors[at : at + len(case.images)])
                at += len(case.images)
    return fusion.fuse(texts, images)
