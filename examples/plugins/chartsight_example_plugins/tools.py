"""A plug-in tool: how many encounters the record holds, in the last N years or in all."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from agent.tools import Args, Fact, ToolContext, ToolRegistry, tool


class EncounterCountArgs(Args):
    """``years``: count only encounters that started in the last N years (default: all)."""

    years: int | None = Field(default=None, ge=1, le=100, description="Only the last N years.")


@tool(
    "encounter_count",
    "How many encounters (visits, admissions) the record holds, in all or in the last N years.",
    EncounterCountArgs,
    questions=(
        r"\bhow many (?:visits|encounters|admissions)\b(?:.*?\blast (?P<years>\d{1,2}) years?\b)?",
    ),
)
def encounter_count(ctx: ToolContext, years: int | None = None) -> list[Fact]:
    """One fact: the number of Encounters (in the last ``years`` years when given), citing each
    one counted, or the Patient when there is none."""
    since = ctx.now - timedelta(days=365.25 * years) if years else None
    counted = [
        e
        for e in ctx.evidence.values()
        if e.category == "encounter" and (since is None or (e.date is not None and e.date >= since))
    ]
    window = f" in the last {years} years" if years else ""
    refs = tuple(e.id for e in counted) or (f"Patient/{ctx.record.patient_id}",)
    n = len(counted)
    return [
        Fact(
            "encounter_count",
            f"The record holds {n} encounter{'s' if n != 1 else ''}{window}."
            + "".join(f" [{r}]" for r in refs),
            value=n,
            evidence=refs,
            details={"echo": [window.strip()]} if window else {},
        )
    ]


def register(registry: ToolRegistry) -> None:
    """The ``chartsight.tools`` entry point."""
    registry.add(encounter_count.name, encounter_count)
