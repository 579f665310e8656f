"""Plain text of chart values for evidence lines: one clean line, numbers and dates as the chart
gives them."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

from retrieval.clinical import code_of, fhir_date, number_text

# Longest text taken from a note or report body into one evidence line.
MAX_NOTE_CHARS = 600

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def clean_text(text: str, limit: int = MAX_NOTE_CHARS) -> str:
    """One line of plain text: control and bidi characters dropped, whitespace folded, bounded to
    ``limit`` characters (a longer text is cut at a word boundary when one lies in its second half,
    and ends in "…": never mid-word)."""
    text = _CONTROL.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    if " " in cut[limit // 2 :] and not text[limit - 1].isspace():
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ;,.") + "…"


def number(value: Any) -> str:
    """A FHIR decimal (Decimal, float, int or numeric string) as ``clinical.number_text`` writes
    it: no exponent, no trailing zeros."""
    return number_text(float(value))


def iso_day(value: date | datetime) -> str:
    """The calendar day of a date or datetime, "YYYY-MM-DD"."""
    return value.date().isoformat() if isinstance(value, datetime) else value.isoformat()


def date_text(value: Any) -> str:
    """A FHIR date or dateTime at its own precision ("2019", "2026-03", "2026-03-04", or with a
    time), as ``clinical.fhir_date`` reads it; "" for None or an unreadable value."""
    found = fhir_date(value)
    return found.text if found is not None else ""


def status_code(concept: Any) -> str:
    """The code of a status-like CodeableConcept (its first coding's code, else its text,
    lower-cased: ``clinical.code_of``), as clean text."""
    return clean_text(code_of(concept))
