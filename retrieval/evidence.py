"""Chart evidence: one compact, citable line per clinically meaningful fact of a ``PatientRecord``.

Compaction follows a registry of compactors: per FHIR *datatype* (Quantity, CodeableConcept,
Period, Reference, ...) and per *resource type* (Observation, Condition, ...). Datatype compactors
turn verbose JSON into short text; resource compactors compose them into one ``Evidence`` line.
``meta``, narrative and empty fields never reach the text. Third parties add or replace compactors
through the ``chartsight.compactors`` entry point group (see ``Compactors.load_entry_points``).
"""

from __future__ import annotations

import base64
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from importlib.metadata import entry_points
from typing import Any

from connectors.record import PatientRecord
from connectors.resources import Resource, reference_of
from retrieval.clinical import (
    FhirDate,
    Measurement,
    code_of,
    codes_of,
    convert,
    display_name,
    fhir_date,
    measurement_of,
    number_text,
    read_status,
    same_unit,
    when_of,
)
from retrieval.terms import TermTable, default_terms

log = logging.getLogger(__name__)

# Short names for the code systems charts use, for the compact lines.
SYSTEM_NAMES: dict[str, str] = {
    "http://loinc.org": "LOINC",
    "http://snomed.info/sct": "SNOMED",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RxNorm",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://dicom.nema.org/resources/ontology/DCM": "DCM",
}

_PERIOD_UNITS = {
    "s": "second",
    "min": "minute",
    "h": "hour",
    "d": "day",
    "wk": "week",
    "mo": "month",
    "a": "year",
}

# Longest text taken from a note or report body into one evidence line.
MAX_NOTE_CHARS = 600


@dataclass(frozen=True)
class Evidence:
    """One fact of the chart, citable by its FHIR reference."""

    id: str  # the FHIR reference, e.g. "Observation/abc"
    text: str  # compact line, ending in "[Observation/abc]"
    date: datetime | None
    category: str  # condition, observation, medication, ...
    codes: tuple[str, ...] = ()  # "system|code"
    abnormal: bool = False  # outside its reference (or usual) range, or flagged by the lab
    active: bool = False  # an active problem, medication or allergy
    withheld: str | None = None  # why the resource's own text was kept from the model
    # "year", "month", "day" or "time": how precise ``date`` is (a partial FHIR date is the start
    # of its interval there, and printed at its own precision by ``day``)
    precision: str = "day"

    @property
    def day(self) -> str:
        """The date as the chart gives it: "2019", "2026-03" or "2026-03-04"; "" when undated."""
        if self.date is None:
            return ""
        if self.precision == "year":
            return f"{self.date.year:04d}"
        if self.precision == "month":
            return f"{self.date.year:04d}-{self.date.month:02d}"
        return self.date.date().isoformat()


@dataclass
class CompactContext:
    """What compactors may consult besides the resource: the record (to resolve references)."""

    record: PatientRecord
    terms: TermTable = field(default_factory=default_terms)

    def resolve(self, reference: str, from_resource: Resource | None = None) -> Resource | None:
        """What ``reference`` points at: ``#id`` in ``from_resource``'s contained, else a
        resource the record holds (``PatientRecord.resolve``)."""
        return self.record.resolve(reference, from_resource)


DatatypeCompactor = Callable[[Any, "Compactors"], str]
ResourceCompactor = Callable[
    [Any, "Compactors", CompactContext], "Evidence | list[Evidence] | None"
]


