"""Tools over results (Observations and their components): the latest value of a test, and
statistics of a series over a period, in one UCUM unit."""

from __future__ import annotations

import logging
import re
import statistics
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import Field

from agent.tools.base import (
    NOW_MIN,
    Args,
    Fact,
    LatestArgs,
    ToolContext,
    WindowArgs,
    _ago,
    _cite,
    _item_facts,
    _period_text,
    _point_day,
    _subject,
    tool,
)
from retrieval.clinical import (
    Point,
    aware,
    convert,
    in_one_unit,
    number_text,
    observation_points,
    observation_series,
    same_unit,
    series_key,
)
from retrieval.terms import TermTable

log = logging.getLogger(__name__)


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


def _first_codes(codes: list[str], shown: int = 3) -> str:
    """'4548-4, 17856-6 or 2 more codes' style: the first few codes searched."""
    more = len(codes) - shown
    head = ", ".join(codes[:shown])
    return f"{head} (or {more} more)" if more > 0 else head


@dataclass
class Found:
    """The results a query matched: dated points (oldest first; entered-in-error ones left out,
    counted in ``voided``)."""

    points: list[Point]
    voided: list[str]


def find_points(ctx: ToolContext, query: str) -> Found:
    """The results a query stands for (by code, else by name): Observations' own values and their
    components, dated, oldest first. Molar and mass codes of one analyte match alike (the term
    table lists both); entered-in-error Observations are left out and counted."""
    codes = matching_codes(query, ctx.terms)
    words = [w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 1]
    points: list[Point] = []
    voided: list[str] = []

    def by_name(point: Point) -> bool:
        name = " ".join(
            [point.name] + [str(c.display or "") for c in _coding_of(point) or []]
        ).lower()
        # whole words from their start ("bnp" is not inside "nt-probnp"; "creatin" finds
        # "creatinine")
        return bool(words) and all(re.search(rf"(?<![a-z0-9]){re.escape(w)}", name) for w in words)

    def by_code(point: Point) -> bool:
        return bool(codes & set(point.codes))

    series = observation_series(ctx.record)
    # by code; a chart that codes none of them (text only, local codes) is searched by name
    hit = by_code
    if not codes or not any(by_code(p) for _, _, pts in series for p in pts):
        hit = by_name
    for (ref, voided_obs, pts), obs in zip(series, ctx.record.observations, strict=True):
        if voided_obs:
            if any(hit(p) for p in observation_points(_unvoided(obs), ref)):
                voided.append(ref)
            continue
        points.extend(p for p in pts if p.when is not None and hit(p))
    points.sort(key=lambda p: p.when.sort_key if p.when is not None else (NOW_MIN, NOW_MIN))
    return Found(points, voided)


def _latest_in_period(
    ctx: ToolContext,
    query: str,
    found: Found,
    since: datetime | None,
    until: datetime | None,
    nth: int = 1,
) -> list[Fact]:
    """The latest result with a value whose date lies in [since, until] ("glucose in 2019",
    "blood pressure on 2019-03-17"; with ``nth``, the nth latest there), or an honest "none in
    that period" that says when the results there are (the nearest before and after), citing the
    Patient and those results."""
    since = aware(since) if since is not None else None
    until = aware(until) if until is not None else None
    period = _period_text(since, until)
    valued = [p for p in found.points if p.has_value and p.when is not None]
    inside = [
        p
        for p in valued
        if (since is None or p.when.start >= since) and (until is None or p.when.start <= until)  # type: ignore[union-attr]
    ]
    subject = _subject(query, found.points)
    details = {"query": query, "echo": [period], "voided": found.voided}
    refs = list(dict.fromkeys(p.reference for p in inside))  # oldest first
    when = {p.reference: p.when.start for p in inside if p.when is not None}
    if refs:
        if nth > len(refs):  # asked further back than the period goes
            ref = refs[0]
            text = f"There is no earlier {subject} result {period}; the oldest there is "
            text += f"{_obs_text(ref, ctx)}."
        else:
            ref = refs[-nth]
            which = "Latest" if nth == 1 else f"Result {nth} back"
            text = f"{which} {subject} {period}{_voided_clause(found)}: {_obs_text(ref, ctx)}."
        return [
            Fact(
                "latest_observation",
                f"{text}{_cite([ref])}",
                date=when.get(ref),
                evidence=(ref,),
                details={**details, "results_in_period": len(refs)},
            )
        ]
    patient = f"Patient/{ctx.record.patient_id}"
    before = [p for p in valued if since is not None and p.when.start < since]  # type: ignore[union-attr]
    after = [p for p in valued if until is not None and p.when.start > until]  # type: ignore[union-attr]
    near = [x.reference for x in (before[-1:] + after[:1])]
    nearest = (
        " Nearest results: " + "; ".join(_obs_text(r, ctx) for r in near) + "." if near else ""
    )
    return [
        Fact(
            "latest_observation",
            f"No {subject} result {period} in the record{_voided_clause(found)}"
            f"{'' if valued else ' (none at any date)'}.{_cite([patient])}"
            f"{nearest}{_cite(near)}",
            evidence=(patient, *near),
            details={**details, "results_in_period": 0},
        )
    ]


