"""The results an answer cites, as one series over time: what a surface plots beside the answer.

An answer about a trend or a window ("creatinine trend", "mean glucose over the last 3 years")
cites every result it used; read back from the patient's own record, the cited results of one
measured concept are a series worth drawing. Values are read, converted to one UCUM unit and
ranged exactly as the tools and evidence lines read them (``retrieval.clinical.in_one_unit``,
``retrieval.evidence.flags.range_in_unit``), so the picture and the sentence agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from connectors.record import PatientRecord
from retrieval.clinical import OneUnit, Point, in_one_unit, observation_series, series_key
from retrieval.evidence.flags import range_in_unit
from retrieval.terms import TermTable, default_terms


@dataclass(frozen=True)
class CitedSeries:
    """One measured concept's cited results: ``name`` as the record names it (e.g. "Creatinine
    [Mass/volume] in Serum or Plasma"), ``unit`` (UCUM, None for a unitless result), ``points``
    as ``(when, value in unit, 'Observation/id')`` oldest first (``when`` the start of the
    result's effective date, timezone-aware), and the range to shade, ``low``–``high`` in
    ``unit`` (either may be None), with ``range_label`` "ref" (the lab's own, from the newest
    result) or "usual range" (``retrieval/terms.toml``), or None without a range."""

    name: str
    unit: str | None
    points: list[tuple[datetime, float, str]]
    low: float | None = None
    high: float | None = None
    range_label: str | None = None


def _ranges(point: Point) -> list[Any]:
    element = point.observation
    if point.component is not None:
        element = (point.observation.component or [])[point.component]
    return list(getattr(element, "referenceRange", None) or [])


def cited_series(
    record: PatientRecord,
    references: Iterable[str],
    *,
    minimum: int = 3,
    terms: TermTable | None = None,
) -> CitedSeries | None:
    """The series of the cited Observations (``references``, ``Type/id``; any others, and any not
    in ``record``, are ignored: only this patient's results are read) with the most cited results
    that have an exact numeric value and a date, when it has at least ``minimum`` distinct
    Observations; else None. Results of one analyte in molar and mass codes are one series
    (``series_key``); a panel's components are series of their own; bounds ("<5") and values
    that cannot be converted to the series' unit are left out, as ``observation_stats`` leaves
    them out. ``terms`` defaults to ``default_terms()``."""
    terms = terms or default_terms()
    wanted = set(references)
    groups: dict[str, list[Point]] = {}
    for ref, voided, points in observation_series(record):
        if ref not in wanted or voided:
            continue
        for p in points:
            if p.measurement is not None and p.when is not None:
                groups.setdefault(series_key(p, terms), []).append(p)
    best: OneUnit | None = None
    for points in groups.values():
        values = in_one_unit(points, terms)
        count = len({p.reference for p, _ in values.rows})
        if count >= minimum and (best is None or count > len({p.reference for p, _ in best.rows})):
            best = values
    if best is None:
        return None
    rows = sorted(best.rows, key=lambda row: row[0].when.sort_key if row[0].when else ())
    newest = rows[-1][0]
    found = range_in_unit(_ranges(newest), newest.codes, terms, best.unit)
    low, high, label = found if found is not None else (None, None, None)
    return CitedSeries(
        name=newest.name or (newest.codes[0] if newest.codes else "result"),
        unit=best.unit,
        points=[(p.when.start, value, p.reference) for p, value in rows if p.when is not None],
        low=low,
        high=high,
        range_label=label,
    )
