"""The rule-based planner: which tools a question needs, read from its words. It always works,
with or without a model; a tool-calling model may add calls of its own.

``plan`` holds the built-in rules. A ``Planner`` adds the extensible ones: a tool that declares the
questions it answers (``agent.tools.Tool.questions``) is called when one matches, and installed
packages add rules through the ``chartsight.planner_rules`` entry point group (``register(registry)``
calling ``registry.add(name, rule)`` with ``rule(question, plan) -> None``, which may add calls to
the plan; see ``common.plugins``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.tools.care import CARE_TEAM_QUESTION
from common.plugins import PluginError, Registry
from retrieval.clinical import MONTH_NAMES
from retrieval.drugs import default_drugs
from retrieval.spelling import Correction, Speller, default_speller
from retrieval.terms import TermTable, default_terms


@dataclass(frozen=True)
class PlannedCall:
    """A call the rule planner decided on: a tool's name and its arguments. (A model's request
    to call a tool is ``agent.backends.ToolCall``.)"""

    tool: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """The calls a question needs (each once, in order), and whether it wants the patient's images
    or similar cases."""

    calls: list[PlannedCall] = field(default_factory=list)
    similar_cases: bool = False
    images: bool = False
    # words of the question read as the clinical words meant ("potasium" → potassium)
    corrections: list[Correction] = field(default_factory=list)

    def add(self, tool: str, **args: Any) -> None:
        """Add a call of ``tool`` with ``args`` (JSON values), unless the same call is planned."""
        call = PlannedCall(tool, args)
        if call not in self.calls:
            self.calls.append(call)


_RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm|"
_UNITS = {"hour": 1 / 24, "day": 1, "week": 7, "month": 30.4375, "year": 365.25}
_WINDOW = re.compile(
    r"\b(?:last|past|previous)\s+(\d+|a|one|two|three|six|twelve|few|couple of|several)?\s*"
    r"(hour|day|week|month|year)s?\b"
)
# "few" is read as 3 and "several" as 5: the answer states the period it used
_WORD_NUMBERS = {"a": 1, "one": 1, "two": 2, "three": 3, "six": 6, "twelve": 12, "few": 3,
                 "couple of": 2, "several": 5}  # fmt: skip
_LATEST_OF = re.compile(
    r"\b(?:last|latest|most recent|recent|current|newest)\s+([a-z0-9][a-z0-9 \-]*?)"
    r"(?:\s+(?:value|level|result|reading|measurement|test))?\s*(?:\?|$|\.|,| and | for | in | of the| was| is)"
)


# what a time phrase or a request word looks like: never the name of a test
_NOT_ANALYTE = re.compile(
    r"^(?:\d+\s*|a\s+|one\s+|two\s+|three\s+|six\s+|twelve\s+|few\s+|couple\s+of\s+)?"
    r"(?:hours?|days?|weeks?|months?|years?|decades?|time|times|night|visit|encounter|"
    r"admission|appointment|result|results|value|values|test|tests|lab|labs|one|few|month's|week's|"
    r"vitals?|vital signs?|blood ?work|blood tests?|lab results|laboratory)$"
    r"|^(?:january|february|march|april|may|june|july|august|september|october|november|"
    r"december|spring|summer|autumn|fall|winter)\b"
)
# "what was her ferritin?", "what is the patient's troponin level": a test the term table may lack
_VALUE_OF = re.compile(
    r"\bwhat\s+(?:was|is|were|are)\s+(?:his|her|their|the\s+patient's|the\s+patients|the)\s+"
    r"([a-z][a-z0-9 \-]*?)(?:\s+(?:value|level|result|reading|measurement|test))?\s*(?:\?|$|\.|,| on | in | at )"
)


_STAT_WORDS = re.compile(
    r"^(?:(?:average|mean|median|trend|trends|change|highest|lowest|maximum|minimum|max|min|"
    r"latest|last|recent|current|most\s+recent)(?:\s+|$)(?:of\s+(?:the\s+|his\s+|her\s+)?)?)+"
)


def analyte_words(phrase: str) -> str | None:
    """``phrase`` as the name of a test ("average troponin" → "troponin"), or None when it is a
    time phrase ("last month") or a request word ("last visit")."""
    phrase = _STAT_WORDS.sub("", phrase.strip()).strip()
    return None if not phrase or _NOT_ANALYTE.search(phrase) else phrase


# words that ask for encounters ("when was he last seen?"), never the name of a test
_ENCOUNTER_WORDS = ("visit", "encounter", "admission", "admitted", "seen", "hospitali")


def _has(words: str, *needles: str) -> bool:
    return any(re.search(rf"\b{re.escape(n)}", words) for n in needles)


def window_days(question: str) -> float | None:
    """Days in 'over the last 3 months', 'past 24 hours', 'last year'."""
    m = _WINDOW.search(question.lower())
    if not m:
        return None
    amount = m.group(1)
    n = _WORD_NUMBERS.get(amount) if amount and not amount.isdigit() else int(amount or 1)
    return (n or 1) * _UNITS[m.group(2)]


_FOLLOW_UP = re.compile(
    r"^\s*(?:and|what about|how about|before that|previous|earlier|the one before|that|it|those|then)\b"
    r"|\b(?:before that|previous one|earlier one|the one before|same)\b",
    re.IGNORECASE,
)


_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?"
# a date as clinicians write one: 2019-03-17, 2019-03, 2019, March 2019, March 17(th), 2019, 17 March 2019
_DATE = (
    r"(?:\d{4}-\d{2}-\d{2}|\d{4}-\d{2}|(?:\d{1,2}\s+)?"
    + _MONTH
    + r"(?:\s+\d{1,2}(?:st|nd|rd|th)?,?)?"
    r"\s+(?:19|20)\d{2}|(?<![\d-])(?:19|20)\d{2}(?![\d-])"
    r"(?!\s*(?:mg|mcg|ug|g|ml|units?|iu|mmol|meq)\b))"  # "2000 mg" is a dose, not a year
)
_PERIOD = re.compile(
    rf"\b(?P<between>between|from)\s+(?P<a>{_DATE})\s+(?:and|to|until|through|till|-)\s+"
    rf"(?P<b>{_DATE})"
    rf"|\b(?P<since>since|after|from)\s+(?P<s>{_DATE})"
    rf"|\b(?P<before>before|until|till|up to|through)\s+(?P<u>{_DATE})"
    rf"|\b(?P<during>in|during|on|for)\s+(?P<d>{_DATE})",
    re.IGNORECASE,
)


def _date_interval(text: str) -> tuple[datetime, datetime] | None:
    """A written date as the interval it covers, [start, end): "2019" is the whole year."""
    text = text.strip().lower().replace(",", " ")
    iso = re.fullmatch(r"(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?", text)
    try:
        if iso:
            year, month, day = int(iso.group(1)), iso.group(2), iso.group(3)
        else:
            parts = re.findall(r"[a-z]+|\d+", text)
            month_word = next(p for p in parts if p.isalpha())
            month = next(i for i, m in enumerate(MONTH_NAMES, 1) if m.startswith(month_word[:3]))
            numbers = [int(p) for p in parts if p.isdigit()]
            year = next(n for n in numbers if n > 31)
            days = [n for n in numbers if n <= 31]
            month, day = f"{month:02d}", f"{days[0]:02d}" if days else None
        if day is not None and month is not None:
            start = datetime(year, int(month), int(day), tzinfo=UTC)
            return start, start + timedelta(days=1)
        if month is not None:
            start = datetime(year, int(month), 1, tzinfo=UTC)
            nxt = datetime(year + (int(month) == 12), int(month) % 12 + 1, 1, tzinfo=UTC)
            return start, nxt
        return datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC)
    except (StopIteration, ValueError, OverflowError):  # OverflowError: 9999-12-31's next day
        return None


def explicit_period(question: str) -> tuple[datetime | None, datetime | None] | None:
    """The period a question names, as (since, until), until inclusive to the microsecond:
    "between 2012-01-01 and 2020-12-31", "from March 2019 to June 2020", "since 2015", "after
    2018", "before 2020", "until 2019-06", "in 2019", "in March 2019", "on 2019-03-17". None when
    it names none ("last 3 years" is ``window_days``'s)."""
    m = _PERIOD.search(question)
    if m is None:
        return None
    try:
        return _period(m)
    except OverflowError:  # "before 0001-01-01": no instant precedes it
        return None


def _period(m: re.Match[str]) -> tuple[datetime | None, datetime | None] | None:
    """``explicit_period`` of a ``_PERIOD`` match; raises ``OverflowError`` for a bound outside
    ``datetime``'s range (years 1 to 9999)."""
    tick = timedelta(microseconds=1)
    if m.group("between"):
        a, b = _date_interval(m.group("a")), _date_interval(m.group("b"))
        if a is None or b is None:
            return None
        return a[0], b[1] - tick
    if m.group("since"):
        s = _date_interval(m.group("s"))
        if s is None:
            return None
        return (s[1] if m.group("since").lower() == "after" else s[0]), None
    if m.group("before"):
        u = _date_interval(m.group("u"))
        if u is None:
            return None
        return None, (u[0] if m.group("before").lower() == "before" else u[1]) - tick
    d = _date_interval(m.group("d"))
    return (d[0], d[1] - tick) if d is not None else None


# vaccines by the names clinicians use (agent.tools.care.VACCINE_WORDS reads them)
_VACCINE = re.compile(
    r"\b(flu|influenza|tetanus|tdap|pneumonia|pneumococcal|shingles|zoster|covid|hpv|"
    r"hepatitis [ab]|mmr|measles|polio|chickenpox|varicella|meningococcal)\s*"
    r"(?:shots?|vaccin\w*|jabs?|immuni[sz]ations?|boosters?)"
)


# "is he on anything for his blood pressure?", "taking something for diabetes?": a drug class asked
# for by what it treats (retrieval/drugs.toml's class names)
_TREATS_CLASS = {
    "blood pressure": "antihypertensive",
    "bp": "antihypertensive",
    "hypertension": "antihypertensive",
    "diabetes": "antidiabetic",
    "blood sugar": "antidiabetic",
    "sugar": "antidiabetic",
    "cholesterol": "statin",
}
_TREATS = re.compile(
    r"\b(?:on|taking|takes?|getting|prescribed)\s+(?:anything|something|any\w*|a\s+\w+|"
    r"medications?|meds?|drugs?|pills?|treatment)\s+for\s+(?:his\s+|her\s+|their\s+|the\s+)?"
    r"(?P<what>blood pressure|bp|hypertension|diabetes|blood sugar|sugar|cholesterol)\b"
)


# a judgement about a diagnosis ("is his hypertension controlled?", "is her heart failure
# stable?"): the record's clinical status cannot give it, so the answer must not say "Yes" for it
_JUDGEMENT = re.compile(
    r"\b(?P<j>well[- ]controlled|uncontrolled|controlled|under control|unstable|stable|"
    r"well[- ]managed|managed|improving|improved|better|worse|worsening|progressing)\b"
)
_JUDGED = {  # the judgement as the answer names it
    "well-controlled": "controlled", "well controlled": "controlled",
    "uncontrolled": "controlled", "under control": "controlled", "unstable": "stable",
    "well-managed": "well managed", "managed": "well managed", "improved": "improving",
    "better": "improving or worsening", "worse": "improving or worsening",
    "worsening": "improving or worsening", "progressing": "progressing",
}  # fmt: skip
# what a clinician reads to judge it, by the condition's words: asked for beside its status
_JUDGED_BY = (
    (re.compile(r"hypertension|high blood pressure|\bhtn\b"), "blood pressure"),
    (re.compile(r"diabet"), "HbA1c"),
    (re.compile(r"cholesterol|lipid"), "LDL cholesterol"),
    (re.compile(r"kidney|renal|\bckd\b"), "eGFR"),
)


# "what changed?", "what's new since …?", "anything new?", "what happened in 2020?"
_CHANGES = re.compile(
    r"\bwhat(?:'s| has| is)? (?:changed|new|happened)\b|\bany(?:thing)? (?:new|changes?)\b|"
    r"\bchanges? (?:since|in|over|during)\b|\bnew since\b"
)


def is_follow_up(question: str) -> bool:
    """Whether a question leans on the one before it ('and before that?', 'what about June?')."""
    return len(question.split()) <= 8 and bool(_FOLLOW_UP.search(question))


def plan(question: str, terms: TermTable | None = None) -> Plan:
    """Tool calls for a question."""
    terms = terms or default_terms()
    q = " " + question.lower() + " "
    out = Plan()
    if re.search(r"\b(?:how old|age|aged)\b", q):  # "what is his age?", never "average"
        out.add("age")
    asks_care_team = bool(re.search(CARE_TEAM_QUESTION, q))
    if _has(
        q.replace("birth control", "").replace("who is on", "").replace("who is treating", ""),
        # (a contraceptive is not a birth date; "who is his doctor?" is the care team's)
        "born",
        "birth",
        "name",
        "sex",
        "gender",
        "who is",
        "demograph",
        "alive",
        "died",
        "deceased",
    ) and not (asks_care_team and not _has(q, "born", "birth", "sex", "gender", "age")):
        out.add("demographics")
    asks_condition = _has(q, "have", "has ", "diagnos", "history of", "suffer", "comorbid") or bool(
        re.search(r"\b(?:is|was) (?:he|she|they|the patient|this patient)\b(?! on\b)", q)
    )  # "is he diabetic?" (but "is he on ...?" asks for a drug)
    # each matched term by its longest phrase in the question; a phrase inside a longer one
    # ("hemoglobin" in "hemoglobin A1c") belongs to the longer one's term
    spans: list[tuple[int, int, str, Any]] = []
    for term in terms.matches(question):
        found = [
            m
            for w in term.words
            if (m := re.search(rf"\b{re.escape(w)}\b", question, re.IGNORECASE)) is not None
        ]
        if found:
            best = max(found, key=lambda m: m.end() - m.start())
            spans.append((best.start(), best.end(), best.group(0), term))
    # ... and a term inside a longer drug or drug class phrase belongs to the drug ("calcium"
    # in "calcium channel blocker", "potassium" in "potassium-sparing diuretic")
    drugs_in_question = default_drugs().spans_in(question)
    drug_spans = [(s, e, "", None) for s, e, _ in drugs_in_question]
    spans = [
        a
        for a in spans
        if not any(
            b is not a and b[0] <= a[0] and a[1] <= b[1] and b[1] - b[0] > a[1] - a[0]
            for b in spans + drug_spans
        )
    ]
    measured_words: list[str] = []
    condition_words: list[str] = []
    procedure_words: list[str] = []  # "has he had a colonoscopy?": the record's Procedures
    names_drug = False  # a term with RxNorm codes ("metformin") asks for the medications
    for _, _, words, term in sorted(spans, key=lambda x: x[0]):
        if "procedure" in term.categories and term.codes:
            procedure_words.append(words)
            continue
        loinc = any(c.startswith("http://loinc.org|") for c in term.codes)
        snomed = any(c.startswith("http://snomed.info/sct|") for c in term.codes)
        names_drug |= any(c.startswith(_RXNORM) for c in term.codes)
        # "does she have a fever?": a diagnosis, and the measurement that shows it (a term with a
        # unit is measured itself; "diabetes" is not an HbA1c value)
        # a term with SNOMED codes and no unit is a condition ("is his hypertension
        # controlled?" is not a search for a result named hypertension)
        measured = loinc and (not snomed or term.unit is not None or term.observed)
        if measured:
            # as the clinician wrote it; a status charted as an Observation is asked for by its
            # name ("does he smoke?" → "smoking status", so the answer says "Latest smoking status")
            measured_words.append(f"{term.words[0]} status" if term.observed else words)
        if snomed and (asks_condition or not measured):
            condition_words.append(words)
    stats = _has(
        q,
        "average",
        "mean",
        "trend",
        "chang",  # "how has his weight changed?": the series, not only the latest value
        "over time",
        "trajector",
        "range of",
        "min",
        "max",
        "how many",
        "number of",
        "count of",
        "highest",
        "lowest",
        "peak",
    )
    if (
        re.search(r"\b(?:kidney|renal) function\b", q)
        and not re.search(r"\be?gfr\b", q)
        and not stats
    ):
        # "how is his kidney function?": creatinine and eGFR together (KDIGO 2012 stages kidney
        # function by eGFR, computed by CKD-EPI 2021 when the record has none); a trend stays
        # the creatinine series
        measured_words.append("eGFR")
    days = window_days(question)
    period = explicit_period(question)
    bounds_of_period = (
        {k: v.isoformat() for k, v in zip(("since", "until"), period, strict=True) if v}
        if period is not None
        else {}
    )
    # an explicit period wins over "last N days"; each statistic and "latest" honours it
    bounds: dict[str, Any] = {}
    if period is not None:
        bounds = {  # ISO strings: a plan is JSON (events, checkpoints); the tools parse them
            k: v.isoformat() for k, v in zip(("since", "until"), period, strict=True) if v
        }
    elif days is not None:
        bounds = {"days": days}
    focus: dict[str, str] = {}
    if re.search(r"\b(?:how many|number of|count of|how often)\b", q):
        focus = {"focus": "count"}
    elif re.search(r"\b(?:highest|maximum|max|peak)\b", q):
        focus = {"focus": "highest"}
    elif re.search(r"\b(?:lowest|minimum|min)\b", q):
        focus = {"focus": "lowest"}
    for word in measured_words:
        if stats or days is not None:
            out.add("observation_stats", query=word, **bounds, **focus)
        if not stats:
            out.add("latest_observation", query=word, **(bounds if period is not None else {}))
    if not measured_words:
        # a test the term table lacks is looked up by its display text in the record (not a
        # procedure's name: "when was her last mammogram?" is the procedure's question, while
        # "the ejection fraction on his last echo" is a result's)
        m = _LATEST_OF.search(q) or _VALUE_OF.search(q)
        name = analyte_words(m.group(1)) if m else None
        if name and name.lower() in {w.lower() for w in procedure_words}:
            name = None
        if name and not _has(
            name,
            *_ENCOUNTER_WORDS, "procedure", "medication", "med", "image", "scan", "name",
            "age", "sex", "gender", "diagnos", "problem", "allerg", "condition", "birth",
            "status", "directive", "doctor", "physician", "provider", "team", "note", "vaccin",
            "immuni", "shot", "pcp", "gp",
        ):  # fmt: skip
            out.add("observation_stats" if stats or days else "latest_observation", query=name)
    # a drug class or drug named ("on a beta blocker?", "any blood thinners?", "taking Lasix?"):
    # answered yes or no from the members recorded; the whole list only when it is asked for
    drugs_named = (
        [] if _has(q, "allerg") else list(dict.fromkeys(w for _, _, w in drugs_in_question))
    )  # as ``DrugTable.named_in`` gives them, from the spans read above
    treated = _TREATS.search(q)
    if treated and not drugs_named:
        # "is he on anything for his blood pressure?": the class that treats it, not the reading
        drugs_named = [_TREATS_CLASS[treated.group("what")]]
        measured_words = [w for w in measured_words if w.lower() not in treated.group(0)]
        out.calls = [
            c for c in out.calls if c.args.get("query", "").lower() not in treated.group(0)
        ]
    for drug in drugs_named:
        out.add("medication_use", query=drug)
    if (not drugs_named and names_drug) or (
        (
            _has(q, "medication", "meds", "drug", "taking", "prescri", "on any")
            or re.search(r"\b(?:is|was) (?:he|she|they|the patient|this patient) on\b", q)
        )
        and not (drugs_named and not _has(q, "medications", "meds", "list", "all "))
    ):
        out.add("active_medications")
    # "latest labs", "recent blood work", "his vitals": every result of the latest day
    if re.search(r"\b(?:labs?|lab results|laboratory|blood ?work|blood tests?)\b", q) and not (
        measured_words
    ):
        out.add("recent_results", category="laboratory")
    if re.search(r"\bvitals?\b|\bvital signs?\b", q) and not measured_words:
        out.add("recent_results", category="vital-signs")
    if _has(q, "allerg"):
        out.add("allergies")
    vaccine = _VACCINE.search(q)
    for term_words in condition_words:
        if vaccine and term_words.lower() in vaccine.group(0):
            continue  # "pneumonia vaccine" asks for a vaccine, not the disease
        if treated and term_words.lower() in treated.group(0):
            continue  # "anything for diabetes?" asks for the drugs, not the diagnosis
        judged = _JUDGEMENT.search(q)
        if judged:
            # "is it controlled?": the status, said as not answering the judgement, and the
            # results a clinician judges it by (read here, never judged)
            word = judged.group("j")
            out.add("condition_history", query=term_words, judged=_JUDGED.get(word, word))
            for pattern, measure in _JUDGED_BY:
                if pattern.search(term_words.lower()):
                    out.add("latest_observation", query=measure)
            continue
        out.add("condition_history", query=term_words)  # any status: active, resolved, ruled out
    if _has(q, "problem", "diagnos", "condition", "comorbid") and not condition_words:
        out.add("active_problems")  # (a question naming a diagnosis gets that one, not the list)
    if (
        re.search(_CHANGES, q)
        and not (measured_words or condition_words or names_drug)
        and not _has(q, "medication", "meds", "drug", "prescri")
    ):
        # "what changed since last year?" (of nothing in particular: "what changed in his
        # creatinine?" is that series'): what is new in the period, default the last year
        out.add("changes_in_period", **(bounds or {"days": 365}))
        return out
    for term_words in procedure_words:
        out.add("procedure_history", query=term_words)  # yes or no first, when, how often
    if _has(q, "procedure", "surgery", "operation") and not procedure_words:
        out.add("recent_procedures")
    if _has(q, *_ENCOUNTER_WORDS):
        counted = re.search(r"\b(?:how many|number of|how often|count)\b", q)
        if counted or period is not None:
            inpatient = _has(q, "admission", "admitted", "hospitali", "inpatient")
            out.add(
                "encounters_in_period",
                **bounds_of_period,
                **({"inpatient": True} if inpatient else {}),
            )
        else:
            out.add("recent_encounters")
    if vaccine or re.search(r"\b(?:vaccin|immuni[sz]|shots?\b|jabs?\b|boosters?\b)", q):
        due = bool(re.search(r"\b(?:due|overdue|needs?|missing|up to date|owed)\b", q))
        out.add(
            "immunizations",
            **({"vaccine": vaccine.group(1)} if vaccine else {}),
            **({"due": True} if due else {}),
        )
    if _has(q, "imaging", "x-ray", "xray", "mri", "scan", "ultrasound", "radiograph", "image") or (
        re.search(r"\bct\b", q)
    ):
        out.add("imaging")
        out.images = True
    if _has(q, "similar", "like this", "comparable", "other patients"):
        out.similar_cases = True
    # "is he on a statin, and what was his last LDL?": the parts are answered in the order asked
    asked = [i for i, c in enumerate(out.calls) if q.find(str(c.args.get("query", "")).lower()) > 0]
    in_order = sorted(
        (out.calls[i] for i in asked), key=lambda c: q.find(str(c.args["query"]).lower())
    )
    for i, call in zip(asked, in_order, strict=True):
        out.calls[i] = call
    return out


log = logging.getLogger(__name__)

PlannerRule = Callable[[str, Plan], None]
"""A rule: given the question and the plan so far, add the calls it needs (``plan.add``)."""


class PlannerRules(Registry[PlannerRule]):
    """Planner rules by name (``chartsight.planner_rules`` plug-ins), run after the built-in ones
    in registration order."""

    kind = "planner rule"
    group = "chartsight.planner_rules"

    def check(self, name: str, item: PlannerRule) -> None:
        """A rule is a callable ``(question, plan) -> None``."""
        super().check(name, item)
        if not callable(item):
            raise PluginError(f"planner rule {name!r} must be callable, not {item!r}")


def question_rule(tool: str, patterns: Iterable[str]) -> PlannerRule:
    """A rule calling ``tool`` when the question matches one of ``patterns`` (regular expressions,
    case-insensitive), with the match's named groups (stripped, lower-cased) as arguments."""
    compiled = [re.compile(p, re.IGNORECASE) for p in patterns]

    def rule(question: str, out: Plan) -> None:
        for pattern in compiled:
            m = pattern.search(question)
            if m is not None:
                args = {k: v.strip().lower() for k, v in m.groupdict().items() if v and v.strip()}
                out.add(tool, **args)
                return

    return rule


@dataclass
class Planner:
    """The built-in rules (``plan``) and the registered ones, over the question with its typos
    read as the clinical words meant (``speller``; ``Plan.corrections`` lists them)."""

    terms: TermTable = field(default_factory=default_terms)
    rules: PlannerRules = field(default_factory=PlannerRules)
    speller: Speller | None = field(default_factory=default_speller)

    def plan(self, question: str) -> Plan:
        """The calls for ``question``. A rule that raises is logged and left out."""
        corrections: list[Correction] = []
        if self.speller is not None:
            question, corrections = self.speller.correct(question)
        out = plan(question, self.terms)
        out.corrections = corrections
        for name, rule in self.rules.items.items():
            try:
                rule(question, out)
            except Exception as exc:  # a plug-in's defect must not lose the built-in plan
                log.warning("planner rule %s failed: %s", name, exc)
        return out


def default_planner(tools: Iterable[Any] = (), *, plugins: bool = True) -> Planner:
    """A planner whose rules are the ``questions`` the given tools declare (``Tool`` objects), then
    (``plugins``) the installed planner rules."""
    rules = PlannerRules()
    for t in tools:
        if getattr(t, "questions", ()):
            rules.add(f"tool:{t.name}", question_rule(t.name, t.questions))
    if plugins:
        rules.load_entry_points()
    return Planner(default_terms(), rules, default_speller())
