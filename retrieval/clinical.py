"""Clinical semantics of FHIR data, decided once: status, dates, quantities, names.

Every layer that reads a resource's meaning (evidence lines, structured tools, the record summary,
case summaries, cards) asks this module, so that an entered-in-error result is left out everywhere,
a refuted diagnosis is never active, a partial date is printed as given and a value in another unit
is converted (or refused) the same way in every answer.

Sources of the rules:
- status value sets: FHIR R4 (``observation-status``, ``condition-ver-status``,
  ``allergyintolerance-verification``, ``medicationrequest-status``, ``medication-statement-status``,
  ``medication-admin-status``, ``event-status``, ``immunization-status``, ``diagnostic-report-status``,
  ``document-reference-status``, ``composition-status``, ``encounter-status``);
- dates: FHIR R4 §2.24 ``date``/``dateTime``/``instant`` (partial precision; a time needs an offset);
- units: UCUM, parsed and converted by ``ucumvert`` (pint); molar ↔ mass conversions use the
  analyte's molar mass from ``terms.toml``; HbA1c % (NGSP) ↔ mmol/mol (IFCC) uses the IFCC–NGSP
  master equation, IFCC = 10.929 × (NGSP − 2.15) (Hoelzel et al., Clin Chem 2004;50:166–174).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from connectors.resources import NO_NAME, display_name, reference_of

if TYPE_CHECKING:
    from retrieval.terms import TermTable

__all__ = ["NO_NAME", "display_name"]  # the patient's name is read in connectors (patient lists)

log = logging.getLogger(__name__)

ENTERED_IN_ERROR = "entered-in-error"


def codes_of(*concepts: Any) -> tuple[str, ...]:
    """``system|code`` of every coding in the given CodeableConcepts (or lists of them)."""
    out: list[str] = []
    for concept in concepts:
        for c in concept if isinstance(concept, list) else [concept]:
            for coding in getattr(c, "coding", None) or []:
                if coding.code:
                    out.append(f"{coding.system or ''}|{coding.code}")
    return tuple(dict.fromkeys(out))


# --- status ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReading:
    """What a resource's status elements mean for a clinician.

    ``voided``: entered in error (``status``, ``docStatus`` or ``verificationStatus``): never a fact,
    never in a value, list, average or summary. ``refuted``: a condition or allergy ruled out.
    ``not_done``: cancelled, not done, not taken, declined: the event did not happen (a result has no
    value). ``active``: a current problem, medication or allergy. ``label``: words for the line
    ("ruled out", "cancelled", "stopped", ...), empty when nothing needs saying.
    """

    voided: bool = False
    refuted: bool = False
    not_done: bool = False
    active: bool = False
    label: str = ""


def code_of(concept: Any) -> str:
    """The first code of a CodeableConcept (or its text, lower-cased); "" for None."""
    if concept is None:
        return ""
    for coding in getattr(concept, "coding", None) or []:
        if coding.code:
            return str(coding.code)
    return str(getattr(concept, "text", "") or "").strip().lower()


# statuses (per resource type) under which the event did not take place
_NOT_DONE: dict[str, frozenset[str]] = {
    "Observation": frozenset({"cancelled"}),
    "DiagnosticReport": frozenset({"cancelled"}),
    "MedicationRequest": frozenset({"cancelled"}),
    "MedicationStatement": frozenset({"not-taken"}),
    "MedicationAdministration": frozenset({"not-done"}),
    "MedicationDispense": frozenset({"cancelled", "declined"}),
    "Procedure": frozenset({"not-done"}),
    "Immunization": frozenset({"not-done"}),
    "Encounter": frozenset({"cancelled"}),
    "ImagingStudy": frozenset({"cancelled"}),
    "Media": frozenset({"not-done"}),
    "Goal": frozenset({"cancelled", "rejected"}),
    "CarePlan": frozenset({"revoked"}),
}
# statuses under which a medication is current (FHIR R4 value sets of each resource)
_ACTIVE_MEDICATION: dict[str, frozenset[str]] = {
    "MedicationRequest": frozenset({"active", "on-hold"}),
    "MedicationStatement": frozenset({"active", "intended", "on-hold"}),
    "MedicationAdministration": frozenset({"in-progress", "on-hold"}),
}
_ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})
_LABELS = {
    "not-done": "not done",
    "not-taken": "not taken",
    "on-hold": "on hold",
    "in-progress": "in progress",
}


def _element(resource: Any, name: str) -> Any:
    """``resource.<name>`` or None; a fhir.resources model keeps its elements in ``__dict__``,
    and reading it there spares pydantic's slow ``__getattr__`` for elements a type lacks."""
    elements = getattr(resource, "__dict__", None)
    return elements.get(name) if elements is not None else getattr(resource, name, None)


