"""A plug-in planner rule: "kidney function" (or "renal function") also asks for the latest eGFR.
The built-in planner reads "kidney function" as creatinine alone (``retrieval/terms.toml``)."""

from __future__ import annotations

import re

from agent.planner import Plan, PlannerRules

_KIDNEY = re.compile(r"\b(?:kidney|renal) function\b", re.IGNORECASE)


def kidney_function(question: str, plan: Plan) -> None:
    """Add the latest eGFR when the question asks about kidney function."""
    if _KIDNEY.search(question):
        plan.add("latest_observation", query="eGFR")


def register(registry: PlannerRules) -> None:
    """The ``chartsight.planner_rules`` entry point."""
    registry.add("kidney_function", kidney_function)