class Compactors:
    """The registry: compactors by FHIR datatype and by resource type."""

    def __init__(self) -> None:
        self.datatypes: dict[str, DatatypeCompactor] = {}
        self.resources: dict[str, ResourceCompactor] = {}

    def datatype(self, name: str) -> Callable[[DatatypeCompactor], DatatypeCompactor]:
        def register(fn: DatatypeCompactor) -> DatatypeCompactor:
            self.datatypes[name] = fn
            return fn

        return register

    def resource(self, *names: str) -> Callable[[ResourceCompactor], ResourceCompactor]:
        def register(fn: ResourceCompactor) -> ResourceCompactor:
            for name in names:
                self.resources[name] = fn
            return fn

        return register

    def text(self, value: Any) -> str:
        """Compact text of any FHIR value: by its datatype's compactor, else its plain form."""
        if value is None:
            return ""
        if isinstance(value, list):
            return ", ".join(t for t in (self.text(v) for v in value) if t)
        kind = type(value).__name__
        fn = self.datatypes.get(kind)
        if fn is not None:
            return fn(value, self)
        if isinstance(value, datetime | date):
            return _iso_day(value)
        if isinstance(value, Decimal | float):
            return _number(value)
        return clean_text(str(value))

    def load_entry_points(self, group: str = "chartsight.compactors") -> None:
        """Let installed packages register compactors: each entry point is ``fn(registry)``."""
        for ep in entry_points(group=group):
            try:
                ep.load()(self)
            except Exception as exc:  # a broken plug-in must not take the chart down
                log.warning("compactor plug-in %s failed to load: %s", ep.name, exc)

    def evidence(self, record: PatientRecord) -> list[Evidence]:
        """Every evidence item of the record, in chart order (patient, then by category)."""
        ctx = CompactContext(record)
        out: list[Evidence] = []
        for res in record.resources():
            fn = self.resources.get(res.get_resource_type())
            if fn is None or read_status(res).voided:  # entered in error: never a fact
                continue
            try:
                made = fn(res, self, ctx)
            except Exception as exc:  # one odd resource must not hide the rest of the chart
                log.warning("could not compact %s: %s", reference_of(res), exc)
                made = _fallback(res, self, ctx)
            if made is None:
                continue
            out.extend(
                withhold_instructions(e) for e in (made if isinstance(made, list) else [made])
            )
        return out


# Text in a record addressed to an AI model rather than to clinicians: an attempt to steer the
# answer (prompt injection). Such an item keeps its place in the chart, but its words never reach a
# model and cannot support a sentence.
_ADDRESSED_TO_MODEL = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b[^.]{0,40}\b(?:instructions?|prompts?|rules|guidelines)\b"
    r"|\b(?:system|developer)\s+prompt\b"
    r"|\b(?:you\s+are\s+now|act\s+as|pretend\s+to\s+be)\s+(?:an?\s+|the\s+)?(?:ai|assistant|model|chatbot|"
    r"unrestricted|jailbroken|dan)\b"
    r"|\b(?:as|to)\s+(?:an?\s+)?(?:ai|language)\s+(?:model|assistant)\b"
    r"|\b(?:new|updated)\s+instructions\b"
    r"|<\|?/?(?:system|assistant|user|im_start|im_end)\|?>"
    r"|\b(?:reveal|list|show|print|disclose|give)\b[^.]{0,40}\b(?:records?|medications?|data|charts?|"
    r"information|results|history)\s+(?:of|for)\s+(?:another|other|a\s+different)\s+patients?\b"
    r"|\b(?:reveal|list|show|print|disclose|give)\b[^.]{0,40}\b(?:another|other)\s+patient(?:'s|s')",
    re.IGNORECASE,
)


# Also addressed to a model: telling it what to say or to drop what it was told, and notes to "the
# AI"/"the summarizer"; encoded payloads offered "to decode and follow".
_TELLS_MODEL = re.compile(
    r"\b(?:disregard|ignore|forget)\s+(?:all\s+|the\s+)?(?:above|previous|prior|earlier)\s+"
    r"(?:guidance|instructions?|prompts?|rules|messages?|context|directions)\b"
    r"|\bforget\s+(?:everything|what\s+you\s+(?:were|have\s+been)\s+told)\b"
    r"|\b(?:note|message|instructions?)\s+(?:to|for)\s+(?:the\s+)?(?:ai|llm|model|assistant|"
    r"summari[sz]er|chatbot|bot)\b"
    r"|\b(?:tell|inform)\s+the\s+(?:clinician|doctor|physician|user|reader)\s+(?:that\s+)?"
    r"(?:this|the)\s+patient\b"
    r"|\bdecode\s+(?:it\s+|this\s+)?and\s+(?:follow|obey|execute|run)\b"
    r"|\b(?:new|updated)\s+rules?\s*:",
    re.IGNORECASE,
)
# Latin look-alikes from other scripts (Cyrillic, Greek) that hide a phrase from a pattern
_CONFUSABLES = str.maketrans(
    "АВЕЅІЈКМНОРСТХУаеіјорсхуԁһӏΑΒΕΖΗΙΚΜΝΟΡΤΥΧαεικνορτυχ",
    "ABESIJKMHOPCTXYaeijopcxydhlABEZHIKMNOPTYXaeiknoptux",
)
_INVISIBLE = re.compile(
    r"[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f"
    r"\u202a-\u202e\u2060-\u206f\ufeff]"
)


