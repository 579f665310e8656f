"""Building the similar-case index from a patient source (``chartsight index build``)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.settings import Settings
from connectors.dicomweb import DicomWebClient
from connectors.errors import ChartSightError
from connectors.images import collect_images
from connectors.record import PatientRecord, assemble_record
from connectors.source import FhirSource
from retrieval.cases import Case, indexed_cases
from retrieval.encoders import EncoderRegistry
from retrieval.index import CaseIndex
from retrieval.index.manifest import fsync_path

log = logging.getLogger(__name__)


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


@dataclass
class BuildReport:
    """What an index build did: cases added, updated and removed, patients that failed (with
    reasons), the generation written and its timings."""

    patients: int = 0
    cases: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


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


async def _records(
    source: FhirSource,
    dicomweb: DicomWebClient | None,
    settings: Settings,
    ids: list[str],
    report: BuildReport,
    ahead: int = 8,
) -> AsyncIterator[list[Case]]:
    """Each patient's cases in order, fetched at most ``ahead`` patients ahead of the encoder
    (so memory stays bounded however many patients the source holds)."""

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

    Cases go to SQL in chunks (each one transaction), and a new index generation is written at
    the end: a crash leaves the previous generation live and the committed chunks kept.
    ``progress(patients_done, patients_total, cases_done)`` is called after each patient.
    """
    report = BuildReport()
    ids = await patient_ids(source)
    pending: list[Case] = []

    def flush() -> None:
        if not pending:
            return
        stats = index.upsert(pending)
        report.added += stats.added
        report.updated += stats.updated
        report.unchanged += stats.unchanged
        pending.clear()

    async for cases in _records(source, dicomweb, settings, ids, report):
        report.patients += 1
        report.cases += len(cases)
        pending.extend(cases)
        if len(pending) >= chunk:
            await asyncio.to_thread(flush)
        if progress is not None:
            progress(report.patients, len(ids), report.cases)
    await asyncio.to_thread(flush)
    if report.added or report.updated or not (index.path / "CURRENT").exists():
        index.save()
    return report