def read_status(resource: Any) -> StatusReading:
    """The clinical meaning of ``resource``'s status elements (see ``StatusReading``)."""
    kind = resource.get_resource_type()
    status = str(_element(resource, "status") or "")
    verification = code_of(_element(resource, "verificationStatus"))
    doc_status = str(_element(resource, "docStatus") or "")
    lifecycle = str(_element(resource, "lifecycleStatus") or "")  # Goal
    if ENTERED_IN_ERROR in (status, verification, doc_status, lifecycle):
        return StatusReading(voided=True, label="entered in error")
    if kind in ("Condition", "AllergyIntolerance"):
        clinical = code_of(_element(resource, "clinicalStatus"))
        if verification == "refuted":
            return StatusReading(refuted=True, label="ruled out")
        if kind == "AllergyIntolerance":
            # no clinicalStatus on an allergy: FHIR allows it, and an unstated allergy is taken as
            # current (safer to warn than to forget)
            active = clinical in _ACTIVE_CLINICAL or not clinical
        else:
            active = clinical in _ACTIVE_CLINICAL
        label = clinical if clinical and not active else ""
        if verification in ("unconfirmed", "provisional", "differential"):
            label = ", ".join(x for x in (label, verification) if x)
        return StatusReading(active=active, label=label)
    code = status or lifecycle
    if code in _NOT_DONE.get(kind, ()):
        return StatusReading(not_done=True, label=_LABELS.get(code, code))
    if kind in _ACTIVE_MEDICATION:
        return StatusReading(active=code in _ACTIVE_MEDICATION[kind], label=_LABELS.get(code, code))
    if kind in ("CarePlan", "Goal"):
        return StatusReading(active=code == "active", label=_LABELS.get(code, code))
    return StatusReading(label=_LABELS.get(code, code) if code else "")


def is_voided(resource: Any) -> bool:
    """Entered in error: left out of every fact, list, average and summary."""
    return read_status(resource).voided


# --- dates -------------------------------------------------------------------------------------

Precision = Literal["year", "month", "day", "time"]
_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


@dataclass(frozen=True)
class FhirDate:
    """A FHIR ``date``/``dateTime``/``instant`` at its own precision, as an interval.

    ``start`` (inclusive) and ``end`` (exclusive) are timezone-aware (a date without an offset is
    taken as UTC); "2019" is [2019-01-01, 2020-01-01). ``text`` is the date as it is printed: at its
    own precision, never padded ("2019", "2026-03", "2026-03-04"; a time prints its day).
    """

    start: datetime
    end: datetime
    precision: Precision

    @property
    def text(self) -> str:
        """The date at its own precision: "2019", "2026-03", or "2026-03-04" (also for a time)."""
        if self.precision == "year":
            return f"{self.start.year:04d}"
        if self.precision == "month":
            return f"{self.start.year:04d}-{self.start.month:02d}"
        return self.start.date().isoformat()

    def __str__(self) -> str:
        return self.text

    @property
    def sort_key(self) -> tuple[datetime, datetime]:
        """Orders dates by when their interval starts, the wider one first on a tie."""
        return (self.start, self.end)


# month names as written in English text ("March 2019", "17 Mar 2019"); a name's first three
# letters identify its month
MONTH_NAMES = (
    "january", "february", "march", "april", "may", "june",
    "july", "august", "september", "october", "november", "december",
)  # fmt: skip


