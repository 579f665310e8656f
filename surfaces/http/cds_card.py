"""What the ``patient-view`` card says, composed from the chart's sections (``ChartSections``: the
same evidence lines the answers cite, entered-in-error and refuted resources never among them).

- ``summary``: the most relevant active problems and abnormal latest results, at most 140
  characters (CDS Hooks 2.0 Card.summary: "one-sentence, <140-character"), composed from whole
  items; an item that does not fit is left out, never cut.
- ``detail``: GitHub-flavoured markdown, one bullet per fact with the resource it comes from
  (``Condition/…``), under headings; record text escaped so it renders as text.
- ``indicator``: ``warning`` when a latest result is flagged critically high or low, else ``info``
  (the card informs; it asks for no action).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from retrieval.cases import ChartSections, line_label
from retrieval.evidence import Evidence

SUMMARY_MAX = 140
DETAIL_ITEMS = 10  # bullets per section; the rest are counted, not listed

# FHIR R4 Vital Signs profile (observation-vitalsigns) codes: the panel and its members. A vital
# sign out of range (a BMI of 27) matters less on a chart summary than an abnormal laboratory
# result, so such results come after the others.
VITAL_SIGNS_LOINC = frozenset(
    f"http://loinc.org|{code}"
    for code in (
        "85353-1", "9279-1", "8867-4", "2708-6", "59408-5", "8310-5", "8302-2", "9843-4",
        "29463-7", "39156-5", "85354-9", "8480-6", "8462-4",
    )
)  # fmt: skip

# SNOMED CT semantic tags of concepts that are not disorders: a "finding" or "situation" (e.g.
# "History of cardiac arrest (situation)") is less relevant than a disorder on a summary
_MINOR_TAGS = ("(finding)", "(situation)", "(observable entity)", "(event)")
_TAG = re.compile(
    r"\s*\((?:disorder|finding|situation|observable entity|event|morphologic abnormality)\)$"
)
# the flag of an evidence line's value: "(high; usual range 18.5–24.9)" → "high"
_FLAG = re.compile(r"\((critically high|critically low|high|low|abnormal)(?:;[^()]*)?\)")
# CommonMark/GFM characters that start markup (links, images, emphasis, code, HTML, tables)
_MARKDOWN = re.compile(r"([\\`*_\[\]()<>!#|~&{}])")


@dataclass
class CardText:
    """A card's composed text: ``summary`` (≤ 140 characters), markdown ``detail``, its
    ``indicator`` and the references ``cited`` in the detail (``Condition/…``), in order."""

    summary: str
    detail: str
    indicator: Literal["info", "warning", "critical"]
    cited: list[str] = field(default_factory=list)


def markdown_text(text: str) -> str:
    """``text`` from the record (a note, a coding's display, a name) as literal markdown: every
    character that starts markup backslash-escaped (CommonMark 2.4), whitespace runs (line breaks
    too) made one space. A record is not the card's author: without this, a display such as
    ``![x](https://host/beacon)`` or ``<img onerror=…>`` would render in the EHR as an image
    fetched from that host, a link or HTML."""
    return _MARKDOWN.sub(r"\\\1", " ".join(text.split()))


def problem_name(item: Evidence) -> str:
    """A problem as a summary names it: its label without status or SNOMED semantic tag
    ("Chronic congestive heart failure (disorder), active" → "Chronic congestive heart
    failure")."""
    return _TAG.sub("", line_label(item).split(", ")[0]).strip()


def result_phrase(item: Evidence) -> str:
    """An abnormal result as a summary names it: the test, value and unit with its flag only
    ("Carbon Dioxide 20.23 mmol/L (low)"); of a panel (blood pressure), only the flagged
    components ("Diastolic Blood Pressure 98.8 mm[Hg] (high)")."""
    text = _FLAG.sub(r"(\1)", line_label(item))
    head, sep, components = text.partition(": ")
    if sep and _FLAG.search(components):
        flagged = [c for c in components.split("; ") if _FLAG.search(c)]
        if flagged:
            return "; ".join(flagged)
    return text if sep == "" or _FLAG.search(components) is None else head


def _minor(item: Evidence) -> bool:
    label = line_label(item).split(", ")[0]
    return label.endswith(_MINOR_TAGS) or label.lower().startswith("history of")


def ranked_problems(sections: ChartSections) -> list[Evidence]:
    """Active problems, most relevant first: disorders before findings and situations (SNOMED CT
    semantic tags; "History of …" counts as a situation), each group newest first; one per
    name."""
    seen: set[str] = set()
    out = []
    for item in sorted(sections.problems, key=_minor):  # stable: newest first within a group
        name = problem_name(item).lower()
        if name not in seen:
            seen.add(name)
            out.append(item)
    return out


def ranked_abnormal(sections: ChartSections) -> list[Evidence]:
    """The latest result of each test that is abnormal, most relevant first: critically high or
    low, then laboratory and other results, then vital signs (``VITAL_SIGNS_LOINC``), each group
    newest first."""
    abnormal = [e for e in sections.latest_results if e.abnormal]

    def rank(item: Evidence) -> int:
        if "(critically " in item.text:
            return 0
        return 2 if VITAL_SIGNS_LOINC.intersection(item.codes) else 1

    return sorted(abnormal, key=rank)


def compose_summary(problems: list[str], results: list[str], limit: int = SUMMARY_MAX) -> str:
    """``"Active: A; B — abnormal: X (low); Y (high)"`` (one sentence) with as many whole items as fit in
    ``limit`` characters, taken alternately from ``problems`` and ``results`` (each most relevant
    first) so that both kinds are shown when one of each fits; an item that does not fit is
    skipped, never cut. With nothing to show, says so; when no single item fits, counts them."""
    if not problems and not results:
        return "No active problems or abnormal latest results in the record."
    chosen_p: list[str] = []
    chosen_r: list[str] = []

    def text(ps: list[str], rs: list[str]) -> str:
        if ps and rs:
            return "Active: " + "; ".join(ps) + " — abnormal: " + "; ".join(rs)
        return "Active: " + "; ".join(ps) if ps else "Abnormal: " + "; ".join(rs)

    order: list[tuple[str, str]] = []
    for i in range(max(len(problems), len(results))):
        order += [("p", p) for p in problems[i : i + 1]] + [("r", r) for r in results[i : i + 1]]
    for kind, item in order:
        ps = [*chosen_p, item] if kind == "p" else chosen_p
        rs = [*chosen_r, item] if kind == "r" else chosen_r
        if len(text(ps, rs)) <= limit:
            chosen_p, chosen_r = ps, rs
    if chosen_p or chosen_r:
        return text(chosen_p, chosen_r)
    return f"{len(problems)} active problems and {len(results)} abnormal results; see details."


def _bullets(items: list[Evidence], title: str, cited: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"**{title}**", ""]
    for item in items[:DETAIL_ITEMS]:
        when = f" ({item.day})" if item.day else ""
        lines.append(f"- {markdown_text(line_label(item))}{when} — `{item.id}`")
        cited.append(item.id)
    if len(items) > DETAIL_ITEMS:
        lines.append(f"- and {len(items) - DETAIL_ITEMS} more in the chart")
    return [*lines, ""]


def compose_card(sections: ChartSections, allergies_read: bool = True) -> CardText:
    """The card's text for a chart (see the module's description). The detail lists active
    problems, abnormal latest results, active medications and active allergies, at most
    ``DETAIL_ITEMS`` bullets each, every bullet ending in the resource it comes from. Allergies
    are never left silent: with none active the detail says so, or, when ``allergies_read`` is
    false (the EHR's prefetch held none and no FHIR server was read), that they were not read."""
    problems = ranked_problems(sections)
    abnormal = ranked_abnormal(sections)
    summary = compose_summary(
        list(dict.fromkeys(problem_name(e) for e in problems)),
        list(dict.fromkeys(result_phrase(e) for e in abnormal)),
    )
    cited: list[str] = []
    lines = (
        _bullets(problems, "Active problems", cited)
        + _bullets(abnormal, "Abnormal latest results", cited)
        + _bullets(sections.medications, "Active medications", cited)
        + _bullets([e for e in sections.allergies if e.active], "Allergies", cited)
    )
    if not any(e.active for e in sections.allergies):
        lines += [
            "**Allergies:** no active allergy recorded."
            if allergies_read
            else "**Allergies:** not read (the EHR sent none with this request).",
            "",
        ]
    detail = "\n".join(lines).strip()
    if not cited and allergies_read:
        detail = (
            "The record holds no active problems, abnormal latest results, active medications "
            "or active allergies."
        )
    critical = any("(critically " in e.text for e in abnormal)
    return CardText(summary, detail, "warning" if critical else "info", cited)
