"""The grounding verifier: every sentence of an answer must rest on evidence that was given.

A sentence is supported when it cites at least one evidence id that was actually given to the model
(``[Observation/abc]``), every number and date it states appears in the evidence it cites, and every
abbreviation it uses (HIV, COPD, HbA1c) and every clinical concept of the term table it names
(diabetes, creatinine) is in that evidence too, by itself or through a word or code of the same
concept (HbA1c ↔ "Hemoglobin A1c"). A number may be a
rounding of the evidence's (6.3 for 6.277); units are compared loosely (the number carries the
check). Unsupported sentences are removed and reported with the reason.

Beside the words, the claim must agree with what it cites (issue 12, ``agent.grounding_claims``):
no denial of a condition the cited line records, no affirmation of one it rules out, no "normal"
for a value flagged high, no "on a statin" from a stopped order or a tool's "No", and a sentence
that only points at its citations asserts nothing. Text is read as a reader sees it: HTML escapes
from chat templates unescaped (``&#39;`` is an apostrophe, not the number 39), "40mg" is
"40 mg", "1,078" is 1078. Numbers and dates the question itself gives, said as its time window
("over the last 3 years", "since 2018-01-01"), are not claims about the record.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.answer import FactUsed, SentenceCheck
from agent.grounding_claims import (
    ASSERTS_NOTHING,
    GENERIC_WORDS,
    asserts_nothing,
    blood_pressure_problems,
    drug_polarity_problems,
    flag_problems,
    polarity_problems,
)
from connectors.resources import is_resource_type
from retrieval.clinical import MONTH_NAMES
from retrieval.drugs import default_drugs, has_word
from retrieval.terms import Term, default_terms

# [Observation/abc] or [Observation/abc, Condition/def] or [Observation/abc; Patient/x]; a similar
# case shown to a caller bound to one patient has no reference, only its rank: [similar-case-1]
_ID = r"(?:[A-Z][A-Za-z]+/[A-Za-z0-9\-.#]+|similar-case-\d+)"
_CITATION = re.compile(rf"\[({_ID}(?:\s*[,;]\s*{_ID})*)\]")
_REF = re.compile(_ID)
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})(?:-(\d{2}))?\b")
_TEXT_DATE = re.compile(
    r"\b(?:(\d{1,2})\s+)?("
    + "|".join(m[:3] for m in MONTH_NAMES)
    + r")[a-z]*\.?\s+(?:(\d{1,2}),?\s+)?(\d{4})\b",
    re.IGNORECASE,
)
# a number, also glued to its unit ("40mg"), with thousands separators ("1,078") or a decimal
# comma ("6,3"); not inside a word ("HbA1c", "T2DM") nor an ordinal ("3rd")
_NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:[.,]\d+)?(?!\d|st\b|nd\b|rd\b|th\b)"
)
# a time window said with the question's own numbers: "over the last 3 years", "past 6 months"
# (not an age or a time ago: "3 years old", "2 years ago")
_WINDOW_NUMBER = re.compile(
    r"\b(?:(?:last|past|previous|prior|preceding|recent)\s+(\d+)|(\d+)\s+(?:days?|weeks?|"
    r"months?|years?)\b(?!\s+(?:ago|old|of age)))",
    re.IGNORECASE,
)
# the word before a date that makes it a window's bound: "since 2018-01-01", "between ... and ..."
_WINDOW_WORD = re.compile(
    r"\b(?:since|after|before|from|until|till|through|between|to|and|as of|prior to)\s*$",
    re.IGNORECASE,
)
# an abbreviation: two or more capitals, digits allowed (HIV, COPD, HbA1c, eGFR, CT)
_ABBREVIATION = re.compile(r"\b(?=(?:[a-z0-9]*[A-Z]){2})[A-Za-z][A-Za-z0-9]{1,7}\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\[(\"'])|\n+")


# the resource types of a term-table category row ("allergy", "medication"): a sentence naming the
# category ("a diagnosis of", "taking") rests on a cited resource of that type
_CATEGORY_TYPES = {
    "allergy": ("AllergyIntolerance",),
    "medication": (
        "MedicationRequest",
        "MedicationStatement",
        "MedicationAdministration",
        "MedicationDispense",
    ),
    "immunization": ("Immunization",),
    "condition": ("Condition",),
    "procedure": ("Procedure",),
    "imaging": ("ImagingStudy", "DiagnosticReport", "Media"),
    "image": ("ImagingStudy", "Media"),
}


def supported_fraction(checks: Sequence[SentenceCheck]) -> float:
    """Supported sentences / sentences that assert something (a sentence that only points at its
    citations is neither for nor against the answer); 0.0 when none asserts anything. The one
    measure ``Verification`` and ``agent.nodes.finalize`` report, on every path."""
    claims = [c for c in checks if c.problems != (ASSERTS_NOTHING,)]
    return len([c for c in claims if c.supported]) / len(claims) if claims else 0.0


def read_as_text(text: str) -> str:
    """``text`` as a reader sees it: HTML character references a chat template left in
    (``&#39;``, ``&amp;``, ``&quot;``) unescaped, typographic apostrophes made plain."""
    return html.unescape(text).replace("\u2019", "'").replace("\u2018", "'")


@dataclass
class Verification:
    """The verdict on a whole answer."""

    sentences: list[SentenceCheck] = field(default_factory=list)

    @property
    def kept(self) -> list[SentenceCheck]:
        """The supported sentences, in order."""
        return [s for s in self.sentences if s.supported]

    @property
    def rejected(self) -> list[SentenceCheck]:
        """The unsupported sentences, each with its problems."""
        return [s for s in self.sentences if not s.supported]

    @property
    def supported_fraction(self) -> float:
        """Supported sentences / sentences that assert something (``supported_fraction``); 0.0
        for an empty answer or one that asserts nothing."""
        return supported_fraction(self.sentences)

    @property
    def text(self) -> str:
        """The answer with the unsupported sentences removed."""
        return " ".join(s.text for s in self.kept)

    @property
    def cited(self) -> list[str]:
        """Evidence ids the kept sentences cite, in order of first use."""
        return list(dict.fromkeys(c for s in self.kept for c in s.citations))


_QUOTED = re.compile(r"\u201c[^\u201c\u201d\n]*\u201d")  # a “quotation” within one line
_KEPT_SPACE = "\ue000"  # (Unicode private use) a space within a quotation while splitting


def split_sentences(text: str) -> list[str]:
    """Sentences (and list items) of an answer; decimals, citations and quotations stay whole:
    a note quoted as “Patient feels well. Ankle swelling resolved.” [DocumentReference/x] is
    one sentence resting on its citation (split, its first sentences cited nothing and were
    removed, leaving the quote's tail). Citations written after the full stop belong to the
    sentence before it, and so does a full stop written after them ("… 83 years. [Patient/p].
    The …": a small model's habit, seen with Qwen2.5-Coder-1.5B): punctuation alone is no
    sentence."""
    text = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s+", "", text, flags=re.MULTILINE)  # list markers
    kept = _KEPT_SPACE not in text  # (a text holding the marker itself is split as it is)
    if kept:
        text = _QUOTED.sub(lambda m: re.sub(r"[ \t]", _KEPT_SPACE, m.group(0)), text)
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip())]
    if kept:
        parts = [p.replace(_KEPT_SPACE, " ") for p in parts]
    # citations written after the full stop belong to the sentence before it
    out: list[str] = []
    for part in parts:
        lead = re.match(r"^((?:" + _CITATION.pattern + r"\s*)+)(.*)$", part, re.DOTALL)
        if out and lead and citations(lead.group(1)):
            out[-1] = f"{out[-1]} {lead.group(1).strip()}"
            part = part[len(lead.group(1)) :].strip()
        if out and part and not re.search(r"\w", part):
            continue
        if part:
            out.append(part)
    return out