def aware(value: datetime) -> datetime:
    """``value`` with a timezone (UTC when it has none)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def fhir_date(value: Any) -> FhirDate | None:
    """A FHIR date of any precision (``date``, ``datetime`` or a partial string), or None."""
    if isinstance(value, datetime):
        start = aware(value)
        return FhirDate(start, start, "time")
    if isinstance(value, date):
        start = datetime(value.year, value.month, value.day, tzinfo=UTC)
        if value == date.max:  # 9999-12-31, a common "no end" in EHR data: no next day exists
            return FhirDate(start, datetime.max.replace(tzinfo=UTC), "day")
        return FhirDate(start, start + timedelta(days=1), "day")
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    m = _PARTIAL.match(text)
    try:
        if m is None:
            return fhir_date(datetime.fromisoformat(text.replace("Z", "+00:00")))
        year, month, day = int(m.group(1)), m.group(2), m.group(3)
        if day:
            return fhir_date(date(year, int(month), int(day)))
        if month:
            start = datetime(year, int(month), 1, tzinfo=UTC)
            nxt = datetime(year + (int(month) == 12), int(month) % 12 + 1, 1, tzinfo=UTC)
            return FhirDate(start, nxt, "month")
        return FhirDate(
            datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC), "year"
        )
    except ValueError:
        return None


# The element that says when a resource happened, by preference; then when it was recorded.
_WHEN = (
    "effectiveDateTime",
    "effectiveInstant",
    "onsetDateTime",
    "performedDateTime",
    "occurrenceDateTime",
    "authoredOn",
    "started",
    "recordedDate",
    "dateTime",  # Consent
    "dateAsserted",
    "createdDateTime",
    "date",
    "issued",
    "created",
)
_WHEN_PERIOD = ("effectivePeriod", "performedPeriod", "onsetPeriod", "period")


def when_of(resource: Any) -> FhirDate | None:
    """When a resource happened (else when it was recorded), at its own precision."""
    for attr in _WHEN:
        found = fhir_date(getattr(resource, attr, None))
        if found is not None:
            return found
    for attr in _WHEN_PERIOD:
        period = getattr(resource, attr, None)
        if period is not None:
            found = fhir_date(period.start or period.end)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class AgeReading:
    """An age in whole years; ``approximate`` when the birth date is partial (a range of ages),
    ``at_death`` when the patient died (the age is then the age at death). For a birth date
    given to the day, ``months`` and ``days`` are the whole months and days too (None
    otherwise), and a young child's age is said in them (``amount``, ``unit``): days in the
    first month, months until 2 years, as pediatric charts and the WHO and CDC growth charts
    (ages in months to 24 months) state it; "0 years" says nothing of a 3-day-old."""

    years: int
    approximate: bool = False
    at_death: bool = False
    months: int | None = None
    days: int | None = None

    @property
    def unit(self) -> str:
        """ "days" (under a month), "months" (under 2 years) or "years"."""
        if self.months is not None and self.days is not None and not self.approximate:
            if self.months < 1:
                return "days"
            if self.months < 24:
                return "months"
        return "years"

    @property
    def amount(self) -> int:
        """The age in ``unit``: whole days, months or years."""
        unit = self.unit
        if unit == "days":
            return self.days or 0
        if unit == "months":
            return self.months or 0
        return self.years

    @property
    def text(self) -> str:
        """The age in years as a line says it: "67", or "about 67" when approximate."""
        return ("about " if self.approximate else "") + f"{self.years}"

    @property
    def spoken(self) -> str:
        """The age with its unit: "3 days", "5 months", "67 years", "about 67 years"."""
        if self.unit == "years":
            return f"{self.text} years"
        return f"{self.amount} {self.unit if self.amount != 1 else self.unit[:-1]}"

    @property
    def short(self) -> str:
        """For a header: "3 d", "5 mo", "67 y", "about 67 y"."""
        abbreviation = {"days": "d", "months": "mo", "years": "y"}[self.unit]
        return f"{self.text if self.unit == 'years' else self.amount} {abbreviation}"


def _whole_years(born: date, on: date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _whole_months(born: date, on: date) -> int:
    return (on.year - born.year) * 12 + on.month - born.month - (on.day < born.day)


def patient_age(patient: Any, on: date | None = None) -> AgeReading | None:
    """The patient's age on ``on`` (today by default), or at death; None without a birth date,
    or when the birth date is after ``on`` (a data error: no age is better than a negative one).

    A partial birth date ("1958", "1958-07") gives the age at the middle of its possible range,
    marked approximate."""
    born = fhir_date(getattr(patient, "birthDate", None))
    if born is None:
        return None
    end = on or datetime.now(UTC).date()
    if born.start.date() > end:
        return None
    died = fhir_date(getattr(patient, "deceasedDateTime", None))
    at_death = died is not None and died.start.date() <= end
    if died is not None and at_death:
        end = died.start.date()
    if born.precision in ("day", "time"):
        day = born.start.date()
        return AgeReading(
            _whole_years(day, end),
            at_death=at_death,
            months=_whole_months(day, end),
            days=(end - day).days,
        )
    youngest = _whole_years((born.end - timedelta(days=1)).date(), end)
    oldest = _whole_years(born.start.date(), end)
    if youngest == oldest:
        return AgeReading(oldest, at_death=at_death)
    return AgeReading(round((youngest + oldest) / 2), approximate=True, at_death=at_death)


# --- quantities and units ----------------------------------------------------------------------

_UCUM = "http://unitsofmeasure.org"
_CENSORED_TEXT = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*(\d+(?:\.\d+)?)\s*([^\d\s].*)?$")
_COMPARATORS = {"≤": "<=", "≥": ">="}


@dataclass(frozen=True)
class Measurement:
    """A measured value with its unit; ``comparator`` ("<", "<=", ">=", ">") when the value is a
    bound (a censored result, e.g. "<0.5 ng/mL"), which is then never used as an exact number.
    ``unit`` is the UCUM code when the Quantity gives one, else its unit text."""

    value: float
    unit: str | None = None
    comparator: str | None = None

    @property
    def exact(self) -> bool:
        """True unless the value is a bound (it has a comparator)."""
        return self.comparator is None

    @property
    def text(self) -> str:
        """Comparator, number (``number_text``) and unit: "<0.5 ng/mL", "6.3 %", "12"."""
        return f"{self.comparator or ''}{number_text(self.value)} {self.unit or ''}".strip()


def number_text(value: float) -> str:
    """A number as charts print it: up to 4 significant digits, no trailing zeros."""
    f = float(value)
    return f"{f:.4g}" if abs(f) < 1e6 else f"{f:.6g}"


def measurement_of(value: Any) -> Measurement | None:
    """The measurement in a Quantity, an integer, or a string such as "<5" or ">= 200 mg/dL"."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Measurement(float(value))
    if isinstance(value, str):
        m = _CENSORED_TEXT.match(value)
        if m is None:
            return None
        comparator = _COMPARATORS.get(m.group(1), m.group(1))
        return Measurement(float(m.group(2)), (m.group(3) or "").strip() or None, comparator)
    number = getattr(value, "value", None)
    if number is None:
        return None
    code = getattr(value, "code", None) if getattr(value, "system", None) == _UCUM else None
    unit = code or getattr(value, "unit", None) or getattr(value, "code", None)
    return Measurement(float(number), str(unit) if unit else None, value.comparator or None)


