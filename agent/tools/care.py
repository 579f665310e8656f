"""Tools over the rest of care: immunizations, encounters in a period, the care team and primary
care provider, code status and advance directives, and clinical notes.

Each answers first (the last flu vaccine, a count, a name, "the record does not say") and says
what it searched when the record has nothing, citing the Patient for an absence.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from pydantic import Field

from agent.tools.base import (
    NOW_MIN,
    Args,
    Fact,
    ToolContext,
    _by_category,
    _cite,
    _item_facts,
    _period_text,
    tool,
)
from retrieval.clinical import aware, display_name, read_status
from retrieval.evidence import Evidence, clean_text

# --- immunizations ---------------------------------------------------------------------------

# what clinicians call a vaccine → words of its CVX display names (CDC CVX code set,
# https://www2a.cdc.gov/vaccines/iis/iisstandards/vaccines.asp?rpt=cvx)
VACCINE_WORDS: dict[str, tuple[str, ...]] = {
    "flu": ("influenza",),
    "influenza": ("influenza",),
    "tetanus": ("td", "tdap", "dtap", "tetanus"),
    "tdap": ("tdap",),
    "pneumonia": ("pneumococcal",),
    "pneumococcal": ("pneumococcal",),
    "shingles": ("zoster",),
    "zoster": ("zoster",),
    "covid": ("sars-cov-2", "covid"),
    "hpv": ("hpv",),
    "hepatitis b": ("hep b", "hepatitis b"),
    "hepatitis a": ("hep a", "hepatitis a"),
    "mmr": ("mmr", "measles"),
    "measles": ("mmr", "measles"),
    "polio": ("ipv", "polio"),
    "chickenpox": ("varicella",),
    "varicella": ("varicella",),
    "meningococcal": ("meningococcal", "mcv4", "menacwy"),
    "rotavirus": ("rotavirus",),
    "hib": ("hib",),
}


class ImmunizationArgs(Args):
    """``vaccine``: which vaccine ('flu', 'tetanus', a CVX display word; empty: all);
    ``due``: the question asks which are due."""

    vaccine: str | None = Field(
        default=None, description="A vaccine ('flu', 'tetanus'); empty: all."
    )
    due: bool = Field(default=False, description="The question asks which vaccines are due.")


def _vaccine_key(item: Evidence) -> str:
    """One vaccine: its CVX code, else its line's name."""
    cvx = [c for c in item.codes if c.startswith("http://hl7.org/fhir/sid/cvx|")]
    return cvx[0] if cvx else item.text.split(",", 1)[0].lower()


@tool(
    "immunizations",
    "Vaccines given: the last of each (or of one vaccine asked about), newest first. Which are "
    "due needs a schedule rule ChartSight does not have, and the answer says so.",
    ImmunizationArgs,
)
def immunizations(ctx: ToolContext, vaccine: str | None = None, due: bool = False) -> list[Fact]:
    """The last completed Immunization of each vaccine (CVX code), newest first, one fact each;
    with ``vaccine`` only those whose display names its words ("Last influenza vaccine:
    2020-03-22 ..."); with ``due`` first a statement that ChartSight has no schedule rule and
    cannot tell what is due. Not-given ones (status not-done) are left out. An absence cites the
    Patient and says how many immunizations were searched."""
    patient = f"Patient/{ctx.record.patient_id}"
    given = [
        e
        for e in _by_category(ctx, "immunization", False)
        if (r := ctx.record.get(e.id)) is not None and getattr(r, "status", None) == "completed"
    ]
    facts: list[Fact] = []
    due = due or bool(vaccine and re.search(r"\bdue\b", vaccine))
    if due:
        facts.append(
            Fact(
                "immunizations",
                "ChartSight cannot tell which vaccines are due: it has no immunization schedule "
                f"rule; the last of each recorded vaccine follows.{_cite([patient])}",
                evidence=(patient,),
            )
        )
    words: tuple[str, ...] = ()
    if vaccine and vaccine.strip().lower() not in ("", "due"):
        v = vaccine.strip().lower()
        words = VACCINE_WORDS.get(v, (v,))
        given = [
            e
            for e in given
            if any(re.search(rf"\b{re.escape(w)}\b", e.text.lower()) for w in words)
        ]
    last: dict[str, Evidence] = {}
    for e in given:  # newest first: the first of each vaccine is its last
        last.setdefault(_vaccine_key(e), e)
    items = list(last.values())
    if not items:
        what = f"{vaccine} vaccine" if words else "vaccine"
        facts.append(
            Fact(
                "immunizations",
                f"No {what} is recorded as given (searched "
                f"{len(ctx.record.immunizations)} immunizations).{_cite([patient])}",
                value=[],
                evidence=(patient,),
            )
        )
        return facts
    if words:
        first = items[0]
        facts.append(
            Fact(
                "immunizations",
                f"Last {vaccine} vaccine: {first.day}.{_cite([first.id])}",
                value=first.day,
                date=first.date,
                evidence=(first.id,),
                details={"date_precision": first.precision},
            )
        )
    elif len(items) > 1:
        facts.append(
            Fact(
                "immunizations",
                f"{len(items)} vaccines are recorded as given; the last of each, newest first."
                f"{_cite(e.id for e in items)}",
                value=len(items),
                evidence=tuple(e.id for e in items),
            )
        )
    return facts + _item_facts("immunizations", items)


