"""What every tool is made of: ``Fact`` (a result with its evidence), ``ToolContext`` (what a
tool computes from), argument models, ``Tool`` and the ``ToolRegistry``."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.answer import FactUsed
from common.plugins import PluginError, Registry
from connectors.errors import ChartSightError
from connectors.record import PatientRecord
from retrieval.clinical import (
    Point,
)
from retrieval.evidence import Compactors, Evidence, default_compactors
from retrieval.terms import TermTable, default_terms

log = logging.getLogger(__name__)


NOW_MIN = datetime.min.replace(tzinfo=UTC)  # sorts undated items first


class ToolError(ChartSightError):
    """A tool was called with arguments it cannot use."""


@dataclass(frozen=True)
class Fact:
    """A result computed from the record, with the evidence it rests on."""

    tool: str
    statement: str  # one readable sentence, its evidence cited in brackets
    value: Any = None
    unit: str | None = None
    date: datetime | None = None
    evidence: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def used(self) -> FactUsed:
        """The fact as an answer carries it: a partial date written at its own precision
        ("2026-03"), a censored value with its ``comparator``, the words it echoes from its call."""
        precision = self.details.get("date_precision")
        if self.date is None:
            when = None
        elif precision == "year":
            when = f"{self.date.year:04d}"
        elif precision == "month":
            when = f"{self.date.year:04d}-{self.date.month:02d}"
        else:
            when = self.date.isoformat()
        return FactUsed(
            tool=self.tool,
            statement=self.statement,
            value=self.value,
            unit=self.unit,
            comparator=self.details.get("comparator"),
            date=when,
            evidence=tuple(self.evidence),
            echo=tuple(self.details.get("echo", ())),
        )


@dataclass
class ToolContext:
    """What tools compute from: ``record`` (the ``PatientRecord``), ``evidence`` (its evidence
    lines by FHIR reference: ``retrieval.evidence.Evidence``, whose ``category`` is one of
    demographics, condition, observation, medication, allergy, procedure, encounter, report,
    document, imaging, image, immunization, care-plan, goal), ``now`` (the date that counts as now) and ``similar``
    (k → similar cases, when there is an index). A test builds one from a record:
    ``ToolContext(record, now=datetime(2021, 1, 1, tzinfo=UTC))``; records come from
    ``ChartSight.record`` or ``connectors.record.assemble_record(source, patient_id)``. A fact's
    ``details["echo"]`` lists words of the statement that only repeat the call's arguments (a
    period), which the verifier does not count as evidence."""

    record: PatientRecord
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    terms: TermTable = field(default_factory=default_terms)
    compactors: Compactors | None = None
    _evidence: dict[str, Evidence] | None = None
    # k → similar cases (CaseHit) from the case index, when there is one
    similar: Callable[[int], list[Any]] | None = None

    @property
    def evidence(self) -> dict[str, Evidence]:
        """Evidence items by id (built once)."""
        if self._evidence is None:
            items = (self.compactors or default_compactors()).evidence(self.record)
            self._evidence = {e.id: e for e in items}
        return self._evidence


def _cite(refs: Iterable[str]) -> str:
    return "".join(f" [{r}]" for r in refs)


def _day(value: datetime | None, precision: str = "day") -> str:
    if value is None:
        return "an unknown date"
    if precision == "year":
        return f"{value.year:04d}"
    if precision == "month":
        return f"{value.year:04d}-{value.month:02d}"
    return value.date().isoformat()


def _ago(when: datetime | None, now: datetime) -> str:
    """ " (25 years ago)", " (5 years 11 months ago)" when ``when`` is a year or more before
    ``now`` (months of 30.4375 days), else "": a "current" or "latest" item that old is said to be
    old."""
    if when is None:
        return ""
    months = int((now - when).days / 30.4375)
    years, months = divmod(months, 12)
    if years < 1:
        return ""
    more = f" {months} month{'s' if months > 1 else ''}" if months else ""
    return f" ({years} year{'s' if years > 1 else ''}{more} ago)"


def _point_day(point: Point) -> str:
    return point.when.text if point.when is not None else "an unknown date"


# --- arguments -----------------------------------------------------------------------------


class Args(BaseModel):
    """Tool arguments; unknown names are refused, so a model that invents one is told so."""

    model_config = ConfigDict(extra="forbid")


class NoArgs(Args):
    """No arguments."""

    pass


class AgeArgs(Args):
    """``on``: the date to compute the age on (default: now)."""

    on: date | None = Field(default=None, description="Age on this date (default: now).")


class ObservationArgs(Args):
    """``query``: what was measured (a name, a LOINC code or ``system|code``)."""

    query: str = Field(
        description="What was measured: a name ('A1c', 'blood pressure', 'creatinine'), a LOINC "
        "code ('4548-4') or 'system|code'."
    )


class LatestArgs(ObservationArgs):
    """``query``; ``nth`` (1: the latest, 2: the one before, ...); ``since``/``until``: the latest
    within that period."""

    nth: int = Field(default=1, ge=1, description="1: the latest; 2: the one before it; ...")
    since: datetime | None = Field(default=None, description="Only results from this time on.")
    until: datetime | None = Field(default=None, description="Only results up to this time.")


class WindowArgs(ObservationArgs):
    """``query``; the period: the last ``days``, or ``since``/``until`` (ISO date-times);
    ``focus``: what the question asks first (``count``, ``highest``, ``lowest``), said before the
    summary."""

    days: float | None = Field(default=None, gt=0, description="Only the last N days.")
    since: datetime | None = Field(default=None, description="Only from this time on.")
    until: datetime | None = Field(default=None, description="Only up to this time.")
    focus: Literal["count", "highest", "lowest"] | None = Field(
        default=None, description="Say this first: the count, the highest or the lowest result."
    )


class SimilarArgs(Args):
    """``k``: how many similar cases (1-10)."""

    k: int = Field(default=3, ge=1, le=10, description="How many similar cases.")


class ProcedureArgs(Args):
    """``query``: the procedure (a name, a SNOMED CT code as ``system|code``)."""

    query: str = Field(
        description="The procedure: a name ('colonoscopy', 'mammogram', 'knee replacement') or "
        "'system|code'."
    )


class ConditionArgs(Args):
    """``query``: the condition (a name, a SNOMED CT or ICD-10 code, or ``system|code``);
    ``judged``: a judgement asked about it ("controlled"), which a status cannot give."""

    query: str = Field(
        description="The condition: a name ('pneumonia', 'heart failure'), a SNOMED CT or ICD-10 "
        "code, or 'system|code'."
    )
    judged: str | None = Field(
        default=None,
        max_length=40,
        description="A judgement the question asks about the condition ('controlled', 'stable'): "
        "its recorded status cannot say, and the answer says so instead of yes or no.",
    )


class LimitArgs(Args):
    """``limit``: how many, newest first (1-100)."""

    limit: int = Field(default=5, ge=1, le=100, description="How many, newest first.")


@dataclass(frozen=True)
class Tool:
    """A named, described, typed function of the record: ``tool(ctx, **args) -> list[Fact]``.

    ``args`` is the pydantic model of its arguments (unknown names refused; its JSON schema is what
    a tool-calling model sees). ``questions`` are regular expressions (case-insensitive) of the
    questions it answers: when one matches, the rule planner calls the tool, with the pattern's
    named groups as arguments (``r"code status"``; ``r"notes? about (?P<query>[a-z ]+)"``), so a
    plug-in tool is used by ``chartsight ask`` without a model. Raises ``ToolError`` on arguments
    it cannot use."""

    name: str
    description: str
    args: type[BaseModel]
    fn: Callable[..., list[Fact]]
    questions: tuple[str, ...] = ()

    def __call__(self, ctx: ToolContext, /, **kwargs: Any) -> list[Fact]:
        # ``ctx`` positional-only: an argument named "ctx" or "self" (an MCP caller's, a model's)
        # is then checked against ``args`` like any other, not a TypeError
        try:
            parsed = self.args(**kwargs)
        except ValueError as exc:
            raise ToolError(f"{self.name}: bad arguments {kwargs}: {exc}") from exc
        return self.fn(ctx, **parsed.model_dump())

    def schema(self) -> dict[str, Any]:
        """An OpenAI-style function description, for tool-calling models."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.args.model_json_schema(),
            },
        }