def _coding_of(point: Point) -> list[Any]:
    element = (
        point.observation.component[point.component]
        if point.component is not None
        else point.observation
    )
    return list(getattr(element.code, "coding", None) or [])


def _unvoided(obs: Any) -> Any:
    """A copy of an entered-in-error Observation read as final: only to see what it measured."""
    return obs.model_copy(update={"status": "final"})


def _obs_text(ref: str, ctx: ToolContext) -> str:
    item = ctx.evidence.get(ref)
    return item.text.rsplit(" [", 1)[0] if item else ref


EGFR_CODES = {"33914-3", "62238-1", "48643-1", "98979-8"}


ADULT_YEARS = 18  # CKD-EPI 2021 holds from this age on (Inker LA et al., NEJM 2021;385:1737-49)


def ckd_epi_2021(creatinine_mg_dl: float, age_years: int, female: bool) -> float:
    """eGFR in mL/min/1.73 m² from serum creatinine (mg/dL), age (years) and sex by the CKD-EPI
    2021 equation without race (Inker LA et al., N Engl J Med 2021;385:1737-49):
    142 × min(Scr/κ, 1)^α × max(Scr/κ, 1)^-1.200 × 0.9938^age × 1.012 [female], with κ 0.7
    (female) or 0.9 (male) and α -0.241 (female) or -0.302 (male). Raises ``ValueError`` for a
    creatinine that is not positive."""
    if creatinine_mg_dl <= 0:
        raise ValueError(f"creatinine must be positive, not {creatinine_mg_dl}")
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    ratio = creatinine_mg_dl / kappa
    egfr = 142 * min(ratio, 1) ** alpha * max(ratio, 1) ** -1.200 * 0.9938**age_years
    return egfr * (1.012 if female else 1.0)


def computed_egfr(ctx: ToolContext) -> Fact | None:
    """When the record has no eGFR result and one is asked for: an eGFR computed from the latest
    serum creatinine with the patient's age on that day and sex (``ckd_epi_2021``), stated as
    computed and citing the creatinine and the Patient; None without a creatinine in mg/dL (or
    convertible), a birth date, or a sex of male or female, and for a patient under 18 on the
    creatinine's day: the equation was derived and validated in adults (Inker 2021: ages 18 and
    over; children's eGFR takes other equations, e.g. bedside Schwartz, and their height)."""
    from retrieval.clinical import patient_age

    patient = ctx.record.patient
    if patient.gender not in ("male", "female"):
        return None
    found = [p for p in find_points(ctx, "creatinine").points if p.measurement is not None]
    found = [
        p
        for p in found
        if p.measurement and p.measurement.exact and p.when is not None and p.when.start <= ctx.now
    ]  # the latest creatinine up to the day asked on, as a latest value is read
    if not found:
        return None
    last = found[-1]
    assert last.measurement is not None and last.when is not None
    term = next((ctx.terms.analyte(c) for c in last.codes if ctx.terms.analyte(c)), None)
    mg = convert(last.measurement, "mg/dL", term.molar_mass if term else None)
    age = patient_age(patient, last.when.start.date())
    if mg is None or mg.value <= 0 or age is None or age.years < ADULT_YEARS:
        return None
    egfr = ckd_epi_2021(mg.value, age.years, patient.gender == "female")
    ref, pref = last.reference, f"Patient/{patient.id}"
    return Fact(
        "latest_observation",
        f"Computed, not a measured result: eGFR {egfr:.0f} mL/min/1.73 m² by the CKD-EPI "
        f"2021 equation from the creatinine of {_point_day(last)} ({number_text(mg.value)} mg/dL), "
        f"age {age.years} and {patient.gender} sex.{_cite([ref, pref])}",
        value=round(egfr),
        unit="mL/min/{1.73_m2}",
        date=last.when.start,
        evidence=(ref, pref),
        details={"computed": "CKD-EPI 2021", "creatinine_mg_dl": mg.value, "age": age.years},
    )


