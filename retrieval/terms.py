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


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class TermTable:
    """Lookups over the term table: words in a question, and usual ranges by code."""

    def __init__(self, terms: list[Term]) -> None:
        self.terms = terms

    def matches(self, question: str) -> list[Term]:
        """Terms one of whose words (as whole words) occurs in ``question``."""
        padded = " " + " ".join(_tokens(question)) + " "
        return [
            t for t in self.terms if any(f" {' '.join(_tokens(w))} " in padded for w in t.words)
        ]

    def usual_range(self, code: str) -> tuple[float | None, float | None] | None:
        """The usual adult range for a ``system|code``: from the first term listing it with one."""
        for term in self.terms:
            if code in term.codes and (term.low is not None or term.high is not None):
                return term.low, term.high
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
            )
        )
    return TermTable(terms)
