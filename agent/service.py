"""``ChartSight``: the one front door to everything about a patient (record, images, ranked
evidence, facts, similar cases, grounded answers through the graph, one thread per conversation).
The surfaces call these methods and do not reach past them into connectors or retrieval."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from agent.answer import CHECKPOINT_TYPES, Answer
from agent.backends import create_backend
from agent.backends.evidence import EvidenceBackend
from agent.cache import RecentCache
from agent.graph import build_graph
from agent.planner import default_planner
from agent.runtime import SIMILAR_NEEDS_WHOLE, AgentRuntime, IndexHandle, own_cases_out
from agent.settings import Settings
from agent.threads import DamagedThread, ThreadStoreError, checked_state, store_errors
from agent.tools import Fact, ToolError, default_tools
from agent.tools.similar import NO_INDEX
from common.schema import SCHEMA_LOCK
from connectors.dicomweb import DicomWebClient
from connectors.errors import ChartSightError, ConfigurationError
from connectors.fhir_client import FhirClient
from connectors.images import ImageSet
from connectors.record import PatientRecord, find_patients, resolve_patient
from connectors.settings import FhirServerSettings, HttpSettings
from connectors.source import FhirSource, RecordScope, ScopedSource
from connectors.store import FhirStore, StoreSource
from retrieval.cases import Case, CasePrivacy, ChartSections, chart_sections
from retrieval.embedding_store import EmbeddingStore
from retrieval.encoders import EncoderRegistry
from retrieval.index import CaseFilter, CaseHit, CaseIndex, CaseIndexError, shown_to
from retrieval.rank import EvidenceRanker, RankedEvidence

# conversation threads on PostgreSQL: connections kept open, and how long a request waits for one
# (while the database is down) before its thread cannot be read or written
_PG_POOL_SIZE = 8
_PG_WAIT_S = 5.0


def _serde() -> Any:
    """The checkpointer's serializer: it rebuilds only plain values and the answer's own models
    (``agent.answer.CHECKPOINT_TYPES``), so a tampered checkpoint database cannot make it
    construct anything else."""
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    return JsonPlusSerializer(
        allowed_msgpack_modules=[(c.__module__, c.__name__) for c in CHECKPOINT_TYPES]
    )


@contextlib.contextmanager
def _thread_store() -> Iterator[None]:
    """Turns the threads database's own errors (``agent.threads.store_errors``) into
    ``ThreadStoreError``, naming the driver's error for the operator."""
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, store_errors()):
            raise
        raise ThreadStoreError(f"the threads database failed: {type(exc).__name__}: {exc}") from exc


async def _checkpointer(url: str, stack: contextlib.AsyncExitStack) -> Any:
    """A LangGraph checkpointer for a SQLite path or a PostgreSQL URL.

    On PostgreSQL it draws from a connection pool (psycopg_pool) whose connections are checked
    before use, so a database restart costs the requests made while it is down (they wait at
    most ``_PG_WAIT_S`` for a connection, then fail with ``psycopg_pool.PoolTimeout``) and the
    service uses the database again once it is back, without a restart. A single connection, as
    ``AsyncPostgresSaver.from_conn_string`` opens, stays broken after a restart."""
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        url = url.replace("postgresql+psycopg://", "postgresql://", 1)  # SQLAlchemy's spelling
        try:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
            from psycopg.rows import dict_row
            from psycopg_pool import AsyncConnectionPool
        except ImportError as exc:
            raise ConfigurationError(
                "a PostgreSQL checkpointer needs `pip install langgraph-checkpoint-postgres`"
            ) from exc
        pool: Any = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=_PG_POOL_SIZE,
            timeout=_PG_WAIT_S,
            check=AsyncConnectionPool.check_connection,
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
            open=False,
        )
        await pool.open(wait=True, timeout=_PG_WAIT_S * 6)
        stack.push_async_callback(pool.close)
        saver = AsyncPostgresSaver(conn=pool, serde=_serde())
        # LangGraph's migrations are not safe when two processes (replicas, workers) run them
        # together (both insert the same checkpoint_migrations row): one at a time, under the
        # schema lock every ChartSight table creation takes (common.schema)
        async with pool.connection() as lock:
            await lock.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
            try:
                await saver.setup()
            finally:
                await lock.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        return saver
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    path = url.removeprefix("sqlite:///")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sqlite = await stack.enter_async_context(AsyncSqliteSaver.from_conn_string(path))
    sqlite.serde = _serde()
    return sqlite