def _voided_clause(found: Found) -> str:
    """ " (N entered-in-error results left out)", inside a sentence before its citation (every
    sentence of a statement ends in its citations, so the verifier keeps it)."""
    n = len(found.voided)
    return f" ({n} entered-in-error result{'s' if n > 1 else ''} left out)" if n else ""


def _dated_after(ctx: ToolContext, refs: list[str], noun: str, taken_as: str) -> str:
    """What is said of results dated after the day asked on (``refs``, oldest first, at least
    one), citing the first: " 2 results dated after 2026-11-29 are not taken as the latest: the
    first, <its line>. [Observation/…]" (``noun`` "results " or "", ``taken_as`` "the latest" or
    "earlier")."""
    k = len(refs)
    return (
        f" {k} {noun}dated after {ctx.now.date().isoformat()} {'are' if k > 1 else 'is'} not "
        f"taken as {taken_as}: the first, {_obs_text(refs[0], ctx)}.{_cite(refs[:1])}"
    )


@tool(
    "latest_observation",
    "The most recent result of a test or measurement: value, unit, date, range and flag "
    "(or, with nth, the one before it; with since/until, the latest in that period).",
    LatestArgs,
)
def latest_observation(
    ctx: ToolContext,
    query: str,
    nth: int = 1,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Fact]:
    """The latest result of ``query`` with a value (or the ``nth`` latest; or the latest within
    ``since``/``until``): value, UCUM unit, date at its precision, reference range and flag,
    citing the Observation. An honest absence (citing the Patient, naming the codes searched)
    when the record has none; entered-in-error results are left out and counted."""
    found = find_points(ctx, query)
    if since is not None or until is not None:
        return _latest_in_period(ctx, query, found, since, until, nth)
    # a result is one Observation; it counts as a value when it (or a matched component) has one
    with_value: list[str] = []
    for point in found.points:
        if point.has_value and point.reference not in with_value:
            with_value.append(point.reference)
        elif point.has_value:
            with_value.remove(point.reference)
            with_value.append(point.reference)
    if not with_value:
        if found.points:
            last = found.points[-1]
            return [
                Fact(
                    "latest_observation",
                    f"The record has no {_subject(query, found.points)} value"
                    f"{_voided_clause(found)}: the latest attempt, "
                    f"{_obs_text(last.reference, ctx)}.{_cite([last.reference])}",
                    date=last.when.start if last.when else None,
                    evidence=(last.reference,),
                    details={"query": query, "results_in_record": 0, "voided": found.voided},
                )
            ]
        codes = sorted(c.partition("|")[2] for c in matching_codes(query, ctx.terms))
        if not codes:
            # not a test the term table knows: nothing to say it is missing (the question
            # may not be about a result at all), so no citable fact; the answer abstains
            return [
                Fact(
                    "latest_observation",
                    f"No {query} result in the record{_voided_clause(found)}.",
                    details={"query": query, "voided": found.voided},
                )
            ]
        # a known test that is absent: the absence rests on the whole record, cited by its
        # Patient, and says what was searched; it is the answer (never a result of another
        # test that shares a word)
        ref = f"Patient/{ctx.record.patient_id}"
        absent = Fact(
            "latest_observation",
            f"No {_subject(query, [])} result in the record{_voided_clause(found)}: none "
            f"of its {len(ctx.record.observations)} Observations has LOINC "
            f"{_first_codes(codes)} or the name {_subject(query, [])!r}.{_cite([ref])}",
            evidence=(ref,),
            details={"query": query, "voided": found.voided, "codes": codes},
        )
        computed = computed_egfr(ctx) if set(codes) & EGFR_CODES else None
        # asked for an eGFR the record lacks: the computed one answers it, said so, first
        return ([computed] if computed is not None else []) + [absent]
    # a result dated after the day asked on (a future-dated entry, or ``--now`` set before the
    # chart's end) is not the latest on that day: it is said, not taken
    when_of = {p.reference: p.when for p in found.points if p.has_value and p.when is not None}
    after = [r for r in with_value if (w := when_of.get(r)) is not None and w.start > ctx.now]
    with_value = [r for r in with_value if r not in after]
    after_note, after_refs = "", []
    if after:
        k, asked_on = len(after), ctx.now.date().isoformat()
        after_refs = [after[0]]
        after_note = _dated_after(
            ctx, after, f"result{'s' if k > 1 else ''} ", "earlier" if nth > 1 else "the latest"
        )
        if not with_value:
            ref = f"Patient/{ctx.record.patient_id}"
            return [
                Fact(
                    "latest_observation",
                    f"No {_subject(query, found.points)} result up to {asked_on}"
                    f"{_voided_clause(found)}."
                    f"{_cite([ref])}{after_note}",
                    evidence=(ref, *after_refs),
                    details={"query": query, "results_in_record": 0, "after_now": k,
                             "echo": [asked_on], "voided": found.voided},
                )
            ]  # fmt: skip
    if nth > len(with_value):
        # no result that far back: say which one is the oldest, citing it
        ref = with_value[0]
        first = next(p for p in found.points if p.reference == ref)
        return [
            Fact(
                "latest_observation",
                f"There is no earlier {_subject(query, found.points)} result; the oldest in "
                f"the record is {_obs_text(ref, ctx)}.{_cite([ref])}",
                date=first.when.start if first.when else None,
                evidence=(ref,),
                details={"query": query, "results_in_record": len(with_value)},
            )
        ]
    ref = with_value[-nth]
    mine = [p for p in found.points if p.reference == ref and p.has_value]
    numeric = [p for p in mine if p.measurement is not None]
    chosen: Point = numeric[0] if len(numeric) == 1 else mine[0]
    m = chosen.measurement if len(numeric) == 1 else None
    item = ctx.evidence.get(ref)
    label = "Latest" if nth == 1 else "Previous" if nth == 2 else f"Result {nth} from the latest:"
    # a latest result a year old or more says so ("current" values that old may not be)
    ago = _ago(chosen.when.start, ctx.now) if nth == 1 and chosen.when is not None else ""
    statement = (
        f"{label} {_subject(query, found.points)}{_voided_clause(found)}: "
        f"{_obs_text(ref, ctx)}{ago}.{_cite([ref])}"
    )
    evidence = [ref]
    # newer attempts without a value (cancelled, not done, no result) are said, not used
    newest_when = chosen.when.sort_key if chosen.when else None
    later = [
        p
        for p in found.points
        if nth == 1
        and not p.has_value
        and p.component is None
        and p.reference not in with_value
        and p.reference not in after  # a panel dated after the day asked on: said below
        and p.when is not None
        and p.when.start <= ctx.now
        and newest_when is not None
        and p.when.sort_key > newest_when
    ]
    # other results of the same test on the same day with another value: said, never hidden
    if nth == 1 and chosen.when is not None:
        day = chosen.when.start.date()
        same_day = {
            p.reference for p in found.points if p.when is not None and p.when.start.date() == day
        }  # once: a monitored chart has thousands of results (a scan per result took 13 s)
        value_of_latest = _obs_text(ref, ctx).rsplit(" ", 2)[-2:]
        twins = [
            r
            for r in reversed(with_value)  # the newest others of that day first
            if r != ref
            and r in same_day
            and _obs_text(r, ctx).rsplit(" ", 2)[-2:] != value_of_latest
        ]
        for other in twins[:3]:
            statement += f" Another result the same day: {_obs_text(other, ctx)}.{_cite([other])}"
            evidence.append(other)
    if later:
        last = later[-1]
        why = f" ({last.absent})" if last.absent else ""
        statement += (
            f" A later attempt on {_point_day(last)} has no result{why}.{_cite([last.reference])}"
        )
        evidence.append(last.reference)
    statement += after_note
    evidence += after_refs
    details: dict[str, Any] = {
        "query": query,
        "abnormal": bool(item and item.abnormal),
        "results_in_record": len(with_value),
        "voided": found.voided,
    }
    if after:
        details["after_now"] = len(after)
        details["echo"] = [ctx.now.date().isoformat()]
    if chosen.when is not None:
        details["date_precision"] = chosen.when.precision
    if m is not None and m.comparator:
        details["comparator"] = m.comparator
    return [
        Fact(
            "latest_observation",
            statement,
            value=m.value
            if m is not None and m.exact
            else (m.text if m is not None else _obs_text(ref, ctx)),
            unit=m.unit if m is not None else None,
            date=chosen.when.start if chosen.when else None,
            evidence=tuple(evidence),
            details=details,
        )
    ]