_SPACES = re.compile(r"\s+")


def _comparable(text: str) -> str:
    """``text`` as a pattern should see it: compatibility forms folded (NFKC), invisible characters
    dropped, look-alike letters of other scripts mapped to Latin, whitespace folded."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).translate(_CONFUSABLES)
    return _SPACES.sub(" ", text)


# Words one of the patterns above needs (every alternative contains one, lower-cased): text
# without any cannot match, and skips the costlier searches (10k chart lines: 0.6 s → 0.1 s)
_ANCHORS = (
    "ignor", "disregard", "forget", "overrid", "system", "developer", "you", "act", "pretend",
    "ai", "language", "instruction", "<", "patient", "rule", "llm", "model", "assistant",
    "summari", "bot", "tell", "inform", "decode",
)  # fmt: skip


def addressed_to_model(text: str) -> str | None:
    """The phrase that marks ``text`` as instructions to an AI model, if any (after undoing the
    usual disguises: invisible characters, look-alike letters, line breaks)."""
    # (ASCII has no compatibility forms, invisible characters or look-alikes to undo)
    plain = _SPACES.sub(" ", text) if text.isascii() else _comparable(text)
    lower = plain.lower()
    if not any(word in lower for word in _ANCHORS):
        return None
    found = _ADDRESSED_TO_MODEL.search(plain) or _TELLS_MODEL.search(plain)
    return found.group(0) if found else None


def withhold_instructions(item: Evidence) -> Evidence:
    """``item``, or, when its text addresses an AI model, a line that says so without its words."""
    phrase = addressed_to_model(item.text)
    if phrase is None:
        return item
    kind = item.id.split("/", 1)[0]
    reason = f"its text contains instructions addressed to an AI model ({clean_text(phrase, 60)!r})"
    # the line the model sees names no words of the text; the reason (for people) quotes them
    line = f"{item.day + ' ' if item.day else ''}{kind} withheld: its text addresses an AI model [{item.id}]"
    return Evidence(
        item.id, line, item.date, item.category, (), withheld=reason, precision=item.precision
    )


# --- plain helpers ------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def clean_text(text: str, limit: int = MAX_NOTE_CHARS) -> str:
    """One line of plain text: control and bidi characters dropped, whitespace folded, bounded."""
    text = _CONTROL.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _number(value: Any) -> str:
    return number_text(float(value))


def _iso_day(value: date | datetime) -> str:
    return value.date().isoformat() if isinstance(value, datetime) else value.isoformat()


def _date_text(value: Any) -> str:
    found = fhir_date(value)
    return found.text if found is not None else ""


def _status_code(concept: Any) -> str:
    return clean_text(code_of(concept))


# --- the default registry ------------------------------------------------------------------------


def default_compactors(*, plugins: bool = True) -> Compactors:
    """The built-in compactors, plus any installed through entry points."""
    reg = Compactors()
    _register_datatypes(reg)
    _register_resources(reg)
    if plugins:
        reg.load_entry_points()
    return reg


def _register_datatypes(reg: Compactors) -> None:
    @reg.datatype("Coding")
    def coding(c: Any, reg: Compactors) -> str:
        name = clean_text(str(c.display or c.code or ""))
        system = SYSTEM_NAMES.get(c.system or "")
        return f"{name} ({system} {c.code})" if system and c.code and c.display else name

    @reg.datatype("CodeableConcept")
    def concept(c: Any, reg: Compactors) -> str:
        codings = c.coding or []
        coded = next((x for x in codings if x.system in SYSTEM_NAMES and x.code), None)
        if c.text:
            text = clean_text(str(c.text))
            return f"{text} ({SYSTEM_NAMES[coded.system]} {coded.code})" if coded else text
        if coded is not None:
            return coding(coded, reg)
        return coding(codings[0], reg) if codings else ""

    @reg.datatype("Quantity")
    def quantity(q: Any, reg: Compactors) -> str:
        if q.value is None:
            return ""
        unit = q.unit or q.code or ""
        comparator = q.comparator or ""  # a bound ("<0.5") stays a bound in every line
        return f"{comparator}{_number(q.value)} {unit}".strip()

    for name in ("Age", "Duration", "Distance", "Count", "SimpleQuantity", "Money"):
        reg.datatypes[name] = quantity

    @reg.datatype("Range")
    def range_(r: Any, reg: Compactors) -> str:
        low = _number(r.low.value) if r.low is not None and r.low.value is not None else None
        high = _number(r.high.value) if r.high is not None and r.high.value is not None else None
        unit = (r.high or r.low).unit if (r.high or r.low) is not None else None
        text = (
            f"{low}–{high}" if low and high else f"> {low}" if low else f"< {high}" if high else ""
        )
        return f"{text} {unit or ''}".strip()

    @reg.datatype("Ratio")
    def ratio(r: Any, reg: Compactors) -> str:
        return f"{reg.text(r.numerator)} / {reg.text(r.denominator)}"

    @reg.datatype("Period")
    def period(p: Any, reg: Compactors) -> str:
        start = _date_text(p.start)
        end = _date_text(p.end)
        if start and end and start != end:
            return f"{start} to {end}"
        return start or (f"until {end}" if end else "")

    @reg.datatype("Reference")
    def reference(r: Any, reg: Compactors) -> str:
        return clean_text(str(r.display or r.reference or ""))

    @reg.datatype("HumanName")
    def human_name(n: Any, reg: Compactors) -> str:
        if n.text:
            return clean_text(str(n.text))
        return clean_text(" ".join([*(str(g) for g in n.given or []), str(n.family or "")]))

    @reg.datatype("Annotation")
    def annotation(a: Any, reg: Compactors) -> str:
        return clean_text(str(a.text or ""))

    @reg.datatype("Dosage")
    def dosage(d: Any, reg: Compactors) -> str:
        if d.text:
            return clean_text(str(d.text))
        parts = []
        for dr in d.doseAndRate or []:
            dose = reg.text(dr.doseQuantity or dr.doseRange)
            if dose:
                parts.append(f"dose {dose}")
        timing = d.timing.repeat if d.timing is not None else None
        if timing is not None and timing.frequency and timing.period:
            unit = _PERIOD_UNITS.get(str(timing.periodUnit or ""), str(timing.periodUnit or ""))
            every = unit if float(timing.period) == 1 else f"{_number(timing.period)} {unit}s"
            parts.append(f"{timing.frequency}× per {every}")
        if d.asNeededBoolean:
            parts.append("as needed")
        return ", ".join(p for p in parts if p)

    @reg.datatype("Attachment")
    def attachment(a: Any, reg: Compactors) -> str:
        return clean_text(str(a.title or a.contentType or "attachment"))


def _evidence(
    res: Any,
    body: str,
    category: str,
    codes: tuple[str, ...] = (),
    *,
    abnormal: bool = False,
    active: bool = False,
    dated: bool = True,
) -> Evidence:
    """One line: the resource's date at its own precision, the body, and its reference."""
    ref = reference_of(res)
    when: FhirDate | None = when_of(res) if dated else None
    prefix = f"{when.text} " if when is not None else ""
    return Evidence(
        ref,
        f"{prefix}{clean_text(body, 4 * MAX_NOTE_CHARS)} [{ref}]",
        when.start if when is not None else None,
        category,
        codes,
        abnormal,
        active,
        precision=when.precision if when is not None else "day",
    )


