"""Structured tools: facts computed by code from the ``PatientRecord``, each with its evidence.

Every tool returns ``Fact`` objects: a value (number, text or list), its unit and date where it has
them, a one-line statement, and the FHIR references it rests on. The model may phrase facts; it never
computes them. Tools are found by name in a registry that installed packages extend through the
``chartsight.tools`` entry point group (each entry point is ``fn(registry)``); every tool declares
its arguments as a pydantic model, which also gives the JSON schema for tool-calling models.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from connectors.errors import ChartSightError
from connectors.record import PatientRecord
from connectors.resources import reference_of
from retrieval.cases import age_of
from retrieval.evidence import Compactors, Evidence, clinical_date, codes_of, default_compactors
from retrieval.terms import TermTable, default_terms

log = logging.getLogger(__name__)


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

    def to_dict(self) -> dict[str, Any]:
        """The fact as plain JSON values (as the graph's state keeps it)."""
        return {
            "tool": self.tool,
            "statement": self.statement,
            "value": self.value,
            "unit": self.unit,
            "date": self.date.isoformat() if self.date else None,
            "evidence": list(self.evidence),
            "echo": list(self.details.get("echo", [])),
        }


@dataclass
class ToolContext:
    """What tools compute from: the record, its evidence lines, and the date that counts as now."""

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


def _day(value: datetime | None) -> str:
    return value.date().isoformat() if value else "an unknown date"


# --- arguments -----------------------------------------------------------------------------


class Args(BaseModel):
    """Tool arguments; unknown names are refused, so a model that invents one is told so."""

    model_config = ConfigDict(extra="forbid")


class NoArgs(Args):
    pass


class AgeArgs(Args):
    on: date | None = Field(default=None, description="Age on this date (default: now).")


class ObservationArgs(Args):
    query: str = Field(
        description="What was measured: a name ('A1c', 'blood pressure', 'creatinine'), a LOINC "
        "code ('4548-4') or 'system|code'."
    )


class LatestArgs(ObservationArgs):
    nth: int = Field(default=1, ge=1, description="1: the latest; 2: the one before it; ...")


class WindowArgs(ObservationArgs):
    days: float | None = Field(default=None, gt=0, description="Only the last N days.")
    since: datetime | None = Field(default=None, description="Only from this time on.")
    until: datetime | None = Field(default=None, description="Only up to this time.")


class SimilarArgs(Args):
    k: int = Field(default=3, ge=1, le=10, description="How many similar cases.")


class LimitArgs(Args):
    limit: int = Field(default=5, ge=1, le=100, description="How many, newest first.")


@dataclass(frozen=True)
class Tool:
    """A named, described, typed function of the record."""

    name: str
    description: str
    args: type[BaseModel]
    fn: Callable[..., list[Fact]]

    def __call__(self, ctx: ToolContext, **kwargs: Any) -> list[Fact]:
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


class ToolRegistry:
    """Tools by name."""

    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}

    def add(
        self, name: str, description: str, args: type[BaseModel] = NoArgs
    ) -> Callable[[Callable[..., list[Fact]]], Callable[..., list[Fact]]]:
        def register(fn: Callable[..., list[Fact]]) -> Callable[..., list[Fact]]:
            self.tools[name] = Tool(name, description, args, fn)
            return fn

        return register

    def __getitem__(self, name: str) -> Tool:
        try:
            return self.tools[name]
        except KeyError:
            raise ToolError(f"no tool {name!r}; known: {', '.join(sorted(self.tools))}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.tools

    def load_entry_points(self, group: str = "chartsight.tools") -> None:
        for ep in entry_points(group=group):
            try:
                ep.load()(self)
            except Exception as exc:  # a broken plug-in must not take the agent down
                log.warning("tool plug-in %s failed to load: %s", ep.name, exc)


# --- observation lookup ------------------------------------------------------------------------

_CODE = re.compile(r"^(?:(?P<system>\S+)\|)?(?P<code>\d{1,7}-\d)$")


def matching_codes(query: str, terms: TermTable) -> set[str]:
    """``system|code`` strings a query stands for: a LOINC code, or a term's codes."""
    m = _CODE.match(query.strip())
    if m:
        return {f"{m.group('system') or 'http://loinc.org'}|{m.group('code')}"}
    codes: set[str] = set()
    for term in terms.matches(query):
        codes |= {c for c in term.codes if c.startswith("http://loinc.org|")}
    return codes


def _subject(query: str, found: list[Any]) -> str:
    """How a statement names what was asked for. The query can come from a model, and a statement
    is evidence for the sentences that cite it, so its numbers must come from the record: a code
    that the found results carry is kept, any other number is dropped."""
    codes = {c for obs in found for c in codes_of(obs.code)}
    if query in codes or any(c.endswith(f"|{query}") for c in codes):
        return query
    bare_numbers = r"(?<![A-Za-z])\d+(?:[.,:/-]\d+)*(?![A-Za-z])"  # not the 1 of "A1c"
    return " ".join(re.sub(bare_numbers, " ", query).split())[:80] or "matching"


def find_observations(ctx: ToolContext, query: str) -> list[Any]:
    """Observations for a query (by code, else by name), oldest first; undated ones left out."""
    codes = matching_codes(query, ctx.terms)
    found = []
    words = [w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 1]
    for obs in ctx.record.observations:
        obs_codes = set(codes_of(obs.code))
        if codes:
            hit = bool(codes & obs_codes)
        else:
            name = " ".join(
                [str(obs.code.text or "")] + [str(c.display or "") for c in obs.code.coding or []]
            ).lower()
            hit = bool(words) and all(w in name for w in words)
        if hit and clinical_date(obs) is not None:
            found.append(obs)
    return sorted(found, key=lambda o: clinical_date(o))  # type: ignore[arg-type, return-value]


def _numeric(obs: Any) -> tuple[float | None, str | None]:
    q = obs.valueQuantity
    if q is not None and q.value is not None:
        return float(q.value), q.unit or q.code
    return None, None


def _obs_text(obs: Any, ctx: ToolContext) -> str:
    item = ctx.evidence.get(reference_of(obs))
    return item.text.rsplit(" [", 1)[0] if item else str(obs.code.text or "")


# --- the built-in tools ----------------------------------------------------------------------


def default_tools(*, plugins: bool = True) -> ToolRegistry:
    """The built-in tools, plus any installed through entry points."""
    reg = ToolRegistry()

    @reg.add("demographics", "The patient's name, sex, birth date, age and vital status.")
    def demographics(ctx: ToolContext) -> list[Fact]:
        p = ctx.record.patient
        ref = f"Patient/{p.id}"
        name = (
            ctx.evidence[ref].text.split(":", 1)[1].split(",")[0].strip()
            if ref in ctx.evidence
            else ""
        )
        years = age_of(ctx.record, ctx.now.date())
        born = p.birthDate.isoformat() if isinstance(p.birthDate, date) else None
        died = (
            p.deceasedDateTime.date().isoformat()
            if isinstance(p.deceasedDateTime, datetime)
            else None
        )
        parts = [name or "The patient", f"{p.gender or 'unknown sex'}"]
        if born:
            parts.append(f"born {born}")
        if years is not None:
            parts.append(f"age {years}" + (" at death" if died else ""))
        if died:
            parts.append(f"died {died}")
        return [
            Fact(
                "demographics",
                ", ".join(parts) + "." + _cite([ref]),
                value={
                    "name": name,
                    "sex": p.gender,
                    "birth_date": born,
                    "age": years,
                    "deceased": died,
                },
                evidence=(ref,),
            )
        ]

    @reg.add("age", "The patient's age in whole years on a date (default: now).", AgeArgs)
    def age(ctx: ToolContext, on: date | None = None) -> list[Fact]:
        when = on or ctx.now.date()
        years = age_of(ctx.record, when)
        ref = f"Patient/{ctx.record.patient_id}"
        if years is None:
            return [Fact("age", f"The record gives no birth date.{_cite([ref])}", evidence=(ref,))]
        return [
            Fact(
                "age",
                f"Age on {when.isoformat()}: {years} years.{_cite([ref])}",
                value=years,
                unit="years",
                evidence=(ref,),
                # a date the caller chose is not evidence of anything (see grounding.evidence_map)
                details={"echo": [when.isoformat()]} if on else {},
            )
        ]

    @reg.add(
        "latest_observation",
        "The most recent result of a test or measurement: value, unit, date, range and flag "
        "(or, with nth, the one before it).",
        LatestArgs,
    )
    def latest_observation(ctx: ToolContext, query: str, nth: int = 1) -> list[Fact]:
        found = find_observations(ctx, query)
        if found and nth > len(found):
            # no result that far back: say which one is the oldest, citing it
            oldest = found[0]
            ref = reference_of(oldest)
            return [
                Fact(
                    "latest_observation",
                    f"There is no earlier {_subject(query, found)} result; the oldest in the "
                    f"record is "
                    f"{_obs_text(oldest, ctx)}.{_cite([ref])}",
                    date=clinical_date(oldest),
                    evidence=(ref,),
                    details={"query": query, "results_in_record": len(found)},
                )
            ]
        if not found:
            return [
                Fact(
                    "latest_observation",
                    f"No {query} result in the record.",
                    details={"query": query},
                )
            ]
        obs = found[-nth]
        ref = reference_of(obs)
        value, unit = _numeric(obs)
        item = ctx.evidence.get(ref)
        when = clinical_date(obs)
        label = (
            "Latest" if nth == 1 else "Previous" if nth == 2 else f"Result {nth} from the latest:"
        )
        return [
            Fact(
                "latest_observation",
                f"{label} {_subject(query, found)}: {_obs_text(obs, ctx)}.{_cite([ref])}",
                value=value if value is not None else _obs_text(obs, ctx),
                unit=unit,
                date=when,
                evidence=(ref,),
                details={
                    "query": query,
                    "abnormal": bool(item and item.abnormal),
                    "results_in_record": len(found),
                },
            )
        ]

    @reg.add(
        "observation_stats",
        "Count, mean, minimum, maximum and trend of a numeric result over a time window.",
        WindowArgs,
    )
    def observation_stats(
        ctx: ToolContext,
        query: str,
        days: float | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[Fact]:
        start = since or (ctx.now - timedelta(days=days) if days else None)
        end = until or ctx.now
        if start is not None and start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        if end.tzinfo is None:
            end = end.replace(tzinfo=UTC)
        rows = []
        found = find_observations(ctx, query)
        for obs in found:
            value, unit = _numeric(obs)
            when = clinical_date(obs)
            if value is None or when is None or when > end or (start and when < start):
                continue
            rows.append((when, value, unit, reference_of(obs)))
        window = (
            f"from {start.date().isoformat()} to {end.date().isoformat()}"
            if start
            else f"up to {end.date().isoformat()}"
        )
        if not rows:
            ref = f"Patient/{ctx.record.patient_id}"
            return [
                Fact(
                    "observation_stats",
                    f"No numeric {_subject(query, [])} result {window}.{_cite([ref])}",
                    value=None,
                    evidence=(ref,),
                    details={"query": query, "count": 0, "echo": [window]},
                )
            ]
        values = [v for _, v, _, _ in rows]
        units = {u for _, _, u, _ in rows if u}
        unit = units.pop() if len(units) == 1 else None
        first, last = rows[0], rows[-1]
        change = last[1] - first[1]
        trend = "rising" if change > 0 else "falling" if change < 0 else "unchanged"
        mean = statistics.fmean(values)
        refs = tuple(r for _, _, _, r in rows)
        u = f" {unit}" if unit else ""
        statement = (
            f"{_subject(query, found)} {window}: {len(values)} results, mean {mean:.4g}{u}, min {min(values):.4g}{u}, "
            f"max {max(values):.4g}{u}; {trend} from {first[1]:.4g} ({_day(first[0])}) to "
            f"{last[1]:.4g} ({_day(last[0])}).{_cite(refs)}"
        )
        return [
            Fact(
                "observation_stats",
                statement,
                value=mean,
                unit=unit,
                date=last[0],
                evidence=refs,
                details={
                    "echo": [window],  # the window is the caller's, not the record's
                    "query": query,
                    "count": len(values),
                    "mean": mean,
                    "min": min(values),
                    "max": max(values),
                    "first": first[1],
                    "last": last[1],
                    "trend": trend,
                    "mixed_units": len({u for _, _, u, _ in rows}) > 1,
                },
            )
        ]

    def _listing(ctx: ToolContext, name: str, items: list[Evidence], empty: str) -> list[Fact]:
        if not items:
            # an absence rests on the whole record, cited by its Patient
            ref = f"Patient/{ctx.record.patient_id}"
            return [Fact(name, f"{empty}{_cite([ref])}", value=[], evidence=(ref,))]
        return [
            Fact(
                name,
                item.text,
                value=item.text.rsplit(" [", 1)[0],
                date=item.date,
                evidence=(item.id,),
            )
            for item in items
        ]

    def _by_category(ctx: ToolContext, category: str, active_only: bool) -> list[Evidence]:
        items = [
            e
            for e in ctx.evidence.values()
            if e.category == category and (e.active or not active_only)
        ]
        return sorted(items, key=lambda e: e.date or datetime.min.replace(tzinfo=UTC), reverse=True)

    @reg.add("active_problems", "The patient's active conditions.")
    def active_problems(ctx: ToolContext) -> list[Fact]:
        return _listing(
            ctx,
            "active_problems",
            _by_category(ctx, "condition", True),
            "No active problem is recorded.",
        )

    @reg.add(
        "active_medications", "Medications the patient is on (active requests and statements)."
    )
    def active_medications(ctx: ToolContext) -> list[Fact]:
        return _listing(
            ctx,
            "active_medications",
            _by_category(ctx, "medication", True),
            "No active medication is recorded.",
        )

    @reg.add("allergies", "Recorded allergies and intolerances.")
    def allergies(ctx: ToolContext) -> list[Fact]:
        return _listing(
            ctx, "allergies", _by_category(ctx, "allergy", False), "No allergy is recorded."
        )

    @reg.add("recent_procedures", "The most recent procedures.", LimitArgs)
    def recent_procedures(ctx: ToolContext, limit: int = 5) -> list[Fact]:
        return _listing(
            ctx,
            "recent_procedures",
            _by_category(ctx, "procedure", False)[:limit],
            "No procedure is recorded.",
        )

    @reg.add("recent_encounters", "The most recent encounters (visits, admissions).", LimitArgs)
    def recent_encounters(ctx: ToolContext, limit: int = 5) -> list[Fact]:
        return _listing(
            ctx,
            "recent_encounters",
            _by_category(ctx, "encounter", False)[:limit],
            "No encounter is recorded.",
        )

    @reg.add(
        "imaging", "Imaging studies and images, and the impressions of imaging reports.", LimitArgs
    )
    def imaging(ctx: ToolContext, limit: int = 5) -> list[Fact]:
        items = _by_category(ctx, "imaging", False) + _by_category(ctx, "image", False)
        reports = [
            e
            for e in _by_category(ctx, "report", False)
            if "conclusion:" in e.text or "text:" in e.text
        ]
        items = sorted(
            items + reports, key=lambda e: e.date or datetime.min.replace(tzinfo=UTC), reverse=True
        )
        return _listing(ctx, "imaging", items[:limit], "No imaging is recorded.")

    @reg.add(
        "similar_cases",
        "Past cases most similar to this patient's (images and summary), the patient's own left "
        "out: each with its similarity score and a de-identified summary.",
        SimilarArgs,
    )
    def similar_cases(ctx: ToolContext, k: int = 3) -> list[Fact]:
        if ctx.similar is None:
            raise ToolError("no similar-case index (run `chartsight index build`)")
        return [
            Fact(
                "similar_cases",
                # one sentence: the summary's own full stops would split it from its citation
                f"Similar case (score {hit.score:.2f}): "
                f"{hit.summary[:240].replace('. ', '; ').rstrip('.')}{_cite([hit.key])}",
                value=round(float(hit.score), 4),
                evidence=(hit.key,),
                details={"key": hit.key, "patient_id": hit.patient_id},
            )
            for hit in ctx.similar(k)
        ]

    if plugins:
        reg.load_entry_points()
    return reg


def langchain_tools(registry: ToolRegistry, ctx: ToolContext, artifacts: bool = False) -> list[Any]:
    """The registry's tools as LangChain ``StructuredTool``s bound to one patient's record, for
    LangGraph's tool node or any LangChain agent. Each returns its facts' statements, cited; with
    ``artifacts`` the facts themselves (as dicts) travel as the tool message's artifact."""
    from langchain_core.tools import StructuredTool

    def bind(tool: Tool) -> Any:
        def run(**kwargs: Any) -> Any:
            facts = tool(ctx, **kwargs)
            text = "\n".join(f.statement for f in facts)
            return (text, [f.to_dict() for f in facts]) if artifacts else text

        return StructuredTool.from_function(
            func=run,
            name=tool.name,
            description=tool.description,
            args_schema=tool.args,
            response_format="content_and_artifact" if artifacts else "content",
        )

    return [bind(tool) for tool in registry.tools.values()]