@tool(
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
    focus: str | None = None,
) -> list[Fact]:
    """Count, mean, minimum, maximum (each with its date), first and last, and the trend of ``query``'s numeric results in the period (the last ``days``, or ``since``/``until``), one fact per series in one UCUM unit (values in other units converted with UCUM, bounds such as "<5" left out and counted). The trend runs from the first to the newest result for up to 5 results, else from the median of the earliest third to the median of the latest third (a spike at either end does not make a trend), "about unchanged" when that change is under a fifth of the usual range's width. Every result used is the fact's evidence; the statement cites them all up to ``MAX_CITED``, else the first, lowest, highest and newest, and says so. With ``focus`` (count, highest, lowest) a direct answer first ("Highest glucose up to 2021-01-01: 95.92 mg/dL on 2020-03-22", citing that result)."""
    start = since
    if start is None and days:
        try:
            start = ctx.now - timedelta(days=days)
        except OverflowError:  # "the last 99999 months" reaches before year 1: the whole record
            start = None
    start = aware(start) if start is not None else None
    end = aware(until or ctx.now)
    window = _period_text(start, end)
    found = find_points(ctx, query)
    # one series per measured concept: a panel's systolic and diastolic are two series
    series: dict[str, list[Point]] = {}
    for point in found.points:
        when = point.when
        if point.measurement is None or when is None:
            continue
        # a result counts when its date interval lies in the window (a "2026-03" result is in
        # a window from 2026-03-15 only in part, and then left out)
        if when.start > end or (start is not None and when.start < start):
            continue
        series.setdefault(_series_key(point, ctx), []).append(point)
    if not series:
        ref = f"Patient/{ctx.record.patient_id}"
        numeric = [p for p in found.points if p.measurement is not None]
        facts = [
            Fact(
                "observation_stats",
                f"No numeric {_subject(query, [])} result {window}{_voided_clause(found)}"
                f"{'' if numeric else ' (none at any date)'}."
                f"{_cite([ref])}",
                value=None,
                evidence=(ref,),
                details={"query": query, "count": 0, "echo": [window], "voided": found.voided},
            )
        ]
        if numeric:  # the data stops (or starts) elsewhere: say where the nearest result is
            newest = numeric[-1]
            side = "newest" if newest.when and newest.when.start < (start or end) else "oldest"
            near = newest if side == "newest" else numeric[0]
            facts.append(
                Fact(
                    "observation_stats",
                    f"The {side} {_subject(query, [])} result in the record is "
                    f"{_obs_text(near.reference, ctx)}.{_cite([near.reference])}",
                    date=near.when.start if near.when else None,
                    evidence=(near.reference,),
                )
            )
        return facts
    facts = [
        _series_fact(ctx, query, found, points, window, multiple=len(series) > 1)
        for points in series.values()
    ]
    if focus is not None:
        facts = [f for fact in facts for f in (*_focus_fact(fact, focus, window), fact)]
    return facts