# --- encounters in a period ------------------------------------------------------------------


class EncounterArgs(Args):
    """``since``/``until``: the period (ISO date-times); ``inpatient``: admissions only."""

    since: datetime | None = Field(default=None, description="Only from this time on.")
    until: datetime | None = Field(default=None, description="Only up to this time.")
    inpatient: bool = Field(default=False, description="Only admissions (inpatient stays).")


_INPATIENT = {"IMP", "ACUTE", "NONAC"}  # v3 ActCode inpatient classes


@tool(
    "encounters_in_period",
    "How many encounters (visits, or admissions only) the record has in a period, and which.",
    EncounterArgs,
)
def encounters_in_period(
    ctx: ToolContext,
    since: datetime | None = None,
    until: datetime | None = None,
    inpatient: bool = False,
) -> list[Fact]:
    """A count first ("4 encounters from 2019-01-01 to 2019-12-31.", citing them; echoing the
    period), then one fact per encounter, newest first (at most 10 listed). Admissions are
    Encounter.class IMP, ACUTE or NONAC (HL7 v3 ActCode)."""
    start = aware(since) if since else None
    end = aware(until) if until else ctx.now
    kind = "admissions" if inpatient else "encounters"
    items = []
    for e in _by_category(ctx, "encounter", False):
        if e.date is None or e.date > end or (start is not None and e.date < start):
            continue
        if inpatient:
            r = ctx.record.get(e.id)
            cls = getattr(getattr(r, "class_fhir", None), "code", None)
            if cls not in _INPATIENT:
                continue
        items.append(e)
    window = _period_text(start, end)
    n = len(items)
    if not items:
        patient = f"Patient/{ctx.record.patient_id}"
        return [
            Fact(
                "encounters_in_period",
                f"No {kind[:-1]} is recorded {window}.{_cite([patient])}",
                value=0,
                evidence=(patient,),
                details={"echo": [window], "count": 0},
            )
        ]
    head = Fact(
        "encounters_in_period",
        f"{n} {kind if n > 1 else kind[:-1]} {window}.{_cite(e.id for e in items)}",
        value=n,
        evidence=tuple(e.id for e in items),
        details={"echo": [window], "count": n},
    )
    return [head, *_item_facts("encounters_in_period", items[:10])]


# --- care team ---------------------------------------------------------------------------------

# "who is his doctor?", "primary care physician", "care team": the question the care_team tool
# answers (the planner also reads it, so that such a question is not a demographics one)
CARE_TEAM_QUESTION = (
    r"\b(?:primary care|pcp|gp\b|general practitioner|family (?:doctor|physician)|care team|"
    r"(?:his|her|their|the patient's) (?:doctor|physician|provider)|who (?:is|are) (?:treating|"
    r"looking after|caring for))"
)


def _named(ctx: ToolContext, reference: Any) -> str | None:
    """The name a Reference points at: its display, else the referenced Practitioner's,
    PractitionerRole's or Organization's name."""
    if reference is None:
        return None
    if getattr(reference, "display", None):
        return str(reference.display)
    ref = getattr(reference, "reference", None)
    target: Any = ctx.record.referenced.get(str(ref)) if ref else None
    if target is None:
        return None
    if getattr(target, "resource_type", "") == "Organization":
        return str(target.name) if getattr(target, "name", None) else None
    return display_name(target) if getattr(target, "name", None) else None