def tool(
    name: str,
    description: str,
    args: type[BaseModel] | None = None,
    *,
    questions: tuple[str, ...] = (),
) -> Callable[[Callable[..., list[Fact]]], Tool]:
    """Make a module-level function ``fn(ctx, **args) -> list[Fact]`` a ``Tool`` (the decorated
    name is then the tool, importable and callable with validated arguments). ``args`` defaults to
    no arguments; ``questions`` as in ``Tool``. Raises ``PluginError`` for a pattern that does not
    compile."""

    for pattern in questions:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PluginError(f"tool {name!r}: question pattern {pattern!r}: {exc}") from exc

    def make(fn: Callable[..., list[Fact]]) -> Tool:
        return Tool(name, description, args or NoArgs, fn, tuple(questions))

    return make


class ToolRegistry(Registry[Tool]):
    """Tools by name (``chartsight.tools`` plug-ins: ``register(registry)`` calling
    ``registry.add(tool.name, tool)``)."""

    kind = "tool"
    group = "chartsight.tools"

    def check(self, name: str, item: Tool) -> None:
        """A tool is registered under its own name."""
        super().check(name, item)
        if not isinstance(item, Tool) or item.name != name:
            raise PluginError(f"{name!r} must be registered as a Tool of that name, not {item!r}")

    def __getitem__(self, name: str) -> Tool:
        try:
            return self.items[name]
        except KeyError:
            raise ToolError(f"no tool {name!r}; known: {', '.join(sorted(self.items))}") from None

    @property
    def tools(self) -> dict[str, Tool]:
        """The tools by name, in registration order."""
        return self.items