def _focus_fact(fact: Fact, focus: str, window: str) -> list[Fact]:
    """The direct answer a statistic's question asks for, from its summary fact: the count, or
    the highest or lowest result with its date, citing what it rests on."""
    d = fact.details
    if not d.get("count"):
        return []
    name, u = d["series"], f" {fact.unit}" if fact.unit else ""
    if focus == "count":
        n = d["count"]
        refs = tuple(r for r in fact.evidence)
        cited = d.get("cited", refs)
        which = REPRESENTATIVES_CITED if len(cited) < len(refs) else ""
        text = f"{n} numeric {name} result{'s' if n > 1 else ''} {window}{which}."
        return [
            Fact("observation_stats", f"{text}{_cite(cited)}", value=n, evidence=refs,
                 details={"echo": [window], "count": n})
        ]  # fmt: skip
    ref = d["max_reference"] if focus == "highest" else d["min_reference"]
    value = d["max"] if focus == "highest" else d["min"]
    day = d["max_day"] if focus == "highest" else d["min_day"]
    text = f"{focus.capitalize()} {name} {window}: {number_text(value)}{u} on {day}."
    return [
        Fact("observation_stats", f"{text}{_cite([ref])}", value=value, unit=fact.unit,
             evidence=(ref,), details={"echo": [window]})
    ]  # fmt: skip


