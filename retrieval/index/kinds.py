"""Index kinds: which FAISS index a case count calls for, how it is made, trained, filled, listed,
searched with parameters, and copied to GPUs.

Index kinds are FAISS factory strings (``"Flat"``, ``"IVF4096,SQ8"``, ``"HNSW32"``), so a user
changes the kind in the settings, not in code; ``"auto"`` picks one by size (``auto_factory``).
Every index holds the cases' own int64 ids (their ``cases.id`` in SQL).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from retrieval.index.errors import CaseIndexError
from retrieval.settings import IndexSettings

log = logging.getLogger(__name__)


class _Faiss:
    """The ``faiss`` module, imported on first use: loading its SWIG library takes ~0.3 s, which a
    question that needs no similar cases (most of them, and every cold ``chartsight ask`` of
    that kind) should not pay. Typed ``Any`` because faiss's bundled stubs lag behind its SWIG API
    (SearchParametersHNSW, keyword constructors)."""

    _module: Any = None

    def __getattr__(self, name: str) -> Any:
        if _Faiss._module is None:
            _Faiss._module = importlib.import_module("faiss")
        return getattr(_Faiss._module, name)


faiss: Any = _Faiss()

EXACT_LIMIT = 50_000  # below this many cases, 'auto' searches exactly
ADD_CHUNK = 50_000  # vectors read from SQL and added to an index at a time

# (ids) -> float32 vectors of shape (len(ids), dim), in the order of ids
VectorReader = Callable[[Sequence[int]], np.ndarray]


def auto_factory(n: int, dim: int, memory_budget_mb: int) -> str:
    """The factory string ``"auto"`` means for ``n`` vectors of ``dim`` float32s: exact ("Flat")
    below 50k vectors; above, IVF with 8-bit scalar-quantised lists (a quarter of the memory of
    float vectors, and faster to scan); IVF-PQ when even that would not fit ``memory_budget_mb``
    (MiB). The list count is 4·√n rounded to a power of two in [256, 65536] (FAISS's guidelines)."""
    if n < EXACT_LIMIT:
        return "Flat"
    nlist = 2 ** round(math.log2(max(256.0, min(65536.0, 4 * math.sqrt(n)))))
    if n * dim > memory_budget_mb * 2**20:
        m = next((m for m in (64, 48, 32, 24, 16, 8) if dim % m == 0 and m <= dim // 4), 8)
        return f"IVF{nlist},PQ{m}"
    return f"IVF{nlist},SQ8"


def choose_factory(settings: IndexSettings, n: int, dim: int) -> str:
    """The factory string for an index of ``n`` vectors of ``dim``: the settings' own, or
    ``auto_factory``'s choice when they say "auto"."""
    if settings.factory != "auto":
        return settings.factory
    return auto_factory(n, dim, settings.memory_budget_mb)


def is_ivf(index: Any) -> bool:
    """Whether ``index`` is (or wraps) an inverted-file index, which has lists to train and probe."""
    return faiss.try_extract_index_ivf(index) is not None


def new_index(factory: str, dim: int) -> Any:
    """An empty CPU index (inner-product metric) of ``factory`` that takes our own int64 ids: IVF
    indexes do so themselves, others are wrapped in ``IDMap2``. Raises CaseIndexError for a
    factory string FAISS does not understand, or one with a refinement stage (``RFlat``,
    ``Refine``), which keeps vectors by position and can neither take ids nor remove one."""
    if "RFlat" in factory or "Refine" in factory:
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
    if is_ivf(probe) or factory.startswith("IDMap"):
        return probe
    return faiss.index_factory(dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)


def train(
    index: Any, factory: str, dim: int, ids: Sequence[int], vectors: VectorReader
) -> tuple[Any, str]:
    """``index`` trained on the vectors of ``ids`` (a sample of at most max(64·nlist, 65536),
    seeded), with the factory it really has; when there are fewer than FAISS's minimum of 39
    vectors per list, an exact ``Flat`` index instead (logged), until the index can train."""
    if index.is_trained:
        return index, factory
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 1
    # k-means on 64 points per list and 10 iterations: what FAISS's guidelines need for
    # good lists, at a fraction of the default cost on a small CPU
    most = max(64 * nlist, 65_536)
    sample = (
        ids if len(ids) <= most else list(np.random.default_rng(0).choice(ids, most, replace=False))
    )
    sample_vectors = vectors(sorted(sample))
    if ivf is not None:
        ivf.cp.niter = 10
    if len(sample_vectors) < 39 * nlist:  # FAISS's own minimum for k-means
        log.warning(
            "%s needs %d cases to train, the index has %d: searching exactly until then",
            factory,
            39 * nlist,
            len(sample_vectors),
        )
        return new_index("Flat", dim), "Flat"
    index.train(sample_vectors)
    return index, factory


# (index, ids, vectors) -> the index holding those ids too (``add_ids``, or shards filled elsewhere
# and merged: ``fill_shard`` and ``merge_shards``)
Filler = Callable[[Any, Sequence[int], VectorReader], Any]


def add_ids(index: Any, ids: Sequence[int], vectors: VectorReader) -> Any:
    """Add the vectors of ``ids`` to ``index`` under those ids, ``ADD_CHUNK`` at a time; returns
    ``index`` (a ``Filler``)."""
    for start in range(0, len(ids), ADD_CHUNK):
        chunk = list(ids[start : start + ADD_CHUNK])
        index.add_with_ids(vectors(chunk), np.asarray(chunk, dtype=np.int64))
    return index


def to_bytes(index: Any) -> np.ndarray:
    """``index`` serialised (FAISS's own format, as ``write_index`` writes it): a uint8 array that
    pickles cheaply to another process."""
    return faiss.serialize_index(index)


def from_bytes(data: np.ndarray) -> Any:
    """The index ``to_bytes`` serialised."""
    return faiss.deserialize_index(np.asarray(data, dtype=np.uint8))


def mergeable(index: Any) -> bool:
    """Whether shards of ``index``'s kind can be filled apart and merged (FAISS ``merge_from``):
    IVF kinds and flat-code kinds (``Flat``, ``SQ8``, ``PQ16``, in an ``IDMap``) can; an HNSW
    graph cannot (its vectors are added in one place)."""
    if is_ivf(index):
        return True
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    return isinstance(inner, faiss.IndexFlatCodes)


def empty_shard(index: Any) -> np.ndarray:
    """A serialised copy of ``index`` without its vectors (trained, for IVF: same centroids), to be
    filled by ``fill_shard`` elsewhere and merged back by ``merge_shards``."""
    shard = faiss.clone_index(index)
    shard.reset()
    return to_bytes(shard)


def fill_shard(empty: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``empty`` (an ``empty_shard``) with ``vectors`` (float32, (len(ids), dim)) added under
    ``ids`` (int64), serialised again: the part of adding (IVF list assignment, quantisation) that
    a worker does."""
    shard = from_bytes(empty)
    shard.add_with_ids(
        np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
    )
    return to_bytes(shard)


def merge_shards(index: Any, shards: Iterable[np.ndarray]) -> Any:
    """``index`` with the filled ``shards`` (``fill_shard``'s outputs) merged in, ids kept.
    Returns the merged index: a deserialised copy of ``index``, since FAISS merges only indexes of
    the same concrete types and a freshly made index differs from a read one (``IndexFlat`` with
    the inner-product metric vs ``IndexFlatIP``)."""
    merged = from_bytes(to_bytes(index))
    for shard in shards:
        merged.merge_from(from_bytes(shard), 0)
    return merged


def index_ids(index: Any) -> np.ndarray:
    """The int64 ids an index holds (an ``IDMap``'s map, or an IVF index's lists, in list order).
    Raises CaseIndexError for an index kind that keeps no ids."""
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


def search_parameters(index: Any, factory: str, settings: IndexSettings, selector: Any) -> Any:
    """FAISS search parameters for ``index`` with ``selector`` (an IDSelector or None): ``nprobe``
    (at most the list count) for IVF, ``efSearch`` for HNSW, the selector alone otherwise."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=min(settings.nprobe, ivf.nlist))
    if "HNSW" in factory:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=settings.ef_search)
    return faiss.SearchParameters(sel=selector)


def gpu_copy(index: Any, nprobe: int) -> tuple[Any, Any]:
    """A GPU copy of the CPU ``index``, and the GPU resources it needs kept alive (None when
    sharded): sharded over every GPU when there are several, else on GPU 0; an IVF copy probes
    ``nprobe`` lists. Needs faiss built with CUDA and at least one visible GPU."""
    resources = None
    if faiss.get_num_gpus() > 1:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        gpu = faiss.index_cpu_to_all_gpus(index, co=options)
    else:
        resources = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(resources, 0, index)
    if is_ivf(index):
        faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", nprobe)
    return gpu, resources
