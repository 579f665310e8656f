"""Drug classes and the ingredients a medication names (``retrieval/drugs.toml``, with its sources
and limits): "is he on a beta blocker?" is answered from the medication lines that name a member.

A medication's text (its RxNorm display, e.g. "24 HR metoprolol succinate 100 MG Extended Release
Oral Tablet [Toprol]") names ingredients, and sometimes only a brand ("Lasix 40mg"); both are matched
as whole words, case-insensitively. A class is the ingredients (and brands, dose forms) it lists plus
those of the classes it ``includes``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files


def _words_pattern(words: tuple[str, ...]) -> re.Pattern[str] | None:
    """Any of ``words`` as whole words (letters and digits around them do not count)."""
    if not words:
        return None
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?![a-z0-9])", re.IGNORECASE)


@dataclass(frozen=True)
class DrugClass:
    """A class of drugs: ``name`` ("beta blocker"), the ``words`` a clinician types for it, its ATC
    group codes (``atc``, identifiers a reader can check), member ``ingredients`` (RxNorm
    ingredient names, lower-case), ``brands`` (brand → ingredient) and dose ``forms`` that make a
    product a member by themselves ("inhaler")."""

    name: str
    words: tuple[str, ...]
    atc: tuple[str, ...]
    ingredients: tuple[str, ...]
    brands: dict[str, str]
    forms: tuple[str, ...] = ()

    def members_in(self, text: str) -> list[str]:
        """The member ingredients ``text`` names (a brand counts as its ingredient; a member dose
        form as itself), each once, in the order of the class's list."""
        low = text.lower()
        found = [i for i in self.ingredients if has_word(low, i)]
        found += [i for b, i in self.brands.items() if has_word(low, b) and i not in found]
        found += [f for f in self.forms if f in low and f not in found]
        return list(dict.fromkeys(found))


def has_word(text: str, word: str) -> bool:
    """Whether lower-case ``text`` holds ``word`` as a whole word (letters or digits around it
    do not count: "insulinoma" does not hold "insulin")."""
    return re.search(rf"(?<![a-z0-9]){re.escape(word)}(?![a-z0-9])", text) is not None


class DrugTable:
    """The classes of ``drugs.toml`` (``includes`` expanded), with lookups by question words."""

    def __init__(self, classes: list[DrugClass]) -> None:
        self.classes = classes
        self.by_name = {c.name.lower(): c for c in classes}
        self._class_words = _words_pattern(tuple(w for c in classes for w in c.words))
        self._drug_words = _words_pattern(
            tuple({i for c in classes for i in (*c.ingredients, *c.brands)})
        )

    def get(self, query: str) -> DrugClass | None:
        """The class a name or word stands for ("statins", "beta-blocker", "ACE inhibitor"), or
        the one-ingredient class of a drug the table knows ("warfarin", "Lasix" → warfarin,
        furosemide); None otherwise."""
        q = " ".join(query.lower().split())
        if q in self.by_name:
            return self.by_name[q]
        for c in self.classes:
            if q in c.words:
                return c
        for c in self.classes:
            if q in c.ingredients:
                return DrugClass(q, (q,), (), (q,), {b: i for b, i in c.brands.items() if i == q})
            if q in c.brands:
                ingredient = c.brands[q]
                brands = {b: i for b, i in c.brands.items() if i == ingredient}
                return DrugClass(ingredient, (q,), (), (ingredient,), brands)
        return None

    def named_in(self, question: str) -> list[str]:
        """The classes and drugs a question names, as ``get`` takes them, each once, in order of
        appearance; a drug inside a named class's phrase is not named twice."""
        return list(dict.fromkeys(w for _, _, w in self.spans_in(question)))

    def spans_in(self, question: str) -> list[tuple[int, int, str]]:
        """Where the question names classes and drugs: ``(start, end, phrase)`` (``phrase``
        lower-cased, as ``get`` takes it), in order; a drug inside a class's phrase is not
        listed. The planner reads no other term inside these ("calcium" in "calcium channel
        blocker" is not a calcium result)."""
        found: list[tuple[int, str]] = []
        for pattern in (self._class_words, self._drug_words):
            if pattern is None:
                continue
            for m in pattern.finditer(question):
                if not any(s <= m.start() < e for s, e, _ in _spans(found)):
                    found.append((m.start(), m.group(0).lower()))
        return _spans(sorted(found))


def _spans(found: list[tuple[int, str]]) -> list[tuple[int, int, str]]:
    return [(s, s + len(w), w) for s, w in found]


def _load(raw: dict[str, object]) -> list[DrugClass]:
    entries = raw["class"]
    assert isinstance(entries, list)
    by_name = {e["name"]: e for e in entries}

    def members(
        entry: dict[str, object], seen: frozenset[str]
    ) -> tuple[list[str], dict[str, str], list[str]]:
        ingredients = list(entry.get("ingredients", []))  # type: ignore[call-overload]
        brands = dict(entry.get("brands", {}))  # type: ignore[call-overload]
        forms = list(entry.get("forms", []))  # type: ignore[call-overload]
        for child in entry.get("includes", []):  # type: ignore[attr-defined]
            if child in seen or child not in by_name:
                raise ValueError(
                    f"drugs.toml: {entry['name']!r} includes unknown or cyclic {child!r}"
                )
            i, b, f = members(by_name[child], seen | {child})
            ingredients += [x for x in i if x not in ingredients]
            brands.update(b)
            forms += [x for x in f if x not in forms]
        return ingredients, brands, forms

    out = []
    for e in entries:
        ingredients, brands, forms = members(e, frozenset({e["name"]}))
        out.append(
            DrugClass(
                name=e["name"],
                words=tuple(w.lower() for w in e.get("words", [])),
                atc=tuple(e.get("atc", [])),
                ingredients=tuple(i.lower() for i in ingredients),
                brands={k.lower(): v.lower() for k, v in brands.items()},
                forms=tuple(f.lower() for f in forms),
            )
        )
    return out


@cache
def default_drugs() -> DrugTable:
    """The table shipped in ``retrieval/drugs.toml`` (read once)."""
    text = files("retrieval").joinpath("drugs.toml").read_text(encoding="utf-8")
    return DrugTable(_load(tomllib.loads(text)))