def _series_key(point: Point, ctx: ToolContext) -> str:
    """What a point measures: its analyte (mass and molar codes alike), else its first code."""
    return series_key(point, ctx.terms)


# from this many results on, a series' trend compares the medians of its first and last thirds
TREND_THIRDS = 6
# a statement cites at most this many results inline; a longer series is cited by its
# representatives (``representatives``)
MAX_CITED = 12
REPRESENTATIVES_CITED = " (the first, lowest, highest and newest cited)"


def representatives(
    refs: tuple[str, ...], *rows: tuple[Point, float]
) -> tuple[tuple[str, ...], str]:
    """The references a statistic over ``refs`` cites inline, and the words that say which: all of
    them (and "") up to ``MAX_CITED``; else those of ``rows`` (the first, lowest, highest and
    newest results), each once, and " (the first, lowest, highest and newest cited)". A mean over
    10,000 results citing each one made an unreadable answer and took the verifier 30 s; the
    fact's ``evidence`` keeps every result it rests on."""
    if len(refs) <= MAX_CITED:
        return refs, ""
    chosen = tuple(dict.fromkeys(p.reference for p, _ in rows))
    return chosen, REPRESENTATIVES_CITED


def _series_fact(
    ctx: ToolContext, query: str, found: Found, points: list[Point], window: str, multiple: bool
) -> Fact:
    """Statistics of one series: exact values in one unit. Values given as bounds ("<5") and
    values in a unit that cannot be converted to the series' unit are left out and said so."""
    values_in = in_one_unit(points, ctx.terms)
    target, rows = values_in.unit, values_in.rows
    bounds, other_unit = values_in.bounds, values_in.other_unit
    name = points[0].name if multiple else _subject(query, found.points)
    if (
        not multiple
        and points[0].name
        and not all(
            re.search(rf"\b{re.escape(w)}", points[0].name.lower()) for w in name.lower().split()
        )
    ):
        # asked by a concept ("kidney function"): the series is named by what was measured
        name = f"{points[0].name} (asked as {name})"
    refs = tuple(dict.fromkeys(p.reference for p, _ in rows))
    notes = ""
    if bounds:
        shown = ", ".join(
            f"{b.measurement.text} on {_point_day(b)}" for b in bounds[:3] if b.measurement
        )
        notes += (
            f" {len(bounds)} result{'s' if len(bounds) > 1 else ''} reported as a bound "
            f"({shown}) {'are' if len(bounds) > 1 else 'is'} not counted in the mean, minimum "
            f"or maximum{' (those shown cited)' if len(bounds) > 3 else ''}."
            f"{_cite(dict.fromkeys(b.reference for b in bounds[:3]))}"
        )
    if other_unit:
        kinds = ", ".join(sorted({str(p.measurement.unit) for p in other_unit if p.measurement}))
        notes += (
            f" {len(other_unit)} result{'s' if len(other_unit) > 1 else ''} in {kinds} could not be "
            f"converted to {target} and {'were' if len(other_unit) > 1 else 'was'} left out"
            f"{f' (the first {MAX_CITED} cited)' if len(other_unit) > MAX_CITED else ''}."
            f"{_cite(dict.fromkeys(p.reference for p in other_unit[:MAX_CITED]))}"
        )
    converted_note = (
        f"; results in other units converted to {target}"
        if target
        and any(
            p.measurement is not None and not same_unit(p.measurement.unit, target) for p, _ in rows
        )
        else ""
    )
    if not rows:
        ref = f"Patient/{ctx.record.patient_id}"
        return Fact(
            "observation_stats",
            f"No exact numeric {name} result {window}{_voided_clause(found)}.{_cite([ref])}{notes}",
            evidence=(ref, *dict.fromkeys(p.reference for p in bounds + other_unit)),
            details={"query": query, "count": 0, "echo": [window], "voided": found.voided},
        )
    values = [v for _, v in rows]
    first, last = rows[0], rows[-1]
    mean = statistics.fmean(values)
    low = min(rows, key=lambda r: r[1])
    high = max(rows, key=lambda r: r[1])
    n = number_text
    u = f" {target}" if target else ""
    # the trend: from the first to the newest result for a short series; from TREND_THIRDS
    # results on, from the median of the earliest third to the median of the latest third, so
    # that one spike at either end does not make a series "rising" or "falling"
    if len(rows) >= TREND_THIRDS:
        third = len(rows) // 3
        early, late = rows[:third], rows[-third:]
        start_value = statistics.median(v for _, v in early)
        end_value = statistics.median(v for _, v in late)
        trend_basis = (
            f": median {n(start_value)}{u} in the first third of the results "
            f"({_point_day(early[0][0])} to {_point_day(early[-1][0])}), {n(end_value)}{u} in the "
            f"last third ({_point_day(late[0][0])} to {_point_day(late[-1][0])}); newest "
            f"{n(last[1])}{u} ({_point_day(last[0])})"
        )
    else:
        start_value, end_value = first[1], last[1]
        trend_basis = (
            f" from {n(first[1])} ({_point_day(first[0])}) to {n(last[1])} ({_point_day(last[0])})"
        )
    change = end_value - start_value
    trend = "rising" if change > 0 else "falling" if change < 0 else "unchanged"
    # what the change means clinically ("creatinine rising: kidney function worsening"), by the
    # term table's rule for the analyte, in its unit
    meaning = None
    analyte = next((a for a in (ctx.terms.analyte(c) for p in points for c in p.codes) if a), None)
    if analyte is not None and len(rows) > 1 and (target is None or target == analyte.unit):
        meaning = analyte.meaning(start_value, end_value)
    # against the usual range (the term table's, in its unit): how many results lie outside it,
    # and a change under a fifth of the range's width is "about unchanged", not rising or falling
    range_note = ""
    if analyte is not None and target is not None and target == analyte.unit:
        lo, hi = analyte.low, analyte.high
        above = sum(v > hi for v in values) if hi is not None else 0
        below = sum(v < lo for v in values) if lo is not None else 0
        span = f"{number_text(lo) if lo is not None else ''}–{number_text(hi) if hi is not None else ''} {target}"
        if lo is not None or hi is not None:
            if not above and not below:
                range_note = f"; all within the usual range ({span})"
            else:
                parts = [f"{above} above" if above else "", f"{below} below" if below else ""]
                range_note = f"; {' and '.join(p for p in parts if p)} the usual range ({span})"
        if (
            lo is not None
            and hi is not None
            and meaning is None
            and len(rows) > 1
            and abs(change) < 0.2 * (hi - lo)
        ):
            trend = "about unchanged"
    # a long series is cited by its first, lowest, highest and newest results (the statement
    # says so); all of them stay the fact's evidence
    cited, which = representatives(refs, first, low, high, last)
    if len(values) == 1:  # one result: no mean, range or trend to speak of
        statement = (
            f"{name} {window}{_voided_clause(found)}: only 1 result, {n(values[0])}{u} on "
            f"{_point_day(first[0])}{converted_note}.{_cite(refs)}{notes}"
        )
    else:
        statement = (
            f"{name} {window}{_voided_clause(found)}: {len(values)} results{which}, "
            f"mean {n(mean)}{u}, "
            f"min {n(low[1])}{u} ({_point_day(low[0])}), max {n(high[1])}{u} ({_point_day(high[0])}); "
            f"{trend}{trend_basis}"
            f"{f' ({meaning})' if meaning else ''}{range_note}{converted_note}."
            f"{_cite(cited)}{notes}"
        )
    statement = statement[:1].upper() + statement[1:]  # the answer's first word
    return Fact(
        "observation_stats",
        statement,
        value=mean,
        unit=target,
        date=last[0].when.start if last[0].when else None,
        evidence=refs + tuple(p.reference for p in bounds + other_unit if p.reference not in refs),
        details={
            "echo": [window],  # the window is the caller's, not the record's
            "query": query,
            "series": name,
            "count": len(values),
            "mean": mean,
            "min": min(values),
            "max": max(values),
            "first": first[1],
            "last": last[1],
            "trend": trend,
            "meaning": meaning,
            "min_reference": low[0].reference,
            "max_reference": high[0].reference,
            "min_day": _point_day(low[0]),
            "max_day": _point_day(high[0]),
            "cited": cited,
            "mixed_units": values_in.mixed,
            "bounds_left_out": len(bounds),
            "other_units_left_out": len(other_unit),
            "voided": found.voided,
        },
    )