def source_for(settings: Settings) -> FhirSource:
    """The FHIR server the settings name, else the embedded local store."""
    if settings.fhir.url:
        return FhirClient(settings.fhir)
    return StoreSource(FhirStore(settings.store_url))


def ehr_source(url: str, token: str | None) -> FhirSource:
    """A FHIR server a caller names, read with the caller's own bearer token (a CDS Hooks request's
    ``fhirServer`` and ``fhirAuthorization``, a SMART launch's ``iss``). Redirects are not
    followed: the caller's URL was checked against the operator's list, and a 3xx from it must not
    take the service (an SSRF) to an address nobody listed."""
    return FhirClient(
        FhirServerSettings(
            url=url.rstrip("/"),
            token=SecretStr(token) if token else None,
            http=HttpSettings(follow_redirects=False),
        )
    )


@contextlib.asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[tuple[FhirSource, DicomWebClient | None]]:
    """The patient source and the PACS (if configured), closed when done."""
    source = source_for(settings)
    dicomweb = DicomWebClient.from_settings(settings.dicomweb)
    try:
        yield source, dicomweb
    finally:
        await source.aclose()
        if dicomweb is not None:
            await dicomweb.aclose()


def withheld_warning(scope: RecordScope) -> str:
    """The answer's warning for a caller whose SMART scopes grant part of the record:
    ``"the answer may be incomplete: your access (SMART scopes) does not include MedicationRequest,
    …"`` (``RecordScope.withheld``)."""
    return "the answer may be incomplete: your access (SMART scopes) does not include " + ", ".join(
        scope.withheld()
    )


class NotPermitted(ChartSightError):
    """What was asked needs more than the caller's SMART scopes grant (HTTP 403)."""


class QuestionError(ChartSightError):
    """A question that cannot be answered as asked (empty, or only whitespace): the caller's to
    fix (HTTP 422), not a failure of the service."""


# characters that change how text is shown, not what it says: C0/C1 controls (Unicode category
# Cc) and format characters (Cf: bidirectional overrides and isolates U+202A–U+202E,
# U+2066–U+2069, zero-width joiners and spaces, the BOM), which can make a question, echoed in
# the answer or the audit, read differently from what was asked (CVE-2021-42574, "Trojan Source")
_SHOWN = {"Cc": " ", "Cf": ""}


def question_text(question: str) -> str:
    """The question as ChartSight reads and echoes it: NFC-normalised (Unicode UAX #15), control
    characters (Unicode category Cc) made spaces, format characters (Cf: bidirectional overrides,
    zero-width characters) removed, runs of whitespace made one space, ends trimmed. Raises
    ``QuestionError`` when nothing that is a letter or digit is left."""
    text = unicodedata.normalize("NFC", question)
    text = "".join(_SHOWN.get(unicodedata.category(c), c) for c in text)
    text = " ".join(text.split())
    if not re.search(r"[^\W_]", text):  # only blanks, control or invisible characters
        raise QuestionError("the question is empty: ask about the patient in words")
    return text


