"""Tools over the rest of the chart: demographics and age, problems and condition history,
medications, allergies, procedures, encounters and imaging."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from datetime import date

from agent.tools.base import (
    NOW_MIN,
    AgeArgs,
    ConditionArgs,
    Fact,
    LimitArgs,
    ProcedureArgs,
    ToolContext,
    _by_category,
    _cite,
    _item_facts,
    _subject,
    tool,
)
from retrieval.clinical import (
    StatusReading,
    display_name,
    fhir_date,
    patient_age,
    read_status,
)
from retrieval.evidence import Evidence

log = logging.getLogger(__name__)

_SNOMED = "http://snomed.info/sct|"


@tool("demographics", "The patient's name, sex, birth date, age and vital status.")
def demographics(ctx: ToolContext) -> list[Fact]:
    """One fact: name, sex, birth date (at its precision), age (approximate for a partial birth
    date; at death for a deceased patient) and vital status; ``value`` is a dict of these; cites
    the Patient."""
    p = ctx.record.patient
    ref = f"Patient/{p.id}"
    name = display_name(p)
    age = patient_age(p, ctx.now.date())
    born = fhir_date(p.birthDate)
    died = fhir_date(p.deceasedDateTime)
    parts = [name, f"{p.gender or 'unknown sex'}"]
    if born:
        parts.append(f"born {born.text}")
    if age is not None:
        parts.append(
            f"age {age.text if age.unit == 'years' else age.spoken}"
            + (" (approximate: partial birth date)" if age.approximate else "")
            + (" at death" if age.at_death else "")
        )
    if died:
        parts.append(f"died {died.text}")
    elif p.deceasedBoolean:
        parts.append("deceased")
    return [
        Fact(
            "demographics",
            ", ".join(parts) + "." + _cite([ref]),
            value={
                "name": name,
                "sex": p.gender,
                "birth_date": born.text if born else None,
                "age": age.years if age else None,
                "age_approximate": bool(age and age.approximate),
                "deceased": died.text if died else (True if p.deceasedBoolean else None),
            },
            evidence=(ref,),
        )
    ]


@tool("age", "The patient's age in whole years on a date (default: now).", AgeArgs)
def age(ctx: ToolContext, on: date | None = None) -> list[Fact]:
    """One fact: the age on ``on`` (default: now) or at death, in whole years, or for a child under 2 with a full birth date in whole months (days in the first month): ``value`` and ``unit`` ("years", "months", "days"); "The record gives no birth date" when it has none. The date asked about is echoed, never evidence."""
    when = on or ctx.now.date()
    reading = patient_age(ctx.record.patient, when)
    ref = f"Patient/{ctx.record.patient_id}"
    if reading is None:
        born = fhir_date(ctx.record.patient.birthDate)
        text = (
            f"The record's birth date, {born.text}, is after {when.isoformat()}: no age can be given."
            if born is not None
            else "The record gives no birth date."
        )
        return [Fact("age", f"{text}{_cite([ref])}", evidence=(ref,))]
    if reading.at_death:
        died = fhir_date(ctx.record.patient.deceasedDateTime)
        text = (
            f"The patient died on {died.text if died else 'an unknown date'}, aged {reading.spoken}"
        )
    else:
        text = f"Age on {when.isoformat()}: {reading.spoken}"
    if reading.approximate:
        text += " (approximate: the record gives only a partial birth date)"
    return [
        Fact(
            "age",
            f"{text}.{_cite([ref])}",
            value=reading.amount,
            unit=reading.unit,
            evidence=(ref,),
            # a date the caller chose is not evidence of anything (see grounding.evidence_map)
            details={
                **({"echo": [when.isoformat()]} if on else {}),
                "approximate": reading.approximate,
                "at_death": reading.at_death,
            },
        )
    ]


def _listing(
    ctx: ToolContext, name: str, items: list[Evidence], empty: str, counted: str = ""
) -> list[Fact]:
    """One fact per item; ``empty`` (citing the Patient: an absence rests on the whole record)
    when there is none. With ``counted`` ("active medications"), two or more items are headed by
    their count ("3 active medications are recorded, newest first."), citing each."""
    if not items:
        ref = f"Patient/{ctx.record.patient_id}"
        return [Fact(name, f"{empty}{_cite([ref])}", value=[], evidence=(ref,))]
    facts = _item_facts(name, items)
    if counted and len(items) > 1:
        head = Fact(
            name,
            f"{len(items)} {counted} are recorded, newest first.{_cite(e.id for e in items)}",
            value=len(items),
            evidence=tuple(e.id for e in items),
            details={"count": len(items)},
        )
        facts.insert(0, head)
    return facts


@tool("active_problems", "The patient's active conditions.")
def active_problems(ctx: ToolContext) -> list[Fact]:
    """One fact per active Condition (newest first), or one absence citing the Patient."""
    return _listing(
        ctx,
        "active_problems",
        _by_category(ctx, "condition", True),
        "No active problem is recorded.",
        counted="active problems",
    )


@tool(
    "condition_history",
    "Every recorded condition matching a name or code, whatever its status: active, "
    "resolved (with dates), or ruled out (refuted). Entered-in-error ones are left out.",
    ConditionArgs,
)
def condition_history(ctx: ToolContext, query: str, judged: str | None = None) -> list[Fact]:
    """The conditions of ``query``'s own codes (or, for an uncoded chart, its words), whatever their clinical status; when none is recorded, an absence citing the Patient and the related conditions recorded ("A related condition is recorded: ...")."""
    matched = ctx.terms.matches(query)
    # the table links related concepts through codes for ranking (diabetes lists
    # prediabetes's code); a diagnosis asked about is only its own: a code that another term,
    # not asked about, stands for is left out ("diabetes?" is not answered with prediabetes)
    others = {c for t in ctx.terms.terms if t not in matched for c in t.codes}
    codes = {c for t in matched for c in t.codes if c not in others}
    if "|" in query:
        codes.add(query.strip())
    related = {c for t in matched for c in t.codes} - codes
    words = [w for w in re.findall(r"[a-z0-9]+", query.lower()) if len(w) > 1]
    found, near = [], []
    for item in _by_category(ctx, "condition", False):
        name = item.text.rsplit(" [", 1)[0].lower()
        by_code = bool(codes & set(item.codes)) or any(
            c.endswith(f"|{query.strip()}") for c in item.codes
        )
        by_name = all(re.search(rf"\b{re.escape(w)}", name) for w in words)
        if by_code or (not codes and words and by_name):
            found.append(item)
        elif related & set(item.codes):
            near.append(item)
    subject = _subject(query, [])
    facts = _listing(
        ctx,
        "condition_history",
        found,
        f"No {subject} diagnosis is in the record's conditions.",
    )
    if not found:  # an honest "no", and what the record has that is close to it
        facts += _item_facts(
            "condition_history", near, "A related condition is recorded: ", related_to=query
        )
    else:
        facts.insert(0, _diagnosis_answer(ctx, subject, found, judged))
    return facts