def citations(sentence: str) -> tuple[str, ...]:
    """Evidence ids cited in a sentence."""
    refs: list[str] = []
    for group in _CITATION.findall(sentence):
        if _is_citation(group):
            refs.extend(_REF.findall(group))
    return tuple(dict.fromkeys(refs))


def _is_citation(group: str) -> bool:
    """Whether bracketed text cites resources: "[Observation/abc]" does, a unit such as
    "[Mass/volume]" in a LOINC name does not."""
    return all(
        ref.startswith("similar-case-") or is_resource_type(ref.split("/", 1)[0])
        for ref in _REF.findall(group)
    )


def _strip_citations(text: str) -> str:
    return _CITATION.sub(lambda m: " " if _is_citation(m.group(1)) else m.group(0), text)


def uncited(text: str) -> str:
    """The text without its citations (for a display that lists them apart)."""
    return re.sub(r"\s+([.,;:])", r"\1", " ".join(_strip_citations(text).split()))


def _dates(text: str) -> tuple[set[str], str]:
    """ISO days/months/years stated in a text, and the text with them blanked out."""
    found: set[str] = set()

    def iso(m: re.Match[str]) -> str:
        year, month, day = m.group(1), m.group(2), m.group(3)
        found.add(f"{year}-{month}-{day}" if day else f"{year}-{month}")
        return " "

    def textual(m: re.Match[str]) -> str:
        day = m.group(1) or m.group(3)
        month = next(
            i for i, name in enumerate(MONTH_NAMES, 1) if name.startswith(m.group(2).lower())
        )
        year = m.group(4)
        found.add(f"{year}-{month:02d}-{int(day):02d}" if day else f"{year}-{month:02d}")
        return " "

    text = _ISO_DATE.sub(iso, text)
    text = _TEXT_DATE.sub(textual, text)
    return found, text