def model_budget(model_limit_s: float | None, caller_limit_s: float | None) -> float | None:
    """Seconds the model may take for one question: ``model.time_limit_s``, and within a caller's
    own limit (``caller_limit_s``) that limit less a reserve for the steps after the model (the
    evidence answer, the verifier, the answer: milliseconds, over a database-backed record at
    most a few seconds), a fifth of it and at most 5 s. None when neither is set."""
    limits = [x for x in (model_limit_s, caller_limit_s) if x is not None]
    if caller_limit_s is not None:
        limits.append(caller_limit_s - min(caller_limit_s / 5, 5.0))
    return min(limits) if limits else None


class ChartSight:
    """The agent, with its source, model backend, index and checkpointer opened once.

    Use as ``async with ChartSight(settings) as cs: answer = await cs.ask(patient, question)``.
    ``answering=False`` opens only what reading a patient needs (no model backend, no thread
    checkpointer: ``ask`` and threads are then unavailable); ``dense=False`` ranks evidence without
    the text encoder (BM25, codes, recency); ``use_index=False`` leaves the similar-case index shut.
    Every method that takes ``source`` reads the patient from there instead of the configured
    source (a CDS Hooks request's prefetch or FHIR server, a SMART launch's EHR), with caches of
    its own.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        source: FhirSource | None = None,
        now: datetime | None = None,
        encoders: EncoderRegistry | None = None,
        use_index: bool = True,
        answering: bool = True,
        dense: bool = True,
    ) -> None:
        self.settings = settings
        self._source = source
        self.now = now
        self.encoders = encoders
        self.use_index = use_index
        self.answering = answering
        self.dense = dense
        self._stack = contextlib.AsyncExitStack()
        self.runtime: AgentRuntime | None = None
        self.one_shot: Any = None  # the graph for questions outside any thread (no checkpoints)
        self._graph: Any = None  # the threaded graph, once its checkpointer is open
        self._opening: asyncio.Future[Any] | None = None  # the attempt to open it
        self._index_error: CaseIndexError | None = None  # why the index could not be opened
        # what this ChartSight keeps on a caller's source (``_shelf``): its name there
        self._shelf_key = f"chartsight-{uuid.uuid4().hex}"

    async def __aenter__(self) -> ChartSight:
        s = self.settings
        source = self._source or source_for(s)
        if self._source is None:
            self._stack.push_async_callback(source.aclose)
        backend = create_backend(s.model) if self.answering else EvidenceBackend()
        self._stack.push_async_callback(backend.aclose)
        dicomweb = DicomWebClient.from_settings(s.dicomweb)
        if dicomweb is not None:
            self._stack.push_async_callback(dicomweb.aclose)
        encoders = self.encoders or EncoderRegistry(s.retrieval.encoders)

        def open_index() -> CaseIndex | None:
            try:
                r = s.retrieval
                return CaseIndex(s.index_path, r.index, r.fusion, encoders.text(), encoders.image())
            except CaseIndexError as exc:
                self._index_error = exc  # reported when similar cases are asked for
                return None

        tools = default_tools()
        self.runtime = AgentRuntime(
            settings=s,
            source=source,
            tools=tools,
            planner=default_planner(tools.tools.values()),
            ranker=self._ranker(encoders, source),
            backend=backend,
            cases=IndexHandle(s.index_path, open_index) if self.use_index else None,
            dicomweb=dicomweb,
            now=self.now,
        )
        if self.answering:
            self.one_shot = build_graph(None)  # questions outside any thread: nothing is kept
        return self

    async def open_threads(self) -> Any:
        """The graph that keeps threads, its checkpointer (``threads_url``) opened on first use:
        a one-shot question (``keep=False``, e.g. the CLI's ``ask``) never opens the threads
        database. Callers arriving together share one attempt; after a failed one the next
        call tries again. The HTTP service calls this at start, so that a threads database it
        cannot reach (PostgreSQL down, a folder that cannot be made) stops it starting; a SQLite
        file is first read by the first thread question, which a damaged one fails with
        ``ThreadStoreError``. Raises ``ThreadStoreError`` when the database cannot
        be opened (nothing of the failed attempt is kept open)."""
        assert self.one_shot is not None, "use `async with ChartSight(...)` (answering=True)"
        if self._graph is not None:
            return self._graph
        opening = self._opening
        if opening is None or (
            opening.done() and (opening.cancelled() or opening.exception() is not None)
        ):
            opening = self._opening = asyncio.ensure_future(self._open_threads())
        # shielded: a caller that gives up does not cancel the attempt the others wait on
        return await asyncio.shield(opening)

    async def _open_threads(self) -> Any:
        async with contextlib.AsyncExitStack() as attempt:
            try:
                with _thread_store():
                    saver = await _checkpointer(self.settings.threads_url, attempt)
            except (OSError, ValueError) as exc:  # a SQLite path that cannot be made or used
                raise ThreadStoreError(f"the threads database cannot be opened: {exc}") from exc
            self._graph = build_graph(saver)
            self._stack.push_async_callback(attempt.pop_all().aclose)  # kept till __aexit__
        return self._graph

    def _ranker(self, encoders: EncoderRegistry, source: FhirSource) -> EvidenceRanker:
        """The evidence ranker: dense scoring with the text encoder when ``self.dense``; chart
        lines' embeddings kept on disk (``retrieval.rank.keep_line_embeddings``) only when the
        source is the embedded store, whose records are on this disk already."""
        s = self.settings
        text = encoders.text() if self.dense else None
        store = None
        folder = s.retrieval.encoders.cache_dir
        keep = s.retrieval.rank.keep_line_embeddings and isinstance(source, StoreSource)
        if text is not None and keep and folder is not None:
            store = EmbeddingStore(
                folder / "line-embeddings.sqlite3", text.info.space, text.info.dim
            )
            self._stack.callback(store.close)
        return EvidenceRanker(s.retrieval.rank, text, store=store)

    async def __aexit__(self, *exc: object) -> None:
        opening = self._opening
        if opening is not None and not opening.done():
            # an open still under way would finish after the stack closed and keep its
            # connection for ever: cancelled, it closes what it opened (its own exit stack)
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
        await self._stack.aclose()

    async def ask(
        self,
        patient: str,
        question: str,
        *,
        thread_id: str | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        source: FhirSource | None = None,
        keep: bool = True,
        case_privacy: CasePrivacy = "full",
        scope: RecordScope | None = None,
        time_limit_s: float | None = None,
    ) -> Answer:
        """A grounded answer; the same ``thread_id`` continues a conversation. ``source`` reads
        the record from elsewhere than the configured source (e.g. a CDS Hooks request's FHIR
        server or prefetch), with caches of its own. ``keep=False`` without a thread keeps
        nothing: no checkpoint is written (faster, and no copy of the question is stored).
        ``case_privacy="generalised"`` (a caller bound to this one patient) shows similar cases
        to the model and in the answer without keys, ids, dates or free text. ``scope`` (the
        caller's SMART scopes, ``RecordScope``; None or whole: every type) limits everything the
        answer is built from (record, evidence, tools, images) to the resources it admits; then no
        similar cases are shown (they summarise every type of other records) and the answer's
        ``warnings`` name what was withheld, so a reader knows it may be incomplete.
        ``time_limit_s`` (seconds; the HTTP service's ``serve.request_timeout_s``) is the time the
        caller waits: the model's turns end early enough for the evidence answer to be given in
        time instead (``model_budget``)."""
        assert self.one_shot is not None, "use `async with ChartSight(...)` (answering=True)"
        question = question_text(question)
        # one runtime per question (sharing the caches), so concurrent questions keep their own
        # event listeners
        budget = model_budget(self.settings.model.time_limit_s, time_limit_s)
        rt = dataclasses.replace(
            self._runtime(source, scope),
            on_event=on_event,
            case_privacy=case_privacy,
            model_deadline=None if budget is None else time.monotonic() + budget,
            model_limit_s=time_limit_s or budget,
        )
        start = {"question": question, "patient_key": patient, "warnings": None, "timings": None}
        if thread_id is None and not keep:
            state = await self.one_shot.ainvoke(start, {"configurable": {"runtime": rt}})
            return self._answer(state, None, rt.scope)
        thread = thread_id or uuid.uuid4().hex
        config = {"configurable": {"thread_id": thread, "runtime": rt}}
        graph = await self.open_threads()
        with _thread_store():
            if thread_id is not None:
                await self._saved_state(thread)  # a damaged thread is refused before it runs
            state = await graph.ainvoke(start, config)
        return self._answer(state, thread, rt.scope)

    async def _saved_state(self, thread_id: str) -> Any:
        """The thread's latest snapshot (``StateSnapshot``), its values checked
        (``agent.threads.checked_state``). Raises ``DamagedThread`` when they do not validate or
        the checkpointer refuses how they are stored (pickle, a JSON constructor: ``ValueError``,
        ``NotImplementedError``), ``ThreadStoreError`` when the database cannot be read."""
        graph = await self.open_threads()
        with _thread_store():
            try:
                snapshot = await graph.aget_state({"configurable": {"thread_id": thread_id}})
            except (ValueError, TypeError, NotImplementedError) as exc:
                raise DamagedThread(f"the thread's saved state cannot be read: {exc}") from exc
        if snapshot and snapshot.values:
            checked_state(dict(snapshot.values))
        return snapshot

    async def pending(self, thread_id: str) -> dict[str, Any] | None:
        """An interrupted run of the thread (its question and the steps still to run), or None."""
        snapshot = await self._saved_state(thread_id)
        if not snapshot or not snapshot.next:
            return None
        return {
            "question": snapshot.values.get("question"),
            "patient_id": snapshot.values.get("patient_id"),
            "next": list(snapshot.next),
            "completed": sorted(snapshot.values.get("timings", {})),
        }

    async def resume(
        self, thread_id: str, *, on_event: Callable[[str, dict[str, Any]], None] | None = None
    ) -> Answer:
        """Finish an interrupted run from its last checkpoint (the steps already done are kept)."""
        assert self.runtime is not None, "use `async with ChartSight(...)`"
        waiting = await self.pending(thread_id)
        if waiting is None:
            raise ChartSightError(f"thread {thread_id!r} has no interrupted run to resume")
        rt = dataclasses.replace(self.runtime, on_event=on_event)
        pid = waiting["patient_id"]
        if pid:  # the record is not checkpointed: fetched again unless still cached
            await rt.record(pid)
        config = {"configurable": {"thread_id": thread_id, "runtime": rt}}
        graph = await self.open_threads()
        with _thread_store():
            state = await graph.ainvoke(None, config)
        return self._answer(state, thread_id)

    def _scoped_source(self, source: FhirSource | None, scope: RecordScope) -> ScopedSource:
        """``source`` (default: the configured one) as a caller with ``scope`` may read it, the
        same object for the same scope while ``source`` lives (so its runtime, and the record it
        fetched, are reused); at most 32 scopes per source are kept."""
        assert self.runtime is not None, "use `async with ChartSight(...)`"
        inner = source if source is not None else self.runtime.source
        shelf = self._shelf(inner)
        if shelf is None:  # a source that takes no attributes: a view for this call
            return ScopedSource(inner, scope)
        views: dict[RecordScope, ScopedSource] = shelf.setdefault("views", {})
        if scope not in views:
            while len(views) >= 32:
                views.pop(next(iter(views)))
            views[scope] = ScopedSource(inner, scope)
        return views[scope]

    def _runtime(
        self, source: FhirSource | None = None, scope: RecordScope | None = None
    ) -> AgentRuntime:
        """The runtime, or one reading from ``source`` with caches of its own, kept as long as
        ``source`` lives: a SMART session's questions reuse the record it fetched, and a CDS
        request's prefetch is read once. A ``scope`` that is not whole reads through a
        ``ScopedSource`` (caches of its own per scope: one caller's view never serves another's)."""
        assert self.runtime is not None, "use `async with ChartSight(...)`"
        if scope is not None and not scope.whole:
            source = self._scoped_source(source, scope)
        if source is None:
            return self.runtime
        shelf = self._shelf(source)
        known = shelf.get("runtime") if shelf is not None else None
        if known is not None:
            return known
        made = dataclasses.replace(
            self.runtime, source=source, records=RecentCache(), images=RecentCache(),
            evidence=RecentCache(), ranker=self.runtime.ranker.without_store(),
            scope=source.scope if isinstance(source, ScopedSource) else None,
        )  # fmt: skip
        if shelf is not None:  # else (a source that takes no attributes): caches for this call
            shelf["runtime"] = made
        return made

    def _shelf(self, source: Any) -> dict[str, Any] | None:
        """What this ChartSight keeps for a caller's ``source`` (its runtime with the record it
        fetched, its views per scope), kept on the source object itself so that it lives exactly
        as long as the source: a SMART session's questions reuse it, and a CDS request's prefetch
        source is freed with everything read from it. (A ``WeakKeyDictionary`` cannot do this:
        a runtime refers to its source, so each value would keep its key, and every CDS request's
        records, alive for ever.) None for an object that takes no attributes."""
        try:
            shelves = source.__dict__.setdefault("_chartsight_shelves", {})
        except AttributeError:
            return None
        shelf: dict[str, Any] = shelves.setdefault(self._shelf_key, {})
        return shelf

    async def record(
        self, patient: str, source: FhirSource | None = None, scope: RecordScope | None = None
    ) -> PatientRecord:
        """The patient's record (kept for ``settings.cache_ttl_s``), only what ``scope`` admits."""
        return await self._runtime(source, scope).record(patient)

    async def images(
        self,
        record: PatientRecord,
        source: FhirSource | None = None,
        scope: RecordScope | None = None,
    ) -> ImageSet:
        """The record's images with their provenance (Media, attachments, ImagingStudy through
        DICOMweb), and the images that failed, each with its reason. ``record`` is one read with
        the same ``source`` and ``scope``."""
        return await self._runtime(source, scope).ensure_images(record)

    def sections(self, record: PatientRecord) -> ChartSections:
        """The record's summary sections (active problems, latest results, active medications,
        allergies, encounters, imaging) from the same evidence lines the answers cite."""
        return chart_sections(record, self._runtime().evidence_items(record))

    async def patient_id(self, key: str, source: FhirSource | None = None) -> str:
        """The Patient id a key names: an id, or an identifier (``system|value`` or a bare value).
        Raises ``ResourceNotFound`` (none) or ``ChartSightError`` (several patients)."""
        patient = await resolve_patient(self._runtime(source).source, key)
        return str(patient.id)

    async def find_patients(self, name: str, born: str | None = None) -> list[Any]:
        """Patient resources matching a name (given and family) and a birth date (YYYY-MM-DD)."""
        return await find_patients(self._runtime().source, name, born)

    async def evidence(
        self,
        patient: str,
        question: str,
        token_budget: int | None = None,
        source: FhirSource | None = None,
        scope: RecordScope | None = None,
    ) -> list[RankedEvidence]:
        """The ranked chart evidence the agent would see for ``question`` (read as
        ``question_text`` reads it), from what ``scope`` admits of the record."""
        question = question_text(question)
        rt = self._runtime(source, scope)
        items = rt.evidence_items(await rt.record(patient))
        return await asyncio.to_thread(rt.ranker.rank, question, items, token_budget=token_budget)

    async def facts(
        self,
        patient: str,
        tool: str,
        args: dict[str, Any],
        case_privacy: CasePrivacy = "full",
        scope: RecordScope | None = None,
    ) -> list[Fact]:
        """One structured tool's facts about the patient; ``case_privacy="generalised"`` (a
        caller bound to this one patient) shows ``similar_cases`` without keys, ids, dates or free
        text, as ``ask`` and ``similar`` do. ``scope``: the tool sees only what it admits (and no
        similar cases unless whole)."""
        rt = dataclasses.replace(self._runtime(None, scope), case_privacy=case_privacy)
        if tool not in rt.tools.tools:
            raise ToolError(f"no tool {tool!r}; tools: {', '.join(sorted(rt.tools.tools))}")
        record = await rt.record(patient)
        if tool == "similar_cases":
            await rt.ensure_images(record)
        try:
            return rt.tools[tool](rt.context(record), **args)
        except ValidationError as exc:
            raise ToolError(f"{tool}: {exc.errors()[0]['msg']} ({exc.errors()[0]['loc']})") from exc

    async def patient_case(
        self, patient: str, source: FhirSource | None = None, scope: RecordScope | None = None
    ) -> Case:
        """The asking patient's own case (summary and images), built like the indexed ones from
        what ``scope`` admits."""
        rt = self._runtime(source, scope)
        record = await rt.record(patient)
        return rt.patient_case(record, await rt.ensure_images(record))

    async def similar(
        self,
        patient: str,
        k: int = 5,
        flt: CaseFilter | None = None,
        source: FhirSource | None = None,
        case_privacy: CasePrivacy = "full",
        scope: RecordScope | None = None,
    ) -> list[CaseHit]:
        """Cases most like the patient's (the patient's own left out); ``case_privacy=
        "generalised"`` for a caller bound to this one patient (``retrieval.index.shown_to``).
        Raises ``NotPermitted`` for a ``scope`` that is not whole: a case summarises every
        resource type of another record."""
        if scope is not None and not scope.whole:
            raise NotPermitted(SIMILAR_NEEDS_WHOLE)
        index = self._runtime().index
        if index is None and self._index_error is not None:
            raise ConfigurationError(str(self._index_error)) from self._index_error
        if index is None or len(index) == 0:
            raise ConfigurationError(NO_INDEX)
        case = await self.patient_case(patient, source)
        hits = await asyncio.to_thread(index.similar, case, k, own_cases_out(case, flt))
        return shown_to(hits, case_privacy)

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The structured tools ``facts`` can run, each as its OpenAI function schema."""
        return [t.schema()["function"] for t in self._runtime().tools.tools.values()]

    @property
    def is_open(self) -> bool:
        """Whether the source, backend, index and checkpointer have been opened."""
        return self.runtime is not None

    @property
    def model_name(self) -> str:
        """The model backend answering questions (``evidence``: the embedded evidence answer)."""
        rt = self.runtime
        return rt.backend.name if rt is not None else "evidence"

    @property
    def cases_indexed(self) -> int:
        """How many cases the similar-case index holds (0 when there is none)."""
        index = self._runtime().index
        return len(index) if index is not None else 0

    def thumbnail(self, case_key: str) -> bytes | None:
        """The index's PNG preview of a similar case's first image, if any."""
        rt = self.runtime
        if rt is None or rt.index is None:
            return None
        return rt.index.thumbnail(case_key)

    def _answer(
        self, state: dict[str, Any], thread: str | None, scope: RecordScope | None = None
    ) -> Answer:
        answer: Answer = state["answer"]
        warnings = list(answer.warnings)
        if scope is not None and scope.withheld():
            warnings.append(withheld_warning(scope))
        # finalize's own time included
        return answer.model_copy(
            update={
                "thread_id": thread,
                "latency_ms": dict(state.get("timings", {})),
                "warnings": warnings,
            }
        )

    async def history(self, thread_id: str) -> list[dict[str, str]]:
        """The questions and answers of a thread so far."""
        snapshot = await self._saved_state(thread_id)
        return list(snapshot.values.get("history", [])) if snapshot else []
