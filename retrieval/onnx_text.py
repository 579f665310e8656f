"""Sentence-transformers text models run by ONNX Runtime, so that a question needs no torch.

A sentence-transformers folder whose modules are ``Transformer → Pooling (mean or CLS) →
[Normalize]`` is exported once to ONNX (``torch.onnx.export`` of its Hugging Face model, the one
time torch is imported) and kept in a cache folder with a sidecar JSON naming the weights'
fingerprint, the embedding size, the pooling and the maximum sequence length. Later processes load
the ONNX graph with ONNX Runtime and the folder's ``tokenizer.json`` with Hugging Face
``tokenizers``: about 0.3 s and 180 MB against about 5 s and 1 GB for torch +
sentence-transformers on a 2-core machine, with vectors equal to the torch ones within 1e-6
(measured on all-MiniLM-L6-v2; ``tests/retrieval/test_encoders.py`` checks it on every run).

The cache key is the folder's path and each file's size and modification time, so new weights in
the same place are exported again; the vector space (``EncoderInfo``) is the torch encoder's, so
an index built by one runtime is searched by the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from connectors.errors import ConfigurationError

log = logging.getLogger(__name__)
_LOADER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-session")

FORMAT = 1  # bump when the export or the sidecar changes
_MODULES = {
    "sentence_transformers.models.Transformer": "transformer",
    "sentence_transformers.models.Pooling": "pooling",
    "sentence_transformers.models.Normalize": "normalize",
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/chartsight/models`` (``~/.cache/chartsight/models``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "chartsight" / "models"


def cuda_present() -> bool:
    """Whether an NVIDIA device is visible, decided without importing torch: a ``/dev/nvidia<N>``
    node exists and ``CUDA_VISIBLE_DEVICES`` does not hide every device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def pipeline_of(folder: Path) -> dict[str, Any] | None:
    """The pooling a sentence-transformers folder uses, when ONNX Runtime can reproduce it:
    ``{"pooling": "mean" | "cls", "normalize": bool, "max_seq_length": int, "lower": bool}``;
    ``None`` for any other pipeline (Dense layers, max pooling, custom modules)."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        kinds = [_MODULES.get(m.get("type", "")) for m in modules]
        if kinds not in (["transformer", "pooling"], ["transformer", "pooling", "normalize"]):
            return None
        pooling_dir = folder / modules[1].get("path", "1_Pooling")
        pooling = json.loads((pooling_dir / "config.json").read_text())
        sbert = json.loads((folder / "sentence_bert_config.json").read_text())
        if not (folder / "tokenizer.json").is_file():
            return None
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True]
    mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(
        modes[0] if len(modes) == 1 else ""
    )
    if mode is None:
        return None
    return {
        "pooling": mode,
        "normalize": kinds[-1] == "normalize",
        "max_seq_length": int(sbert.get("max_seq_length") or 512),
        "lower": bool(sbert.get("do_lower_case", False)),
    }


def cache_key(folder: Path) -> str:
    """A hash of the folder's path and every file's name, size and modification time."""
    digest = hashlib.sha256(f"{FORMAT}:{folder.resolve()}".encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def export(folder: Path, target: Path) -> dict[str, Any]:
    """Export ``folder``'s Hugging Face model to ``target`` (``.onnx``) with torch, and write the
    sidecar ``target.with_suffix('.json')``: ``{"format", "fingerprint", "dim", "inputs"}`` plus
    the pipeline. Both files appear atomically (written aside, then renamed)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from retrieval.encoders import weights_fingerprint

    pipeline = pipeline_of(folder)
    if pipeline is None:
        raise ConfigurationError(f"{folder}: not a Transformer → Pooling model ONNX can run")
    model = SentenceTransformer(str(folder), device="cpu")
    fingerprint = weights_fingerprint(model)
    dimension = (
        getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    )
    auto_model: Any = model[0].auto_model
    auto_model.eval()
    tokenizer = model.tokenizer
    sample = tokenizer(["a", "a longer sample text"], padding=True, return_tensors="pt")
    inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in sample]

    class _Hidden(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *tensors: Any) -> Any:
            return self.inner(**dict(zip(inputs, tensors, strict=True))).last_hidden_state

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        axes = {name: {0: "batch", 1: "tokens"} for name in [*inputs, "last_hidden_state"]}
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python control flow
            torch.onnx.export(
                _Hidden(auto_model),
                tuple(sample[name] for name in inputs),
                str(onnx_path),
                input_names=inputs,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
            )
        meta = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "dim": int(dimension() or 0),
            "inputs": inputs,
            **pipeline,
        }
        (Path(tmp) / "meta.json").write_text(json.dumps(meta))
        os.replace(onnx_path, target)
        os.replace(Path(tmp) / "meta.json", target.with_suffix(".json"))
    return meta


