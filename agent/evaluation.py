"""Evaluation: run a suite of questions with expected answers against any source and backend, and
score each answer — for a hospital validating ChartSight on its own data before go-live.

A suite is a JSON Lines file, one question per line (``SuiteItem``)::

    {"id": "demo-0001", "family": "latest lab value", "patient": "6234b038-…",
     "question": "What was the most recent HbA1c?", "now": "2021-01-01",
     "expect": {"contains": ["5.9", "2020-12-13"], "cites": ["Observation/ab…"],
                "cite_types": ["Observation"], "may_cite": [], "abstain": false}}

``expect`` (all parts optional, all must hold):

- ``starts_with``: the answer's first words ("Yes: on", "No: ");
- ``contains``: phrases the answer states (case-insensitive, whitespace-normalised);
- ``cites``: references that must be cited; ``one_of``: equally right resources (results repeated
  at one instant), at least one cited; with ``cite_types``, the citations of those resource types
  must lie within ``cites`` ∪ ``one_of`` ∪ ``may_cite`` (exactly the expected resources);
- ``abstain``: true when the right answer is that the record does not hold it (an honest "no"
  naming what was searched counts, as does the graph's abstention); the ``contains`` phrases then
  say which words the honest "no" must use.

Scores per item: ``value`` (starts_with and contains), ``citations`` (cites and cite_types),
``abstention`` (abstained exactly when it should), ``right`` (all three), and the outcome
``right`` | ``rightly abstained`` | ``abstained`` (wrongly: the record had the answer) | ``wrong``
(a statement that is not the expected one). Latency is the wall time of ``ChartSight.ask``.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.answer import Answer
from agent.series import CitedSeries, cited_series
from connectors.errors import ChartSightError
from retrieval.clinical import aware


class EvalError(ChartSightError):
    """A suite file that cannot be read (not JSON Lines, an item of the wrong shape)."""


class Expect(BaseModel):
    """What a right answer does (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    starts_with: str | None = None
    contains: list[str] = Field(default_factory=list)
    cites: list[str] = Field(default_factory=list)
    one_of: list[str] = Field(default_factory=list)
    cite_types: list[str] = Field(default_factory=list)
    may_cite: list[str] = Field(default_factory=list)
    abstain: bool = False


class SuiteItem(BaseModel):
    """One question of a suite: ``patient`` (a Patient id or identifier), ``now`` (the date that
    counts as today for it, ISO; default: today), ``tuned`` (the question's wording was used while
    building ChartSight's rules: reported apart)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    family: str
    patient: str
    question: str
    expect: Expect
    now: str | None = None
    tuned: bool = False

    @field_validator("now")
    @classmethod
    def _iso_date(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"now {value!r} is not an ISO 8601 date") from None
        return value


def load_suite(paths: Iterable[Path]) -> list[SuiteItem]:
    """The items of JSON Lines suite files, in order (blank lines and ``#`` comments skipped).
    Raises ``EvalError`` naming the file and line of an item that is not valid (not JSON, JSON
    nested deeper than Python's recursion limit, a ``\\ud800`` escape of a lone surrogate, which
    no UTF-8 report can hold, not a ``SuiteItem``) and of an item whose id an
    earlier item already used; the file is read as UTF-8."""
    items: list[SuiteItem] = []
    where: dict[str, str] = {}  # item id → "file:line" of its first use
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise EvalError(f"cannot read suite {path}: {exc}") from exc
        for n, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                raw = json.loads(line)
                json.dumps(raw, ensure_ascii=False).encode("utf-8")  # no lone surrogate (\\ud800)
                item = SuiteItem.model_validate(raw)
            except UnicodeEncodeError as exc:
                raise EvalError(
                    f"{path}:{n}: not a suite item: it escapes a lone UTF-16 surrogate "
                    f"({exc.object[exc.start : exc.end]!a}), which is no character"
                ) from exc
            except ValidationError as exc:
                error = exc.errors()[0]
                where_ = ".".join(str(part) for part in error["loc"]) or "the line"
                raise EvalError(f"{path}:{n}: not a suite item: {where_}: {error['msg']}") from exc
            except json.JSONDecodeError as exc:
                raise EvalError(f"{path}:{n}: not a suite item: {exc}") from exc
            except RecursionError as exc:
                raise EvalError(f"{path}:{n}: not a suite item: JSON nested too deeply") from exc
            if item.id in where:
                raise EvalError(
                    f"{path}:{n}: suite item id {item.id!r} is used twice (first at "
                    f"{where[item.id]})"
                )
            where[item.id] = f"{path}:{n}"
            items.append(item)
    return items


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass
class ItemResult:
    """The score of one item: its parts, the outcome, the answer's text and citations, and the
    latency in milliseconds."""

    item: SuiteItem
    value: bool
    citations: bool
    abstention: bool
    outcome: str
    latency_ms: float
    text: str
    cited: list[str] = field(default_factory=list)
    error: str | None = None
    # the model path: the share of shown sentences supported, the model's sentences the verifier
    # removed (their count, and each one's text with the verifier's problems), and whether the
    # evidence answer stood in for the model's
    supported_fraction: float = 1.0
    rejected: int = 0
    fallback: bool = False
    # the cited results of one test over time, when the answer cites a series (for a plot)
    series: CitedSeries | None = None
    rejected_sentences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def right(self) -> bool:
        """Value, citations and abstention all as expected."""
        return self.value and self.citations and self.abstention


_CITED = re.compile(r"\[([A-Z][A-Za-z]+/[^\]\s]+)\]")


def _abstained(answer: Answer) -> bool:
    """The graph's abstention, or an answer whose direct answer (its first line) is an absence
    resting on the whole record: it says "No …" or "The record holds/has/names no …" and cites only
    the Patient ("No eGFR result in the record ... [Patient/x]"), whatever follows it (the newest
    result outside the period asked, the members no longer active)."""
    if answer.abstained:
        return True
    first = answer.text.strip().split("\n", 1)[0]
    refs = _CITED.findall(first)
    return (
        bool(refs)
        and all(r.startswith("Patient/") for r in refs)
        and bool(re.match(r"^(?:no\b|the record (?:holds|has|names|does) no)", first, re.I))
    )


def score(item: SuiteItem, answer: Answer, latency_ms: float) -> ItemResult:
    """Score ``answer`` against ``item.expect`` (see the module docstring)."""
    e = item.expect
    text = _norm(answer.text)
    value = (e.starts_with is None or text.startswith(_norm(e.starts_with))) and all(
        _norm(c) in text for c in e.contains
    )
    cited = [c.reference for c in answer.citations]
    citations = set(e.cites) <= set(cited) and (not e.one_of or bool(set(e.one_of) & set(cited)))
    if e.cite_types:
        allowed = set(e.cites) | set(e.one_of) | set(e.may_cite)
        typed = {r for r in cited if r.split("/", 1)[0] in e.cite_types}
        citations = citations and typed <= allowed
    abstained = _abstained(answer)
    abstention = abstained == e.abstain
    if value and citations and abstention:
        outcome = "rightly abstained" if e.abstain else "right"
    elif abstained and not e.abstain:
        outcome = "abstained"
    else:
        outcome = "wrong"
    return ItemResult(
        item,
        value,
        citations,
        abstention,
        outcome,
        latency_ms,
        answer.text,
        cited,
        supported_fraction=answer.supported_fraction,
        rejected=len(answer.rejected),
        fallback=answer.fallback_used,
        rejected_sentences=[
            {"text": c.text, "problems": list(c.problems)} for c in answer.rejected
        ],
    )


async def run_suite(
    agent: Any, items: Sequence[SuiteItem], progress: Any = None, series: int = 12
) -> list[ItemResult]:
    """Ask every item's question of ``agent`` (a ``ChartSight``) and score it; an item whose ask
    fails (unknown patient, a source error) is scored wrong with the error's message.
    ``progress(done, total)`` is called after each item. For the first ``series`` answers that
    cite 3 or more results of one test, ``ItemResult.series`` holds them
    (``agent.series.cited_series``, read from the patient's cached record) for the report's
    plots."""
    results: list[ItemResult] = []
    plotted = 0
    for n, item in enumerate(items, 1):
        start = time.perf_counter()
        try:
            answer = await agent.ask(item.patient, item.question)
        except ChartSightError as exc:
            elapsed = (time.perf_counter() - start) * 1000
            results.append(
                ItemResult(item, False, False, False, "wrong", elapsed, "", error=str(exc))
            )
        else:
            result = score(item, answer, (time.perf_counter() - start) * 1000)
            cited = [r for r in result.cited if r.startswith("Observation/")]
            if plotted < series and len(cited) >= 3:
                found = cited_series(await agent.record(answer.patient_id), cited)
                if found is not None:
                    result.series = found
                    plotted += 1
            results.append(result)
        if progress is not None:
            progress(n, len(items))
    return results


def suite_now(items: Sequence[SuiteItem]) -> datetime | None:
    """The one ``now`` the items share (None when they give none). Raises ``EvalError`` when they
    give several: one run has one today."""
    nows = {i.now for i in items if i.now}
    if len(nows) > 1:
        raise EvalError(f"the suite's items give several dates as now: {sorted(nows)}")
    if not nows:
        return None
    try:
        day = datetime.fromisoformat(nows.pop())
    except ValueError as exc:
        raise EvalError(f"suite 'now' is not an ISO date: {exc}") from exc
    return aware(day)


@dataclass
class FamilyScore:
    """Per family: items, right (incl. rightly abstained), each part's rate, wrong and wrongly
    abstained counts, latency p50 and p95 (ms)."""

    family: str
    items: int
    right: int
    value: float
    citations: float
    abstention: float
    wrong: int
    abstained: int
    p50_ms: float
    p95_ms: float
    tuned: bool


def summarise(results: Sequence[ItemResult]) -> list[FamilyScore]:
    """One ``FamilyScore`` per family, in order of first appearance."""
    by: dict[str, list[ItemResult]] = {}
    for r in results:
        by.setdefault(r.item.family, []).append(r)
    out = []
    for family, rs in by.items():
        lat = sorted(r.latency_ms for r in rs)
        out.append(
            FamilyScore(
                family,
                len(rs),
                sum(r.right for r in rs),
                sum(r.value for r in rs) / len(rs),
                sum(r.citations for r in rs) / len(rs),
                sum(r.abstention for r in rs) / len(rs),
                sum(r.outcome == "wrong" for r in rs),
                sum(r.outcome == "abstained" for r in rs),
                statistics.median(lat),
                lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
                any(r.item.tuned for r in rs),
            )
        )
    return out
