"""The graph's steps. Each takes the state and the runtime (``agent.runtime.AgentRuntime``, from
the run's config) and returns the part of the state it changes; ``graph.py`` wires them. Each step's
docstring names the state keys (``agent.state.AskState``) it reads and writes; every step also
writes its time in milliseconds to ``timings``."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.errors import GraphBubbleUp

import prompts
from agent.answer import (
    Answer,
    Citation,
    FactUsed,
    ImageUsed,
    SentenceCheck,
    SimilarCase,
    ToolCallMade,
)
from agent.answer_prompt import AnswerPrompt, answer_prompt
from agent.backends import BackendError, Generation, Grounds
from agent.backends.evidence import EvidenceBackend, similar_line
from agent.grounding import ASSERTS_NOTHING, evidence_map, supported_fraction, verify
from agent.planner import is_follow_up
from agent.runtime import SIMILAR_NEEDS_WHOLE, AgentRuntime, own_cases_out, runtime
from agent.state import AskState
from agent.tools import ToolError
from common import observe
from connectors.errors import ChartSightError
from connectors.images import PatientImage
from connectors.record import PatientRecord
from retrieval.index import shown_to

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


def timed(
    name: str,
) -> Callable[[Callable[..., Awaitable[dict[str, Any]]]], Callable[..., Awaitable[dict[str, Any]]]]:
    """Record the node's duration in ``timings`` and tell listeners when it starts and ends. A
    step that runs more than once for a question (``generate`` and ``verify`` on a retry,
    ``think`` and ``act`` in the tool loop) records the sum of its runs, in milliseconds."""

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
            before = (state.get("timings") or {}).get(name, 0.0)  # this question's earlier runs
            out["timings"] = {name: round(before + elapsed, 2)}
            rt.emit("node_finished", node=name, ms=round(elapsed, 2))
            return out

        node.__name__ = name
        return node

    return wrap


@timed("resolve")
async def resolve(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Fetch the patient's record (cached while fresh) and start a new question.

    Reads ``patient_key``. Writes ``patient_id``, ``patient_line`` (the demographics statement),
    ``warnings`` (parts of the record that could not be fetched, resources that failed validation,
    lines withheld from the model) and clears what belonged to the thread's previous question."""
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
        "given": {},
        "checked": [],
        "transcript": [],
        "tool_steps": 0,
        "pending_calls": [],
        "model_facts": [],
        "tool_log": None,  # clears the previous question's
    }


