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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from importlib.metadata import entry_points
from typing import Any

from connectors.record import PatientRecord
from connectors.resources import Resource, reference_of
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

    @property
    def day(self) -> str:
        return self.date.date().isoformat() if self.date else ""


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
            if fn is None:
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


def addressed_to_model(text: str) -> str | None:
    """The phrase that marks ``text`` as instructions to an AI model, if any."""
    found = _ADDRESSED_TO_MODEL.search(text)
    return found.group(0) if found else None


def withhold_instructions(item: Evidence) -> Evidence:
    """``item``, or, when its text addresses an AI model, a line that says so without its words."""
    phrase = addressed_to_model(item.text)
    if phrase is None:
        return item
    kind = item.id.split("/", 1)[0]
    reason = f"its text contains instructions addressed to an AI model ({clean_text(phrase, 60)!r})"
    # the line the model sees names no words of the text; the reason (for people) quotes them
    line = _line(item.date, f"{kind} withheld: its text addresses an AI model", item.id)
    return Evidence(item.id, line, item.date, item.category, (), withheld=reason)


# --- plain helpers ------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def clean_text(text: str, limit: int = MAX_NOTE_CHARS) -> str:
    """One line of plain text: control and bidi characters dropped, whitespace folded, bounded."""
    text = _CONTROL.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _number(value: Any) -> str:
    f = float(value)
    return f"{f:.4g}" if abs(f) < 1e6 else f"{f:.6g}"


def _iso_day(value: date | datetime) -> str:
    return value.date().isoformat() if isinstance(value, datetime) else value.isoformat()


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, str) and value:
        # partial FHIR dates: "2019" and "2019-03" mean the start of that year or month
        padded = value + "-01-01"[len(value) - 4 :] if len(value) in (4, 7) else value
        try:
            parsed = datetime.fromisoformat(padded)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def clinical_date(resource: Any) -> datetime | None:
    """The clinically relevant date of a resource (when it happened, else when it was recorded)."""
    for attr in (
        "effectiveDateTime",
        "effectiveInstant",
        "onsetDateTime",
        "performedDateTime",
        "occurrenceDateTime",
        "authoredOn",
        "started",
        "recordedDate",
        "dateAsserted",
        "createdDateTime",
        "date",
        "issued",
        "created",
    ):
        value = _as_datetime(getattr(resource, attr, None))
        if value is not None:
            return value
    for attr in ("effectivePeriod", "performedPeriod", "onsetPeriod", "period"):
        period = getattr(resource, attr, None)
        if period is not None:
            value = _as_datetime(period.start or period.end)
            if value is not None:
                return value
    return None


def codes_of(*concepts: Any) -> tuple[str, ...]:
    """``system|code`` of every coding in the given CodeableConcepts (or lists of them)."""
    out: list[str] = []
    for concept in concepts:
        for c in concept if isinstance(concept, list) else [concept]:
            for coding in getattr(c, "coding", None) or []:
                if coding.code:
                    out.append(f"{coding.system or ''}|{coding.code}")
    return tuple(dict.fromkeys(out))


def _status_code(concept: Any) -> str:
    for coding in getattr(concept, "coding", None) or []:
        if coding.code:
            return str(coding.code)
    return clean_text(str(getattr(concept, "text", "") or "")).lower()


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
        comparator = q.comparator or ""
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
        start = _iso_day(p.start) if p.start else ""
        end = _iso_day(p.end) if p.end else ""
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
        return clean_text(" ".join([*(n.given or []), n.family or ""]))

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


def _line(day: datetime | None, body: str, ref: str) -> str:
    prefix = f"{_iso_day(day)} " if day else ""
    return f"{prefix}{body} [{ref}]"


def _evidence(
    res: Any,
    body: str,
    category: str,
    codes: tuple[str, ...] = (),
    *,
    abnormal: bool = False,
    active: bool = False,
    day: datetime | None = None,
) -> Evidence:
    ref = reference_of(res)
    when = day if day is not None else clinical_date(res)
    return Evidence(
        ref,
        _line(when, clean_text(body, 4 * MAX_NOTE_CHARS), ref),
        when,
        category,
        codes,
        abnormal,
        active,
    )