def _fallback(res: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    concept = getattr(res, "code", None) or getattr(res, "type", None)
    text = reg.text(concept) if concept is not None and not isinstance(concept, str) else ""
    status = getattr(res, "status", None)
    body = f"{res.get_resource_type()}: {text or 'no code'}" + (f", {status}" if status else "")
    return _evidence(res, body, res.get_resource_type().lower(), codes_of(concept))


_ABNORMAL_CODES = ("H", "HH", "HU", "L", "LL", "LU", "A", "AA", "POS", "DET")


def _bound(q: Any) -> float | None:
    return float(q.value) if q is not None and q.value is not None else None


def _range_unit(rng: Any) -> str | None:
    for q in (rng.low, rng.high):
        m = measurement_of(q) if q is not None else None
        if m is not None and m.unit:
            return m.unit
    return None


def _compare(m: Measurement, low: float | None, high: float | None) -> str:
    """ "high", "low" or "" for a measurement against a range in the same unit. A bound ("<0.5")
    is flagged only when the whole bound lies outside the range."""
    above = high is not None and (m.value > high or (m.comparator == ">" and m.value >= high))
    below = low is not None and (m.value < low or (m.comparator == "<" and m.value <= low))
    if above and m.comparator in (None, ">", ">="):
        return "high"
    if below and m.comparator in (None, "<", "<="):
        return "low"
    return ""


def _flag(
    value: Any,
    ranges: list[Any],
    interpretation: list[Any],
    codes: tuple[str, ...],
    terms: TermTable,
) -> tuple[str, bool]:
    """The range text and whether the value is abnormal: the resource's own interpretation and
    range first, the project's usual range when the resource has neither. A range is compared only
    in the value's unit: a range in another UCUM unit is converted first (through the analyte's
    molar mass where one applies); a value that cannot be converted is not flagged."""
    rng = next((r for r in ranges if r.low is not None or r.high is not None), None)
    for interp in interpretation:
        code = _status_code(interp).upper()
        if code in _ABNORMAL_CODES:
            word = {"H": "high", "HH": "critically high", "L": "low", "LL": "critically low"}.get(
                code, "abnormal"
            )
            return f"{word}" + (f"; ref {_range_text(rng)}" if rng is not None else ""), True
    m = measurement_of(value)
    if m is None:
        return "", False
    analyte = next((a for a in (terms.analyte(c) for c in codes) if a), None)
    molar_mass = analyte.molar_mass if analyte is not None else None
    if rng is not None:
        low, high, unit, label = _bound(rng.low), _bound(rng.high), _range_unit(rng), "ref"
    else:
        usual = next((u for u in (terms.usual_range(c) for c in codes) if u), None)
        if usual is None:
            return "", False
        low, high, unit = usual
        label = "usual range"
    if unit is not None and m.unit is not None and not same_unit(unit, m.unit):
        # the range is put into the value's unit, so the line reads in one unit
        bounds = [
            convert(Measurement(b, unit), m.unit, molar_mass) if b is not None else None
            for b in (low, high)
        ]
        if any(
            b is None for b, given in zip(bounds, (low, high), strict=True) if given is not None
        ):
            return "", False  # another unit, no conversion: no flag rather than a wrong one
        low, high = (b.value if b is not None else None for b in bounds)
        unit = m.unit
    elif unit is not None and m.unit is None:
        return "", False
    shown_unit = m.unit
    word = _compare(m, low, high)
    span = (
        f"{_number(low)}–{_number(high)}"
        if low is not None and high is not None
        else f"< {_number(high)}"
        if high is not None
        else f"> {_number(low)}"
    )
    # a range in another unit than the value's says which (the value was converted to compare)
    span += f" {unit}" if unit and not same_unit(unit, shown_unit) else ""
    if rng is not None:
        return (f"{word}; {label} {span}" if word else f"{label} {span}"), bool(word)
    return (f"{word}; {label} {span}" if word else ""), bool(word)


def _range_text(rng: Any) -> str:
    low = _number(rng.low.value) if rng.low is not None and rng.low.value is not None else None
    high = _number(rng.high.value) if rng.high is not None and rng.high.value is not None else None
    return f"{low}–{high}" if low and high else f"< {high}" if high else f"> {low}"


def _note_text(attachment: Any) -> str:
    """Inline text of an attachment (plain text or similar), for notes and report bodies."""
    ctype = (attachment.contentType or "").split(";")[0].strip().lower()
    if not attachment.data or not (
        ctype.startswith("text/") or ctype in ("application/xhtml+xml",)
    ):
        return ""
    data = attachment.data
    raw = data if isinstance(data, bytes) else base64.b64decode(data)
    text = raw.decode("utf-8", errors="replace")
    if ctype in ("text/html", "application/xhtml+xml"):
        text = re.sub(r"<[^>]+>", " ", text)
    return clean_text(text)


def _status_note(res: Any) -> str:
    """ ", <status words>" for a line, when the status says something a reader must know."""
    label = read_status(res).label
    return f", {label}" if label else ""


def _drug(m: Any, reg: Compactors, ctx: CompactContext) -> tuple[str, tuple[str, ...]]:
    """The drug a medication resource names (``PatientRecord.medication_code``: its concept, or
    the contained or referenced Medication's code), else the reference's display."""
    code = ctx.record.medication_code(m)
    if code is not None:
        return reg.text(code), codes_of(code)
    ref = getattr(m, "medicationReference", None)
    return (reg.text(ref), ()) if ref is not None else ("", ())


def _register_resources(reg: Compactors) -> None:
    @reg.resource("Patient")
    def patient(p: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        parts = [f"Patient: {clean_text(display_name(p))}"]
        if p.gender:
            parts.append(str(p.gender))
        born = _date_text(p.birthDate)
        if born:
            parts.append(f"born {born}")
        died = _date_text(p.deceasedDateTime)
        if died:
            parts.append(f"died {died}")
        elif p.deceasedBoolean:
            parts.append("deceased")
        return _evidence(p, ", ".join(parts), "demographics", dated=False)

    def component_text(comp: Any, ctx: CompactContext) -> tuple[str, bool]:
        comp_codes = codes_of(comp.code)
        m = measurement_of(comp.valueQuantity) or measurement_of(comp.valueString)
        value = (
            m.text
            if m is not None and comp.valueQuantity is None
            else reg.text(comp.valueQuantity or comp.valueCodeableConcept or comp.valueString)
        )
        if not value and comp.dataAbsentReason is not None:
            value = f"no value ({reg.text(comp.dataAbsentReason)})"
        flag, bad = _flag(
            comp.valueQuantity or m,
            comp.referenceRange or [],
            comp.interpretation or [],
            comp_codes,
            ctx.terms,
        )
        label = reg.text(comp.code).split(" (")[0]
        return f"{label} {value}".strip() + (f" ({flag})" if flag else ""), bad

    @reg.resource("Observation")
    def observation(o: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        codes = codes_of(o.code)
        name = reg.text(o.code)
        status = read_status(o)
        abnormal = False
        value = reg.text(
            o.valueQuantity
            or o.valueCodeableConcept
            or o.valueString
            or o.valueBoolean
            or o.valueInteger
            or o.valueRange
            or o.valueRatio
            or o.valuePeriod
            or o.valueDateTime
        )
        if value:
            flag, abnormal = _flag(
                o.valueQuantity or measurement_of(o.valueString),
                o.referenceRange or [],
                o.interpretation or [],
                codes,
                ctx.terms,
            )
            body = f"{name} {value}".strip() + (f" ({flag})" if flag else "")
        elif o.component:
            parts = []
            for comp in o.component:
                text, bad = component_text(comp, ctx)
                abnormal |= bad
                codes += codes_of(comp.code)
                parts.append(text)
            body = f"{name}: " + "; ".join(parts)
        else:
            why = [w for w in (status.label, reg.text(o.dataAbsentReason)) if w]
            body = f"{name}: no result" + (f" ({'; '.join(why)})" if why else "")
        if value or o.component:
            if status.not_done:
                body += f" [{status.label}]"
            elif o.status not in ("final", "amended", "corrected", None):
                body += f" [status {o.status}]"
        for note in o.note or []:
            body += f"; note: {reg.text(note)}"
        return _evidence(o, body, "observation", tuple(dict.fromkeys(codes)), abnormal=abnormal)

    @reg.resource("Condition")
    def condition(c: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        status = read_status(c)
        clinical = _status_code(c.clinicalStatus) if c.clinicalStatus is not None else ""
        if status.refuted:
            body = f"Condition: {reg.text(c.code)}, ruled out (verification status refuted)"
        else:
            body = f"Condition: {reg.text(c.code)}" + (f", {clinical}" if clinical else "")
            verification = _status_code(c.verificationStatus) if c.verificationStatus else ""
            if verification and verification != "confirmed":
                body += f" ({verification})"
            resolved = _date_text(c.abatementDateTime)
            if resolved:
                body += f", resolved {resolved}"
        return _evidence(c, body, "condition", codes_of(c.code), active=status.active)

    @reg.resource(
        "MedicationRequest",
        "MedicationStatement",
        "MedicationAdministration",
        "MedicationDispense",
    )
    def medication(m: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        drug, codes = _drug(m, reg, ctx)
        status = read_status(m)
        dosages = getattr(m, "dosageInstruction", None) or getattr(m, "dosage", None)
        if isinstance(dosages, list):
            dosage = reg.text(dosages[0]) if dosages else ""
        else:  # MedicationAdministration.dosage: one element with text and dose
            dosage = clean_text(str(getattr(dosages, "text", "") or "")) or reg.text(
                getattr(dosages, "dose", None)
            )
        word = {
            "MedicationAdministration": "Medication given",
            "MedicationDispense": "Medication dispensed",
        }.get(m.get_resource_type(), "Medication")
        body = f"{word}: {drug or 'unnamed'}, {_LABEL_OR(m.status, status.label)}"
        body += f"; {dosage}" if dosage else ""
        reasons = [reg.text(r) for r in (getattr(m, "reasonCode", None) or [])]
        if reasons:
            body += f"; for {', '.join(reasons)}"
        if status.not_done:
            why = getattr(m, "statusReason", None)
            why_text = reg.text(why) if why is not None and not isinstance(why, list) else ""
            body += f"; reason: {why_text}" if why_text else ""
        return _evidence(m, body, "medication", codes, active=status.active)

    @reg.resource("AllergyIntolerance")
    def allergy(a: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        status = read_status(a)
        if status.refuted:
            when = _date_text(a.recordedDate) or _date_text(getattr(a, "lastOccurrence", None))
            body = f"Allergy: {reg.text(a.code)}: not allergic (refuted" + (
                f" on {when})" if when else ")"
            )
            return _evidence(a, body, "allergy", codes_of(a.code), active=False)
        body = f"Allergy: {reg.text(a.code)}"
        extras = [
            x
            for x in (
                a.criticality and f"criticality {a.criticality}",
                _status_code(a.clinicalStatus) if a.clinicalStatus else "",
            )
            if x
        ]
        reactions = [reg.text(m) for r in a.reaction or [] for m in r.manifestation or []]
        if reactions:
            extras.append("reaction " + ", ".join(reactions))
        body += (", " + ", ".join(extras)) if extras else ""
        return _evidence(a, body, "allergy", codes_of(a.code), active=status.active)

    @reg.resource("Procedure")
    def procedure(p: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Procedure: {reg.text(p.code)}, {_LABEL_OR(p.status, read_status(p).label)}"
        reasons = [reg.text(r) for r in p.reasonCode or []]
        if reasons:
            body += f"; for {', '.join(reasons)}"
        if p.statusReason is not None:
            body += f"; reason: {reg.text(p.statusReason)}"
        return _evidence(p, body, "procedure", codes_of(p.code))

    @reg.resource("Encounter")
    def encounter(e: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        kind = reg.text(e.type) or reg.text(getattr(e, "class_fhir", None))
        body = f"Encounter: {kind or 'visit'}" + (
            f", {read_status(e).label}" if read_status(e).not_done else ""
        )
        reasons = [reg.text(r) for r in e.reasonCode or []]
        if reasons:
            body += f"; reason {', '.join(reasons)}"
        return _evidence(e, body, "encounter", codes_of(e.type or [], e.reasonCode or []))

    @reg.resource("DiagnosticReport")
    def report(r: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Report: {reg.text(r.code)}, {_LABEL_OR(r.status, read_status(r).label)}"
        if (
            r.result
        ):  # the results are evidence items of their own; naming them here only adds noise
            body += f"; {len(r.result)} result{'s' if len(r.result) > 1 else ''}"
        if r.conclusion:
            body += f"; conclusion: {clean_text(str(r.conclusion))}"
        texts = [t for t in (_note_text(a) for a in r.presentedForm or []) if t]
        if texts:
            body += f"; text: {clean_text(' '.join(texts))}"
        return _evidence(r, body, "report", codes_of(r.code, r.conclusionCode or []))

    @reg.resource("DocumentReference")
    def document(d: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Document: {reg.text(d.type) or 'untyped'}"
        if d.status == "superseded":
            body += " (superseded)"
        if d.docStatus == "preliminary":
            body += " (preliminary)"
        if d.description:
            body += f", {clean_text(str(d.description))}"
        texts = [t for t in (_note_text(c.attachment) for c in d.content or []) if t]
        if texts:
            body += f"; text: {clean_text(' '.join(texts))}"
        return _evidence(d, body, "document", codes_of(d.type))

    @reg.resource("ImagingStudy")
    def imaging(s: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        modalities = sorted(
            {str(m.code) for m in s.modality or [] if m.code}
            | {
                str(se.modality.code)
                for se in s.series or []
                if se.modality is not None and se.modality.code
            }
        )
        sites = sorted({reg.text(se.bodySite) for se in s.series or [] if se.bodySite is not None})
        body = f"Imaging study: {'/'.join(modalities) or 'unknown modality'}"
        if sites:
            body += f" of {', '.join(sites)}"
        body += _status_note(s) if read_status(s).not_done else ""
        if s.description:
            body += f", {clean_text(str(s.description))}"
        body += f"; {s.numberOfSeries or len(s.series or [])} series, {s.numberOfInstances or '?'} instances"
        codes = tuple(f"http://dicom.nema.org/resources/ontology/DCM|{m}" for m in modalities)
        return _evidence(s, body, "imaging", codes)

    @reg.resource("Media")
    def media(m: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        parts = [reg.text(m.modality) or reg.text(m.type) or "image"]
        if m.view is not None:
            parts.append(f"view {reg.text(m.view)}")
        if m.bodySite is not None:
            parts.append(f"of {reg.text(m.bodySite)}")
        body = (
            "Image: "
            + ", ".join(p for p in parts if p)
            + (_status_note(m) if read_status(m).not_done else "")
        )
        notes = [reg.text(n) for n in m.note or []]
        if notes:
            body += f"; note: {' '.join(notes)}"
        return _evidence(m, body, "image", codes_of(m.modality, m.type))

    @reg.resource("Immunization")
    def immunization(i: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        status = read_status(i)
        body = f"Immunization: {reg.text(i.vaccineCode)}, {_LABEL_OR(i.status, status.label)}"
        if status.not_done and i.statusReason is not None:
            body += f"; reason: {reg.text(i.statusReason)}"
        return _evidence(i, body, "immunization", codes_of(i.vaccineCode))

    @reg.resource("CarePlan")
    def care_plan(c: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Care plan: {reg.text(c.category) or reg.text(c.title) or 'untitled'}, {c.status}"
        addresses = []
        for ref in c.addresses or []:
            target = ctx.resolve(str(ref.reference or ""), c)
            addresses.append(reg.text(getattr(target, "code", None)) if target else reg.text(ref))
        if any(addresses):
            body += f"; addresses {', '.join(a for a in addresses if a)}"
        return _evidence(
            c, body, "care-plan", codes_of(c.category or []), active=read_status(c).active
        )

    @reg.resource("Goal")
    def goal(g: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Goal: {reg.text(g.description)}, {g.lifecycleStatus}"
        if g.achievementStatus is not None:
            body += f" ({_status_code(g.achievementStatus)})"
        return _evidence(g, body, "goal", codes_of(g.description))


def _LABEL_OR(status: Any, label: str) -> str:
    """The status as words ("not done", "on hold"), else the status code itself."""
    return label or str(status or "unknown status")


def record_evidence(record: PatientRecord, compactors: Compactors | None = None) -> list[Evidence]:
    """The evidence items of a record (built-in compactors and installed plug-ins)."""
    return (compactors or default_compactors()).evidence(record)


def iter_lines(items: Iterable[Evidence]) -> Iterator[str]:
    """The compact lines, one per item."""
    for item in items:
        yield item.text