def _numbers(text: str) -> list[str]:
    """The numbers of a text as decimal strings: "1,078" → "1078", "6,3" → "6.3", "40mg" → "40"."""
    out = []
    for n in _NUMBER.findall(text):
        out.append(n.replace(",", "") if re.search(r",\d{3}(?!\d)", n) else n.replace(",", "."))
    return out


def _question_window(text: str, question: str) -> str:
    """``text`` without the numbers and dates of the question's time window that it repeats:
    "the last 3 years" when the question says 3, "since 2018-01-01" when it gives that date. A
    number or date of the question said otherwise ("was 3 %", "on 2018-01-01") stays."""
    if not question:
        return text
    asked_dates, rest = _dates(read_as_text(question))
    asked = set(_numbers(rest))

    def date(m: re.Match[str]) -> str:
        found, _ = _dates(m.group(0))
        window = _WINDOW_WORD.search(text[: m.start()])
        return " " if found and found <= asked_dates and window else m.group(0)

    for pattern in (_ISO_DATE, _TEXT_DATE):
        text = pattern.sub(date, text)

    def number(m: re.Match[str]) -> str:
        said = m.group(1) or m.group(2)
        return m.group(0).replace(said, " ") if said in asked else m.group(0)

    return _WINDOW_NUMBER.sub(number, text)


def _number_supported(stated: str, given: list[str]) -> bool:
    """Whether a stated number equals, or is a rounding of, one in the evidence."""
    decimals = len(stated.split(".")[1]) if "." in stated else 0
    value = float(stated)
    for candidate in given:
        c = float(candidate)
        if c == value or round(c, decimals) == value or abs(c - value) < 10 ** (-decimals) / 2:
            return True
    return False


def _date_supported(stated: str, evidence_dates: set[str]) -> bool:
    return any(d.startswith(stated) or stated.startswith(d) for d in evidence_dates)


def check_sentence(sentence: str, evidence: Mapping[str, str], question: str = "") -> SentenceCheck:
    """Whether one sentence rests on the evidence it cites (``evidence``: id → its text, pieces
    "\n"-joined); ``question``, when given, lends the numbers and dates of its time window.
    Problems are reported in words ("the number 8.1 is not in the cited evidence", "asserts
    nothing", "the cited evidence records 'stroke'; the sentence denies it")."""
    sentence = read_as_text(sentence)
    cited = citations(sentence)
    problems: list[str] = []
    unknown = [c for c in cited if c not in evidence]
    if unknown:
        problems.append(
            f"cites {', '.join(unknown)}, which {'was' if len(unknown) == 1 else 'were'} not given"
        )
    known = [c for c in cited if c in evidence]
    lead_in = _strip_citations(sentence).strip()
    if lead_in.endswith(":") and not re.search(r"\d", lead_in):
        # a list's lead-in ("The patient's latest labs are:", Qwen2.5-Coder-1.5B): the items
        # after it make the claims, each with its citation
        return SentenceCheck(
            text=sentence, citations=cited, supported=False, problems=(ASSERTS_NOTHING,)
        )
    if not known:
        if not cited:
            problems.append("cites no evidence")
        return SentenceCheck(
            text=sentence, citations=cited, supported=False, problems=tuple(problems)
        )
    # each distinct piece once: a fact citing a thousand results is under each of their ids, and
    # joining it a thousand times made one mean over 1,078 glucose results take 7 s and 550 MB
    pieces = list(dict.fromkeys(p for c in known for p in evidence[c].split("\n")))
    support = " ".join(pieces)
    support_dates, support_rest = _dates(support)
    support_numbers = _numbers(support_rest)
    body = _strip_citations(sentence)
    if asserts_nothing(body):
        return SentenceCheck(
            text=sentence, citations=cited, supported=False, problems=(ASSERTS_NOTHING,)
        )
    stated_dates, rest = _dates(_question_window(body, question))
    for d in sorted(stated_dates):
        if not _date_supported(d, support_dates):
            problems.append(f"the date {d} is not in the cited evidence")
    years = {d[:4] for d in support_dates}
    for number in _numbers(rest):
        if len(number) == 4 and number.isdigit() and number in years:
            continue  # a year of a cited date ("in 2019")
        if not _number_supported(number, support_numbers):
            problems.append(f"the number {number} is not in the cited evidence")
    for term in _abbreviations(rest):
        if not _term_supported(term, support):
            problems.append(f"{term} is not in the cited evidence")
    for concept in default_terms().matches(rest):
        named = next(w for w in concept.words if re.search(rf"\b{re.escape(w)}\b", rest.lower()))
        if named in GENERIC_WORDS or _category_cited(concept, known):
            continue  # "history", "patient"; "a diagnosis of" citing a Condition
        said_once = named.upper() in {t.upper() for t in _abbreviations(rest)}
        if not _concept_supported(concept, support) and not said_once:
            problems.append(f"{named!r} is not in the cited evidence")
    problems += _drug_problems(rest, support)
    problems += polarity_problems(body, pieces)
    problems += drug_polarity_problems(body, pieces)
    problems += flag_problems(body, pieces)
    problems += blood_pressure_problems(body, pieces)
    return SentenceCheck(
        text=sentence, citations=cited, supported=not problems, problems=tuple(problems)
    )


