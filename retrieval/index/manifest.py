"""Generations on disk: each a folder with the FAISS index, its ids and a manifest, made live by an
atomic switch of ``CURRENT``; and the vector space a manifest (or the database) records.

A generation folder ``gen-NNNNNN/`` holds ``index.faiss``, ``ids.npy`` (the int64 ids in the index)
and ``manifest.json``: the vector space (``vector_space``), the factory string, the count, SHA-256
checksums of the index file and of the sorted ids, the time written and the FAISS version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.encoders import EncoderInfo
from retrieval.index.errors import CaseIndexError, IndexMismatch
from retrieval.index.fusion import Fusion
from retrieval.index.kinds import faiss, index_ids

log = logging.getLogger(__name__)

FORMAT = 1  # the layout of generations and of the space record; a change means a rebuild

# the parts of a vector space, in the order a mismatch is reported
_SPACE_PARTS = ("format", "text_encoder", "image_encoder", "fusion", "dim", "metric")


def vector_space(text: EncoderInfo, image: EncoderInfo, fusion: Fusion) -> dict[str, Any]:
    """What the vectors depend on, as JSON-ready data: the format, both encoders (name, version,
    dimension, space, weights fingerprint), the fusion mode and weights, the fused dimension and
    the metric. Two indexes may be compared only when these are equal (``compare_space``)."""
    return {
        "format": FORMAT,
        "text_encoder": asdict(text),
        "image_encoder": asdict(image),
        "fusion": {
            "mode": fusion.mode,
            "image_weight": fusion.settings.image_weight,
            "text_weight": fusion.settings.text_weight,
        },
        "dim": fusion.dim,
        "metric": "inner_product",
    }


def compare_space(stored: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Raise IndexMismatch naming the first difference between two vector spaces (``stored`` at
    ``where``, ``wanted`` by the settings); return None when they are equal."""
    for part in _SPACE_PARTS:
        if stored.get(part) != wanted.get(part):
            have, want = _describe(stored.get(part)), _describe(wanted.get(part))
            raise IndexMismatch(
                f"the index at {where} was built with {part.replace('_', ' ')} {have}, but the "
                f"settings ask for {want}; searching it would compare vectors of different spaces. "
                "Rebuild it (`chartsight index build --rebuild`) or change the settings back."
            )


def _describe(part: Any) -> str:
    if isinstance(part, dict) and "name" in part:
        return f"{part['name']} ({part.get('version', '')})"
    if isinstance(part, dict):
        return ", ".join(f"{k} {v}" for k, v in part.items())
    return str(part)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (renames in it), to disk (``os.fsync``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# what CURRENT may name: a generation folder of this index, nothing else
_GENERATION_NAME = re.compile(r"gen-\d{6}")


def current_generation(root: Path) -> Path | None:
    """The live generation folder named by ``root/CURRENT``, or None when there is none yet, the
    folder it names is gone, or it names anything but a real ``gen-NNNNNN`` folder directly in
    ``root`` (a planted ``../elsewhere`` or a symbolic link is never followed; logged)."""
    pointer = root / "CURRENT"
    if not pointer.is_file() or pointer.is_symlink():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not _GENERATION_NAME.fullmatch(name):
        log.warning("ignored %s: it names %r, not a generation folder", pointer, name[:80])
        return None
    gen = root / name
    if gen.is_symlink() or not gen.is_dir():
        return None
    return gen


def read_generation(gen: Path, space: dict[str, Any]) -> tuple[Any, np.ndarray, str]:
    """(FAISS index, int64 ids it holds, factory string) of the generation ``gen``. Raises
    IndexMismatch when its manifest records another vector space than ``space``, and
    CaseIndexError when ``index.faiss`` does not match the manifest's checksum."""
    try:
        manifest = json.loads((gen / "manifest.json").read_text())
        stored_space, checksum, factory = (
            manifest["space"], manifest["index_sha256"], manifest["factory"]
        )  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        raise CaseIndexError(
            f"{gen / 'manifest.json'} cannot be read ({type(exc).__name__}); rebuild the index "
            "with `chartsight index build --rebuild`"
        ) from exc
    compare_space(stored_space, space, str(gen))
    index_file = gen / "index.faiss"
    if sha256_file(index_file) != checksum:
        raise CaseIndexError(
            f"{index_file} does not match its manifest's checksum (a damaged file); "
            "rebuild it with `chartsight index build --rebuild`"
        )
    index = faiss.read_index(str(index_file))
    ids = np.load(gen / "ids.npy", allow_pickle=False)
    if int(index.d) != int(space["dim"]) or len(ids) != int(index.ntotal):
        raise CaseIndexError(
            f"{index_file} holds vectors of dimension {index.d} ({index.ntotal} of them, "
            f"{len(ids)} ids), not the space's {space['dim']}: rebuild it with "
            "`chartsight index build --rebuild`"
        )
    return index, ids, factory


def write_generation(root: Path, index: Any, factory: str, space: dict[str, Any]) -> Path:
    """Write ``index`` as the next generation under ``root`` and make it live: files are written
    and fsynced in a hidden folder, renamed into place, then ``CURRENT`` is replaced atomically
    and older generations removed. A crash at any point leaves the previous generation live.
    Returns the new generation's folder. The caller holds the index's lock."""
    previous = current_generation(root)
    number = int(previous.name.split("-")[1]) + 1 if previous is not None else 1
    gen = root / f"gen-{number:06d}"
    tmp = root / f".{gen.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    faiss.write_index(index, str(tmp / "index.faiss"))
    ids = index_ids(index)
    np.save(tmp / "ids.npy", ids)
    manifest = {
        "space": space,
        "factory": factory,
        "count": int(index.ntotal),
        "index_sha256": sha256_file(tmp / "index.faiss"),
        "ids_sha256": hashlib.sha256(np.sort(ids).tobytes()).hexdigest(),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "faiss": faiss.__version__,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for name in ("index.faiss", "ids.npy", "manifest.json"):
        fsync_path(tmp / name)
    if gen.exists():
        # a crash after an earlier rename into place but before CURRENT named it: never live
        shutil.rmtree(gen)
    tmp.rename(gen)
    pointer_tmp = root / ".CURRENT.tmp"
    pointer_tmp.unlink(missing_ok=True)  # never write through a link planted there
    fd = os.open(pointer_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(gen.name)
    fsync_path(pointer_tmp)
    os.replace(pointer_tmp, root / "CURRENT")
    fsync_path(root)
    for old in root.glob("gen-*"):
        if old != gen:
            shutil.rmtree(old, ignore_errors=True)
    return gen
