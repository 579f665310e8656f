"""The similar-case index: fused case vectors in FAISS, case metadata and vectors in SQL.

Layout of an index folder::

    cases.db            SQLite (or any SQLAlchemy URL): one row per case, with its fused vector
    CURRENT             the name of the live generation, replaced atomically
    gen-000007/         index.faiss, ids.npy (FAISS ids in the index), manifest.json

SQL is the source of truth; the FAISS file is derived from it. A build commits cases to SQL in
chunks, then writes a new generation and switches ``CURRENT`` to it; a crash at any point leaves
the previous generation live, and the next open brings it up to date from SQL without encoding
anything again. The manifest names the encoders (with a fingerprint of their weights), the fusion,
the dimensions and a checksum, so that an index is never searched with vectors of another space.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    Column,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    insert,
    select,
)
from sqlalchemy.engine import Engine

from connectors.errors import ChartSightError
from retrieval.cases import Case, CasePrivacy, generalised_summary
from retrieval.encoders import EncoderInfo, ImageEncoder, TextEncoder
from retrieval.settings import FusionSettings, IndexSettings

log = logging.getLogger(__name__)

# faiss's bundled stubs lag behind its SWIG API (SearchParametersHNSW, keyword constructors)
faiss: Any = importlib.import_module("faiss")

FORMAT = 1
EXACT_LIMIT = 50_000  # below this many cases, 'auto' searches exactly


class CaseIndexError(ChartSightError):
    """The case index cannot be used as asked."""


class IndexMismatch(CaseIndexError):
    """The index was built with other encoders, fusion or dimensions than the settings ask for."""


metadata = MetaData()
cases_t = Table(
    "cases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # the FAISS id
    Column("key", String(512), nullable=False, unique=True),
    Column("patient_id", String(256), nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("sex", String(16), index=True),
    Column("age_band", String(16), index=True),
    Column("modalities", String(256), nullable=False, default=""),  # ",CT,MR," for LIKE
    Column("label", String(256)),
    Column("summary", Text, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("has_image", Integer, nullable=False),
    Column("vector", LargeBinary, nullable=False),  # float32, the fused vector
    Column("updated_at", String(32), nullable=False),
)
# each case's patient identifiers, to leave a patient's own cases out across sources
idents_t = Table(
    "case_identifiers",
    metadata,
    Column("id", Integer, nullable=False, index=True),  # the case's FAISS id
    Column("identifier", String(512), nullable=False, index=True),
)
# a small greyscale preview of each case's first image, for case cards (PNG, at most 128 px)
thumbs_t = Table(
    "case_thumbnails",
    metadata,
    Column("key", String(512), primary_key=True),
    Column("png", LargeBinary, nullable=False),
)
meta_t = Table(
    "index_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


def _thumbnail(case: Case) -> bytes:
    picture = case.images[0].convert("L")
    picture.thumbnail((128, 128))
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --- fusion ----------------------------------------------------------------------------------------


class Fusion:
    """Turns a case's image and text vectors into one vector, and queries into the same space.

    ``concat``: ``[wi·image, wt·text] / sqrt(wi² + wt²)``: the inner product of two fused vectors is
    the weighted mean of their image and text cosines; a part missing on either side adds 0.
    ``sum``: ``normalise(wi·image + wt·text)`` in a space both towers share (CLIP-style), where a
    text query finds images.
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
        """Fused rows; ``text`` or ``image`` may be None (or hold zero rows for missing parts)."""
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


# --- index kinds -------------------------------------------------------------------------------