def _diagnosis_answer(
    ctx: ToolContext, subject: str, found: list[Evidence], judged: str | None = None
) -> Fact:
    """The direct answer to "does he have <subject>?" from the conditions found: "Yes: ... is
    recorded as active (since <earliest onset>)", else "In the past: ... is recorded, not active
    now", else "No: ... was ruled out" (every one refuted), citing the conditions it rests on.
    With ``judged`` ("controlled"), an active condition is not a yes: "The record does not say
    whether ... is controlled; it is recorded as active (since ...)", for a clinician to judge
    from the results given beside it."""
    readings = {e.id: _status(ctx, e.id) for e in found}
    active = [e for e in found if readings[e.id].active and not readings[e.id].refuted]
    past = [e for e in found if not readings[e.id].active and not readings[e.id].refuted]
    if active:
        dated = [e for e in active if e.date is not None]
        first = min(dated, key=lambda e: e.date) if dated else None  # type: ignore[arg-type, return-value]
        since = f" (since {first.day})" if first is not None else ""
        text, cited, value = f"Yes: {subject} is recorded as active{since}.", active, "active"
        if judged:
            text = (
                f"The record does not say whether {subject} is {judged}; it is recorded as "
                f"active{since}."
            )
    elif past:
        text, cited, value = f"In the past: {subject} is recorded, not active now.", past, "past"
    else:
        text, cited, value = f"No: {subject} was ruled out.", found, "ruled out"
    return Fact(
        "condition_history",
        f"{text}{_cite(e.id for e in cited)}",
        value=value,
        evidence=tuple(e.id for e in cited),
    )


