"""The Ray engine of ``chartsight index build`` (``--engine ray``): an existing engine for a build
that outgrows one process, from a Ray instance on this machine to a hospital's Ray cluster.

What runs where:
  - the driver (this process) lists the patients, reads the fingerprints a batch's patients
    already have in SQL, writes each batch's new and changed cases to SQL in patient order (so
    rows get the ids a local build would give them), and at the end brings FAISS up to date in
    one pass (``CaseIndex.sync``): a new IVF index is trained on a sample (``kinds.train``), and
    vectors are added in shards that the workers fill and the driver merges (``kinds.fill_shard``,
    ``kinds.merge_shards``); the generation, manifest and SQL rows are those of a local build.
  - ``CaseWorker`` actors (``workers`` of them, one CPU each, and a GPU each when the cluster has
    GPUs) read their batch's records from the source the settings name (the local store, or the
    FHIR server), build the cases, skip the unchanged ones (same fingerprint), and encode the
    rest with encoders loaded from the same settings (cache folder, offline); an actor whose
    encoders are not the index's (another weights fingerprint) refuses to start (IndexMismatch).

On a cluster every node needs ChartSight installed, the store reachable (PostgreSQL, or a FHIR
server) and the encoders' weights (the packaged defaults need nothing else). Imported only when the
settings ask for Ray (``agent.index_build.build_index``); needs ``pip install 'chartsight[ray]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from agent.index_build import BuildReport, patient_cases, patient_ids
from agent.service import source_for
from agent.settings import IndexBuildSettings, Settings
from connectors.dicomweb import DicomWebClient
from connectors.errors import ChartSightError, ConfigurationError
from connectors.source import FhirSource
from retrieval.cases import Case
from retrieval.encoders import EncoderRegistry
from retrieval.index import CaseIndex, kinds, manifest
from retrieval.index.fusion import Fusion, encode_cases

try:
    import ray
except ImportError as exc:  # the optional extra
    raise ConfigurationError(
        "the Ray engine (`--engine ray`) needs `pip install 'chartsight[ray]'`"
    ) from exc

log = logging.getLogger(__name__)

T = TypeVar("T")

IN_FLIGHT_PER_WORKER = 2  # batches queued on each actor, so none waits while the driver writes


@dataclass
class BatchResult:
    """What a worker returns for one batch of patients: the cases to write (new or changed, in
    patient order) with their fused vectors (float32, (len(todo), dim)), how many cases the batch
    had and how many were unchanged, the patients that failed (id, reason), and the worker's
    seconds building cases and encoding."""

    todo: list[Case]
    vectors: np.ndarray
    patients: int
    cases: int
    unchanged: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    cases_s: float = 0.0
    encode_s: float = 0.0


class CaseWorker:
    """A Ray actor that builds and encodes the cases of batches of patients, and fills FAISS
    shards. Made with the driver's ``settings`` and its index's vector space (``space``, as
    ``manifest.vector_space`` gives it); raises IndexMismatch when the encoders loaded here have
    another space (other weights on this node)."""

    def __init__(self, settings: Settings, space: dict[str, Any]) -> None:
        self.settings = settings
        self.error: ChartSightError | None = None
        try:
            encoders = EncoderRegistry(settings.retrieval.encoders)
            self.text, self.image = encoders.text(), encoders.image()
            self.fusion = Fusion(settings.retrieval.fusion, self.text.info, self.image.info)
            here = manifest.vector_space(self.text.info, self.image.info, self.fusion)
            manifest.compare_space(space, here, f"a Ray worker's encoders (pid {os.getpid()})")
        except ChartSightError as exc:  # told to the driver by ``ready``
            self.error = exc
        # the source's event loop, on a thread of its own (Ray may run an actor's methods where
        # another loop is running)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.source: FhirSource = source_for(settings)
        self.dicomweb = DicomWebClient.from_settings(settings.dicomweb)

    def ready(self) -> ChartSightError | None:
        """None when the actor's encoders loaded and match the index; else the error (an
        IndexMismatch, a ConfigurationError), which the driver raises."""
        return self.error

    def build(self, ids: list[str], held: dict[str, str]) -> BatchResult:
        """The cases of the patients ``ids`` (in that order) whose fingerprint differs from
        ``held`` (key → fingerprint already in SQL), encoded. Patients whose record cannot be
        read are reported in ``failed``, not raised."""
        report = BuildReport()
        started = time.perf_counter()
        cases = self._run(self._cases(ids, report))
        built = time.perf_counter()
        todo = [c for c in cases if held.get(c.key) != c.fingerprint()]
        if todo:
            vectors = encode_cases(todo, self.text, self.image, self.fusion)
        else:
            vectors = np.zeros((0, self.fusion.dim), dtype=np.float32)
        return BatchResult(
            todo=todo,
            vectors=vectors,
            patients=len(ids),
            cases=len(cases),
            unchanged=len(cases) - len(todo),
            failed=report.failed,
            cases_s=built - started,
            encode_s=time.perf_counter() - built,
        )

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    async def _cases(self, ids: list[str], report: BuildReport) -> list[Case]:
        out: list[Case] = []
        async for cases in patient_cases(self.source, self.dicomweb, self.settings, ids, report):
            out.extend(cases)
        return out

    def fill(self, empty: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """``kinds.fill_shard``: the serialised empty index ``empty`` with ``vectors`` added under
        ``ids``, serialised."""
        return kinds.fill_shard(empty, ids, vectors)

    def close(self) -> None:
        """Close the source and the PACS client (the actor is then killed)."""

        async def shut() -> None:
            await self.source.aclose()
            if self.dicomweb is not None:
                await self.dicomweb.aclose()

        self._run(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)


@contextlib.contextmanager
def ray_session(options: IndexBuildSettings) -> Iterator[None]:
    """Ray connected for the block: the cluster at ``options.address``, else a Ray instance
    started here (``workers`` CPUs, or all of this machine's; no dashboard) and shut down after
    the block (its processes with it). An already initialised Ray is used as it is and left so."""
    if ray.is_initialized():
        yield
        return
    if options.address:
        ray.init(address=options.address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(
            num_cpus=options.workers or os.cpu_count() or 1,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    try:
        yield
    finally:
        ray.shutdown()


def _layout(options: IndexBuildSettings) -> tuple[int, float]:
    """(workers, GPUs per worker) for the connected cluster: the options' own, else one worker per
    GPU (1 GPU each) when it has GPUs, else one per CPU (0 GPUs)."""
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0.0))
    per_gpu = options.gpus_per_worker
    if per_gpu is None:
        per_gpu = 1.0 if gpus > 0 else 0.0
    if options.workers:
        return options.workers, per_gpu
    if per_gpu > 0:
        return max(1, int(gpus / per_gpu)), per_gpu
    return max(1, int(resources.get("CPU", 1.0))), per_gpu


def shard_filler(actors: Sequence[Any]) -> kinds.Filler:
    """A ``kinds.Filler`` that adds vectors in shards filled by ``actors`` and merged here, at most
    ``kinds.ADD_CHUNK`` vectors and one shard per actor (twice that in flight), merged in id order
    (the lists then hold ids in the order a local build adds them). Index kinds that cannot merge
    (HNSW) are filled here (``kinds.add_ids``)."""

    def fill(index: Any, ids: Sequence[int], vectors: kinds.VectorReader) -> Any:
        if not ids or not kinds.mergeable(index):
            return kinds.add_ids(index, ids, vectors)
        empty = ray.put(kinds.empty_shard(index))
        size = max(1, min(kinds.ADD_CHUNK, math.ceil(len(ids) / len(actors))))
        starts = iter(range(0, len(ids), size))

        def shards() -> Iterator[np.ndarray]:
            window: deque[Any] = deque()
            for n, start in enumerate(starts):
                chunk = list(ids[start : start + size])
                actor = actors[n % len(actors)]
                window.append(actor.fill.remote(empty, np.asarray(chunk, np.int64), vectors(chunk)))
                if len(window) >= IN_FLIGHT_PER_WORKER * len(actors):
                    yield ray.get(window.popleft())
            while window:
                yield ray.get(window.popleft())

        return kinds.merge_shards(index, shards())

    return fill


def _build(
    index: CaseIndex,
    ids: list[str],
    settings: Settings,
    report: BuildReport,
    progress: Callable[[int, int, int], None] | None,
) -> None:
    """The driver's part (see the module's docstring), blocking, with Ray connected; fills
    ``report``."""
    options = settings.index_build
    clock = time.perf_counter
    workers, gpus = _layout(options)
    report.engine, report.workers = "ray", workers
    worker = ray.remote(CaseWorker).options(num_cpus=1, num_gpus=gpus)
    actors: list[Any] = [worker.remote(settings, index.space()) for _ in range(workers)]
    try:
        for error in ray.get([a.ready.remote() for a in actors]):
            if error is not None:
                raise error
        batches = [
            ids[i : i + options.batch_patients] for i in range(0, len(ids), options.batch_patients)
        ]
        window: deque[Any] = deque()
        pending = iter(enumerate(batches))

        def top_up() -> None:
            while len(window) < IN_FLIGHT_PER_WORKER * workers:
                item = next(pending, None)
                if item is None:
                    return
                n, batch = item
                held = index.fingerprints(patients=batch)
                window.append(actors[n % workers].build.remote(batch, held))

        top_up()
        while window:
            result: BatchResult = ray.get(window.popleft())
            top_up()
            started = clock()
            stats = index.store(result.todo, result.vectors)
            report.timings["add"] += clock() - started
            report.timings["cases"] += result.cases_s
            report.timings["encode"] += result.encode_s
            report.patients += result.patients
            report.cases += result.cases
            report.added += stats.added
            report.updated += stats.updated
            report.unchanged += result.unchanged + stats.unchanged
            report.failed.extend(result.failed)
            if progress is not None:
                progress(report.patients, len(ids), report.cases)
        started = clock()
        if report.added or report.updated or not (index.path / "CURRENT").exists():
            index.sync(shard_filler(actors))
            index.save()
        report.timings["index"] += clock() - started
        ray.get([a.close.remote() for a in actors])
    finally:
        for actor in actors:
            ray.kill(actor)


async def build_index_ray(
    index: CaseIndex,
    source: FhirSource,
    settings: Settings,
    *,
    progress: Callable[[int, int, int], None] | None = None,
) -> BuildReport:
    """``build_index`` on Ray (``settings.index_build``: address, workers, batch size, GPUs).
    ``source`` lists the patients; the workers read each patient's record from the source the
    settings name (``agent.service.source_for``), which must be the same one. Returns the
    ``BuildReport`` (engine "ray", its workers, per-stage seconds). Raises IndexMismatch when a
    worker's encoders differ from the index's, and whatever Ray raises when it cannot connect or
    a worker dies (``ray.exceptions.RayError``)."""
    report = BuildReport()
    ids = await patient_ids(source)
    # Ray is started from this (the main) thread, where it can install its signal handlers
    with ray_session(settings.index_build):
        await asyncio.to_thread(_build, index, ids, settings, report, progress)
    return report