def auto_factory(n: int, dim: int, memory_budget_mb: int) -> str:
    """Exact below 50k vectors; above, IVF with 8-bit scalar-quantised lists (a quarter of the
    memory of float vectors, and faster to scan); IVF-PQ when even that would not fit the budget."""
    if n < EXACT_LIMIT:
        return "Flat"
    nlist = 2 ** round(math.log2(max(256.0, min(65536.0, 4 * math.sqrt(n)))))
    if n * dim > memory_budget_mb * 2**20:
        m = next((m for m in (64, 48, 32, 24, 16, 8) if dim % m == 0 and m <= dim // 4), 8)
        return f"IVF{nlist},PQ{m}"
    return f"IVF{nlist},SQ8"


def _is_ivf(index: Any) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def _new_index(factory: str, dim: int) -> Any:
    """An empty CPU index that takes our own int64 ids."""
    if "RFlat" in factory or "Refine" in factory:
        # IndexRefine keeps its vectors by position: it can neither take our ids nor remove one
        raise CaseIndexError(
            f"{factory!r}: refinement stages are not supported by the case index; use e.g. "
            "'IVF4096,SQ8' or 'IVF4096,PQ64'"
        )
    try:
        probe = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise CaseIndexError(
            f"FAISS does not understand the factory string {factory!r}: {exc}"
        ) from exc
    if _is_ivf(probe) or factory.startswith("IDMap"):
        return probe
    return faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)


@dataclass(frozen=True)
class CaseFilter:
    """Which cases a search may return; applied inside the FAISS search (an IDSelector)."""

    exclude_patient: str | None = None
    exclude_identifiers: tuple[str, ...] = ()  # also leave out cases of patients with these
    modality: str | None = None
    sex: str | None = None
    age_band: str | None = None

    @property
    def narrows(self) -> bool:
        return bool(self.modality or self.sex or self.age_band)


@dataclass(frozen=True)
class CaseHit:
    """A similar case found by a search."""

    key: str
    patient_id: str
    score: float
    summary: str
    sex: str | None
    age_band: str | None
    modalities: tuple[str, ...]
    label: str | None
    kind: str


def generalised_hit(hit: CaseHit, n: int) -> CaseHit:
    """``hit`` as a caller who may read only one patient's record sees it: no case key and no
    patient id (the case is "similar-case-<n>"), the summary ``generalised_summary``'s; sex, age
    band (90+ pooled), modalities, label, kind and score are kept."""
    band = hit.age_band
    if band is not None and band[:2].isdigit() and int(band.split("-")[0].rstrip("+")) >= 90:
        band = "90+"
    return replace(
        hit,
        key=f"similar-case-{n}",
        patient_id="",
        summary=generalised_summary(hit.summary),
        age_band=band,
    )


def shown_to(hits: list[CaseHit], privacy: CasePrivacy) -> list[CaseHit]:
    """``hits`` as a caller with ``privacy`` may see them: as they are ("full"), or each
    ``generalised_hit`` ("generalised", numbered from 1 in rank order)."""
    if privacy == "generalised":
        return [generalised_hit(h, n) for n, h in enumerate(hits, 1)]
    return hits


@dataclass(frozen=True)
class BuildStats:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0


def _sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CaseIndex:
    """Similar cases: add, update and remove by key; search with filters; save generations."""

    def __init__(
        self,
        path: Path,
        settings: IndexSettings,
        fusion_settings: FusionSettings,
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
        *,
        sql_url: str | None = None,
    ) -> None:
        self.path = path
        self.settings = settings
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.fusion = Fusion(fusion_settings, text_encoder.info, image_encoder.info)
        path.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(sql_url or f"sqlite:///{path / 'cases.db'}")
        metadata.create_all(self.engine)
        self._lock = threading.RLock()
        self._gpu: Any = None
        self._gpu_stale = True
        self._check_space()
        self.index, self.factory = self._open()

    # --- identity of the vector space ---

    def space(self) -> dict[str, Any]:
        """What the vectors depend on: compared on every open."""
        return {
            "format": FORMAT,
            "text_encoder": asdict(self.text_encoder.info),
            "image_encoder": asdict(self.image_encoder.info),
            "fusion": {
                "mode": self.fusion.mode,
                "image_weight": self.fusion.settings.image_weight,
                "text_weight": self.fusion.settings.text_weight,
            },
            "dim": self.fusion.dim,
            "metric": "inner_product",
        }

    def _check_space(self) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(select(meta_t.c.value).where(meta_t.c.name == "space")).first()
            if row is None:
                conn.execute(insert(meta_t).values(name="space", value=json.dumps(self.space())))
                return
        stored = json.loads(row[0])
        _compare_space(stored, self.space(), str(self.path))

    # --- generations on disk ---

    def _current(self) -> Path | None:
        pointer = self.path / "CURRENT"
        if not pointer.is_file():
            return None
        gen = self.path / pointer.read_text().strip()
        return gen if gen.is_dir() else None

    def _open(self) -> tuple[Any, str]:
        gen = self._current()
        rows = self._sql_state()
        if gen is None:
            index, factory = self._build_from_sql(self._choose_factory(len(rows)))
            if rows:
                self.save(index=index, factory=factory)
            return index, factory
        manifest = json.loads((gen / "manifest.json").read_text())
        _compare_space(manifest["space"], self.space(), str(gen))
        index_file = gen / "index.faiss"
        if _sha256_file(index_file) != manifest["index_sha256"]:
            raise CaseIndexError(
                f"{index_file} does not match its manifest's checksum (a damaged file); "
                "rebuild it with `chartsight index build --rebuild`"
            )
        index = faiss.read_index(str(index_file))
        ids = np.load(gen / "ids.npy")
        factory = manifest["factory"]
        in_index = set(ids.tolist())
        in_sql = set(rows)
        if in_index != in_sql:
            # a build committed to SQL but did not finish its generation: catch up, no encoding
            log.info(
                "index %s is behind its database (%d to add, %d to remove); catching up",
                gen.name,
                len(in_sql - in_index),
                len(in_index - in_sql),
            )
            self._apply(index, add=sorted(in_sql - in_index), remove=sorted(in_index - in_sql))
            self.save(index=index, factory=factory)
        return index, factory

    def _sql_state(self) -> dict[int, str]:
        with self.engine.connect() as conn:
            return dict(conn.execute(select(cases_t.c.id, cases_t.c.fingerprint)).all())

    def _choose_factory(self, n: int) -> str:
        if self.settings.factory != "auto":
            return self.settings.factory
        return auto_factory(n, self.fusion.dim, self.settings.memory_budget_mb)

    def _vectors(self, ids: Sequence[int]) -> np.ndarray:
        out = np.zeros((len(ids), self.fusion.dim), dtype=np.float32)
        pos = {i: n for n, i in enumerate(ids)}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 5000):
                chunk = list(ids[start : start + 5000])
                for cid, blob in conn.execute(
                    select(cases_t.c.id, cases_t.c.vector).where(cases_t.c.id.in_(chunk))
                ):
                    out[pos[cid]] = np.frombuffer(blob, dtype=np.float32)
        return out

    def _build_from_sql(self, factory: str) -> tuple[Any, str]:
        """A fresh index of the cases in SQL, and the factory it really has."""
        index = _new_index(factory, self.fusion.dim)
        ids = sorted(self._sql_state())
        if not index.is_trained:
            ivf = faiss.try_extract_index_ivf(index)
            nlist = ivf.nlist if ivf is not None else 1
            # k-means on 64 points per list and 10 iterations: what FAISS's guidelines need for
            # good lists, at a fraction of the default cost on a small CPU
            most = max(64 * nlist, 65_536)
            sample = (
                ids
                if len(ids) <= most
                else list(np.random.default_rng(0).choice(ids, most, replace=False))
            )
            vectors = self._vectors(sorted(sample))
            if ivf is not None:
                ivf.cp.niter = 10
            if len(vectors) < 39 * nlist:  # FAISS's own minimum for k-means
                log.warning(
                    "%s needs %d cases to train, the index has %d: searching exactly until then",
                    factory,
                    39 * nlist,
                    len(vectors),
                )
                index, factory = _new_index("Flat", self.fusion.dim), "Flat"
            else:
                index.train(vectors)
        for start in range(0, len(ids), 50_000):
            chunk = ids[start : start + 50_000]
            index.add_with_ids(self._vectors(chunk), np.asarray(chunk, dtype=np.int64))
        return index, factory

    def _apply(self, index: Any, add: Sequence[int], remove: Sequence[int]) -> Any:
        if remove:
            try:
                index.remove_ids(np.asarray(remove, dtype=np.int64))
            except RuntimeError:
                # HNSW cannot delete: rebuild from SQL (still no encoding)
                return self._build_from_sql(self.factory)[0]
        for start in range(0, len(add), 50_000):
            chunk = list(add[start : start + 50_000])
            index.add_with_ids(self._vectors(chunk), np.asarray(chunk, dtype=np.int64))
        return index

    def save(self, *, index: Any = None, factory: str | None = None) -> Path:
        """Write a new generation and make it live atomically; older ones are removed."""
        index = index if index is not None else self.index
        factory = factory or self.factory
        with self._lock:
            previous = self._current()
            number = int(previous.name.split("-")[1]) + 1 if previous is not None else 1
            gen = self.path / f"gen-{number:06d}"
            tmp = self.path / f".{gen.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            faiss.write_index(index, str(tmp / "index.faiss"))
            ids = _index_ids(index)
            np.save(tmp / "ids.npy", ids)
            manifest = {
                "space": self.space(),
                "factory": factory,
                "count": int(index.ntotal),
                "index_sha256": _sha256_file(tmp / "index.faiss"),
                "ids_sha256": hashlib.sha256(np.sort(ids).tobytes()).hexdigest(),
                "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "faiss": faiss.__version__,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            for name in ("index.faiss", "ids.npy", "manifest.json"):
                with (tmp / name).open("rb") as fh:
                    os.fsync(fh.fileno())
            tmp.rename(gen)
            pointer_tmp = self.path / ".CURRENT.tmp"
            pointer_tmp.write_text(gen.name)
            with pointer_tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(pointer_tmp, self.path / "CURRENT")
            _fsync_dir(self.path)
            for old in self.path.glob("gen-*"):
                if old != gen:
                    shutil.rmtree(old, ignore_errors=True)
            return gen

    # --- changing the cases ---

    def thumbnail(self, key: str) -> bytes | None:
        """The PNG preview of a case's first image, if it has one."""
        with self.engine.connect() as conn:
            found = conn.execute(select(thumbs_t.c.png).where(thumbs_t.c.key == key)).first()
        return bytes(found[0]) if found else None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def fingerprints(self) -> dict[str, str]:
        """Key → fingerprint of every case held."""
        with self.engine.connect() as conn:
            return dict(conn.execute(select(cases_t.c.key, cases_t.c.fingerprint)).all())

    def encode(self, cases: Sequence[Case]) -> np.ndarray:
        """Fused vectors of cases: text of the summaries, mean of each case's image vectors."""
        text = self.text_encoder.encode_texts([c.summary for c in cases])
        image = np.zeros((len(cases), self.image_encoder.info.dim), dtype=np.float32)
        flat = [im for c in cases for im in c.images]
        if flat:
            vectors = self.image_encoder.encode_images(flat)
            at = 0
            for row, case in enumerate(cases):
                if case.images:
                    mean = vectors[at : at + len(case.images)].mean(axis=0)
                    image[row] = mean / max(float(np.linalg.norm(mean)), 1e-12)
                    at += len(case.images)
        return self.fusion.fuse(text, image)

    def upsert(self, cases: Sequence[Case], vectors: np.ndarray | None = None) -> BuildStats:
        """Add new cases and replace changed ones (by key), in one SQL transaction."""
        if not cases:
            return BuildStats()
        held = self.fingerprints()
        todo = [c for c in cases if held.get(c.key) != c.fingerprint()]
        unchanged = len(cases) - len(todo)
        if not todo:
            return BuildStats(unchanged=unchanged)
        if vectors is None:
            vectors = self.encode(todo)
        else:
            keep = {c.key for c in todo}
            vectors = vectors[[i for i, c in enumerate(cases) if c.key in keep]]
        if vectors.shape != (len(todo), self.fusion.dim):
            raise CaseIndexError(
                f"expected vectors of shape {(len(todo), self.fusion.dim)}, got {vectors.shape}"
            )
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            with self.engine.begin() as conn:
                old = dict(
                    conn.execute(
                        select(cases_t.c.key, cases_t.c.id).where(
                            cases_t.c.key.in_([c.key for c in todo])
                        )
                    ).all()
                )
                if old:
                    conn.execute(delete(cases_t).where(cases_t.c.id.in_(list(old.values()))))
                    conn.execute(delete(idents_t).where(idents_t.c.id.in_(list(old.values()))))
                conn.execute(delete(thumbs_t).where(thumbs_t.c.key.in_([c.key for c in todo])))
                for case in todo:
                    if case.images:
                        conn.execute(insert(thumbs_t).values(key=case.key, png=_thumbnail(case)))
                new_ids = []
                for case, vec in zip(todo, vectors, strict=True):
                    result = conn.execute(
                        insert(cases_t).values(
                            key=case.key,
                            patient_id=case.patient_id,
                            kind=case.kind,
                            sex=case.sex,
                            age_band=case.age_band,
                            modalities="," + ",".join(case.modalities) + ","
                            if case.modalities
                            else "",
                            label=case.label,
                            summary=case.summary,
                            fingerprint=case.fingerprint(),
                            has_image=int(bool(case.images)),
                            vector=np.asarray(vec, dtype=np.float32).tobytes(),
                            updated_at=now,
                        )
                    )
                    new_id = int(result.inserted_primary_key[0])  # type: ignore[index]
                    new_ids.append(new_id)
                    for ident in case.identifiers:
                        conn.execute(insert(idents_t).values(id=new_id, identifier=ident))
            self._grow_or_apply(add=new_ids, remove=list(old.values()))
        return BuildStats(added=len(todo) - len(old), updated=len(old), unchanged=unchanged)

    def remove(self, keys: Iterable[str]) -> int:
        """Remove cases by key; returns how many were held."""
        keys = list(keys)
        with self._lock:
            with self.engine.begin() as conn:
                ids = [
                    int(i)
                    for (i,) in conn.execute(select(cases_t.c.id).where(cases_t.c.key.in_(keys)))
                ]
                if ids:
                    conn.execute(delete(cases_t).where(cases_t.c.id.in_(ids)))
                    conn.execute(delete(idents_t).where(idents_t.c.id.in_(ids)))
                    conn.execute(delete(thumbs_t).where(thumbs_t.c.key.in_(keys)))
            if ids:
                self._grow_or_apply(add=[], remove=ids)
        return len(ids)

    def _grow_or_apply(self, add: list[int], remove: list[int]) -> None:
        wanted = self._choose_factory(int(self.index.ntotal) + len(add) - len(remove))
        if wanted != self.factory:
            # the kind changed with size (exact → IVF), or an IVF index can now be trained
            self.index, self.factory = self._build_from_sql(wanted)
        else:
            self.index = self._apply(self.index, add, remove)
        self._gpu_stale = True

    # --- search ---

    def _selector(self, flt: CaseFilter) -> tuple[Any, set[int] | None, bool]:
        """(selector, ids excluded by a small exclusion, whether nothing at all is allowed)."""
        c = cases_t.c
        if flt.narrows:
            query = select(c.id)
            if flt.modality:
                query = query.where(c.modalities.like(f"%,{flt.modality.upper()},%"))
            if flt.sex:
                query = query.where(c.sex == flt.sex.lower())
            if flt.age_band:
                query = query.where(c.age_band == flt.age_band)
            if flt.exclude_patient:
                query = query.where(c.patient_id != flt.exclude_patient)
            if flt.exclude_identifiers:
                query = query.where(c.id.not_in(self._with_identifiers(flt.exclude_identifiers)))
            with self.engine.connect() as conn:
                allowed = np.array([i for (i,) in conn.execute(query)], dtype=np.int64)
            return faiss.IDSelectorBatch(allowed), None, len(allowed) == 0
        if flt.exclude_patient or flt.exclude_identifiers:
            own: Any = select(c.id).where(c.patient_id == (flt.exclude_patient or ""))
            if flt.exclude_identifiers:
                own = own.union(self._with_identifiers(flt.exclude_identifiers))
            with self.engine.connect() as conn:
                excluded = sorted({int(i) for (i,) in conn.execute(own)})
            if excluded:
                batch = faiss.IDSelectorBatch(np.array(excluded, dtype=np.int64))
                selector = faiss.IDSelectorNot(batch)
                selector.referenced = batch  # keep the inner selector alive
                return selector, set(excluded), False
        return None, None, False

    @staticmethod
    def _with_identifiers(identifiers: Sequence[str]) -> Any:
        """Ids of the cases whose patient carries one of ``identifiers``."""
        return select(idents_t.c.id).where(idents_t.c.identifier.in_(list(identifiers)))

    def _params(self, selector: Any) -> Any:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            return faiss.SearchParametersIVF(
                sel=selector, nprobe=min(self.settings.nprobe, ivf.nlist)
            )
        if "HNSW" in self.factory:
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.settings.ef_search)
        return faiss.SearchParameters(sel=selector)

    def _gpu_index(self) -> Any:
        if not self.settings.use_gpu or faiss.get_num_gpus() == 0:
            return None
        if self._gpu_stale or self._gpu is None:
            if faiss.get_num_gpus() > 1:
                options = faiss.GpuMultipleClonerOptions()
                options.shard = True
                self._gpu = faiss.index_cpu_to_all_gpus(self.index, co=options)
            else:
                self._resources = faiss.StandardGpuResources()
                self._gpu = faiss.index_cpu_to_gpu(self._resources, 0, self.index)
            ivf = faiss.try_extract_index_ivf(self.index)
            if ivf is not None:
                faiss.GpuParameterSpace().set_index_parameter(
                    self._gpu, "nprobe", self.settings.nprobe
                )
            self._gpu_stale = False
        return self._gpu

    def search_vectors(
        self, queries: np.ndarray, k: int = 5, flt: CaseFilter | None = None
    ) -> list[list[tuple[int, float]]]:
        """(FAISS id, score) of the best ``k`` allowed cases for each query row."""
        flt = flt or CaseFilter()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self._lock:
            if self.index.ntotal == 0:
                return [[] for _ in range(len(queries))]
            selector, excluded, nothing = self._selector(flt)
            if nothing:
                return [[] for _ in range(len(queries))]
            gpu = self._gpu_index()
            if gpu is not None and (selector is None or excluded is not None):
                # GPU indexes ignore IDSelectors: a small exclusion set is searched exactly by
                # asking for k + |excluded| and dropping them; allow-lists go to the CPU index.
                extra = len(excluded or ())
                scores, ids = gpu.search(queries, min(k + extra, int(self.index.ntotal)))
            else:
                params = self._params(selector)
                scores, ids = self.index.search(
                    queries, min(k, int(self.index.ntotal)), params=params
                )
        out = []
        for row_ids, row_scores in zip(ids, scores, strict=True):
            hits = [
                (int(i), float(s))
                for i, s in zip(row_ids, row_scores, strict=True)
                if i >= 0 and not (excluded and int(i) in excluded)
            ]
            out.append(hits[:k])
        return out

    def hits(self, found: list[tuple[int, float]]) -> list[CaseHit]:
        """Case rows for search results, in their order."""
        if not found:
            return []
        c = cases_t.c
        with self.engine.connect() as conn:
            rows = {
                r.id: r
                for r in conn.execute(
                    select(
                        c.id,
                        c.key,
                        c.patient_id,
                        c.summary,
                        c.sex,
                        c.age_band,
                        c.modalities,
                        c.label,
                        c.kind,
                    ).where(c.id.in_([i for i, _ in found]))
                )
            }
        return [
            CaseHit(
                key=rows[i].key,
                patient_id=rows[i].patient_id,
                score=score,
                summary=rows[i].summary,
                sex=rows[i].sex,
                age_band=rows[i].age_band,
                modalities=tuple(m for m in rows[i].modalities.split(",") if m),
                label=rows[i].label,
                kind=rows[i].kind,
            )
            for i, score in found
            if i in rows
        ]

    def similar(
        self,
        case: Case,
        k: int = 5,
        flt: CaseFilter | None = None,
        *,
        image_weight: float | None = None,
        text_weight: float | None = None,
    ) -> list[CaseHit]:
        """Cases most like ``case`` (its images and summary, fused as configured)."""
        text = self.text_encoder.encode_texts([case.summary])
        image = None
        if case.images:
            vectors = self.image_encoder.encode_images(case.images)
            mean = vectors.mean(axis=0, keepdims=True)
            image = mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        query = self.fusion.fuse(text, image, image_weight, text_weight)
        return self.hits(self.search_vectors(query, k, flt)[0])

    def search_text(self, text: str, k: int = 5, flt: CaseFilter | None = None) -> list[CaseHit]:
        """Cases matching a text query. With a shared image-text space (``sum`` fusion) this
        reaches images too; with ``concat`` it compares with the case summaries only."""
        vec = self.text_encoder.encode_texts([text])
        if self.fusion.mode == "sum":
            query = vec
        else:
            query = self.fusion.fuse(vec, None, image_weight=0.0, text_weight=1.0)
        return self.hits(self.search_vectors(query, k, flt)[0])


def _index_ids(index: Any) -> np.ndarray:
    """The int64 ids an index holds."""
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        invlists = ivf.invlists
        parts = []
        for lst in range(ivf.nlist):
            size = invlists.list_size(lst)
            if size:
                ptr = invlists.get_ids(lst)
                parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                invlists.release_ids(lst, ptr)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    raise CaseIndexError(f"cannot list the ids of a {type(index).__name__}")


def _compare_space(stored: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Raise IndexMismatch naming the first difference between two vector spaces."""
    for part in ("format", "text_encoder", "image_encoder", "fusion", "dim", "metric"):
        if stored.get(part) != wanted.get(part):
            have, want = stored.get(part), wanted.get(part)
            have, want = _describe(have), _describe(want)
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