def _status(ctx: ToolContext, reference: str) -> StatusReading:
    resource = ctx.record.get(reference)
    return read_status(resource) if resource is not None else StatusReading()


@tool("active_medications", "Medications the patient is on (active requests and statements).")
def active_medications(ctx: ToolContext) -> list[Fact]:
    """One fact per active MedicationRequest or MedicationStatement (newest first), or one absence
    citing the Patient."""
    return _listing(
        ctx,
        "active_medications",
        _by_category(ctx, "medication", True),
        "No active medication is recorded.",
        counted="active medications",
    )


@tool("allergies", "Recorded allergies and intolerances.")
def allergies(ctx: ToolContext) -> list[Fact]:
    """One fact per AllergyIntolerance (any status, newest first), or one absence citing the
    Patient."""
    return _listing(
        ctx,
        "allergies",
        _by_category(ctx, "allergy", False),
        "No allergy is recorded.",
        counted="allergies or intolerances",
    )


@tool("recent_procedures", "The most recent procedures.", LimitArgs)
def recent_procedures(ctx: ToolContext, limit: int = 5) -> list[Fact]:
    """The newest ``limit`` Procedures, one fact each, or one absence citing the Patient."""
    return _listing(
        ctx,
        "recent_procedures",
        _by_category(ctx, "procedure", False)[:limit],
        "No procedure is recorded.",
    )


# the entries a procedure answer cites and lists, newest first
MAX_LISTED = 12


@tool(
    "procedure_history",
    "Whether and when a procedure was done (colonoscopy, mammogram, CABG, ...): every recorded "
    "Procedure matching a name or code, newest first, yes or no first.",
    ProcedureArgs,
)
def procedure_history(ctx: ToolContext, query: str) -> list[Fact]:
    """ "Has he had a colonoscopy?": the Procedures (as of ``ctx.now``) whose code is one of
    ``query``'s term's SNOMED CT codes (``retrieval/terms.toml``), or, for a Procedure SNOMED CT
    does not code (CPT, a local code, text only), whose name has the term's words (or
    ``query``'s own words for a procedure the table lacks), newest first. A direct answer first:
    "Yes: colonoscopy is recorded 2 times, the last on 2017-06-10" (FHIR Procedure.status
    completed or in-progress; the newest ``MAX_LISTED`` cited and listed, and said so when there
    are more), "No colonoscopy is recorded as done: 1 recorded with status not-done" when none is
    done, or "No colonoscopy is recorded among the record's N procedures", citing the Patient (an
    absence rests on the whole record). Entered-in-error Procedures are not in the record's
    evidence and are never counted."""
    matched = [t for t in ctx.terms.matches(query) if "procedure" in t.categories and t.codes]
    codes = {c for t in matched for c in t.codes}
    if "|" in query:
        codes.add(query.strip())
    phrases = [w for t in matched for w in t.words] or [
        " ".join(re.findall(r"[a-z0-9]+", query.lower()))
    ]
    procedures = _by_category(ctx, "procedure", False)
    found = []
    for item in procedures:
        name = item.text.rsplit(" [", 1)[0].lower()
        by_code = bool(codes & set(item.codes))
        # by name only a procedure SNOMED CT does not code (CPT, a local code, text): a SNOMED
        # coded "Insertion of ureteric stent" is not a coronary stent, whatever its words
        snomed_coded = any(c.startswith(_SNOMED) for c in item.codes)
        by_name = (not snomed_coded or not codes) and any(
            p and re.search(rf"\b{re.escape(p)}\b", name) for p in phrases
        )
        if by_code or by_name:
            found.append(item)
    subject = _subject(query, [])
    if not found:
        ref = f"Patient/{ctx.record.patient_id}"
        n = len(procedures)
        return [
            Fact(
                "procedure_history",
                f"No {subject} is recorded among the record's {n} "
                f"procedure{'s' if n != 1 else ''}.{_cite([ref])}",
                value="none",
                evidence=(ref,),
                details={"query": query, "count": 0},
            )
        ]
    statuses = {e.id: str(getattr(ctx.record.get(e.id), "status", "") or "") for e in found}
    done = [e for e in found if statuses[e.id] in ("completed", "in-progress")]
    # a long history (an ICU patient's daily chest X-rays) is cited by its newest entries
    if done:
        last = done[0]
        times = f"{len(done)} times, the last" if len(done) > 1 else "once,"
        shown = done[:MAX_LISTED]
        which = f" (the newest {len(shown)} cited)" if len(shown) < len(done) else ""
        text = f"Yes: {subject} is recorded {times} on {last.day}{which}"
        if statuses[last.id] == "in-progress":
            text += " (in progress)"
        head = Fact(
            "procedure_history",
            f"{text}.{_cite(e.id for e in shown)}",
            value="done",
            date=last.date,
            evidence=tuple(e.id for e in done),
            details={"query": query, "count": len(done)},
        )
    else:
        kinds = sorted({statuses[e.id] or "no status" for e in found})
        shown = found[:MAX_LISTED]
        head = Fact(
            "procedure_history",
            f"No {subject} is recorded as done: {len(found)} recorded with status "
            f"{', '.join(kinds)}.{_cite(e.id for e in shown)}",
            value="not done",
            evidence=tuple(e.id for e in found),
            details={"query": query, "count": 0},
        )
    return [head, *_item_facts("procedure_history", found[:MAX_LISTED])]


