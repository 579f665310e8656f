"""Building the similar-case index from a patient source (``chartsight index build``).

Two engines write the same index (generations, manifest, SQL rows): ``local`` (this process: cases
fetched 8 patients ahead, encoded and added in chunks) and ``ray`` (``agent.index_ray``: batches
of patients built and encoded on Ray actors, FAISS filled in shards and merged), chosen by
``settings.index_build.engine``. Both are incremental: a case whose fingerprint is unchanged is
not encoded again. The patients come from the store, a FHIR server, or the NDJSON files of a FHIR
Bulk Data export (``ndjson_source``: a temporary store, removed after the build).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from agent.settings import Settings
from connectors.dicomweb import DicomWebClient
from connectors.errors import ChartSightError, ConfigurationError, FhirImportError
from connectors.images import collect_images
from connectors.record import PatientRecord, assemble_record
from connectors.source import FhirSource
from connectors.store import FhirStore
from retrieval.cases import Case, indexed_cases
from retrieval.encoders import EncoderRegistry
from retrieval.index import CaseIndex
from retrieval.index.manifest import fsync_path

log = logging.getLogger(__name__)

S = TypeVar("S", bound=Settings)


def _staging(path: Path) -> Path:
    """Where ``--rebuild`` builds a new index beside the live one at ``path``."""
    return path.with_name(f".{path.name}.rebuild")


def _retired(path: Path) -> Path:
    """Where the live index is moved while a rebuilt one takes its place."""
    return path.with_name(f".{path.name}.old")


def recover_index_folder(path: Path) -> None:
    """Finish what a crash interrupted while a rebuilt index replaced the one at ``path``
    (``install_rebuilt``): if the live folder was moved aside but the rebuilt one not yet moved
    in, the previous index is put back; if both moves were done, the retired folder is removed.
    A rebuild that never finished (its staging folder) is left for the next ``--rebuild``,
    which starts it afresh; it is never read."""
    retired = _retired(path)
    if not retired.exists():
        return
    if path.exists():
        shutil.rmtree(retired, ignore_errors=True)
    else:
        retired.rename(path)
        log.warning("an index rebuild was interrupted; the previous index at %s is live", path)


def open_index(
    settings: Settings, encoders: EncoderRegistry, *, rebuild: bool = False
) -> CaseIndex:
    """The case index the settings describe (created empty if there is none), after
    ``recover_index_folder``. With ``rebuild``, an empty index in a staging folder beside it:
    the live index keeps serving, and survives a crash, until ``install_rebuilt`` puts the
    finished one in its place."""
    path = settings.index_path
    recover_index_folder(path)
    if rebuild:
        path = _staging(path)
        shutil.rmtree(path, ignore_errors=True)
    r = settings.retrieval
    return CaseIndex(path, r.index, r.fusion, encoders.text(), encoders.image())


def install_rebuilt(staged: CaseIndex, settings: Settings) -> None:
    """Make the index built by ``open_index(..., rebuild=True)`` (and ``build_index``) the live
    one at ``settings.index_path``: the live folder is renamed aside, the staged one renamed into
    place, then the old one removed. Each rename is atomic; a crash between the two is undone
    by ``recover_index_folder`` on the next open (the previous index comes back). ``staged`` is
    not used after (its database connections are closed)."""
    path = settings.index_path
    staged.engine.dispose()
    retired = _retired(path)
    if path.exists():
        path.rename(retired)
    staged.path.rename(path)
    fsync_path(path.parent)
    shutil.rmtree(retired, ignore_errors=True)


# the stages of a build, in the order they run
STAGES = ("cases", "encode", "add", "index")


@dataclass
class BuildReport:
    """What an index build did: patients read, cases found, added, updated (encoded again) and
    unchanged (not encoded), patients that failed (id, reason), the engine and its workers, and
    seconds per stage (``STAGES``): ``cases`` (fetching records and building cases), ``encode``
    (text and image encoders, fusion), ``add`` (SQL rows), ``index`` (FAISS training, filling
    and, on Ray, merging; the generation written). The local
    engine's stages are wall seconds of one process; the Ray engine's ``cases`` and ``encode``
    are summed over its workers (worker-seconds: divide by ``workers`` for wall time), ``add``
    and ``index`` are the driver's wall seconds."""

    patients: int = 0
    cases: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    engine: str = "local"
    workers: int = 1
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")