def _drug_problems(claim: str, support: str) -> list[str]:
    """A drug or drug class the sentence names ("on a statin", "atorvastatin") must be in what it
    cites: a member ingredient or brand of it (``retrieval.drugs``), or its own word (a tool's
    "none ... is a statin" supports "he is not on a statin")."""
    drugs = default_drugs()
    low = support.lower()
    problems = []
    for word in drugs.named_in(claim):
        found = drugs.get(word)
        if found is None or found.members_in(support):
            continue
        if has_word(low, word):
            continue
        problems.append(f"{word!r} is not in the cited evidence")
    return problems


def _category_cited(concept: Term, cited: Sequence[str]) -> bool:
    """Whether ``concept`` is a category row of the term table (no codes: "diagnosis",
    "medications", "allergies") and a cited id is a resource of its type."""
    if concept.codes or not concept.categories:
        return False
    types = {t for c in concept.categories for t in _CATEGORY_TYPES.get(c, ())}
    return any(ref.split("/", 1)[0] in types for ref in cited)


def _abbreviations(text: str) -> list[str]:
    return list(dict.fromkeys(_ABBREVIATION.findall(text)))


def _term_supported(term: str, support: str) -> bool:
    """Whether an abbreviation, or a word or code of its concept, occurs in the cited evidence."""
    if re.search(rf"\b{re.escape(term.lower())}\b", support.lower()):
        return True
    return any(_concept_supported(c, support) for c in default_terms().matches(term))


def _concept_supported(concept: Term, support: str) -> bool:
    """Whether one of the concept's words occurs in the cited evidence. (Not its codes: the table
    links related concepts through codes for ranking, e.g. diabetes to the HbA1c test, and a
    sentence about diabetes must not rest on an HbA1c result.)"""
    low = support.lower()
    return any(re.search(rf"\b{re.escape(w)}\b", low) for w in concept.words)


def verify(
    answer: str, evidence: Mapping[str, str], trusted: Iterable[str] = (), question: str = ""
) -> Verification:
    """Check every sentence of ``answer`` (read as text: ``read_as_text``) against ``evidence``
    (id → the text given for it). A sentence that is, word for word, one of the ``trusted``
    statements (the facts the tools computed from the record), or one sentence of one, stands as
    it is. ``question``: the question asked, whose time window a sentence may repeat."""
    verbatim = {_normal(s) for t in trusted for s in split_sentences(t)}
    checks = []
    for sentence in split_sentences(read_as_text(answer)):
        check = check_sentence(sentence, evidence, question)
        if not check.supported and _normal(sentence) in verbatim and check.citations:
            known = all(c in evidence for c in check.citations)
            if known:
                check = SentenceCheck(text=sentence, citations=check.citations, supported=True)
        checks.append(check)
    return Verification(checks)


def _normal(text: str) -> str:
    return " ".join(text.split()).rstrip(".")


def evidence_map(items: Mapping[str, str], facts: Sequence[FactUsed]) -> dict[str, str]:
    """Evidence text by id: the evidence lines, plus each fact's statement under every id it cites
    (a computed age or mean is then supported by the Patient or Observations it rests on). What a
    fact only echoes from its call (``FactUsed.echo``: a time window, a date asked about) is left
    out, so that a model cannot make a date "evidence" by asking a tool about it. A text holds its
    line and each statement as separate lines ("\n"-joined), so a reader can take each piece once."""
    out = dict(items)
    for fact in facts:
        statement = fact.statement
        for echoed in fact.echo:
            statement = statement.replace(echoed, " ")
        for (
            ref
        ) in fact.evidence:  # pieces on lines of their own (``check_sentence`` reads each once)
            out[ref] = "\n".join(p for p in (out.get(ref, ""), statement.strip()) if p)
    return out
