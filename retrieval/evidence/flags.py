"""Whether a result is abnormal, and the range text its evidence line shows: the lab's own
interpretation and reference range first, the project's usual range (``terms.toml``) when the
resource has neither; ranges in another UCUM unit are converted into the value's unit first."""

from __future__ import annotations

from typing import Any

from retrieval.clinical import Measurement, convert, measurement_of, same_unit
from retrieval.evidence.text import number, status_code
from retrieval.terms import TermTable

# HL7 v3 ObservationInterpretation codes that mark a result as outside its normal range
_ABNORMAL_CODES = ("H", "HH", "HU", "L", "LL", "LU", "A", "AA", "POS", "DET")


def range_text(rng: Any) -> str:
    """A FHIR Range's bounds without unit: "4–6", "< 6", "> 4"; "" when it has neither bound."""
    low = number(rng.low.value) if rng.low is not None and rng.low.value is not None else None
    high = number(rng.high.value) if rng.high is not None and rng.high.value is not None else None
    if low and high:
        return f"{low}–{high}"
    return f"< {high}" if high else f"> {low}" if low else ""


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


def range_in_unit(
    ranges: list[Any], codes: tuple[str, ...], terms: TermTable, unit: str | None
) -> tuple[float | None, float | None, str] | None:
    """The range a value in ``unit`` is read against, as (low, high, label) in ``unit``: the
    resource's own reference range (the first of ``ranges``, FHIR Range elements, with a bound;
    label "ref") first, else the project's usual range for one of ``codes`` ("system|code";
    label "usual range"). A range in another UCUM unit is converted into ``unit`` (through the
    analyte's molar mass where one applies). None when there is no range, or it cannot be put
    into ``unit`` (no conversion, or the range has a unit and the value none)."""
    rng = next((r for r in ranges if r.low is not None or r.high is not None), None)
    if rng is not None:
        low, high, given, label = _bound(rng.low), _bound(rng.high), _range_unit(rng), "ref"
    else:
        usual = next((u for u in (terms.usual_range(c) for c in codes) if u), None)
        if usual is None:
            return None
        low, high, given = usual
        label = "usual range"
    if given is not None and unit is not None and not same_unit(given, unit):
        analyte = next((a for a in (terms.analyte(c) for c in codes) if a), None)
        molar_mass = analyte.molar_mass if analyte is not None else None
        bounds = [
            convert(Measurement(b, given), unit, molar_mass) if b is not None else None
            for b in (low, high)
        ]
        if any(b is None for b, was in zip(bounds, (low, high), strict=True) if was is not None):
            return None  # another unit, no conversion: no range rather than a wrong one
        low, high = (b.value if b is not None else None for b in bounds)
    elif given is not None and unit is None:
        return None
    return low, high, label


def range_flag(
    value: Any,
    ranges: list[Any],
    interpretation: list[Any],
    codes: tuple[str, ...],
    terms: TermTable,
) -> tuple[str, bool]:
    """(the text in a line's parentheses, whether the value is abnormal) for a value (a Quantity,
    a ``Measurement`` or a string ``measurement_of`` reads) with the resource's reference
    ``ranges``, ``interpretation`` codes and ``codes`` ("system|code", for the usual range and
    the analyte's molar mass). E.g. ("high; ref 4–6", True), ("ref 4–6", False),
    ("low; usual range 4–6", True), or ("", False) for a usual range met or nothing to compare. The resource's own interpretation and
    range come first, the project's usual range when the resource has neither. A range is
    compared only in the value's unit: a range in another UCUM unit is converted first (through
    the analyte's molar mass where one applies); a value that cannot be converted is not flagged."""
    rng = next((r for r in ranges if r.low is not None or r.high is not None), None)
    for interp in interpretation:
        code = status_code(interp).upper()
        if code in _ABNORMAL_CODES:
            word = {"H": "high", "HH": "critically high", "L": "low", "LL": "critically low"}.get(
                code, "abnormal"
            )
            return f"{word}" + (f"; ref {range_text(rng)}" if rng is not None else ""), True
    m = measurement_of(value)
    if m is None:
        return "", False
    found = range_in_unit(ranges, codes, terms, m.unit)
    if found is None:
        return "", False
    low, high, label = found
    word = _compare(m, low, high)
    span = (
        f"{number(low)}–{number(high)}"
        if low is not None and high is not None
        else f"< {number(high)}"
        if high is not None
        else f"> {number(low)}"
    )
    if rng is not None:
        return (f"{word}; {label} {span}" if word else f"{label} {span}"), bool(word)
    return (f"{word}; {label} {span}" if word else ""), bool(word)