def ndjson_files(paths: Sequence[Path]) -> list[Path]:
    """The NDJSON files named by ``paths`` (files, or folders searched recursively for
    ``NDJSON_SUFFIXES``), Patient files first, then by path. Raises ``FhirImportError`` naming a
    path that does not exist, or all of them when they hold no NDJSON file."""
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found.update(
                p for p in path.rglob("*") if p.is_file() and p.name.endswith(NDJSON_SUFFIXES)
            )
        elif path.is_file():
            found.add(path)
        else:
            raise FhirImportError(str(path), "no such file or folder")
    if not found:
        raise FhirImportError(
            " ".join(map(str, paths)), f"no NDJSON files ({', '.join(NDJSON_SUFFIXES)})"
        )
    return sorted(found, key=lambda p: (not p.name.startswith("Patient."), str(p)))


@contextlib.contextmanager
def ndjson_source(
    paths: Sequence[Path],
    settings: S,
    progress: Callable[[int, int, Path], None] | None = None,
) -> Iterator[S]:
    """Build from the NDJSON files of a FHIR Bulk Data export (``ndjson_files(paths)``) without
    ChartSight's store: yields a copy of ``settings`` whose patient source is a temporary SQLite
    store holding those files, for ``build_index`` (either engine: Ray's workers read it too). The
    files go through the store's importer (``FhirStore.import_path``: validated, all or nothing
    per file, read line by line, never whole in memory), so a case built from the export is the
    case a build from an imported store gives. The temporary store lives in a folder beside the
    index (``.ndjson-build-<pid>-*`` in the index's parent folder: about 0.3 MB a patient, the
    disk the index is on) and is removed when the block ends, also on an error; one a killed
    build left is removed by the next (``remove_stale_ndjson_stores``).

    The files must be a *full* export: a record is what the files hold, so an export with
    ``_since`` (only what changed) would give cases built from partial records; import such an
    export into the store (``chartsight bulk``/``import``) and build from it. Resources outside
    any patient's compartment (Practitioner, Medication, ...) are kept and resolved as in a store.

    ``progress(files_done, files_total, file)`` is called before each file. Raises
    ``FhirImportError`` naming the first file that cannot be imported, or the paths when they hold
    no Patient (nothing is built), and ``ConfigurationError`` when the temporary store cannot be
    made (an unwritable folder) or for a Ray cluster named by ``index_build.address`` (its nodes
    cannot read a store on this machine: import the export into PostgreSQL and build from that)."""
    if settings.index_build.engine == "ray" and settings.index_build.address:
        raise ConfigurationError(
            "a build from NDJSON files reads a temporary store on this machine, which the nodes "
            "of a Ray cluster (--address) cannot reach: import the export into a store they "
            "share (PostgreSQL: `chartsight import` or `chartsight bulk`) and build from it"
        )
    files = ndjson_files(paths)
    parent = settings.index_path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_ndjson_stores(parent)
        folder = Path(tempfile.mkdtemp(prefix=f".ndjson-build-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise ConfigurationError(
            f"cannot make the temporary store for the NDJSON build in {parent}: "
            f"{exc.strerror or exc}"
        ) from exc
    store: FhirStore | None = None
    try:
        url = f"sqlite:///{folder / 'store.db'}"
        store = FhirStore(url, batch_size=settings.store.batch_size)
        for n, path in enumerate(files):
            if progress is not None:
                progress(n, len(files), path)
            store.import_path(path)
        if not store.counts().get("Patient"):
            raise FhirImportError(
                " ".join(map(str, paths)),
                "no Patient resources: a case is built for each Patient of the export "
                "(export the Patient type too)",
            )
        store.close()
        store = None
        built = settings.model_copy(deep=True)
        built.store.url = url
        built.fhir.url = None
        yield built
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_ndjson_stores(parent: Path) -> None:
    """Remove the temporary stores (``.ndjson-build-<pid>-*``) in ``parent`` that builds killed
    without their clean-up left (a ``kill``, a power cut): those whose process is gone."""
    for folder in parent.glob(".ndjson-build-*"):
        pid = folder.name.removeprefix(".ndjson-build-").split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


async def patient_ids(source: FhirSource) -> list[str]:
    """Every patient id the source holds."""
    found = await source.search("Patient", {})
    return [str(p.id) for p in found.resources]


async def _cases_of(
    source: FhirSource, dicomweb: DicomWebClient | None, settings: Settings, pid: str
) -> tuple[PatientRecord, list[Case]]:
    record = await assemble_record(source, pid)
    images = None
    if settings.retrieval.index.max_images_per_case > 0:
        images = await collect_images(record, source, settings.images, dicomweb)
    return record, indexed_cases(record, images, settings.retrieval.index)


async def patient_cases(
    source: FhirSource,
    dicomweb: DicomWebClient | None,
    settings: Settings,
    ids: list[str],
    report: BuildReport,
    ahead: int = 8,
) -> AsyncIterator[list[Case]]:
    """Each patient's cases (``indexed_cases``), in the order of ``ids``, fetched at most
    ``ahead`` patients ahead of the consumer (so memory stays bounded however many patients the
    source holds). A patient whose record cannot be read (a ``ChartSightError``) yields ``[]``
    and is added to ``report.failed`` with the reason."""

    async def one(pid: str) -> tuple[str, list[Case] | Exception]:
        try:
            return pid, (await _cases_of(source, dicomweb, settings, pid))[1]
        except ChartSightError as exc:
            return pid, exc

    pending = iter(ids)
    window: deque[asyncio.Future[tuple[str, list[Case] | Exception]]] = deque()

    def fill() -> None:
        while len(window) < ahead:
            pid = next(pending, None)
            if pid is None:
                return
            window.append(asyncio.ensure_future(one(pid)))

    fill()
    try:
        while window:
            pid, outcome = await window.popleft()
            fill()
            if isinstance(outcome, Exception):
                report.failed.append((pid, str(outcome)))
                yield []
            else:
                yield outcome
    finally:
        for task in window:
            task.cancel()


async def build_index(
    index: CaseIndex,
    source: FhirSource,
    settings: Settings,
    dicomweb: DicomWebClient | None = None,
    *,
    chunk: int = 32,
    progress: Callable[[int, int, int], None] | None = None,
) -> BuildReport:
    """Add every patient of ``source`` to the index; unchanged cases are not encoded again.

    The engine is ``settings.index_build.engine``: ``local`` here, ``ray`` in
    ``agent.index_ray`` (imported only then; its workers read the source the settings name).
    Cases go to SQL in chunks (each one transaction); at the end FAISS is brought up to date from
    SQL in one pass (``CaseIndex.sync``: a new IVF index trained on a sample of all the cases) and
    a new generation is written: a crash leaves the previous generation live and the committed
    chunks kept.
    ``progress(patients_done, patients_total, cases_done)`` is called after each patient (each
    batch on Ray). Raises ConfigurationError when Ray is asked for and not installed.
    """
    if settings.index_build.engine == "ray":
        from agent import index_ray

        return await index_ray.build_index_ray(index, source, settings, progress=progress)
    report = BuildReport()
    ids = await patient_ids(source)
    pending: list[Case] = []
    clock = time.perf_counter

    def flush() -> None:
        if not pending:
            return
        held = index.fingerprints(keys=[c.key for c in pending])
        todo = [c for c in pending if held.get(c.key) != c.fingerprint()]
        report.unchanged += len(pending) - len(todo)
        pending.clear()
        if not todo:
            return
        started = clock()
        vectors = index.encode(todo)
        encoded = clock()
        stats = index.store(todo, vectors)
        report.timings["encode"] += encoded - started
        report.timings["add"] += clock() - encoded
        report.added += stats.added
        report.updated += stats.updated
        report.unchanged += stats.unchanged

    waited = clock()
    async for cases in patient_cases(source, dicomweb, settings, ids, report):
        report.timings["cases"] += clock() - waited
        report.patients += 1
        report.cases += len(cases)
        pending.extend(cases)
        if len(pending) >= chunk:
            await asyncio.to_thread(flush)
        if progress is not None:
            progress(report.patients, len(ids), report.cases)
        waited = clock()
    await asyncio.to_thread(flush)
    started = clock()
    if report.added or report.updated or not (index.path / "CURRENT").exists():
        # FAISS once, from SQL: an IVF index is trained on a sample of the whole population (as
        # on Ray), not on the cases that happened to come first
        await asyncio.to_thread(index.sync)
        index.save()
    report.timings["index"] += clock() - started
    return report
