"""Settings of the retrieval layer: encoders, ranking, fusion and the case index."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator


class EncoderSettings(BaseModel):
    """Which encoders embed text and images, and how they run."""

    text: str = Field(
        default="minilm",
        description=(
            "Text encoder: 'minilm' (the packaged all-MiniLM-L6-v2, offline), "
            "'sentence-transformers:<name or path>' (MedCPT, BioLORD, ...), 'biomedclip', "
            "'open_clip:<model>[@<pretrained tag or checkpoint>]', or a plug-in's name."
        ),
    )
    image: str = Field(
        default="efficientnet-lite0",
        description=(
            "Image encoder: 'efficientnet-lite0' (packaged ImageNet weights, offline), "
            "'timm:<model>[@<checkpoint>]', 'biomedclip', 'open_clip:<model>[@<pretrained>]' "
            "(also 'open_clip:local-dir:<folder>'), or a plug-in's name."
        ),
    )
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda:0'.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="'auto': fp16 on CUDA, fp32 on CPU."
    )
    batch_size: int = Field(
        default=16, ge=1, description="Images or texts per forward pass (CPU: small is faster)."
    )
    runtime: Literal["auto", "torch", "onnx"] = Field(
        default="auto",
        description=(
            "How sentence-transformers text models in a local folder ('minilm', "
            "'sentence-transformers:<folder>') run: 'onnx' (exported once, then ONNX Runtime: "
            "no torch import, fast to load), 'torch', or 'auto' (ONNX on CPU when the model's "
            "pipeline allows it, torch on CUDA)."
        ),
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where ONNX exports are kept (default <home>/models, else "
        "~/.cache/chartsight/models).",
    )


class FusionSettings(BaseModel):
    """How a case's image and text vectors become one vector."""

    image_weight: float = Field(default=0.5, ge=0.0)
    text_weight: float = Field(default=0.5, ge=0.0)
    mode: Literal["auto", "concat", "sum"] = Field(
        default="auto",
        description=(
            "'concat': weighted concatenation (any two encoders; the inner product is the "
            "weighted sum of the image and text cosines); 'sum': weighted sum in one shared space "
            "(CLIP-style encoders only; allows text-to-image queries); 'auto': sum when the "
            "image and text encoders share a space, else concat."
        ),
    )

    @model_validator(mode="after")
    def _some_weight(self) -> FusionSettings:
        if self.image_weight + self.text_weight <= 0:
            raise ValueError("fusion needs a positive image_weight or text_weight")
        return self


class RankSettings(BaseModel):
    """Hybrid ranking of chart evidence for a question."""

    lexical_weight: float = Field(default=0.35, ge=0.0, description="BM25, scaled to [0, 1].")
    dense_weight: float = Field(default=0.35, ge=0.0, description="Embedding cosine.")
    code_weight: float = Field(
        default=0.3, ge=0.0, description="Evidence carrying a code the question's words map to."
    )
    category_weight: float = Field(
        default=0.15, ge=0.0, description="Evidence of a category the question names."
    )
    recency_weight: float = Field(default=0.15, ge=0.0)
    active_weight: float = Field(
        default=0.4, ge=0.0, description="Active items, when the question asks what holds now."
    )
    recent_boost: float = Field(
        default=3.0, ge=1.0, description="Recency weight factor for 'last', 'latest', 'current'."
    )
    half_life_days: float = Field(
        default=365.0, gt=0, description="Age at which recency counts half; from the newest item."
    )
    dense_candidates: int = Field(
        default=200,
        ge=0,
        description=(
            "Most lines embedded per question: on a larger chart, the best by the other parts, "
            "newest dense_per_series of each observation series; the rest of a series takes "
            "the score of its newest embedded line. 0: embed every line."
        ),
    )
    dense_per_series: int = Field(
        default=3,
        ge=1,
        description="Newest lines of one series (same category and codes) that may be embedded.",
    )
    token_budget: int = Field(default=1500, ge=1, description="Tokens of evidence handed on.")
    max_items: int = Field(default=40, ge=1)
    keep_line_embeddings: bool = Field(
        default=True,
        description=(
            "Keep the embedded store's chart-line embeddings on disk "
            "(<encoders.cache_dir>/line-embeddings.sqlite3), so a new process does not embed "
            "them again. Never questions, never lines read from a FHIR server or an EHR."
        ),
    )


class IndexSettings(BaseModel):
    """The similar-case index."""

    path: Path | None = Field(
        default=None, description="Folder of the index; default <home>/index."
    )
    factory: str = Field(
        default="auto",
        description=(
            "FAISS factory string ('Flat', 'IVF1024,Flat', 'HNSW32', 'IVF4096,PQ64', ...), or "
            "'auto': exact below 50k cases, IVF above, IVF-PQ when the vectors would not fit "
            "memory_budget_mb."
        ),
    )
    memory_budget_mb: int = Field(default=4096, ge=16)
    nprobe: int = Field(default=32, ge=1, description="IVF lists visited per query.")
    ef_search: int = Field(default=128, ge=1, description="HNSW search breadth.")
    use_gpu: bool = Field(default=True, description="Move the index to GPUs when FAISS sees any.")
    max_images_per_case: int = Field(default=4, ge=0)
    case_kind: Literal["patient", "study"] = Field(
        default="patient",
        description="'patient': one case per patient; 'study': one per imaging study as well.",
    )


class RetrievalSettings(BaseModel):
    """Everything the retrieval layer needs."""

    encoders: EncoderSettings = EncoderSettings()
    fusion: FusionSettings = FusionSettings()
    rank: RankSettings = RankSettings()
    index: IndexSettings = IndexSettings()