def _subject(query: str, found: list[Point]) -> str:
    """How a statement names what was asked for. The query can come from a model, and a statement
    is evidence for the sentences that cite it, so its numbers must come from the record: a code
    that the found results carry is kept, any other number is dropped."""
    codes = {c for p in found for c in p.codes}
    if query in codes or any(c.endswith(f"|{query}") for c in codes):
        return query
    bare_numbers = r"(?<![A-Za-z])\d+(?:[.,:/-]\d+)*(?![A-Za-z])"  # not the 1 of "A1c"
    return " ".join(re.sub(bare_numbers, " ", query).split())[:80] or "matching"


def _period_text(since: datetime | None, until: datetime | None) -> str:
    """ "from 2019-01-01 to 2019-12-31", "from 2015-01-01", "up to 2019-12-31"."""
    if since is not None and until is not None:
        return f"from {since.date().isoformat()} to {until.date().isoformat()}"
    if since is not None:
        return f"from {since.date().isoformat()}"
    return f"up to {until.date().isoformat()}" if until is not None else ""


def _item_facts(name: str, items: list[Evidence], prefix: str = "", **details: Any) -> list[Fact]:
    """One fact per evidence line: its text (after ``prefix``), value, date and citation."""
    return [
        Fact(
            name,
            f"{prefix}{item.text}",
            value=item.text.rsplit(" [", 1)[0],
            date=item.date,
            evidence=(item.id,),
            details={"date_precision": item.precision, **details},
        )
        for item in items
    ]


def _by_category(ctx: ToolContext, category: str, active_only: bool) -> list[Evidence]:
    """The record's evidence lines of ``category`` (only the active ones with ``active_only``)
    as of ``ctx.now``: newest first, undated last, and none dated after ``ctx.now`` (a planned
    visit, a future-dated entry, or a chart read as of an earlier day with ``--now``: what had
    not happened yet is not a problem, a medication, a procedure or a visit on that day)."""
    items = [
        e
        for e in ctx.evidence.values()
        if e.category == category
        and (e.active or not active_only)
        and (e.date is None or e.date <= ctx.now)
    ]
    return sorted(items, key=lambda e: e.date or NOW_MIN, reverse=True)
