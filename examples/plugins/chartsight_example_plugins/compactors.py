"""Plug-in compactors: ``Flag`` resources (chart alerts: "Fall risk", "Difficult airway"), which
the built-ins leave out, and the built-in ``Goal`` replaced by name (with its target's due date)."""

from __future__ import annotations

import dataclasses
from typing import Any

from retrieval.clinical import codes_of
from retrieval.evidence import CompactContext, Compactors, Evidence
from retrieval.evidence.compactors import goal as builtin_goal
from retrieval.evidence.model import evidence_line


def flag(res: Any, reg: Compactors, ctx: CompactContext) -> Evidence | None:
    """Flag: "Alert: <code>, <status> (since <period.start>)"; an inactive flag is not active."""
    what = reg.text(res.code)
    if not what:
        return None
    since = reg.text(res.period.start) if res.period is not None and res.period.start else ""
    text = f"Alert: {what}, {res.status}" + (f" (since {since})" if since else "")
    return evidence_line(res, text, "alert", codes_of(res.code), active=res.status == "active")


def goal(res: Any, reg: Compactors, ctx: CompactContext) -> Evidence | list[Evidence] | None:
    """The built-in Goal line, with "due <date>" of its first target that has one."""
    made = builtin_goal(res, reg, ctx)
    due = next((t.dueDate for t in res.target or [] if t.dueDate is not None), None)
    if not isinstance(made, Evidence) or due is None:
        return made
    body, sep, cite = made.text.rpartition(" [")
    return dataclasses.replace(made, text=f"{body}, due {reg.text(due)}{sep}{cite}")


def register(registry: Compactors) -> None:
    """The ``chartsight.compactors`` entry point."""
    registry.add_resource("Flag", flag)
    registry.add_resource("Goal", goal, replace=True)  # says so: the registry logs it