@cache
def _registry() -> Any:
    """The UCUM unit registry (loaded on first conversion: ~1 s)."""
    from ucumvert import PintUcumRegistry

    return PintUcumRegistry()


# UCUM spellings that are one unit for a clinician but that UCUM parses as another or not at all
_UNIT_ALIASES = {"mmhg": "mm[Hg]", "mg/dl": "mg/dL", "g/dl": "g/dL", "mmol/l": "mmol/L"}


def _unit(unit: str) -> Any:
    reg = _registry()
    text = _UNIT_ALIASES.get(unit.strip().lower(), unit.strip())
    return reg.from_ucum(text)


def same_unit(a: str | None, b: str | None) -> bool:
    """Whether two unit strings name the same unit (case and spacing aside)."""
    norm = lambda u: _UNIT_ALIASES.get((u or "").strip().lower(), (u or "").strip())  # noqa: E731
    return norm(a) == norm(b)


# HbA1c: NGSP % and IFCC mmol/mol (master equation; see the module docstring)
_HBA1C_UNITS = {"%": "ngsp", "mmol/mol": "ifcc"}


def _scaled(quantity: Any, factor: float) -> Any:
    """``quantity`` in a unit with a factor ("10*3/uL" is 1000/uL); offset units (Cel) have none."""
    return quantity if factor == 1 else quantity / factor


