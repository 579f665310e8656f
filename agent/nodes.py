"""The graph's nodes. Each takes the state (and the runtime, through the run's config) and returns
the part of the state it changes. ``graph.py`` wires them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.errors import GraphBubbleUp

import prompts
from agent.answer import Answer, Citation, FactUsed, ImageUsed, SimilarCase
from agent.backends import Backend, BackendError, Generation, Message
from agent.cache import RecentCache
from agent.grounding import evidence_map, verify
from agent.planner import is_follow_up
from agent.planner import plan as rule_plan
from agent.settings import Settings
from agent.state import AskState
from agent.tools import ToolContext, ToolError, ToolRegistry
from connectors.dicomweb import DicomWebClient
from connectors.errors import ChartSightError
from connectors.images import ImageSet, PatientImage, collect_images
from connectors.record import PatientRecord, assemble_record
from connectors.source import FhirSource
from retrieval.cases import Case, CasePrivacy, cases_from_record
from retrieval.evidence import Evidence, record_evidence
from retrieval.index import CaseFilter, CaseIndex, shown_to
from retrieval.rank import EvidenceRanker

log = logging.getLogger(__name__)


class StepError(ChartSightError):
    """A step of the graph failed on this question; the message names the step."""


# What a gathering step contributes when it fails: nothing, so the answer rests on the others (or
# abstains), with a warning naming the step.
SKIPPABLE: dict[str, dict[str, Any]] = {
    "tools": {"facts": [], "tool_log": []},
    "evidence": {"evidence": {}, "evidence_scores": {}, "all_lines": {}},
    "images": {"images": []},
    "similar": {"similar": []},
}

MAX_ATTEMPTS = 2  # the first answer and one retry with the verifier's findings
MAX_IMAGES = 4
GATHER_NODES = ("tools", "evidence", "images", "similar")  # run in parallel after planning


@dataclass
class AgentRuntime:
    """What the nodes work with; not part of the (checkpointed) state."""

    settings: Settings
    source: FhirSource
    tools: ToolRegistry
    ranker: EvidenceRanker
    backend: Backend | None = None
    index: CaseIndex | None = None
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

    def evidence_items(self, record: PatientRecord) -> list[Evidence]:
        """The record's evidence lines, compacted once per patient (records are cached too)."""
        if record.patient_id not in self.evidence:
            self.evidence[record.patient_id] = record_evidence(record)
        return self.evidence[record.patient_id]

    def context(self, record: PatientRecord) -> ToolContext:
        """A tool context that reuses the cached evidence lines. Its similar cases follow
        ``case_privacy`` (generalised for a caller bound to one patient), as ``gather_similar``'s
        do: the ``similar_cases`` tool is reachable by the model and by MCP's ``patient_facts``."""
        items = self.evidence_items(record)
        index = self.index
        privacy = self.case_privacy

        def similar(k: int) -> list[Any]:
            assert index is not None
            case = self.patient_case(record, self.images.get(record.patient_id) or ImageSet())
            return shown_to(index.similar(case, k, own_cases_out(case)), privacy)

        return ToolContext(
            record,
            now=self.now or datetime.now().astimezone(),
            _evidence={e.id: e for e in items},
            similar=similar if index is not None and len(index) else None,
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
        limit = self.settings.retrieval.index.max_images_per_case
        return cases_from_record(record, images, max_images=limit)[0]

    def emit(self, kind: str, **data: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, data)


def own_cases_out(case: Case, flt: CaseFilter | None = None) -> CaseFilter:
    """``flt`` leaving out the patient's own cases: by id, and by identifier (the same person
    indexed from another source has another id)."""
    return dataclasses.replace(
        flt or CaseFilter(), exclude_patient=case.patient_id, exclude_identifiers=case.identifiers
    )


def runtime(config: RunnableConfig) -> AgentRuntime:
    return config["configurable"]["runtime"]


def timed(
    name: str,
) -> Callable[[Callable[..., Awaitable[dict[str, Any]]]], Callable[..., Awaitable[dict[str, Any]]]]:
    """Record the node's duration in ``timings`` and tell listeners when it starts and ends."""

    def wrap(
        fn: Callable[..., Awaitable[dict[str, Any]]],
    ) -> Callable[..., Awaitable[dict[str, Any]]]:
        async def node(state: AskState, config: RunnableConfig) -> dict[str, Any]:
            rt = runtime(config)
            rt.emit("node_started", node=name)
            start = time.perf_counter()
            try:
                out = await fn(state, rt)
            except (ChartSightError, GraphBubbleUp):
                raise  # already clear (or LangGraph's own control flow)
            except Exception as exc:  # a defect met on odd data: named, never a traceback
                # one line for the user; the traceback for developers (debug logging)
                log.warning(
                    "the %s step failed: %s", name, exc, exc_info=log.isEnabledFor(logging.DEBUG)
                )
                what = f"{type(exc).__name__}: {exc}"[:300]
                if name not in SKIPPABLE:
                    raise StepError(f"the {name} step failed ({what})") from exc
                out = {
                    **SKIPPABLE[name],
                    "warnings": [f"the {name} step failed and was left out ({what})"],
                }
            elapsed = (time.perf_counter() - start) * 1000
            out["timings"] = {name: round(elapsed, 2)}
            rt.emit("node_finished", node=name, ms=round(elapsed, 2))
            return out

        node.__name__ = name
        return node

    return wrap


@timed("resolve")
async def resolve(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    record = await rt.record(state["patient_key"])
    warnings = [
        f"part of the record could not be fetched: {p.what}: {p.error}" for p in record.problems
    ]
    warnings += [
        f"{i.reference} failed validation and was left out: {i.error}" for i in record.invalid[:5]
    ]
    warnings += [
        f"{e.id} was withheld from the model: {e.withheld}"
        for e in rt.evidence_items(record)
        if e.withheld
    ]
    demo = rt.tools["demographics"](rt.context(record))[0]
    return {
        "patient_id": record.patient_id,
        "patient_line": demo.statement,
        "warnings": warnings,
        "attempts": 0,
        "fallback": False,
        # what belonged to the thread's previous question
        "facts": [],
        "evidence": {},
        "evidence_scores": {},
        "similar": [],
        "images": [],
        "draft": "",
        "checked": [],
        "transcript": [],
        "tool_steps": 0,
        "pending_calls": [],
        "model_facts": [],
        "tool_log": None,  # clears the previous question's
    }


@timed("plan")
async def plan(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    question = state["question"]
    made = rule_plan(question)
    calls = [asdict(c) for c in made.calls]
    if not calls and state.get("history") and is_follow_up(question):
        # a follow-up takes its subject from the thread's last question; "before that" steps
        # back one result
        earlier = re.search(r"\b(before|previous|earlier|prior)\b", question, re.IGNORECASE)
        for call in state.get("plan", []):
            args = dict(call["args"])
            if earlier and call["tool"] == "latest_observation":
                args["nth"] = int(args.get("nth", 1)) + 1
            calls.append({"tool": call["tool"], "args": args})
        if not calls:
            made = rule_plan(f"{state['history'][-1]['question']} {question}")
            calls = [asdict(c) for c in made.calls]
    rt.emit("plan", calls=calls)
    return {
        "plan": calls,
        "want_images": made.images,
        "want_similar": made.similar_cases,
    }


def record_of(state: AskState, rt: AgentRuntime) -> PatientRecord:
    return rt.records[state["patient_id"]]


@timed("tools")
async def gather_tools(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    record = record_of(state, rt)
    if any(c["tool"] == "similar_cases" for c in state.get("plan", [])):
        await rt.ensure_images(record, quiet=True)
    ctx = rt.context(record)
    facts: list[dict[str, Any]] = []
    warnings = []
    log_entries = []
    for call in state.get("plan", []):
        try:
            for fact in rt.tools[call["tool"]](ctx, **call["args"]):
                facts.append(fact.to_dict())
            log_entries.append({**call, "by": "rules", "error": False})
        except ToolError as exc:
            warnings.append(str(exc))
            log_entries.append({**call, "by": "rules", "error": True})
        except Exception as exc:  # one tool's defect must not take the others' facts down
            log.warning(
                "tool %s failed: %s", call["tool"], exc, exc_info=log.isEnabledFor(logging.DEBUG)
            )
            warnings.append(
                f"the {call['tool']} tool failed and was left out ({type(exc).__name__})"
            )
            log_entries.append({**call, "by": "rules", "error": True})
    seen = {f["statement"] for f in facts}
    facts += [f for f in state.get("model_facts", []) if f["statement"] not in seen]
    rt.emit("facts", count=len(facts))
    return {"facts": facts, "warnings": warnings, "tool_log": log_entries}


@timed("evidence")
async def gather_evidence(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    items = rt.evidence_items(record_of(state, rt))
    # embedding the question (and new lines) is CPU work: off the event loop
    ranked = await asyncio.to_thread(rt.ranker.rank, state["question"], items)
    by_id = {e.id: e.text for e in items}
    evidence = {r.evidence.id: r.evidence.text for r in ranked}
    scores = {r.evidence.id: {"score": r.score, **r.parts} for r in ranked}
    rt.emit("evidence", count=len(evidence))
    return {"evidence": evidence, "evidence_scores": scores, "all_lines": by_id}


@timed("images")
async def gather_images(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    if not state.get("want_images") and not state.get("want_similar"):
        return {"images": []}
    try:
        found = await rt.ensure_images(record_of(state, rt))
    except ChartSightError as exc:
        return {"images": [], "warnings": [f"images could not be fetched: {exc}"]}
    warnings = [f"image {f.provenance.fhir_reference} left out: {f.error}" for f in found.failures]
    return {"images": [_image_dict(i) for i in found.images[:MAX_IMAGES]], "warnings": warnings}


def _image_dict(image: PatientImage) -> dict[str, Any]:
    p = image.provenance
    return {
        "reference": p.fhir_reference,
        "modality": image.modality,
        "study_uid": p.study_uid,
        "series_uid": p.series_uid,
        "sop_instance_uid": p.sop_instance_uid,
    }


@timed("similar")
async def gather_similar(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    if not state.get("want_similar"):
        return {"similar": []}
    if rt.index is None or len(rt.index) == 0:
        return {"similar": [], "warnings": ["no similar-case index (run `chartsight index build`)"]}
    record = record_of(state, rt)
    case = rt.patient_case(record, await rt.ensure_images(record))
    hits = await asyncio.to_thread(rt.index.similar, case, 3, own_cases_out(case))
    hits = shown_to(hits, rt.case_privacy)
    return {
        "similar": [{"key": h.key, "score": round(h.score, 4), "summary": h.summary} for h in hits]
    }


def _matches(scores: dict[str, float]) -> bool:
    """Whether an evidence item shares words or codes with the question (not only its meaning)."""
    return (
        scores.get("lexical", 0) > 0 or scores.get("code", 0) > 0 or scores.get("category", 0) > 0
    )


def _one_sentence(line: str) -> str:
    """A record line as one sentence: its inner sentence ends become semicolons."""
    body, sep, cite = line.rpartition(" [")
    body = re.sub(r"(?<!\d)[.!?]+(?=\s|$)", ";", body).rstrip(";")
    return f"{body}{sep}{cite}" if sep else re.sub(r"[.!?]+(?=\s|$)", ";", line).rstrip(";")


def _similar_line(case: dict[str, Any]) -> str:
    summary = case["summary"]
    if len(summary) > 240:  # cut at a word, and say so (never "Systolic Blood Pressur")
        summary = summary[:240].rsplit(" ", 1)[0].rstrip(" ;,.") + " …"
    summary = summary.replace(". ", "; ").rstrip(".")
    return f"Similar case (score {case['score']:.2f}): {summary}"


def evidence_answer(state: AskState) -> str:
    """The embedded default: the facts, else the evidence lines that share words or codes with the
    question; each sentence cited. Empty when nothing matches (the answer then abstains)."""
    # each statement once (two tools may list the same condition)
    sentences = list(
        dict.fromkeys(f["statement"] for f in state.get("facts", []) if f.get("evidence"))
    )
    # when a result was asked for and the record has none, other lines that share a word with the
    # question (hemoglobin for an A1c, HDL for an LDL) are never offered as the answer
    measured = {"latest_observation", "observation_stats"}
    asked_for_a_result = any(f.get("tool") in measured for f in state.get("facts", []))
    if not sentences and not asked_for_a_result:
        scores = state.get("evidence_scores", {})
        lines = [
            line for ref, line in state.get("evidence", {}).items() if _matches(scores.get(ref, {}))
        ][:3]
        # a record line is quoted as one sentence: a note's own full stops must not turn its words
        # ("The patient is healthy.") into a sentence of the answer that stands on its own
        sentences = [f"Relevant record entry: {_one_sentence(line)}" for line in lines]
    for case in state.get("similar", []):
        sentences.append(f"{_similar_line(case)} [{case['key']}]")
    return " ".join(s if s.rstrip().endswith((".", "]")) else s + "." for s in sentences)


def _evidence_for(state: AskState) -> dict[str, str]:
    lines = dict(state.get("evidence", {}))
    all_lines = state.get("all_lines", {})
    for fact in state.get("facts", []):
        for ref in fact.get("evidence", []):
            if ref not in lines and ref in all_lines:
                lines[ref] = all_lines[ref]
    for case in state.get("similar", []):
        lines[case["key"]] = _similar_line(case)
    facts = [
        (f["statement"], tuple(f.get("evidence", [])), tuple(f.get("echo", [])))
        for f in state.get("facts", [])
    ]
    return evidence_map(lines, facts)


def _trusted(state: AskState) -> list[str]:
    """The tools' statements, which stand word for word (they were computed from the record)."""
    return [f["statement"] for f in state.get("facts", []) if f.get("evidence")]


def _messages(state: AskState, rt: AgentRuntime) -> list[Message]:
    version = prompts.DEFAULT_VERSION
    system = prompts.render("system", version, max_sentences=6)
    given = _evidence_for(state)
    lines = [v for k, v in given.items() if not k.startswith("Patient/")][:40]
    user = prompts.render(
        "answer",
        version,
        patient_line=state.get("patient_line", ""),
        question=state["question"],
        facts=[f["statement"] for f in state.get("facts", [])],
        evidence=lines,
        similar=[f"{c['summary'][:200]} [{c['key']}]" for c in state.get("similar", [])],
        images=[f"{i['modality'] or 'image'} [{i['reference']}]" for i in state.get("images", [])],
    )
    history = []
    for turn in state.get("history", [])[-3:]:
        history += [Message("user", turn["question"]), Message("assistant", turn["answer"])]
    images: tuple[PatientImage, ...] = ()
    if state.get("images") and state.get("patient_id") in rt.images:
        images = tuple(rt.images[state["patient_id"]].images[:MAX_IMAGES])
    messages = [Message("system", system), *history, Message("user", user, images)]
    if state.get("attempts", 0) > 0 and state.get("draft"):
        rejected = [c for c in state.get("checked", []) if not c["supported"]]
        messages += [
            Message("assistant", state["draft"]),
            Message("user", prompts.render("retry", version, rejected=rejected)),
        ]
    return messages


@timed("generate")
async def generate(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    attempts = state.get("attempts", 0)
    if rt.backend is None:
        return {"draft": evidence_answer(state), "model": "evidence", "attempts": attempts + 1}
    try:
        stream = getattr(rt.backend, "stream", None)
        if rt.on_event is not None and stream is not None:
            # listeners get the answer token by token as the model writes it
            parts = []
            async for token in stream(_messages(state, rt)):
                parts.append(token)
                rt.emit("token", text=token)
            reply = Generation("".join(parts).strip(), rt.backend.name)
        else:
            reply = await rt.backend.generate(_messages(state, rt))
    except BackendError as exc:
        rt.emit("fallback", reason=str(exc))
        return {
            "draft": evidence_answer(state),
            "model": "evidence",
            "fallback": True,
            "attempts": MAX_ATTEMPTS,
            "warnings": [
                f"the model could not answer ({exc}); the evidence answer is given instead"
            ],
        }
    rt.emit("generated", model=reply.model, chars=len(reply.text))
    return {"draft": reply.text, "model": rt.backend.name, "attempts": attempts + 1}


@timed("verify")
async def check(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    result = verify(state.get("draft", ""), _evidence_for(state), _trusted(state))
    checked = [
        {
            "text": s.text,
            "citations": list(s.citations),
            "supported": s.supported,
            "problems": list(s.problems),
        }
        for s in result.sentences
    ]
    rt.emit("verified", supported=len(result.kept), rejected=len(result.rejected))
    return {"checked": checked}


def after_check(state: AskState) -> str:
    """Retry once with the verifier's findings when a model's answer had unsupported sentences."""
    rejected = any(not c["supported"] for c in state.get("checked", []))
    if rejected and state.get("model") != "evidence" and state.get("attempts", 0) < MAX_ATTEMPTS:
        return "generate"
    return "finalize"


@timed("finalize")
async def finalize(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    given = _evidence_for(state)
    checked = state.get("checked", [])
    kept = [c for c in checked if c["supported"]]
    warnings: list[str] = []
    model = state.get("model", "evidence")
    fallback = state.get("fallback", False)
    shown = checked  # the checks of the sentences the answer shows
    if not kept and model != "evidence":
        # nothing the model said held up: give the evidence answer instead, and say so
        draft = evidence_answer(state)
        result = verify(draft, given, _trusted(state))
        checked_fallback = [
            {
                "text": s.text,
                "citations": list(s.citations),
                "supported": s.supported,
                "problems": list(s.problems),
            }
            for s in result.sentences
        ]
        kept = [c for c in checked_fallback if c["supported"]]
        shown = checked_fallback
        warnings.append(
            "no sentence of the model's answer was supported; the evidence answer is given instead"
        )
        fallback = True
    rejected = [c for c in checked if not c["supported"]]
    if rejected:
        warnings.append(f"{len(rejected)} unsupported sentence(s) removed")
    abstained = not kept
    if abstained:
        closest = list(state.get("evidence", {}).items())[:3]
        text = "The record does not answer this question." + (
            " Closest evidence: " + " ".join(line for _, line in closest) if closest else ""
        )
        cited = [ref for ref, _ in closest]
    else:
        text = " ".join(c["text"] for c in kept)
        cited = list(dict.fromkeys(ref for c in kept for ref in c["citations"]))
    lines = {**state.get("all_lines", {}), **state.get("evidence", {})}
    answer = Answer(
        question=state["question"],
        patient_id=state["patient_id"],
        text=text,
        citations=[Citation(ref, lines.get(ref) or given.get(ref, "")) for ref in cited],
        facts=[
            FactUsed(
                f["tool"],
                f["statement"],
                f["value"],
                f["unit"],
                f["date"],
                tuple(f["evidence"]),
                f.get("comparator"),
            )
            for f in state.get("facts", [])
        ],
        similar_cases=[
            SimilarCase(c["key"], c["score"], c["summary"]) for c in state.get("similar", [])
        ],
        images=[ImageUsed(**i) for i in state.get("images", [])],
        model=model
        if not fallback
        else f"evidence (fallback from {model})"
        if model != "evidence"
        else "evidence (fallback)",
        prompt_version=prompts.DEFAULT_VERSION,
        # over the sentences shown (after a fallback: the evidence answer's), so that it means the
        # same on every path; the model's removed sentences stay listed in ``rejected``
        supported_fraction=round(len([c for c in shown if c["supported"]]) / len(shown), 4)
        if shown
        else 0.0,
        abstained=abstained,
        fallback_used=fallback,
        warnings=[*state.get("warnings", []), *warnings],
        rejected=rejected,
        latency_ms=dict(state.get("timings", {})),
        tool_calls=list(state.get("tool_log", [])),
    )
    return {
        "answer": answer.to_dict(),
        "history": [{"question": state["question"], "answer": text}],
    }
