"""The container the graph's steps work with: settings, the FHIR source, tools, ranker, model
backend, case index, and per-patient caches (record, images, evidence lines). It is not part of the
checkpointed state; each run finds it in its config (``runtime(config)``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig

from agent.backends import Backend, BackendError
from agent.backends.evidence import EvidenceBackend
from agent.cache import RecentCache
from agent.planner import Planner
from agent.settings import Settings
from agent.tools import ToolContext, ToolError, ToolRegistry
from agent.tools.similar import NO_INDEX
from connectors.dicomweb import DicomWebClient
from connectors.errors import ChartSightError
from connectors.images import ImageSet, collect_images
from connectors.record import PatientRecord, assemble_record
from connectors.source import FhirSource, RecordScope
from retrieval.cases import Case, CasePrivacy, indexed_cases
from retrieval.evidence import Evidence, record_evidence
from retrieval.index import CaseFilter, CaseIndex, shown_to
from retrieval.rank import EvidenceRanker

# why a caller whose SMART scopes grant only some resource types is shown no similar cases
SIMILAR_NEEDS_WHOLE = (
    "similar cases need read access to every resource type (e.g. patient/*.rs): a case "
    "summarises every type of another patient's record"
)


class IndexHandle:
    """The similar-case index at ``path``, opened on first use and shared by every copy of a
    runtime (``dataclasses.replace`` per question or per caller). Opening reads the FAISS
    generation and imports faiss (~0.3 s), which a question without similar cases — most of them,
    and most cold ``chartsight ask``s — need not pay. While there is no index (no ``CURRENT``
    file), each use looks again, so a service notices the first build without a restart (later
    generations are picked up by ``CaseIndex.refresh``). ``opener`` returns None when the index
    cannot be opened (its caller keeps the reason); that is not retried."""

    def __init__(self, path: Path, opener: Callable[[], CaseIndex | None]) -> None:
        self.path = path
        self._opener = opener
        self._lock = threading.Lock()
        self._failed = False
        self._index: CaseIndex | None = None

    def get(self) -> CaseIndex | None:
        """The index (opened now if this is the first use since one exists), or None."""
        with self._lock:
            if self._index is None and not self._failed and (self.path / "CURRENT").is_file():
                self._index = self._opener()
                self._failed = self._index is None
        return self._index


@dataclass
class AgentRuntime:
    """What the nodes work with; not part of the (checkpointed) state."""

    settings: Settings
    source: FhirSource
    tools: ToolRegistry
    ranker: EvidenceRanker
    planner: Planner = field(default_factory=Planner)
    backend: Backend = field(default_factory=EvidenceBackend)
    # the similar-case index, opened on first use (None: there is no index)
    cases: IndexHandle | None = None
    dicomweb: DicomWebClient | None = None
    now: datetime | None = None  # the date that counts as now (default: the wall clock)
    # per-patient data, bounded; a record older than settings.cache_ttl_s is fetched again
    records: RecentCache[PatientRecord] = field(default_factory=RecentCache)
    images: RecentCache[ImageSet] = field(default_factory=RecentCache)
    evidence: RecentCache[list[Evidence]] = field(default_factory=RecentCache)

    def __post_init__(self) -> None:
        for cache in (self.records, self.images, self.evidence):
            cache.max_items = self.settings.cache_patients
            cache.ttl_s = self.settings.cache_ttl_s

    on_event: Callable[[str, dict[str, Any]], None] | None = None
    # "generalised" for a caller who may read only one patient: similar cases reach the prompt
    # and the answer without keys, patient ids, dates or free text (retrieval.index.generalised_hit)
    case_privacy: CasePrivacy = "full"
    # what of a record the caller's SMART scopes grant (None: every type); ``source`` is then a
    # ``connectors.source.ScopedSource`` and no similar cases are shown (they span every type)
    scope: RecordScope | None = None
    # when the model's turns of this question must have ended (``time.monotonic()`` seconds; None:
    # only ``model.http``'s per-request bounds), and the limit it was set from (seconds)
    model_deadline: float | None = None
    model_limit_s: float | None = None

    @contextlib.asynccontextmanager
    async def model_time(self) -> AsyncIterator[None]:
        """Bound a model call (a draft, its stream, a tool round) by what is left of the question's
        model time (``model_deadline``): past it the call is cancelled and ``BackendError`` is
        raised, so the step falls back as for any model failure, within the question's limit."""
        if self.model_deadline is None:
            yield
            return
        left = self.model_deadline - time.monotonic()
        spent = f"the model did not answer within this question's {self.model_limit_s:g} s"
        if left <= 0:
            raise BackendError(spent)
        bound = asyncio.timeout(left)
        try:
            async with bound:
                yield
        except TimeoutError as exc:
            if bound.expired():
                raise BackendError(spent) from exc
            raise

    @property
    def index(self) -> CaseIndex | None:
        """The similar-case index, opened on first use (None: there is none, or it could not be
        opened — ``ChartSight.similar`` says why)."""
        return self.cases.get() if self.cases is not None else None

    @property
    def similar_allowed(self) -> bool:
        """Whether similar cases may be shown: only to a caller who may read every type."""
        return self.scope is None or self.scope.whole

    def evidence_items(self, record: PatientRecord) -> list[Evidence]:
        """The record's evidence lines, compacted once per patient (records are cached too)."""
        if record.patient_id not in self.evidence:
            self.evidence[record.patient_id] = record_evidence(record)
        return self.evidence[record.patient_id]

    def context(self, record: PatientRecord) -> ToolContext:
        """A tool context that reuses the cached evidence lines. Its similar cases follow
        ``case_privacy`` (generalised for a caller bound to one patient), as ``gather_similar``'s
        do: the ``similar_cases`` tool is reachable by the model and by MCP's ``patient_facts``;
        it has none for a caller whose ``scope`` is not whole."""
        items = self.evidence_items(record)
        privacy = self.case_privacy

        def similar(k: int) -> list[Any]:
            index = self.index
            if index is None or len(index) == 0:
                raise ToolError(NO_INDEX)
            case = self.patient_case(record, self.images.get(record.patient_id) or ImageSet())
            return shown_to(index.similar(case, k, own_cases_out(case)), privacy)

        return ToolContext(
            record,
            now=self.now or datetime.now().astimezone(),
            _evidence={e.id: e for e in items},
            similar=similar if self.cases is not None and self.similar_allowed else None,
        )

    async def record(self, key: str) -> PatientRecord:
        """The patient's record, from the cache while it is fresh (``settings.cache_ttl_s``)."""
        record = self.records.fresh(key)
        if record is None:
            record = await assemble_record(self.source, key)
            for derived in (self.evidence, self.images):  # made from the previous copy
                derived.pop(record.patient_id, None)
            self.records[key] = self.records[record.patient_id] = record
        return record

    async def ensure_images(self, record: PatientRecord, *, quiet: bool = False) -> ImageSet:
        """The patient's images, collected once (a similar-case query uses them). ``quiet``: an
        image source that fails gives no images rather than an error."""
        if record.patient_id not in self.images:
            try:
                self.images[record.patient_id] = await collect_images(
                    record, self.source, self.settings.images, self.dicomweb
                )
            except ChartSightError:
                if not quiet:
                    raise
                return ImageSet()
        return self.images[record.patient_id]

    def patient_case(self, record: PatientRecord, images: ImageSet | None) -> Case:
        """The asking patient's own case, built like the indexed ones (the index settings' image
        limit), for a similar-case query."""
        return indexed_cases(record, images, self.settings.retrieval.index)[0]

    def emit(self, kind: str, **data: Any) -> None:
        """Tell the listener (``on_event``, e.g. a server-sent-event stream) that ``kind``
        happened, with ``data`` (JSON values)."""
        if self.on_event is not None:
            self.on_event(kind, data)


def own_cases_out(case: Case, flt: CaseFilter | None = None) -> CaseFilter:
    """``flt`` leaving out the patient's own cases: by id, and by identifier (the same person
    indexed from another source has another id)."""
    return dataclasses.replace(
        flt or CaseFilter(), exclude_patient=case.patient_id, exclude_identifiers=case.identifiers
    )


def runtime(config: RunnableConfig) -> AgentRuntime:
    """The runtime a graph run was given (``config["configurable"]["runtime"]``)."""
    return config["configurable"]["runtime"]
