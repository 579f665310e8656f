"""Whether the patient is on a drug or a drug class ("is he on a beta blocker?", "any blood
thinners?", "is she taking Lasix?"), answered yes or no first, from the medication lines that name
a member (``retrieval.drugs``: membership by ingredient, with the table's sources and limits)."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from agent.tools.base import (
    Args,
    Fact,
    ToolContext,
    ToolError,
    _ago,
    _by_category,
    _cite,
    _item_facts,
    tool,
)
from retrieval.drugs import DrugClass, default_drugs
from retrieval.evidence import Evidence

MAX_SEARCHED_SHOWN = 8  # member ingredients named in a "no" (the rest counted)


class MedicationUseArgs(Args):
    """``query``: a drug class ("statin", "beta blocker", "anticoagulant", "ACE inhibitor", ...)
    or a drug ("warfarin", "Lasix")."""

    query: str = Field(
        description="A drug class ('statin', 'beta blocker', 'anticoagulant', 'diuretic', "
        "'opioid', 'antibiotic', ...) or a drug's ingredient or brand name ('warfarin', 'Lasix')."
    )


def _article(label: str) -> str:
    """ "a statin", "an ACE inhibitor", "an NSAID"; no article for a drug's own name."""
    return "an " if label[:1].lower() in "aeiou" or label.startswith(("NSAID", "MRA")) else "a "


def _drug_text(item: Evidence) -> str:
    """What a medication line says the drug is: its text before the dosage, reasons and citation
    (a reason "patient refused warfarin" is not the drug)."""
    return item.text.rsplit(" [", 1)[0].split(";")[0]


@tool(
    "medication_use",
    "Whether the patient is on a drug class or a drug (yes or no first): the active medications "
    "that belong to it, and those recorded before that are no longer active.",
    MedicationUseArgs,
)
def medication_use(ctx: ToolContext, query: str) -> list[Fact]:
    """Facts, the answer first: "Yes: on a beta blocker (metoprolol; ATC C07): 1 active
    medication." citing the active members, or "No: none of the 3 active medications is a statin
    (searched by ingredient: atorvastatin, ...; ATC C10AA)." citing the Patient (an absence rests
    on the whole record). Then one fact per active member, and one per member recorded before
    ("Not active now: ..."), newest first. Raises ``ToolError`` for a class or drug the table
    (``retrieval/drugs.toml``) does not know."""
    drugs = default_drugs()
    found = drugs.get(query)
    if found is None:
        known = ", ".join(c.name for c in drugs.classes)
        raise ToolError(f"medication_use: unknown drug class or drug {query!r}; classes: {known}")
    label, is_class = _label(found)
    meds = _by_category(ctx, "medication", active_only=False)
    members = {e.id: found.members_in(_drug_text(e)) for e in meds}
    active = [e for e in meds if e.active and members[e.id]]
    before = [e for e in meds if not e.active and members[e.id]]
    atc = f"; ATC {', '.join(found.atc)}" if found.atc else ""
    patient = f"Patient/{ctx.record.patient_id}"
    details = {"query": query, "class": found.name, "atc": list(found.atc)}
    if active:
        named = list(dict.fromkeys(m for e in active for m in members[e.id]))
        n = len(active)
        what = f"{_article(label)}{label}" if is_class else label
        which = ", ".join(named) if is_class else ""
        inner = f" ({which}{atc})" if which else (f" ({atc[2:]})" if atc else "")
        newest = active[0]
        age = _age_note(newest, ctx.now)
        head = Fact(
            "medication_use",
            f"Yes: on {what}{inner}: {n} active medication{'s' if n > 1 else ''}{age}."
            f"{_cite(e.id for e in active)}",
            value=True,
            evidence=tuple(e.id for e in active),
            details={**details, "active": [e.id for e in active]},
        )
    else:
        n_active = sum(1 for e in meds if e.active)
        searched = found.ingredients[:MAX_SEARCHED_SHOWN]
        more = len(found.ingredients) - len(searched)
        listed = ", ".join(searched) + (f" and {more} more" if more > 0 else "")
        what = f"{_article(label)}{label}" if is_class else label
        if n_active:
            body = (
                f"No: none of the {n_active} active medication{'s' if n_active > 1 else ''} is "
                f"{what}"
            )
        else:
            body = f"No: no active medication is recorded, so none is {what}"
        by = f"searched by ingredient: {listed}{atc}" if is_class else f"searched by name{atc}"
        head = Fact(
            "medication_use",
            f"{body} ({by}).{_cite([patient])}",
            value=False,
            evidence=(patient,),
            details={**details, "active": []},
        )
    return [
        head,
        *_item_facts("medication_use", active),
        *_item_facts("medication_use", before, "Not active now: "),
    ]


def _age_note(item: Evidence, now: datetime) -> str:
    """ ", recorded 1995-09-02 (25 years ago)" when the newest active member is over a year old:
    an "active" order that old may no longer be taken."""
    ago = _ago(item.date, now)
    return f", recorded {item.day}{ago}" if ago else ""


def _label(found: DrugClass) -> tuple[str, bool]:
    """How statements name it, and whether it is a class (a drug's own class is its ingredient)."""
    is_class = bool(found.atc) or len(found.ingredients) > 1
    return found.name, is_class