def convert(m: Measurement, to_unit: str, molar_mass: float | None = None) -> Measurement | None:
    """``m`` in ``to_unit``, or None when the units cannot be converted (other dimensions and no
    molar mass, an unparseable unit). ``molar_mass`` (g/mol) converts substance ↔ mass
    concentrations (mmol/L ↔ mg/dL). The comparator travels with the value."""
    if m.unit is None:
        return None
    if same_unit(m.unit, to_unit):
        return Measurement(m.value, to_unit, m.comparator)
    if m.unit in _HBA1C_UNITS and to_unit in _HBA1C_UNITS:
        ngsp = m.value if m.unit == "%" else m.value / 10.929 + 2.15
        value = ngsp if to_unit == "%" else 10.929 * (ngsp - 2.15)
        return Measurement(value, to_unit, m.comparator)
    try:
        import pint

        unit = _unit(m.unit)
        # a quantity built from value and unit (not value × unit): offset units such as Cel
        src = unit.__class__(m.value * unit.magnitude, unit.units)
        dst = _unit(to_unit)
        try:
            out = _scaled(src.to(dst.units), dst.magnitude)
        except pint.DimensionalityError:
            if molar_mass is None:
                return None
            grams_per_mol = molar_mass * _unit("g/mol")
            per_mass = src * grams_per_mol
            per_mol = src / grams_per_mol
            chosen = per_mass if per_mass.dimensionality == dst.dimensionality else per_mol
            out = _scaled(chosen.to(dst.units), dst.magnitude)
        return Measurement(float(out.magnitude), to_unit, m.comparator)
    except Exception as exc:  # an odd unit string: no conversion rather than a wrong one
        log.debug("no conversion %s → %s: %s", m.unit, to_unit, exc)
        return None


