"""A plug-in planner rule: "kidney function" (or "renal function") is read from the latest
creatinine and eGFR, which the built-in planner does not know to ask for."""

from __future__ import annotations

import re

from agent.planner import Plan, PlannerRules

_KIDNEY = re.compile(r"\b(?:kidney|renal) function\b", re.IGNORECASE)


def kidney_function(question: str, plan: Plan) -> None:
    """Add the latest creatinine and eGFR when the question asks about kidney function."""
    if _KIDNEY.search(question):
        plan.add("latest_observation", query="creatinine")
        plan.add("latest_observation", query="eGFR")


def register(registry: PlannerRules) -> None:
    """The ``chartsight.planner_rules`` entry point."""
    registry.add("kidney_function", kidney_function)
