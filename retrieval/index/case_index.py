"""``CaseIndex``: the similar-case index, built from cases and searched with filters.

SQL (``schema``, ``rows``) is the source of truth; the FAISS index (``kinds``) is derived from it
and saved as generations (``manifest``). Opening an index checks its vector space, loads the live
generation and catches up with SQL without encoding anything again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, insert, select
from sqlalchemy.engine import Engine

from common.schema import create_schema
from retrieval.cases import Case
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.index import filters, kinds, manifest, rows
from retrieval.index.errors import CaseIndexError
from retrieval.index.fusion import Fusion, encode_cases, mean_direction
from retrieval.index.hits import CaseFilter, CaseHit
from retrieval.index.schema import meta_t, metadata
from retrieval.settings import FusionSettings, IndexSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildStats:
    """What one ``CaseIndex.upsert`` did, in cases: ``added`` (new keys), ``updated`` (keys whose
    fingerprint changed), ``unchanged`` (same fingerprint, not encoded) and ``removed``."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0


class CaseIndex:
    """Similar cases: add, update and remove by key; search with filters; save generations.

    ``path`` is the index folder (``cases.db`` there unless ``sql_url`` names another database).
    Opening raises IndexMismatch when the folder was built in another vector space, and
    CaseIndexError when its live generation is damaged. Thread-safe: changes and searches hold
    one lock.
    """

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
        create_schema(self.engine, metadata)
        self._lock = threading.RLock()
        self._gpu: Any = None
        self._gpu_resources: Any = None
        self._gpu_stale = True
        self._check_space()
        # which generation is held in memory: its folder's name, inode and change time (a rebuild
        # starts numbering again at gen-000001 in a new folder, so the name alone is not enough)
        self._held: tuple[str, int, int] | None = None
        self.index, self.factory = self._open()

    # --- identity of the vector space ---

    def space(self) -> dict[str, Any]:
        """What the vectors depend on (``manifest.vector_space``): compared on every open."""
        return manifest.vector_space(self.text_encoder.info, self.image_encoder.info, self.fusion)

    def _check_space(self) -> None:
        """Record the space in a new database; raise IndexMismatch when a database has another."""
        with self.engine.begin() as conn:
            row = conn.execute(select(meta_t.c.value).where(meta_t.c.name == "space")).first()
            if row is None:
                conn.execute(insert(meta_t).values(name="space", value=json.dumps(self.space())))
                return
        manifest.compare_space(json.loads(row[0]), self.space(), str(self.path))

    # --- the FAISS index, from SQL and generations ---

    def _open(self) -> tuple[Any, str]:
        """The live generation, brought up to date with SQL; built from SQL when there is none."""
        gen = manifest.current_generation(self.path)
        in_sql = set(rows.sql_state(self.engine))
        if gen is None:
            index, factory = self._build_from_sql(self._choose_factory(len(in_sql)))
            if in_sql:
                self.save(index=index, factory=factory)
            return index, factory
        index, ids, factory = manifest.read_generation(gen, self.space())
        self._hold(gen)
        in_index = set(ids.tolist())
        if in_index != in_sql:
            # a build committed to SQL but did not finish its generation: catch up, no encoding
            log.info(
                "index %s is behind its database (%d to add, %d to remove); catching up",
                gen.name,
                len(in_sql - in_index),
                len(in_index - in_sql),
            )
            index = self._apply(
                index, add=sorted(in_sql - in_index), remove=sorted(in_index - in_sql)
            )
            self.save(index=index, factory=factory)
        return index, factory

    def _choose_factory(self, n: int) -> str:
        return kinds.choose_factory(self.settings, n, self.fusion.dim)

    def _vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The fused vectors of ``ids`` from SQL, shape (len(ids), dim)."""
        return rows.read_vectors(self.engine, ids, self.fusion.dim)

    def _build_from_sql(
        self, factory: str, filler: kinds.Filler = kinds.add_ids
    ) -> tuple[Any, str]:
        """A fresh index of the cases in SQL (trained on a sample, then filled by ``filler``), and
        the factory it really has."""
        ids = sorted(rows.sql_state(self.engine))
        index, factory = kinds.train(
            kinds.new_index(factory, self.fusion.dim), factory, self.fusion.dim, ids, self._vectors
        )
        return filler(index, ids, self._vectors), factory

    def _apply(
        self,
        index: Any,
        add: Sequence[int],
        remove: Sequence[int],
        filler: kinds.Filler = kinds.add_ids,
    ) -> Any:
        """``index`` with ``remove`` taken out and ``add`` put in (their vectors from SQL, by
        ``filler``)."""
        if remove:
            try:
                index.remove_ids(np.asarray(remove, dtype=np.int64))
            except RuntimeError:
                # HNSW cannot delete: rebuild from SQL (still no encoding)
                return self._build_from_sql(self.factory, filler)[0]
        return filler(index, add, self._vectors) if add else index

    def save(self, *, index: Any = None, factory: str | None = None) -> Path:
        """Write a new generation (``manifest.write_generation``) and make it live atomically;
        older ones are removed. Returns the generation's folder."""
        index = index if index is not None else self.index
        factory = factory or self.factory
        with self._lock:
            gen = manifest.write_generation(self.path, index, factory, self.space())
            self._hold(gen)
            return gen

    @property
    def generation(self) -> str | None:
        """The folder name of the generation held in memory (``gen-NNNNNN``), None before the
        first is written."""
        return self._held[0] if self._held is not None else None

    def _hold(self, gen: Path) -> None:
        st = gen.stat()
        self._held = (gen.name, st.st_ino, st.st_ctime_ns)

    def _is_held(self, gen: Path) -> bool:
        try:
            st = gen.stat()
        except OSError:
            return False
        return self._held == (gen.name, st.st_ino, st.st_ctime_ns)

    def refresh(self) -> bool:
        """Switch to the live generation when another process (``chartsight index build``, or
        another replica's build on a shared index location) has made a newer one live since this
        one was read: ``CURRENT`` is read (one small file) and, when it names another generation,
        that generation is loaded in place of this one. Called before every search, so a running
        service answers from a new build without a restart; a generation is told apart by its
        folder (name, inode, change time), so a ``--rebuild``'s new ``gen-000001`` is noticed
        too. Returns whether it switched; a
        generation that cannot be read (removed by a newer build while being read, a damaged
        file, another vector space) is logged and the one held is kept."""
        live = manifest.current_generation(self.path)
        if live is None or self._is_held(live):
            return False
        with self._lock:
            if self._is_held(live):
                return False
            try:
                index, _, factory = manifest.read_generation(live, self.space())
            except (OSError, RuntimeError, CaseIndexError) as exc:  # faiss raises RuntimeError
                log.warning("kept index %s: %s could not be read (%s)", self.generation, live, exc)
                return False
            log.info("index switched from %s to %s", self.generation, live.name)
            self.index, self.factory = index, factory
            self._hold(live)
            self._gpu_stale = True
            # a rebuild replaces the whole folder, its cases.db included: connections still open
            # on the old file would read the old rows
            self.engine.dispose()
            return True

    # --- changing the cases ---

    def thumbnail(self, key: str) -> bytes | None:
        """The PNG preview of a case's first image (greyscale, at most 128 px), if it has one."""
        return rows.thumbnail(self.engine, key)

    def __len__(self) -> int:
        self.refresh()
        return int(self.index.ntotal)

    def fingerprints(
        self, *, keys: Sequence[str] | None = None, patients: Sequence[str] | None = None
    ) -> dict[str, str]:
        """Key → fingerprint of every case held; only of ``keys``, or of the cases of
        ``patients`` (patient ids), when given."""
        return rows.fingerprints(self.engine, keys=keys, patients=patients)

    def encode(self, cases: Sequence[Case]) -> np.ndarray:
        """Fused vectors of cases, float32 (len(cases), dim) (``fusion.encode_cases``): text of
        the summaries, the unit mean of each case's image vectors (zero for a case without
        images)."""
        return encode_cases(cases, self.text_encoder, self.image_encoder, self.fusion)

    def upsert(self, cases: Sequence[Case], vectors: np.ndarray | None = None) -> BuildStats:
        """Add new cases and replace changed ones (by key), in one SQL transaction, and in the
        FAISS index; unchanged fingerprints are skipped without encoding. ``vectors`` (one fused
        row per case, in the order of ``cases``) skips encoding; a wrong shape raises
        CaseIndexError."""
        return self._write(cases, vectors, searchable=True)

    def store(self, cases: Sequence[Case], vectors: np.ndarray) -> BuildStats:
        """What ``upsert`` does to SQL alone (the source of truth): the FAISS index is left as it
        is until ``sync`` brings it up to date in one pass, as a distributed build does after
        writing every batch. ``vectors``: one fused row per case, float32 (len(cases), dim);
        unchanged fingerprints are skipped; a wrong shape raises CaseIndexError."""
        return self._write(cases, vectors, searchable=False)

    def _write(
        self, cases: Sequence[Case], vectors: np.ndarray | None, *, searchable: bool
    ) -> BuildStats:
        if not cases:
            return BuildStats()
        held = self.fingerprints(keys=[c.key for c in cases])
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
        with self._lock:
            new_ids, old_ids = rows.replace_cases(self.engine, todo, vectors)
            if searchable:
                self._grow_or_apply(add=new_ids, remove=old_ids)
        return BuildStats(added=len(todo) - len(old_ids), updated=len(old_ids), unchanged=unchanged)

    def sync(self, filler: kinds.Filler = kinds.add_ids) -> BuildStats:
        """Bring the FAISS index up to date with SQL after ``store``: when the case count calls
        for another kind (``choose_factory``: exact → IVF), a new index is trained on a sample
        and filled; else the rows no longer in SQL are removed and the new ones added. ``filler``
        adds vectors (``kinds.add_ids``, or shards filled by workers and merged). Returns the
        ids added and removed as ``BuildStats`` (added, removed); a new index counts all."""
        with self._lock:
            in_sql = set(rows.sql_state(self.engine))
            wanted = self._choose_factory(len(in_sql))
            in_index = set(kinds.index_ids(self.index).tolist())
            if wanted != self.factory:
                self.index, self.factory = self._build_from_sql(wanted, filler)
                stats = BuildStats(added=len(in_sql), removed=len(in_index))
            else:
                add, remove = sorted(in_sql - in_index), sorted(in_index - in_sql)
                self.index = self._apply(self.index, add, remove, filler)
                stats = BuildStats(added=len(add), removed=len(remove))
            self._gpu_stale = True
        return stats

    def remove(self, keys: Iterable[str]) -> int:
        """Remove cases by key; returns how many were held."""
        keys = list(keys)
        with self._lock:
            ids = rows.delete_cases(self.engine, keys)
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

    def _gpu_index(self) -> Any:
        """A GPU copy of the index when the settings ask for one and a GPU is visible, refreshed
        after a change; else None."""
        if not self.settings.use_gpu or kinds.faiss.get_num_gpus() == 0:
            return None
        if self._gpu_stale or self._gpu is None:
            self._gpu, self._gpu_resources = kinds.gpu_copy(self.index, self.settings.nprobe)
            self._gpu_stale = False
        return self._gpu

    def search_vectors(
        self, queries: np.ndarray, k: int = 5, flt: CaseFilter | None = None
    ) -> list[list[tuple[int, float]]]:
        """(FAISS id, score) of the best ``k`` allowed cases for each query row (queries: float32
        (n, dim) in the fused space); one list per row, best first, shorter when fewer match."""
        flt = flt or CaseFilter()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.refresh()
        with self._lock:
            if self.index.ntotal == 0:
                return [[] for _ in range(len(queries))]
            selector, excluded, nothing = filters.selector(self.engine, flt)
            if nothing:
                return [[] for _ in range(len(queries))]
            gpu = self._gpu_index()
            if gpu is not None and (selector is None or excluded is not None):
                # GPU indexes ignore IDSelectors: a small exclusion set is searched exactly by
                # asking for k + |excluded| and dropping them; allow-lists go to the CPU index.
                extra = len(excluded or ())
                scores, ids = gpu.search(queries, min(k + extra, int(self.index.ntotal)))
            else:
                params = kinds.search_parameters(self.index, self.factory, self.settings, selector)
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
        """Case rows for search results (``search_vectors``' lists), in their order."""
        return rows.case_hits(self.engine, found)

    def similar(
        self,
        case: Case,
        k: int = 5,
        flt: CaseFilter | None = None,
        *,
        image_weight: float | None = None,
        text_weight: float | None = None,
    ) -> list[CaseHit]:
        """Cases most like ``case`` (its images and summary, fused as configured, or with the
        weights given), best first, at most ``k``."""
        text = self.text_encoder.encode_texts([case.summary])
        image = None
        if case.images:
            image = mean_direction(self.image_encoder.encode_images(case.images))[None, :]
        query = self.fusion.fuse(text, image, image_weight, text_weight)
        return self.hits(self.search_vectors(query, k, flt)[0])

    def search_text(self, text: str, k: int = 5, flt: CaseFilter | None = None) -> list[CaseHit]:
        """Cases matching a text query, best first, at most ``k``. With a shared image-text space
        (``sum`` fusion) this reaches images too; with ``concat`` it compares with the case
        summaries only."""
        vec = self.text_encoder.encode_texts([text])
        if self.fusion.mode == "sum":
            query = vec
        else:
            query = self.fusion.fuse(vec, None, image_weight=0.0, text_weight=1.0)
        return self.hits(self.search_vectors(query, k, flt)[0])