# --- observations as measurements ------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One result of a series: an Observation's own value, or one of its components (a systolic
    pressure inside a blood-pressure panel is a measurement in its own right).

    ``measurement`` is the numeric value (a bound keeps its comparator), None for a coded or text
    value or for no value; ``has_value`` is False when there is no value at all, ``absent`` then says
    why (the status, e.g. "cancelled", and the dataAbsentReason)."""

    observation: Any
    reference: str
    codes: tuple[str, ...]
    name: str
    when: FhirDate | None
    measurement: Measurement | None
    has_value: bool
    absent: str = ""
    component: int | None = None


def _name(concept: Any) -> str:
    text = str(getattr(concept, "text", "") or "")
    if text:
        return text
    for coding in getattr(concept, "coding", None) or []:
        if coding.display:
            return str(coding.display)
    return ""


def _value_of(element: Any) -> tuple[Measurement | None, bool]:
    for attr in (
        "valueQuantity",
        "valueCodeableConcept",
        "valueString",
        "valueBoolean",
        "valueInteger",
        "valueRange",
        "valueRatio",
        "valueSampledData",
        "valueTime",
        "valueDateTime",
        "valuePeriod",
    ):
        value = getattr(element, attr, None)
        if value is not None:
            return measurement_of(value) if attr in (
                "valueQuantity",
                "valueString",
                "valueInteger",
            ) else None, True
    return None, False


def observation_points(obs: Any, reference: str) -> list[Point]:
    """The Observation's measurements: its own value (or its lack of one) first, then one point per
    component. An entered-in-error Observation has none."""
    status = read_status(obs)
    if status.voided:
        return []
    when = when_of(obs)

    def absent_reason(element: Any) -> str:
        reason = getattr(element, "dataAbsentReason", None)
        words = [status.label if status.not_done else "", _name(reason) or code_of(reason)]
        return "; ".join(w for w in words if w)

    m, has = _value_of(obs)
    has = has and not status.not_done
    points = [
        Point(
            obs, reference, codes_of(obs.code), _name(obs.code), when,
            m if has else None, has, "" if has else absent_reason(obs),
        )
    ]  # fmt: skip
    for i, comp in enumerate(getattr(obs, "component", None) or []):
        cm, chas = _value_of(comp)
        chas = chas and not status.not_done
        points.append(
            Point(
                obs, reference, codes_of(comp.code), _name(comp.code), when,
                cm if chas else None, chas, "" if chas else absent_reason(comp), i,
            )
        )  # fmt: skip
    return points


def observation_series(record: Any) -> list[tuple[str, bool, list[Point]]]:
    """Each Observation of a ``PatientRecord``: its reference, whether it is voided, its points.
    Read once per record and kept in ``record.derived`` (a record is not changed once assembled; a
    new fetch is a new object), so questions on a 50k-resource chart do not read them again."""
    cached = record.derived.get("observation_series")
    if cached is None or len(cached) != len(record.observations):
        cached = []
        for obs in record.observations:
            ref = reference_of(obs)
            cached.append((ref, read_status(obs).voided, observation_points(obs, ref)))
        record.derived["observation_series"] = cached
    return cached


def series_key(point: Point, terms: TermTable) -> str:
    """What a point measures, to put it in one series with others: its analyte (mass and molar
    codes alike, from the term table: ``"analyte:<first word>"``), else its first ``system|code``,
    else its name in lower case."""
    for code in point.codes:
        analyte = terms.analyte(code)
        if analyte is not None:
            return "analyte:" + analyte.words[0]
    return point.codes[0] if point.codes else point.name.lower()


@dataclass(frozen=True)
class OneUnit:
    """A series' exact values in one unit: ``rows`` (point, value in ``unit``) in the points'
    order; ``bounds`` the points given as a bound ("<5"), ``other_unit`` those whose unit could not
    be converted to ``unit``, both left out of ``rows``; ``mixed`` when the points came in more
    than one unit; ``molar_mass`` (g/mol) of the analyte, for converting a range too."""

    unit: str | None
    rows: list[tuple[Point, float]]
    bounds: list[Point]
    other_unit: list[Point]
    mixed: bool
    molar_mass: float | None = None


def in_one_unit(points: list[Point], terms: TermTable) -> OneUnit:
    """The numeric ``points`` of one series (points without a measurement are skipped) in one UCUM
    unit: the unit they all share; else the analyte's unit from the term table, the others
    converted to it (``convert``); else the most common unit, the others left out."""
    measured = [p for p in points if p.measurement is not None]
    analyte = next((a for a in (terms.analyte(c) for p in measured for c in p.codes) if a), None)
    molar_mass = analyte.molar_mass if analyte else None
    units = [p.measurement.unit for p in measured if p.measurement is not None]
    distinct = {u for u in units if u}
    if len(distinct) <= 1:
        target = next(iter(distinct), None)
    elif analyte is not None and analyte.unit is not None:
        target = analyte.unit
    else:  # no analyte to convert through: the most common unit, the others left out
        target = max(distinct, key=units.count)
    rows: list[tuple[Point, float]] = []
    bounds: list[Point] = []
    other_unit: list[Point] = []
    for p in measured:
        m: Measurement | None = p.measurement
        assert m is not None
        if not m.exact:
            bounds.append(p)
            continue
        if target is not None and not same_unit(m.unit, target):
            m = convert(m, target, molar_mass)
            if m is None:
                other_unit.append(p)
                continue
        rows.append((p, m.value))
    return OneUnit(target, rows, bounds, other_unit, len(distinct) > 1, molar_mass)