@tool(
    "care_team",
    "The patient's primary care provider (Patient.generalPractitioner), care teams (CareTeam) and "
    "the clinicians of the latest encounters.",
    questions=(CARE_TEAM_QUESTION,),
)
def care_team(ctx: ToolContext) -> list[Fact]:
    """The primary care provider(s) named by Patient.generalPractitioner (citing the Patient),
    each CareTeam with its participants (citing it), and, when neither is recorded, a statement
    that the record does not name one, followed by the clinicians of the latest encounter that
    names any ("Seen most recently by Dr X on 2020-12-13", citing the Encounter)."""
    p = ctx.record.patient
    patient = f"Patient/{p.id}"
    facts: list[Fact] = []
    gps = [n for n in (_named(ctx, r) for r in p.generalPractitioner or []) if n]
    if gps:
        facts.append(
            Fact(
                "care_team",
                f"Primary care provider: {', '.join(gps)}.{_cite([patient])}",
                value=gps,
                evidence=(patient,),
            )
        )
    teams: list[Any] = [r for r in ctx.record.other if r.__resource_type__ == "CareTeam"]
    for team in teams:
        if read_status(team).voided:
            continue
        members = []
        for part in team.participant or []:
            who = _named(ctx, part.member)
            role = ", ".join(
                str(c.text or (c.coding[0].display if c.coding else "")) for c in part.role or []
            )
            if who:
                members.append(f"{who} ({role})" if role else who)
        name = team.name or "care team"
        status = f", {team.status}" if team.status else ""
        ref = f"CareTeam/{team.id}"
        facts.append(
            Fact(
                "care_team",
                f"Care team {name}{status}: {', '.join(members) or 'no participant named'}."
                f"{_cite([ref])}",
                value=members,
                evidence=(ref,),
            )
        )
    if facts:
        return facts
    facts.append(
        Fact(
            "care_team",
            "The record names no primary care provider (Patient.generalPractitioner is empty) and "
            f"holds no care team.{_cite([patient])}",
            evidence=(patient,),
        )
    )
    for e in _by_category(ctx, "encounter", False):
        r = ctx.record.get(e.id)
        names = [
            n
            for n in (_named(ctx, pt.individual) for pt in getattr(r, "participant", None) or [])
            if n
        ]
        if names:
            facts.append(
                Fact(
                    "care_team",
                    f"Seen most recently by {', '.join(names)} on {e.day}.{_cite([e.id])}",
                    value=names,
                    date=e.date,
                    evidence=(e.id,),
                )
            )
            break
    return facts


# --- code status and advance directives -----------------------------------------------------

# words of code status and advance care planning in charts (HL7 Consent category "acd" advance
# care directive, "dnr"; LOINC 75320-2 Advance directive, 42348-3 Advance healthcare directives,
# 75781-5 Code status; SNOMED 304253006 Not for resuscitation)
CODE_STATUS_CODES = frozenset(
    {
        "http://loinc.org|75320-2",
        "http://loinc.org|42348-3",
        "http://loinc.org|75781-5",
        "http://snomed.info/sct|304253006",
        "http://snomed.info/sct|450476008",
    }
)
_CODE_STATUS_WORDS = re.compile(
    r"\b(?:code status|full code|dnr|dnar|do not (?:attempt )?resuscitat\w*|not for resuscitation|"
    r"resuscitation|polst|molst|advance(?:d)? (?:care )?directives?|living wills?|"
    r"health ?care proxy|power of attorney)\b",
    re.IGNORECASE,
)


@tool(
    "code_status",
    "Code status (full code, DNR) and advance directives, where the record holds them.",
    questions=(
        r"\b(?:code status|full code|dnr|dnar|resuscitat\w*|polst|molst|advance(?:d)? (?:care )?"
        r"directives?|living wills?|health ?care proxy|power of attorney)\b",
    ),
)
def code_status(ctx: ToolContext) -> list[Fact]:
    """Every record item about code status or advance care planning: Consent resources, and
    evidence lines coded with ``CODE_STATUS_CODES`` or naming resuscitation, DNR, POLST/MOLST, an
    advance directive, a living will or a health care proxy (newest first, one fact each); when
    none, "The record holds no code status or advance directive" with what was searched, citing
    the Patient. Never inferred from anything else."""
    found = [
        e
        for e in ctx.evidence.values()
        if e.category == "consent"
        or CODE_STATUS_CODES & set(e.codes)
        or _CODE_STATUS_WORDS.search(e.text)
    ]
    found.sort(key=lambda e: e.date or NOW_MIN, reverse=True)
    if found:
        return _item_facts("code_status", found, "Recorded: ")
    patient = f"Patient/{ctx.record.patient_id}"
    return [
        Fact(
            "code_status",
            "The record holds no code status or advance directive: no Consent, and none of its "
            f"{len(ctx.evidence)} items is coded as or mentions code status, resuscitation, DNR, "
            f"POLST, an advance directive or a health care proxy.{_cite([patient])}",
            evidence=(patient,),
        )
    ]


