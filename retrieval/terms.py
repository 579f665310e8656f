"""The project's table of clinical words, the codes they stand for, and usual ranges."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files


@dataclass(frozen=True)
class Term:
    """Words a clinician types for one concept, the codes charts use for it, a usual range."""

    words: tuple[str, ...]
    codes: frozenset[str]
    categories: frozenset[str] = frozenset()
    low: float | None = None
    high: float | None = None
    unit: str | None = None  # UCUM unit of low/high; a term with a unit is an analyte
    molar_mass: float | None = None  # g/mol: converts molar and mass concentrations of it
    observed: bool = False  # charted as an Observation even when asked about as a condition
    rising: str | None = None  # what a rise means ("kidney function worsening")
    falling: str | None = None
    meaningful_change: float | None = None  # in ``unit``: a smaller change means nothing
    meaningful_change_percent: float | None = None  # of the first value

    def meaning(self, first: float, last: float) -> str | None:
        """What the change from ``first`` to ``last`` (in ``unit``) means clinically ("kidney
        function worsening"), "no meaningful change in <what>" when it is below the term's
        threshold, or None when the term says nothing about its changes."""
        if self.rising is None or self.falling is None:
            return None
        change = last - first
        small = (self.meaningful_change is not None and abs(change) < self.meaningful_change) or (
            self.meaningful_change_percent is not None
            and first != 0
            and abs(change) / abs(first) * 100 < self.meaningful_change_percent
        )
        what = self.rising.rsplit(" ", 1)[0]  # "kidney function"
        if change == 0:
            return f"no change in {what}"
        if small:
            limit = (
                f"{self.meaningful_change:g} {self.unit}"
                if self.meaningful_change is not None
                else f"{self.meaningful_change_percent:g} %"
            )
            return f"a change under {limit}: no meaningful change in {what}"
        return self.rising if change > 0 else self.falling


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class TermTable:
    """Lookups over the term table: words in a question, and usual ranges by code."""

    def __init__(self, terms: list[Term]) -> None:
        self.terms = terms
        # each word's tokens under its first token, with the (term, word) order it is listed in:
        # ``matches`` looks up a question's tokens here instead of trying every word at every
        # position (it ran for every sentence the verifier checks: ≈4 ms a call, the largest CPU
        # cost of a rule-based answer in the service's profile)
        self._by_first: dict[str, list[tuple[tuple[int, int], tuple[str, ...], Term]]] = {}
        for t, term in enumerate(terms):
            for n, word in enumerate(term.words):
                w = tuple(_tokens(word))
                if w:
                    self._by_first.setdefault(w[0], []).append(((t, n), w, term))

    def matches(self, question: str) -> list[Term]:
        """Terms one of whose words (as whole words) occurs in ``question``, in the table's order.

        A word found only inside a longer matched word of another term does not count: "hemoglobin
        A1c" is the A1c, not also hemoglobin; "LDL cholesterol" is LDL, not also total cholesterol.
        """
        tokens = _tokens(question)
        found: list[tuple[tuple[int, int], int, int, Term]] = []
        for i, token in enumerate(tokens):
            for order, w, term in self._by_first.get(token, ()):
                if tuple(tokens[i : i + len(w)]) == w:
                    found.append((order, i, i + len(w), term))
        # in the order of a scan term by term, word by word, position by position
        found.sort(key=lambda f: (f[0], f[1]))
        spans = [(start, end, term) for _, start, end, term in found]
        kept: list[Term] = []
        for start, end, term in spans:
            inside_longer = any(
                s <= start and end <= e and (e - s) > (end - start) and t is not term
                for s, e, t in spans
            )
            if not inside_longer and term not in kept:
                kept.append(term)
        return kept

    def analyte(self, code: str) -> Term | None:
        """The analyte a ``system|code`` measures (the first term with a unit listing it): its
        mass and molar codes, its unit and molar mass."""
        for term in self.terms:
            if code in term.codes and term.unit is not None:
                return term
        return None

    def usual_range(self, code: str) -> tuple[float | None, float | None, str | None] | None:
        """The usual adult range for a ``system|code`` and the UCUM unit it is in: from the first
        term listing the code with a range."""
        for term in self.terms:
            if code in term.codes and (term.low is not None or term.high is not None):
                return term.low, term.high, term.unit
        return None


def _num(value: object) -> float | None:
    if value is None:
        return None
    f = float(value)  # type: ignore[arg-type]
    return None if math.isnan(f) else f


@cache
def default_terms() -> TermTable:
    """The table shipped in ``retrieval/terms.toml``."""
    data = tomllib.loads(files("retrieval").joinpath("terms.toml").read_text(encoding="utf-8"))
    terms = []
    for row in data["term"]:
        low, high = (row.get("range") or [None, None])[:2]
        terms.append(
            Term(
                words=tuple(w.lower() for w in row["words"]),
                codes=frozenset(row.get("codes", [])),
                categories=frozenset(row.get("categories", [])),
                low=_num(low),
                high=_num(high),
                unit=row.get("unit"),
                molar_mass=_num(row.get("molar_mass")),
                observed=bool(row.get("observed", False)),
                rising=row.get("rising"),
                falling=row.get("falling"),
                meaningful_change=_num(row.get("meaningful_change")),
                meaningful_change_percent=_num(row.get("meaningful_change_percent")),
            )
        )
    return TermTable(terms)