def _fallback(res: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    concept = getattr(res, "code", None) or getattr(res, "type", None)
    text = reg.text(concept) if concept is not None and not isinstance(concept, str) else ""
    status = getattr(res, "status", None)
    body = f"{res.get_resource_type()}: {text or 'no code'}" + (f", {status}" if status else "")
    return _evidence(res, body, res.get_resource_type().lower(), codes_of(concept))


def _flag(
    value: Any,
    ranges: list[Any],
    interpretation: list[Any],
    codes: tuple[str, ...],
    terms: TermTable,
) -> tuple[str, bool]:
    """The range text and whether the value is abnormal: the resource's own range and
    interpretation first, the project's usual ranges when the resource has neither."""
    for interp in interpretation:
        code = _status_code(interp).upper()
        if code in ("H", "HH", "HU", "L", "LL", "LU", "A", "AA", "POS", "DET"):
            word = {"H": "high", "HH": "critically high", "L": "low", "LL": "critically low"}.get(
                code, "abnormal"
            )
            rng = next((r for r in ranges if r.low is not None or r.high is not None), None)
            return f"{word}" + (f"; ref {_range_text(rng)}" if rng is not None else ""), True
    if value is None or getattr(value, "value", None) is None:
        return "", False
    v = float(value.value)
    rng = next((r for r in ranges if r.low is not None or r.high is not None), None)
    if rng is not None:
        low = float(rng.low.value) if rng.low is not None and rng.low.value is not None else None
        high = (
            float(rng.high.value) if rng.high is not None and rng.high.value is not None else None
        )
        label = "ref"
    else:
        usual = next((u for u in (terms.usual_range(c) for c in codes) if u), None)
        if usual is None:
            return "", False
        low, high = usual
        label = "usual range"
    word = "high" if high is not None and v > high else "low" if low is not None and v < low else ""
    span = (
        f"{_number(low)}–{_number(high)}"
        if low is not None and high is not None
        else f"< {_number(high)}"
        if high is not None
        else f"> {_number(low)}"
    )
    if rng is not None:
        return (f"{word}; {label} {span}" if word else f"{label} {span}"), bool(word)
    return (f"{word}; {label} {span}" if word else ""), bool(word)


def _range_text(rng: Any) -> str:
    low = _number(rng.low.value) if rng.low is not None and rng.low.value is not None else None
    high = _number(rng.high.value) if rng.high is not None and rng.high.value is not None else None
    return f"{low}–{high}" if low and high else f"< {high}" if high else f"> {low}"


def _is_active(concept: Any, status: str | None = None) -> bool:
    if concept is not None:
        return _status_code(concept) in ("active", "recurrence", "relapse")
    return status in ("active", "on-hold")


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


def _register_resources(reg: Compactors) -> None:
    @reg.resource("Patient")
    def patient(p: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        name = reg.text((p.name or [None])[0])
        parts = [f"Patient: {name}" if name else "Patient"]
        if p.gender:
            parts.append(str(p.gender))
        if p.birthDate:
            parts.append(f"born {_iso_day(p.birthDate)}")
        if p.deceasedDateTime:
            parts.append(f"died {_iso_day(p.deceasedDateTime)}")
        elif p.deceasedBoolean:
            parts.append("deceased")
        return _evidence(p, ", ".join(parts), "demographics", day=None)

    @reg.resource("Observation")
    def observation(o: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        codes = codes_of(o.code)
        name = reg.text(o.code)
        abnormal = False
        if o.component and o.valueQuantity is None and o.valueCodeableConcept is None:
            parts = []
            for comp in o.component:
                comp_codes = codes_of(comp.code)
                value = reg.text(
                    comp.valueQuantity or comp.valueCodeableConcept or comp.valueString
                )
                flag, bad = _flag(
                    comp.valueQuantity,
                    comp.referenceRange or [],
                    comp.interpretation or [],
                    comp_codes,
                    ctx.terms,
                )
                abnormal |= bad
                codes += comp_codes
                label = reg.text(comp.code).split(" (")[0]
                parts.append(f"{label} {value}" + (f" ({flag})" if flag else ""))
            body = f"{name}: " + "; ".join(parts)
        else:
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
            flag, abnormal = _flag(
                o.valueQuantity, o.referenceRange or [], o.interpretation or [], codes, ctx.terms
            )
            if not value and o.dataAbsentReason is not None:
                value = f"no value ({reg.text(o.dataAbsentReason)})"
            body = f"{name} {value}".strip() + (f" ({flag})" if flag else "")
        if o.status not in ("final", "amended", "corrected", None):
            body += f" [status {o.status}]"
        for note in o.note or []:
            body += f"; note: {reg.text(note)}"
        return _evidence(o, body, "observation", tuple(dict.fromkeys(codes)), abnormal=abnormal)

    @reg.resource("Condition")
    def condition(c: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        active = _is_active(c.clinicalStatus)
        status = _status_code(c.clinicalStatus) if c.clinicalStatus is not None else ""
        body = f"Condition: {reg.text(c.code)}" + (f", {status}" if status else "")
        verification = _status_code(c.verificationStatus) if c.verificationStatus else ""
        if verification and verification != "confirmed":
            body += f" ({verification})"
        if c.abatementDateTime:
            body += f", resolved {_iso_day(c.abatementDateTime)}"
        return _evidence(c, body, "condition", codes_of(c.code), active=active)

    @reg.resource("MedicationRequest", "MedicationStatement")
    def medication(m: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        drug = reg.text(m.medicationCodeableConcept)
        codes = codes_of(m.medicationCodeableConcept)
        if not drug and m.medicationReference is not None:
            med = ctx.resolve(str(m.medicationReference.reference or ""), m)
            drug = (
                reg.text(getattr(med, "code", None))
                if med is not None
                else reg.text(m.medicationReference)
            )
            codes = codes_of(getattr(med, "code", None)) if med is not None else ()
        dosage = reg.text(
            (getattr(m, "dosageInstruction", None) or getattr(m, "dosage", None) or [None])[0]
        )
        body = f"Medication: {drug or 'unnamed'}, {m.status}" + (f"; {dosage}" if dosage else "")
        reasons = [reg.text(r) for r in (getattr(m, "reasonCode", None) or [])]
        if reasons:
            body += f"; for {', '.join(reasons)}"
        active = m.status in ("active", "on-hold", "intended")
        return _evidence(m, body, "medication", codes, active=active)

    @reg.resource("AllergyIntolerance")
    def allergy(a: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
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
        active = a.clinicalStatus is None or _is_active(a.clinicalStatus)
        return _evidence(a, body, "allergy", codes_of(a.code), active=active)

    @reg.resource("Procedure")
    def procedure(p: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Procedure: {reg.text(p.code)}, {p.status}"
        reasons = [reg.text(r) for r in p.reasonCode or []]
        if reasons:
            body += f"; for {', '.join(reasons)}"
        return _evidence(p, body, "procedure", codes_of(p.code))

    @reg.resource("Encounter")
    def encounter(e: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        kind = reg.text(e.type) or reg.text(getattr(e, "class_fhir", None))
        body = f"Encounter: {kind or 'visit'}"
        reasons = [reg.text(r) for r in e.reasonCode or []]
        if reasons:
            body += f"; reason {', '.join(reasons)}"
        return _evidence(e, body, "encounter", codes_of(e.type or [], e.reasonCode or []))

    @reg.resource("DiagnosticReport")
    def report(r: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Report: {reg.text(r.code)}, {r.status}"
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
        body = "Image: " + ", ".join(p for p in parts if p)
        notes = [reg.text(n) for n in m.note or []]
        if notes:
            body += f"; note: {' '.join(notes)}"
        return _evidence(m, body, "image", codes_of(m.modality, m.type))

    @reg.resource("Immunization")
    def immunization(i: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Immunization: {reg.text(i.vaccineCode)}, {i.status}"
        return _evidence(i, body, "immunization", codes_of(i.vaccineCode))

    @reg.resource("CarePlan")
    def care_plan(c: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Care plan: {reg.text(c.category) or reg.text(c.title) or 'untitled'}, {c.status}"
        addresses = []
        for ref in c.addresses or []:
            target = ctx.resolve(str(ref.reference or ""))
            addresses.append(reg.text(getattr(target, "code", None)) if target else reg.text(ref))
        if any(addresses):
            body += f"; addresses {', '.join(a for a in addresses if a)}"
        return _evidence(
            c, body, "care-plan", codes_of(c.category or []), active=c.status == "active"
        )

    @reg.resource("Goal")
    def goal(g: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
        body = f"Goal: {reg.text(g.description)}, {g.lifecycleStatus}"
        if g.achievementStatus is not None:
            body += f" ({_status_code(g.achievementStatus)})"
        return _evidence(g, body, "goal", codes_of(g.description))


def record_evidence(record: PatientRecord, compactors: Compactors | None = None) -> list[Evidence]:
    """The evidence items of a record (built-in compactors and installed plug-ins)."""
    return (compactors or default_compactors()).evidence(record)


def iter_lines(items: Iterable[Evidence]) -> Iterator[str]:
    """The compact lines, one per item."""
    for item in items:
        yield item.text