# --- notes ---------------------------------------------------------------------------------------


class NotesArgs(Args):
    """``query``: words to find in the notes (empty: the latest note)."""

    query: str | None = Field(default=None, description="Words to find (empty: the latest note).")


def _note_body(item: Evidence) -> str:
    text = item.text.rsplit(" [", 1)[0]
    for marker in ("; text: ", "; conclusion: "):
        if marker in text:
            return text.split(marker, 1)[1]
    return ""


@tool(
    "notes",
    "What the clinical notes say: DocumentReference text and report text, quoted and cited.",
    NotesArgs,
    questions=(
        r"\bnotes?\s+(?:about|on|mention\w*|say\w*\s+about)\s+(?P<query>[a-z][a-z \-]{1,40}?)\s*(?:\?|$)",
        r"\b(?:last|latest|recent|most recent)\s+(?:clinical\s+|progress\s+|discharge\s+)?"
        r"(?:note|summary)\b",
        r"\bwhat did the (?:\w+ )?(?:note|notes|report) say\b",
    ),
)
def notes(ctx: ToolContext, query: str | None = None) -> list[Fact]:
    """Notes are DocumentReference and DiagnosticReport items with text (inline attachments,
    conclusions). Without ``query``: the latest note, quoted (at most 400 characters). With it:
    every note holding all its words, the sentence that holds them quoted, newest first (5 at
    most). An absence cites the Patient and says how many notes were searched. A note whose text
    was withheld (``Evidence.withheld``: it addresses an AI model, ``retrieval.evidence.guard``)
    is neither quoted nor searched, but named: without ``query`` when it is newer than the latest
    quoted note (the latest note is then that one), with ``query`` in a count of the notes not
    searched."""
    patient = f"Patient/{ctx.record.patient_id}"
    every = _by_category(ctx, "document", False) + _by_category(ctx, "report", False)
    withheld = sorted(
        (e for e in every if e.withheld), key=lambda e: e.date or NOW_MIN, reverse=True
    )
    items = [e for e in every if not e.withheld and _note_body(e)]
    items.sort(key=lambda e: e.date or NOW_MIN, reverse=True)
    words = [w for w in re.findall(r"[a-z0-9]+", (query or "").lower()) if len(w) > 2]
    facts: list[Fact] = []
    if (
        withheld
        and not words
        and (not items or (withheld[0].date or NOW_MIN) > (items[0].date or NOW_MIN))
    ):
        w = withheld[0]
        facts.append(
            Fact(
                "notes",
                f"The latest note ({w.day or 'undated'}) is not quoted: its text addresses an AI "
                f"model, so it was withheld; read it in the record.{_cite([w.id])}",
                date=w.date,
                evidence=(w.id,),
            )
        )
    if not items:
        return facts or [
            Fact(
                "notes",
                "The record holds no clinical notes (no DocumentReference or report with text)."
                f"{_cite([patient])}",
                evidence=(patient,),
            )
        ]
    if not words:
        latest = items[0]
        body = _note_body(latest)
        quote = clean_text(body, 400)
        said = "The latest readable note" if facts else "The latest note"
        return [
            *facts,
            Fact(
                "notes",
                f"{said} ({latest.day}) says: \u201c{quote}\u201d{_cite([latest.id])}",
                date=latest.date,
                evidence=(latest.id,),
            ),
        ]
    for e in items:
        body = _note_body(e)
        if all(re.search(rf"\b{re.escape(w)}", body.lower()) for w in words):
            sentence = next(
                (
                    s
                    for s in re.split(r"(?<=[.!?])\s+", body)
                    if any(re.search(rf"\b{re.escape(w)}", s.lower()) for w in words)
                ),
                body,
            )
            sentence = clean_text(sentence, 300)
            facts.append(
                Fact(
                    "notes",
                    f"A note of {e.day} says: \u201c{sentence}\u201d{_cite([e.id])}",
                    date=e.date,
                    evidence=(e.id,),
                )
            )
        if len(facts) == 5:
            break
    if not facts:
        unread = (
            f" ({len(withheld)} more not searched: their text addresses an AI model, so it was "
            f"withheld){_cite(e.id for e in withheld)}"
            if withheld
            else ""
        )
        return [
            Fact(
                "notes",
                f"None of the record's {len(items)} notes mentions {query!r}{unread}."
                f"{_cite([patient])}",
                evidence=(patient, *(e.id for e in withheld)),
                details={"echo": [str(query)]},
            )
        ]
    return facts