@timed("plan")
async def plan(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Decide the tool calls by rules (``agent.planner``, with the plug-in rules and the tools'
    declared questions). A short follow-up ("and before that?") takes its subject from the
    thread's previous plan or question. Typos read as clinical words are said in ``warnings``.

    Reads ``question``, ``history``, ``plan`` (the previous question's). Writes ``plan`` (a list of
    ``{"tool", "args"}``), ``want_images``, ``want_similar``, ``warnings``."""
    question = state["question"]
    made = rt.planner.plan(question)
    calls = [asdict(c) for c in made.calls]
    if not calls and state.get("history") and is_follow_up(question):
        # a follow-up takes its subject from the thread's last question; "before that" steps
        # back one result
        earlier = re.search(r"\b(before|previous|earlier|prior)\b", question, re.IGNORECASE)
        for call in state.get("plan", []):
            args = dict(call["args"])
            if earlier and call["tool"] == "latest_observation":
                if args.get("since"):  # "on 2019-03-17" → the latest before that day
                    since = datetime.fromisoformat(args.pop("since"))
                    args["until"] = (since - timedelta(seconds=1)).isoformat()
                    args.pop("nth", None)
                else:
                    args["nth"] = int(args.get("nth", 1)) + 1
            calls.append({"tool": call["tool"], "args": args})
        if not calls:
            made = rt.planner.plan(f"{state['history'][-1]['question']} {question}")
            calls = [asdict(c) for c in made.calls]
    rt.emit("plan", calls=calls)
    return {
        "plan": calls,
        "want_images": made.images,
        "want_similar": made.similar_cases,
        "warnings": [f"read {c.written!r} as {c.read!r}" for c in made.corrections],
    }


def record_of(state: AskState, rt: AgentRuntime) -> PatientRecord:
    """The record of the state's ``patient_id``, as ``resolve`` cached it."""
    return rt.records[state["patient_id"]]


@timed("tools")
async def gather_tools(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Run the planned tool calls; a failing tool is left out with a warning, never the others.

    Reads ``plan``, ``model_facts`` (facts of the model's own tool calls). Writes ``facts``
    (``FactUsed``, each statement once), ``warnings``, ``tool_log`` (``ToolCallMade``)."""
    record = record_of(state, rt)
    if any(c["tool"] == "similar_cases" for c in state.get("plan", [])):
        await rt.ensure_images(record, quiet=True)
    ctx = rt.context(record)
    facts: list[FactUsed] = []
    warnings = []
    log_entries = []
    for call in state.get("plan", []):
        failed = True
        try:
            facts += [fact.used() for fact in rt.tools[call["tool"]](ctx, **call["args"])]
            failed = False
        except ToolError as exc:
            warnings.append(str(exc))
        except Exception as exc:  # one tool's defect must not take the others' facts down
            log.warning(
                "tool %s failed: %s", call["tool"], exc, exc_info=log.isEnabledFor(logging.DEBUG)
            )
            warnings.append(
                f"the {call['tool']} tool failed and was left out ({type(exc).__name__})"
            )
        log_entries.append(
            ToolCallMade(tool=call["tool"], args=call["args"], by="rules", error=failed)
        )
    seen = {f.statement for f in facts}
    facts += [f for f in state.get("model_facts", []) if f.statement not in seen]
    rt.emit("facts", count=len(facts))
    return {"facts": facts, "warnings": warnings, "tool_log": log_entries}


def ranking_question(state: AskState, rt: AgentRuntime) -> str:
    """What the evidence is ranked for: the question, preceded by the thread's latest question
    that was not itself a follow-up when it is a short follow-up (``agent.planner.is_follow_up``)
    for which the planner finds nothing by itself, as ``plan`` takes its subject then."""
    question = state["question"]
    history = state.get("history") or []
    if not history or not is_follow_up(question) or rt.planner.plan(question).calls:
        return question
    subject = next(
        (t["question"] for t in reversed(history) if not is_follow_up(t["question"])),
        history[-1]["question"],
    )
    return f"{subject} {question}"


@timed("evidence")
async def gather_evidence(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Rank the record's evidence lines for the question (``retrieval.rank``); a short follow-up
    ("and before that?") is ranked together with the thread's previous question, whose subject it
    takes.

    Reads ``question``, ``history``. Writes ``evidence`` (id → line, best first, within the token budget),
    ``evidence_scores`` (id → the score and its parts), ``all_lines`` (every line of the record,
    for citations of facts)."""
    items = rt.evidence_items(record_of(state, rt))
    # embedding the question (and new lines) is CPU work: off the event loop
    ranked = await asyncio.to_thread(rt.ranker.rank, ranking_question(state, rt), items)
    by_id = {e.id: e.text for e in items}
    evidence = {r.evidence.id: r.evidence.text for r in ranked}
    scores = {r.evidence.id: {"score": r.score, **r.parts} for r in ranked}
    rt.emit("evidence", count=len(evidence))
    return {"evidence": evidence, "evidence_scores": scores, "all_lines": by_id}


@timed("images")
async def gather_images(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Collect the patient's images when the question wants them or similar cases.

    Reads ``want_images``, ``want_similar``. Writes ``images`` (``ImageUsed``, at most
    ``MAX_IMAGES``) and ``warnings`` (images left out, a failing image source)."""
    if not state.get("want_images") and not state.get("want_similar"):
        return {"images": []}
    try:
        found = await rt.ensure_images(record_of(state, rt))
    except ChartSightError as exc:
        return {"images": [], "warnings": [f"images could not be fetched: {exc}"]}
    warnings = [f"image {f.provenance.fhir_reference} left out: {f.error}" for f in found.failures]
    return {"images": [_image_used(i) for i in found.images[:MAX_IMAGES]], "warnings": warnings}


def _image_used(image: PatientImage) -> ImageUsed:
    p = image.provenance
    return ImageUsed(
        reference=p.fhir_reference,
        modality=image.modality,
        study_uid=p.study_uid,
        series_uid=p.series_uid,
        sop_instance_uid=p.sop_instance_uid,
    )


@timed("similar")
async def gather_similar(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Find the cases most similar to the patient's (the patient's own left out), shown as the
    caller may see them (``case_privacy``).

    Reads ``want_similar``. Writes ``similar`` (``SimilarCase``, 3 at most) and ``warnings`` (no
    index; none shown to a caller whose SMART scopes do not grant every type)."""
    if not state.get("want_similar"):
        return {"similar": []}
    if not rt.similar_allowed:
        return {"similar": [], "warnings": [SIMILAR_NEEDS_WHOLE]}
    if rt.index is None or len(rt.index) == 0:
        return {"similar": [], "warnings": ["no similar-case index (run `chartsight index build`)"]}
    record = record_of(state, rt)
    case = rt.patient_case(record, await rt.ensure_images(record))
    hits = await asyncio.to_thread(rt.index.similar, case, 3, own_cases_out(case))
    hits = shown_to(hits, rt.case_privacy)
    return {
        "similar": [
            SimilarCase(key=h.key, score=round(h.score, 4), summary=h.summary) for h in hits
        ]
    }


def grounds(state: AskState) -> Grounds:
    """What the answer is written from, as backends take it."""
    return Grounds(
        facts=tuple(state.get("facts", [])),
        evidence=dict(state.get("evidence", {})),
        evidence_scores=dict(state.get("evidence_scores", {})),
        similar=tuple(state.get("similar", [])),
    )


def _evidence_for(state: AskState) -> dict[str, str]:
    """The evidence a sentence may cite: the ranked lines, every line a fact cites, the similar
    cases' lines, and the facts' statements under the ids they cite (``evidence_map``)."""
    lines = dict(state.get("evidence", {}))
    all_lines = state.get("all_lines", {})
    for fact in state.get("facts", []):
        for ref in fact.evidence:
            if ref not in lines and ref in all_lines:
                lines[ref] = all_lines[ref]
    for case in state.get("similar", []):
        lines[case.key] = similar_line(case)
    return evidence_map(lines, state.get("facts", []))


def _trusted(state: AskState) -> list[str]:
    """The tools' statements, which stand word for word (they were computed from the record)."""
    return [f.statement for f in state.get("facts", []) if f.evidence]


def _citable(state: AskState) -> dict[str, str]:
    """What a sentence may cite: ``given`` as ``generate`` made it once per question, else made
    now (``_evidence_for``)."""
    return state.get("given") or _evidence_for(state)


def _prompt(state: AskState, rt: AgentRuntime, given: dict[str, str]) -> AnswerPrompt:
    """The answer prompt (``agent.answer_prompt``) with the patient's images when they were
    gathered."""
    images: tuple[PatientImage, ...] = ()
    if state.get("images") and state.get("patient_id") in rt.images:
        images = tuple(rt.images[state["patient_id"]].images[:MAX_IMAGES])
    return answer_prompt(
        state, given, evidence_tokens=rt.settings.model.evidence_tokens, images=images
    )


EVIDENCE = EvidenceBackend()  # the fallback when a model cannot answer


@timed("generate")
async def generate(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Write a draft with the configured backend (token by token to listeners when it streams);
    a backend that fails gives way to the evidence backend, with a warning.

    Reads the gathered keys (``facts``, ``evidence``, ``evidence_scores``, ``similar``,
    ``images``, ``patient_line``, ``history``) and, on a retry, ``draft`` and ``checked``. Writes
    ``draft``, ``given`` (what a sentence may cite, made once per question), ``model``,
    ``attempts``; on a fallback also ``fallback`` and ``warnings``, and reports
    ``observe.MODEL_ERROR`` (the ``model.name`` setting, the error's class name). The model gets
    what is left of the question's model time (``AgentRuntime.model_time``); past it, the evidence
    answer is given as for any model failure."""
    attempts = state.get("attempts", 0)
    backend = rt.backend
    given = grounds(state)
    citable = _citable(state)
    try:
        if backend.name == EVIDENCE.name:
            reply = await backend.generate([], given)
        else:
            prompt = _prompt(state, rt, citable)
            stream = getattr(backend, "stream", None)
            async with rt.model_time():
                if rt.on_event is not None and stream is not None:
                    # listeners get the answer token by token as the model writes it (with its
                    # aliases: the ids are put back in the whole answer)
                    parts = []
                    async for token in stream(prompt.messages):
                        parts.append(token)
                        rt.emit("token", text=token)
                    reply = Generation("".join(parts).strip(), backend.name)
                else:
                    reply = await backend.generate(prompt.messages, given)
            # the model cites aliases ([E1]); the verifier reads record ids
            reply = Generation(prompt.resolve(reply.text), reply.model, reply.usage)
    except BackendError as exc:
        observe.report(
            observe.MODEL_ERROR, backend=rt.settings.model.name, error=type(exc).__name__
        )
        rt.emit("fallback", reason=exc.public)  # streamed to callers: no server address
        log.warning("model fell back to the evidence answer: %s", exc)  # the operator's log
        return {
            "draft": (await EVIDENCE.generate([], given)).text,
            "given": citable,
            "model": EVIDENCE.name,
            "fallback": True,
            "attempts": MAX_ATTEMPTS,
            "warnings": [
                f"the model could not answer ({exc.public}); the evidence answer is given instead"
            ],
        }
    rt.emit("generated", model=reply.model, chars=len(reply.text))
    return {
        "draft": reply.text,
        "given": citable,
        "model": backend.name,
        "attempts": attempts + 1,
    }


@timed("verify")
async def check(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Check each sentence of the draft against the evidence it cites (``agent.grounding``).

    Reads ``draft``, ``question`` (whose time window a sentence may repeat) and the gathered keys.
    Writes ``checked`` (``SentenceCheck`` per sentence)."""
    result = verify(
        state.get("draft", ""), _citable(state), _trusted(state), state.get("question", "")
    )
    rt.emit("verified", supported=len(result.kept), rejected=len(result.rejected))
    return {"checked": list(result.sentences)}


def after_check(state: AskState) -> str:
    """Retry once with the verifier's findings when a model's answer had unsupported sentences
    (reads ``checked``, ``model``, ``attempts``); the next step's name. A sentence that only
    asserts nothing ("See the cited records") is removed without a retry."""
    rejected = any(
        not c.supported and c.problems != (ASSERTS_NOTHING,) for c in state.get("checked", [])
    )
    if rejected and state.get("model") != EVIDENCE.name and state.get("attempts", 0) < MAX_ATTEMPTS:
        return "generate"
    return "finalize"


def _model_label(model: str, fallback: bool) -> str:
    if not fallback:
        return model
    return f"evidence (fallback from {model})" if model != EVIDENCE.name else "evidence (fallback)"


@timed("finalize")
async def finalize(state: AskState, rt: AgentRuntime) -> dict[str, Any]:
    """Make the ``Answer``: the supported sentences with their citations, or the evidence answer
    when none of the model's held up, or an abstention ("The record does not answer this
    question.") with the closest evidence lines in ``nearest``, apart from the citations.

    Reads ``question``, ``patient_id``, ``checked``, ``model``, ``fallback``, ``facts``,
    ``similar``, ``images``, ``evidence``, ``all_lines``, ``warnings``, ``timings``, ``tool_log``.
    Writes ``answer`` and appends the turn to ``history``."""
    given = _citable(state)
    checked: list[SentenceCheck] = list(state.get("checked", []))
    kept = [c for c in checked if c.supported]
    warnings: list[str] = []
    model = state.get("model", EVIDENCE.name)
    fallback = state.get("fallback", False)
    shown = checked  # the checks of the sentences the answer shows
    if not kept and model != EVIDENCE.name:
        # nothing the model said held up: give the evidence answer instead, and say so
        draft = (await EVIDENCE.generate([], grounds(state))).text
        shown = list(verify(draft, given, _trusted(state), state.get("question", "")).sentences)
        kept = [c for c in shown if c.supported]
        warnings.append(
            "no sentence of the model's answer was supported; the evidence answer is given instead"
        )
        fallback = True
    # every sentence written and removed: the model's, and after a fallback the evidence
    # answer's too (as when the evidence answer was the draft: generate's fallback)
    rejected = [c for c in checked if not c.supported]
    rejected += [c for c in shown if not c.supported and c not in rejected]
    if rejected:
        warnings.append(f"{len(rejected)} unsupported sentence(s) removed")
    abstained = not kept
    nearest: list[Citation] = []
    if abstained:
        # the closest lines are kept apart: they support no statement, so they are no citation
        text = "The record does not answer this question."
        cited = []
        nearest = [
            Citation(reference=ref, text=line)
            for ref, line in list(state.get("evidence", {}).items())[:3]
        ]
    else:
        # the evidence answer is a list of facts: one per line; a model's prose stays prose
        sep = "\n" if model == EVIDENCE.name or fallback else " "
        text = sep.join(c.text for c in kept)
        cited = list(dict.fromkeys(ref for c in kept for ref in c.citations))
    lines = {**state.get("all_lines", {}), **state.get("evidence", {})}
    answer = Answer(
        question=state["question"],
        patient_id=state["patient_id"],
        text=text,
        citations=[
            Citation(reference=ref, text=lines.get(ref) or given.get(ref, "")) for ref in cited
        ],
        facts=list(state.get("facts", [])),
        similar_cases=list(state.get("similar", [])),
        images=list(state.get("images", [])),
        model=_model_label(model, fallback),
        prompt_version=prompts.DEFAULT_VERSION,
        # over the sentences shown (after a fallback: the evidence answer's; on both fallback
        # paths, generate's and this step's, the same sentences), those that assert nothing left
        # out (``grounding.supported_fraction``), so that it means the same on every path; the
        # model's removed sentences stay listed in ``rejected``
        supported_fraction=round(supported_fraction(shown), 4),
        abstained=abstained,
        nearest=nearest,
        fallback_used=fallback,
        warnings=[*state.get("warnings", []), *warnings],
        rejected=rejected,
        latency_ms=dict(state.get("timings", {})),
        tool_calls=list(state.get("tool_log", [])),
    )
    return {
        "answer": answer,
        "history": [{"question": state["question"], "answer": text}],
    }
