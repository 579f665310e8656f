"""Typos in a clinician's question read as the clinical word meant: "potasium" → potassium,
"cholestrol" → cholesterol, "hypertention" → hypertension, "metoprolo" → metoprolol.

A word of the question is corrected only when it is not an English word (the pyspellchecker
English frequency list), not a word of the vocabulary itself, at least 5 letters long, starts with
the same letter as the correction (typos at the first letter are rare, and guessing there corrupts
abbreviations), and is within an optimal-string-alignment distance (rapidfuzz's
``distance.OSA``: insertions, deletions, substitutions and adjacent transpositions) of 1 from one
vocabulary word (2 from words of 9 letters or more). When two vocabulary words of different
concepts are equally close the word is left alone: a guess between two tests is not a reading
("diabetis" is as close to "diabetes" as to "diabetic", one concept, and is read as the first).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from functools import cache

_WORD = re.compile(r"[A-Za-z]+")
MIN_LENGTH = 5


@dataclass(frozen=True)
class Correction:
    """One word read as another: ``written`` as in the question, ``read`` the vocabulary word."""

    written: str
    read: str


@cache
def _english() -> frozenset[str]:
    from spellchecker import SpellChecker

    return frozenset(SpellChecker(language="en").word_frequency.keys())


class Speller:
    """Corrects question words against a vocabulary of clinical words: ``vocabulary`` maps each
    word (lower-case letters; shorter than ``MIN_LENGTH`` never a target) to the concept it
    belongs to (any hashable name; ties between words of one concept are no ambiguity)."""

    def __init__(self, vocabulary: Mapping[str, Hashable]) -> None:
        self.concepts = {
            w: c for w, c in vocabulary.items() if len(w) >= MIN_LENGTH and w.isalpha()
        }
        self.words = frozenset(self.concepts)
        self._by_initial: dict[str, list[str]] = {}
        for w in sorted(self.words):
            self._by_initial.setdefault(w[0], []).append(w)

    def read(self, word: str) -> str | None:
        """The vocabulary word ``word`` is a typo of, or None (see the module's rules)."""
        from rapidfuzz.distance import OSA

        low = word.lower()
        if len(low) < MIN_LENGTH or low in self.words:
            return None
        limit = 2 if len(low) >= 9 else 1
        best: list[tuple[int, str]] = []
        for candidate in self._by_initial.get(low[0], ()):
            if abs(len(candidate) - len(low)) > limit:
                continue
            d = OSA.distance(low, candidate, score_cutoff=limit)
            if d <= limit:
                best.append((d, candidate))
        if not best:
            return None
        best.sort()
        closest = {self.concepts[w] for d, w in best if d == best[0][0]}
        if len(closest) > 1 or low in _english():  # (the dictionary loads only when needed)
            return None  # words of two concepts equally close, or a real word: no guess
        return best[0][1]

    def correct(self, question: str) -> tuple[str, list[Correction]]:
        """``question`` with its typos replaced by the words meant (case of the rest kept), and
        the corrections made, in order."""
        corrections: list[Correction] = []

        def fix(m: re.Match[str]) -> str:
            read = self.read(m.group(0))
            if read is None:
                return m.group(0)
            corrections.append(Correction(m.group(0), read))
            return read

        return _WORD.sub(fix, question), corrections


@cache
def default_speller() -> Speller:
    """A ``Speller`` over the words of the shipped term table (``retrieval/terms.toml``) and drug
    table (``retrieval/drugs.toml``: class words, ingredients, brands)."""
    from retrieval.drugs import default_drugs
    from retrieval.terms import default_terms

    words: dict[str, Hashable] = {}
    for i, term in enumerate(default_terms().terms):
        for phrase in term.words:
            words.update((w.lower(), ("term", i)) for w in _WORD.findall(phrase))
    for c in default_drugs().classes:
        for phrase in c.words:
            words.update((w.lower(), ("class", c.name)) for w in _WORD.findall(phrase))
        for phrase in (*c.ingredients, *c.brands):
            words.update((w.lower(), ("drug", phrase)) for w in _WORD.findall(phrase))
    return Speller(words)
