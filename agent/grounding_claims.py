"""What a sentence claims, beside its numbers, against the evidence pieces it cites (issue 12).

``agent.grounding`` checks that a sentence's numbers, dates and words are in the evidence it
cites; the rules here check that the claim itself agrees with that evidence:

- *asserts nothing*: a sentence whose words are only about the citations ("See the cited
  records") is no answer (``asserts_nothing``);
- *polarity*: a denial ("did not have a stroke", "no history of", "denies", "ruled out") must not
  cite evidence recording the concept, and an affirmation must not cite only evidence that rules
  it out, voids it or records its absence (``polarity_problems``); drugs and drug classes
  likewise, by the medication lines' status (``drug_polarity_problems``);
- *flags*: "normal" must not cite a value flagged high, low or abnormal, and "high", "low",
  "abnormal" must not cite a value within its range (``flag_problems``).

Each evidence piece is one line as ``retrieval.evidence`` compacts a resource ("Condition: Stroke,
active", "ruled out (verification status refuted)", "Medication: ..., stopped",
"4.2 mmol/L (high; ref 3.5–5.1)") or one tool statement ("No: ...", "Yes: ...", "In the past:",
"Not active now:", "No HbA1c result in the record"). The concept a clause names comes from the term
table (``retrieval/terms.toml``), else from the words of a cited condition's or allergy's name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from retrieval.drugs import DrugClass, default_drugs, has_word
from retrieval.terms import Term, default_terms

ASSERTS_NOTHING = "asserts nothing"

# words that only point at the citations (the sources of the answer, not a claim about the patient)
_POINTER_WORDS = frozenset(
    {"a", "an", "the", "this", "that", "these", "those", "it", "its", "is", "are", "was", "were",
     "be", "been", "here", "there", "see", "also", "cited", "cite", "cites", "citing", "citation",
     "citations", "record", "records", "evidence", "supporting", "supports", "support",
     "supported", "answer", "source", "sources", "reference", "references", "referenced",
     "following", "below", "above", "listed", "list", "for", "more", "further", "detail",
     "details", "information", "info", "in", "of", "to", "as", "and", "based", "on", "from",
     "chart", "charts", "documentation", "entries", "entry", "please", "refer", "shown", "given",
     "relevant", "data", "note", "notes", "with", "by", "per", "according", "which", "our", "my",
     "closest", "nearest", "related", "most"}
)  # fmt: skip
# ("closest": the system prompt's rule 4 asks to cite the closest evidence when the record does not
# answer; Qwen2.5-Coder-1.5B then wrote "The closest evidence is from the record [Observation/…]",
# which was kept as a supported claim and stood as the whole answer)
# generic words of the term table's category rows that name no clinical concept of their own
GENERIC_WORDS = frozenset({"history", "record", "records", "chart", "patient", "problem"})

_CLAUSE = re.compile(r"[;,:]|\s(?:but|whereas|while|although|however|except)\s", re.IGNORECASE)
# a denial before the concept: "no", "not", "never", "denies", "without", "n't", "none of"
_NEG_BEFORE = re.compile(
    r"(?<![a-z])(?:no|not|never|none|without|denies|denied|deny|lacks?|free of|absence of|"
    r"negative for)(?![a-z])|n't(?![a-z])",
    re.IGNORECASE,
)
# a denial after the concept: "stroke was ruled out", "is absent", "was excluded"
_NEG_AFTER = re.compile(
    r"^\W*(?:\w+\W+){0,3}?(?:(?:(not)\s+)?(?:ruled out|excluded|refuted|absent|negative)|"
    r"(?:not|never)\s+(?:been\s+)?(?:recorded|documented|present|found|noted|seen|diagnosed))\b",
    re.IGNORECASE,
)
# words between a denial and the concept that make it about the status, not the existence
_STATUS_WORDS = frozenset({"active", "current", "currently", "now", "longer", "ongoing"})
_BLOCKING_WORDS = frozenset(
    {"high", "low", "elevated", "normal", "abnormal", "raised", "controlled", "only", "recent",
     "recently", "well", "worse", "better", "above", "below", "within"}
)  # fmt: skip
_ANY_DENIAL = re.compile(
    _NEG_BEFORE.pattern + r"|\b(?:ruled out|excluded|refuted|absent|negative)\b", re.IGNORECASE
)
_PRESENT_DRUG = re.compile(
    r"(?:\b(?:is|are|remains|stays)|'s)\s+(?:\w+\s+)?on\b|\btakes\b|\b(?:is|'s) taking\b|"
    r"\bcurrently\b",
    re.IGNORECASE,
)
_PAST_DRUG = re.compile(
    r"\b(?:was|were|had been|used to|previously|formerly|no longer|stopped|discontinued|until|"
    r"before|in the past|took)\b",
    re.IGNORECASE,
)


def asserts_nothing(body: str) -> bool:
    """Whether a sentence (citations removed) says nothing of the patient: every word of it points
    at the sources ("The evidence supporting this answer is:", "See the cited records"), and it
    states no number. "Yes" and "No" assert (they answer the question)."""
    words = re.findall(r"[a-z]+|\d", body.lower())
    return all(w in _POINTER_WORDS for w in words)


# ---------------------------------------------------------------------------- evidence stances
# What one evidence piece says of a concept it names:
#   "active", "past", "recorded" (the record holds it), "refuted", "absent", "void" (it does not)
_AFFIRMING = ("active", "past", "recorded")


def _line_body(piece: str) -> str:
    """A line without its leading date and trailing citation."""
    body = re.sub(r"\s*\[[A-Z][A-Za-z]+/[^\]]+\]\s*$", "", piece.strip())
    return re.sub(r"^\d{4}(?:-\d{2}){0,2}(?:T[\d:.+\-Z]+)?\s+", "", body)


def _stance(piece: str, spans: Sequence[tuple[int, int]] = ()) -> str:
    """What ``piece`` records of the concept it names (at ``spans`` in it, when known)."""
    body = _line_body(piece)
    low = body.lower()
    if "ruled out" in low or "refuted" in low or "not allergic" in low:
        return "refuted"
    if re.search(r"\(entered[- ]in[- ]error\)|,\s*entered[- ]in[- ]error\b", low):
        return "void"  # a condition's verification, a medication's status
    if re.match(r"(?:no\b|there is no\b|the record has no\b)", low) or ": no result" in low:
        return "absent"
    if low.startswith(("in the past:", "not active now:")):
        return "past"
    if low.startswith("yes:"):
        return "active"
    structured = re.match(r"(?:condition|allergy|medication(?: given| dispensed)?):", low)
    if structured:
        # the status words of ``retrieval.clinical.read_status`` (FHIR R4 value sets)
        status = re.search(
            r",\s*(active|recurrence|relapse|on hold|intended|in progress|inactive|remission|"
            r"resolved|stopped|completed|cancelled|ended|not taken|not done)\b",
            low,
        )
        if status is None:
            return "recorded"
        current = ("active", "recurrence", "relapse", "on hold", "intended", "in progress")
        return "active" if status.group(1) in current else "past"
    if any(_denied_at(piece, span) for span in spans):
        return "absent"  # a note's own "no signs of stroke"
    return "recorded"


def _denied_at(text: str, span: tuple[int, int]) -> str:
    """How the clause around ``span`` of ``text`` treats the concept there: "denied" (no, not,
    never, denies ... before it, within six words; ruled out, absent ... after it), "status" (a
    denial of its activity: "no longer", "not currently"), or "" (affirmed)."""
    start = max((m.end() for m in _CLAUSE.finditer(text, 0, span[0])), default=0)
    ahead = _CLAUSE.search(text, span[1])
    end = ahead.start() if ahead else len(text)
    before = text[start : span[0]]
    cues = list(_NEG_BEFORE.finditer(before))
    if cues:
        between = re.findall(r"[a-z]+", before[cues[-1].end() :].lower())
        if len(between) <= 6 and not _BLOCKING_WORDS & set(between):
            return "status" if _STATUS_WORDS & set(between) else "denied"
    after = _NEG_AFTER.match(text[span[1] : end])
    if after and not after.group(1):
        return "denied"
    return ""


# ---------------------------------------------------------------------------- conditions, terms
def _spans(text: str, words: Sequence[str]) -> list[tuple[int, int]]:
    low = text.lower()
    return [
        (m.start(), m.end())
        for w in words
        for m in re.finditer(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])", low)
    ]


def _name_words(piece: str) -> set[str]:
    """The content words of a condition's or allergy's name in its line ("Fracture of hip")."""
    m = re.match(r"(?:condition|allergy):\s*([^,(;]+)", _line_body(piece), re.IGNORECASE)
    if m is None:
        return set()
    return {w for w in re.findall(r"[a-z]+", m.group(1).lower()) if len(w) > 2} - {"of", "the"}


def polarity_problems(claim: str, pieces: Sequence[str]) -> list[str]:
    """Problems of a sentence (``claim``, citations removed) whose denials or affirmations of a
    clinical concept disagree with the cited evidence ``pieces``:

    - a concept denied ("did not have", "no history of", "denies", "ruled out", "absent") where a
      cited piece records it (any clinical status but refuted or entered-in-error);
    - a concept said to be no longer there ("no longer has") where a cited piece records it active;
    - a concept affirmed, in a sentence with no denial at all, where every cited piece naming it
      rules it out, voids it (entered-in-error) or states its absence.

    A concept is a term-table row named in the clause (its category-only rows and ``GENERIC_WORDS``
    aside), or a cited condition's or allergy's name whose words the clause all uses."""
    problems: list[str] = []
    concepts: list[tuple[str, tuple[str, ...], tuple[int, int]]] = []
    low = claim.lower()
    for term in default_terms().matches(claim):
        if term.categories and not term.codes and "allergy" not in term.categories:
            continue  # "no other medications", "no procedures": a listing, not one concept
        if term.observed:
            continue  # a status charted as an Observation ("former smoker"), not an existence
        words = tuple(w for w in term.words if w not in GENERIC_WORDS)
        for span in _spans(claim, words):
            concepts.append((low[span[0] : span[1]], words, span))
    for piece in pieces:
        name = _name_words(piece)
        if name and all(re.search(rf"\b{w}", low) for w in name):
            first = min(low.index(w) for w in name)
            concepts.append((" ".join(sorted(name)), tuple(name), (first, first + 1)))
    any_denial = _ANY_DENIAL.search(claim) is not None
    done: set[str] = set()
    for named, words, span in concepts:
        how = _denied_at(claim, span)
        stances = []
        for piece in pieces:
            found = _spans(piece, words)
            if found or (set(words) <= _name_words(piece) and words):
                stances.append(_stance(piece, found))
        if not stances or named in done:
            continue
        backed = "absent" in stances or "refuted" in stances  # a tool's absence, a refutation
        if how == "denied" and not backed and any(s in _AFFIRMING for s in stances):
            problems.append(f"the cited evidence records {named!r}; the sentence denies it")
        elif how == "status" and "active" in stances:
            problems.append(f"the cited evidence records {named!r} as active")
        elif not how and not any_denial and all(s not in _AFFIRMING for s in stances):
            what = {"refuted": "ruled out", "void": "entered in error", "absent": "absent"}
            said = sorted({what[s] for s in stances})
            problems.append(f"the cited evidence records {named!r} as {' and '.join(said)}")
        done.add(named)
    return problems


# ---------------------------------------------------------------------------- drugs
def drug_polarity_problems(claim: str, pieces: Sequence[str]) -> list[str]:
    """Problems of a sentence's drug claims against the cited pieces, by the status of the lines
    naming a member (``retrieval.drugs``; a brand is its ingredient):

    - "not on X" / "no X" where a cited line holds an active member;
    - "is on X" / "takes X" / "Yes, ... X" (present, no denial) where every cited line naming X is
      not active (stopped, completed), entered in error, or a tool's "No: none of ... is X".

    A past claim ("was on warfarin until 2015", "no longer on") is not held to the present."""
    drugs = default_drugs()
    problems: list[str] = []
    any_denial = _ANY_DENIAL.search(claim) is not None
    for word in drugs.named_in(claim):
        found: DrugClass | None = drugs.get(word)
        if found is None:
            continue
        span = _spans(claim, (word,))[0]
        how = _denied_at(claim, span)
        stances = [
            _stance(p)
            for p in pieces
            if found.members_in(p) or has_word(p.lower(), word) or has_word(p.lower(), found.name)
        ]
        if not stances:
            continue
        if how == "denied" and "active" in stances:
            problems.append(
                f"the cited evidence records {word!r} as active; the sentence denies it"
            )
        elif how == "status" and "active" in stances:
            problems.append(f"the cited evidence records {word!r} as active")
        elif not how and not any_denial and "active" not in stances:
            present = _PRESENT_DRUG.search(claim) or re.match(r"\s*yes\b", claim, re.IGNORECASE)
            if present and not _PAST_DRUG.search(claim):
                problems.append(f"the cited evidence does not record {word!r} as active")
    return problems


# ---------------------------------------------------------------------------- flags
_CLAIM_FLAGS: tuple[tuple[str, frozenset[str]], ...] = (
    # the words a sentence uses → the cited flags that agree with them
    (r"within (?:the )?(?:normal |usual |reference )?range|in range|unremarkable|normal",
     frozenset({"normal"})),
    (r"out of range|outside (?:the )?(?:normal |usual |reference )?range|abnormal",
     frozenset({"high", "low", "abnormal"})),
    (r"above (?:the )?(?:normal |usual |reference )?range|elevated|raised|high",
     frozenset({"high", "abnormal"})),
    (r"below (?:the )?(?:normal |usual |reference )?range|decreased|low",
     frozenset({"low", "abnormal"})),
)  # fmt: skip
_ALL_FLAGS = frozenset({"normal", "high", "low", "abnormal"})
# "high" and "low" inside a name or a dose, not a judgement of a value
_NOT_A_FLAG = re.compile(
    r"\s+(?:density|dose|dosage|sensitivity|sensitive|blood pressure|intensity|flow|molecular|"
    r"potency|risk|salt|sodium diet|fat)\b|-",
    re.IGNORECASE,
)
_VALUE = re.compile(
    r"(?P<label>[^;:()]*?)(?<![^\s])(?P<num>[<>]?-?\d[\d,]*(?:\.\d+)?)\s*(?P<unit>[^\s(;]*)"
    r"(?:\s*\((?P<flag>critically high|critically low|high|low|abnormal)?;?\s*"
    r"(?P<range>(?:ref|usual range)\s[^)]*)?\))?"
)


def _claimed_flags(clause: str) -> frozenset[str] | None:
    """The cited flags a clause's judgement agrees with, or None when it judges nothing; the
    longest wording counts ("above the normal range" is not "normal"), and a judgement denied
    ("not high", "not normal") agrees with the other flags."""
    low = clause.lower()
    said: list[tuple[int, int, frozenset[str]]] = []
    for pattern, agrees in _CLAIM_FLAGS:
        for m in re.finditer(rf"(?<![a-z\-])(?:{pattern})(?![a-z])", low):
            if not _NOT_A_FLAG.match(low, m.end()):
                said.append((m.start(), -m.end(), agrees))
    if not said:
        return None
    start, _, agrees = min(said, key=lambda x: (x[0], x[1]))
    denied = re.search(r"\b(?:not|never|no longer|n't)\s+(?:\w+\s+)?$", low[:start])
    return _ALL_FLAGS - agrees if denied else agrees


def _piece_flags(piece: str, words: Sequence[str]) -> list[str]:
    """The flags of the values in ``piece`` whose label names one of ``words`` (all its values
    when ``words`` is empty or names none): "high", "low", "abnormal" as the line's parentheses
    say, "normal" for a value shown with its range and no flag, or without a flag where the term
    table gives the line's LOINC code a usual range in the value's unit (``retrieval.evidence.
    flags`` shows a usual range only when the value is outside it)."""
    body = _line_body(piece)
    if re.match(r"(?:condition|allergy|medication|procedure|encounter)", body, re.IGNORECASE):
        return []
    usual = None
    loinc = re.search(r"\(LOINC ([\d-]+)\)", body)
    if loinc is not None:
        usual = default_terms().usual_range(f"http://loinc.org|{loinc.group(1)}")
    found: list[tuple[str, str | None]] = []
    for m in _VALUE.finditer(re.sub(r"\(LOINC [\d-]+\)|\[[^\]]*\]", " ", body)):
        label, flag = (m.group("label") or "").lower(), None
        if m.group("flag"):
            flag = m.group("flag").split()[-1]
        elif m.group("range"):
            flag = "normal"
        elif usual is not None and usual[2] and m.group("unit").lower() == usual[2].lower():
            flag = "normal"  # unflagged in the table's unit: within its usual range
        found.append((label, flag))
    # the values the sentence names by their labels ("systolic"), else all of them
    named = [(label, f) for label, f in found if any(w in label for w in words)] or found
    return [f for _, f in named if f is not None]


def flag_problems(claim: str, pieces: Sequence[str]) -> list[str]:
    """Problems of a sentence judging a value ("normal", "within range", "unremarkable" /
    "high", "elevated", "low", "abnormal", "out of range"; "not ..." turns it) against the flags
    of the cited values: "normal" needs every cited value of the concept named to be unflagged,
    an abnormal word needs one whose flag agrees. Values the pieces show no judgement of are not
    counted."""
    problems: list[str] = []
    start = 0
    for end in [m.start() for m in _CLAUSE.finditer(claim)] + [len(claim)]:
        clause, start = claim[start:end], end
        agrees = _claimed_flags(clause)
        if agrees is None:
            continue
        words = [w for t in default_terms().matches(clause) for w in _concept_words(t, clause)]
        flags = {f for p in pieces for f in _piece_flags(p, words)}
        if not flags:
            continue
        if agrees == frozenset({"normal"}) and flags - agrees:
            problems.append(f"the cited evidence flags the value {sorted(flags - agrees)[0]}")
        elif agrees != frozenset({"normal"}) and not flags & agrees:
            problems.append(f"the cited evidence flags the value {sorted(flags)[0]}")
    return problems


def _concept_words(term: Term, claim: str) -> list[str]:
    """The words of ``term`` that ``claim`` uses (a label names the concept by them)."""
    return [w for w in term.words if _spans(claim, (w,))] or list(term.words)


# ------------------------------------------------------------------ blood pressure components
# a blood pressure panel's component in an evidence line (LOINC 55284-4's 8462-4 and 8480-6):
# "Diastolic Blood Pressure 85.46 mm[Hg] (high; …); Systolic Blood Pressure 102.4 mm[Hg]"
_BP_COMPONENT = re.compile(r"\b(systolic|diastolic) blood pressure (\d+(?:\.\d+)?)", re.IGNORECASE)
_ISO_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}(?:T[\d:.+\-Z]+)?")


def blood_pressure_problems(claim: str, pieces: Sequence[str]) -> list[str]:
    """A sentence that gives one value of a cited blood pressure panel as the reading, without
    naming which ("The latest blood pressure is 85.46 mm[Hg]", "The one before was 81.89 mm[Hg]"
    resting on "Diastolic Blood Pressure 85.46 mm[Hg]; Systolic Blood Pressure 102.4 mm[Hg]":
    Qwen2.5-Coder-1.5B on the demo suite), passes every number check yet misstates the reading.
    ``claim``: the sentence without its citations; ``pieces``: the cited evidence lines. Returns
    one problem per such reading, in words; none when the sentence names the component
    ("diastolic …") or states both values ("102.4/85.46")."""
    if re.search(r"systolic|diastolic", claim, re.IGNORECASE):
        return []
    stated = set(re.findall(r"\d+(?:\.\d+)?", _ISO_DATE.sub(" ", claim)))
    problems: list[str] = []
    for piece in pieces:
        values = {kind.lower(): value for kind, value in _BP_COMPONENT.findall(piece)}
        if len(values) != 2:
            continue
        given = [kind for kind, value in values.items() if value in stated]
        if len(given) == 1:
            other = "systolic" if given[0] == "diastolic" else "diastolic"
            problem = (
                f"gives the {given[0]} value {values[given[0]]} mm[Hg] as the blood pressure; "
                f"the cited reading's {other} value is {values[other]} mm[Hg]"
            )
            if problem not in problems:  # the line and a fact may both hold the reading
                problems.append(problem)
    return problems