@tool("recent_encounters", "The most recent encounters (visits, admissions).", LimitArgs)
def recent_encounters(ctx: ToolContext, limit: int = 5) -> list[Fact]:
    """The newest ``limit`` Encounters, one fact each, the newest first also said as "Last
    encounter: <line>" (its date, kind and reason), or one absence citing the Patient."""
    items = _by_category(ctx, "encounter", False)[:limit]
    facts = _listing(ctx, "recent_encounters", items, "No encounter is recorded.")
    if items:
        first = items[0]
        # what was diagnosed at it (Condition.encounter) tells why, when no reason is coded
        found_then = [
            e
            for e in _by_category(ctx, "condition", False)
            if (c := ctx.record.get(e.id)) is not None
            and getattr(getattr(c, "encounter", None), "reference", None) == first.id
        ]
        names = [e.text.split("Condition: ", 1)[-1].split(",", 1)[0] for e in found_then]
        if "; reason " in first.text:
            reason = ""
        elif names:
            reason = f"; diagnosed at it: {'; '.join(names)}"
        else:
            reason = " (no reason recorded)"
        head = _item_facts("recent_encounters", [first], "Last encounter: ")[0]
        text = head.statement.rsplit(" [", 1)
        cited = (
            (first.id, *(e.id for e in found_then))
            if reason.startswith("; diagnosed")
            else (first.id,)
        )
        facts[0] = replace(
            head, statement=f"{text[0]}{reason}.{_cite(cited)}", evidence=tuple(cited)
        )
    return facts


@tool("imaging", "Imaging studies and images, and the impressions of imaging reports.", LimitArgs)
def imaging(ctx: ToolContext, limit: int = 5) -> list[Fact]:
    """The newest ``limit`` imaging items: ImagingStudy, images, and reports with a conclusion or
    text, one fact each, or one absence citing the Patient."""
    items = _by_category(ctx, "imaging", False) + _by_category(ctx, "image", False)
    reports = [
        e
        for e in _by_category(ctx, "report", False)
        if "conclusion:" in e.text or "text:" in e.text
    ]
    items = sorted(items + reports, key=lambda e: e.date or NOW_MIN, reverse=True)
    return _listing(ctx, "imaging", items[:limit], "No imaging is recorded.")