__all__ = [
    "care_team",
    "code_status",
    "encounters_in_period",
    "immunizations",
    "notes",
]


# --- what changed in a period ------------------------------------------------------------------


class ChangesArgs(Args):
    """The period: the last ``days``, or ``since``/``until`` (ISO date-times); default the last
    365 days."""

    days: float | None = Field(default=None, gt=0, description="Only the last N days.")
    since: datetime | None = Field(default=None, description="Only from this time on.")
    until: datetime | None = Field(default=None, description="Only up to this time.")


# what a clinician reads as "what changed": each kind of entry, how the answer names it, and
# whether only abnormal entries count (a normal result is no change)
_CHANGE_KINDS = (
    ("condition", "diagnosis recorded", "diagnoses recorded", False),
    ("medication", "medication ordered", "medications ordered", False),
    ("procedure", "procedure", "procedures", False),
    ("observation", "abnormal result", "abnormal results", True),
    ("encounter", "encounter", "encounters", False),
)
CHANGES_LISTED = 8  # entries listed per kind (the count says how many there are)


@tool(
    "changes_in_period",
    "What the record shows as new in a period: diagnoses recorded, medications ordered, "
    "procedures, abnormal results and encounters, each counted and the newest listed.",
    ChangesArgs,
)
def changes_in_period(
    ctx: ToolContext,
    days: float | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Fact]:
    """A summary first ("From 2020-01-01 to 2020-12-31 the record has 1 diagnosis recorded,
    2 medications ordered, …", citing every entry counted; echoing the period), then, per kind,
    the newest ``CHANGES_LISTED`` entries (diagnoses and medications first: what changes care).
    A period with nothing recorded says so and names the record's latest dated entry, so that a
    chart that ends before the period is not read as "nothing changed". Dates are the entries'
    own (onset or recorded date, order date, result time)."""
    end = aware(until) if until else ctx.now
    start = aware(since) if since else end - timedelta(days=days or 365)
    window = _period_text(start, end)
    found: list[tuple[str, str, list[Evidence]]] = []
    for category, one, many, abnormal_only in _CHANGE_KINDS:
        items = [
            e
            for e in _by_category(ctx, category, False)
            if e.date is not None and start <= e.date <= end and (e.abnormal or not abnormal_only)
        ]
        if items:
            found.append((one, many, items))
    if not found:
        dated = [e for e in ctx.evidence.values() if e.date is not None]
        latest = max(dated, key=lambda e: e.date or NOW_MIN) if dated else None
        patient = f"Patient/{ctx.record.patient_id}"
        text = f"Nothing is recorded {window}"
        cited: tuple[str, ...] = (patient,)
        if latest is not None and latest.date is not None and latest.date < start:
            text += f"; the record's latest dated entry is from {latest.day}"
            cited = (patient, latest.id)
        return [
            Fact(
                "changes_in_period",
                f"{text}.{_cite(cited)}",
                value=0,
                evidence=cited,
                details={"echo": [window], "count": 0},
            )
        ]
    parts = [f"{len(items)} {one if len(items) == 1 else many}" for one, many, items in found]
    every = [e.id for _, _, items in found for e in items]
    head = Fact(
        "changes_in_period",
        f"{window[0].upper()}{window[1:]} the record has {', '.join(parts)}.{_cite(every)}",
        value=len(every),
        evidence=tuple(every),
        details={"echo": [window], "count": len(every)},
    )
    listed = [
        fact
        for one, _, items in found
        if one != "encounter"  # counted; the visits are not changes in themselves
        for fact in _item_facts("changes_in_period", items[:CHANGES_LISTED])
    ]
    return [head, *listed]