class RecentResultsArgs(Args):
    """``category``: the Observation category (``laboratory`` or ``vital-signs``)."""

    category: Literal["laboratory", "vital-signs"] = Field(
        default="laboratory", description="'laboratory' (labs) or 'vital-signs' (vitals)."
    )


MAX_RECENT_RESULTS = 25


@tool(
    "recent_results",
    "The newest results of a category (laboratory by default, or vital signs): every result of "
    "the latest day that has one, newest first.",
    RecentResultsArgs,
)
def recent_results(ctx: ToolContext, category: str = "laboratory") -> list[Fact]:
    """ "What are his latest labs?": the Observations of ``category`` (Observation.category, HL7
    observation-category codes) with a value on the latest day that has any up to the day asked
    on (``ctx.now``; later-dated ones are counted and the first cited, not shown), at most
    ``MAX_RECENT_RESULTS``: a head ("12 laboratory results on 2020-12-13, the latest day with
    any.") citing them, then one fact per result line. Entered-in-error ones are left out. An
    absence citing the Patient when there is none."""
    words = "laboratory results" if category == "laboratory" else "vital sign results"
    dated: list[tuple[datetime, str]] = []
    for (ref, voided, points), obs in zip(
        observation_series(ctx.record), ctx.record.observations, strict=True
    ):
        if voided or not any(p.has_value for p in points):
            continue
        codes = {c.code for cat in obs.category or [] for c in cat.coding or []}
        when = next((p.when for p in points if p.when is not None), None)
        if category in codes and when is not None:
            dated.append((when.start, ref))
    # results dated after the day asked on are not the latest on that day: counted, not shown
    after = sorted((d, r) for d, r in dated if d > ctx.now)
    dated = [(d, r) for d, r in dated if d <= ctx.now]
    asked_on = ctx.now.date().isoformat()
    later = _dated_after(ctx, [r for _, r in after], "", "the latest") if after else ""
    if not dated:
        ref = f"Patient/{ctx.record.patient_id}"
        up_to = f" up to {asked_on}" if after else ""
        return [
            Fact(
                "recent_results",
                f"No {words} are recorded{up_to}.{_cite([ref])}{later}",
                evidence=(ref, *(r for _, r in after[:1])),
                details={"echo": [asked_on]} if after else {},
            )
        ]
    day = max(d for d, _ in dated).date()
    refs = list(dict.fromkeys(r for d, r in sorted(dated, reverse=True) if d.date() == day))
    shown = refs[:MAX_RECENT_RESULTS]
    more = f" ({len(refs) - len(shown)} more not shown)" if len(refs) > len(shown) else ""
    n = len(refs)
    head = Fact(
        "recent_results",
        f"{n} {words if n > 1 else words[:-1]} on {day.isoformat()}, the latest day with any"
        f"{more}.{_cite(shown)}{later}",
        value=n,
        date=max(d for d, _ in dated),
        evidence=(*shown, *(r for _, r in after[:1])),
        details={
            "category": category,
            "day": day.isoformat(),
            **({"echo": [asked_on], "after_now": len(after)} if after else {}),
        },
    )
    return [
        head,
        *_item_facts("recent_results", [ctx.evidence[r] for r in shown if r in ctx.evidence]),
    ]