class OnnxTextEncoder:
    """A sentence-transformers folder's text tower on ONNX Runtime (CPU); see the module doc.

    ``info`` is the one the torch encoder of the same folder would report (name, version with the
    weights' fingerprint, dimension, space). Raises ``ConfigurationError`` when the folder cannot
    run here (other pipeline, export failure)."""

    def __init__(
        self, folder: Path, cache_dir: Path, name: str, version_tag: str, batch_size: int
    ) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        from retrieval.encoders import EncoderInfo

        target = cache_dir / f"{folder.name}-{cache_key(folder)}.onnx"
        meta_path = target.with_suffix(".json")
        meta = _read_meta(meta_path) if target.is_file() else None
        if meta is None:
            log.info("exporting %s to ONNX (once) at %s", folder, target)
            try:
                meta = export(folder, target)
            except ConfigurationError:
                raise
            except Exception as exc:  # torch.onnx raises many kinds
                raise ConfigurationError(f"could not export {folder} to ONNX: {exc}") from exc
        self.meta = meta
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(int(meta["max_seq_length"]))
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=pad_id if pad_id is not None else 0)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        # the session (0.2–0.7 s here: reading and optimising 90 MB of graph) is made in a
        # background thread, which onnxruntime lets run beside Python: a cold question reads
        # its record meanwhile, and waits only when it first encodes
        self._session: Future[Any] = _LOADER.submit(
            onnxruntime.InferenceSession, str(target), options, providers=["CPUExecutionProvider"]
        )
        self.info = EncoderInfo(
            name=name,
            version=f"{version_tag}, weights {meta['fingerprint']}",
            dim=int(meta["dim"]),
            space=f"{name}:{meta['fingerprint']}",
        )
        self._lock = threading.Lock()

    @property
    def session(self) -> Any:
        """The ``onnxruntime.InferenceSession``, waited for when still being made; raises what
        making it raised (an unreadable model file)."""
        return self._session.result()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text, float32 ``(len(texts), dim)``, pooled and (if the model does)
        L2-normalised as sentence-transformers would."""
        from retrieval.encoders import _normalise

        if not texts:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        rows = []
        with self._lock:
            for start in range(0, len(texts), self.batch_size):
                rows.append(self._batch(list(texts[start : start + self.batch_size])))
        vectors = np.concatenate(rows)
        return _normalise(vectors) if self.meta["normalize"] else vectors

    def _batch(self, texts: list[str]) -> np.ndarray:
        if self.meta.get("lower"):
            texts = [t.lower() for t in texts]
        encodings = self.tokenizer.encode_batch(texts)
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        session = self.session
        inputs = {i.name: arrays[i.name] for i in session.get_inputs()}
        hidden = session.run(None, inputs)[0]
        if self.meta["pooling"] == "cls":
            return hidden[:, 0].astype(np.float32)
        mask = arrays["attention_mask"][..., None].astype(np.float32)
        summed = (hidden * mask).sum(axis=1)
        return (summed / np.maximum(mask.sum(axis=1), 1e-9)).astype(np.float32)


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None
