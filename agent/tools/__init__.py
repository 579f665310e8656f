"""Structured tools: facts computed by code from the ``PatientRecord``, each with its evidence.

Every tool returns ``Fact`` objects: a value (number, text or list), its unit and date where it has
them, a one-line statement, and the FHIR references it rests on. The model may phrase facts; it never
computes them. Each built-in tool is a module-level ``Tool`` (``agent.tools.observations``,
``agent.tools.chart``, ``agent.tools.medications``, ``agent.tools.care``, ``agent.tools.similar``), importable and callable by itself
(``latest_observation(ctx, query="A1c")``); ``default_tools()`` registers them by name, then the
installed plug-ins (``chartsight.tools``: ``register(registry)``, see ``common.plugins``). A tool
declares its arguments as a pydantic model, which also gives the JSON schema for tool-calling models,
and may declare the questions it answers (``Tool.questions``) so that the rule planner calls it.
"""

from __future__ import annotations

from typing import Any

from agent.tools.base import (
    AgeArgs,
    Args,
    ConditionArgs,
    Fact,
    LatestArgs,
    LimitArgs,
    NoArgs,
    ObservationArgs,
    ProcedureArgs,
    SimilarArgs,
    Tool,
    ToolContext,
    ToolError,
    ToolRegistry,
    WindowArgs,
    tool,
)
from agent.tools.care import (
    care_team,
    changes_in_period,
    code_status,
    encounters_in_period,
    immunizations,
    notes,
)
from agent.tools.chart import (
    active_medications,
    active_problems,
    age,
    allergies,
    condition_history,
    demographics,
    imaging,
    procedure_history,
    recent_encounters,
    recent_procedures,
)
from agent.tools.medications import medication_use
from agent.tools.observations import (
    find_points,
    latest_observation,
    matching_codes,
    observation_stats,
    recent_results,
)
from agent.tools.similar import similar_cases

BUILTIN_TOOLS: tuple[Tool, ...] = (
    demographics,
    age,
    latest_observation,
    observation_stats,
    recent_results,
    active_problems,
    condition_history,
    active_medications,
    medication_use,
    allergies,
    recent_procedures,
    procedure_history,
    recent_encounters,
    encounters_in_period,
    changes_in_period,
    immunizations,
    care_team,
    code_status,
    notes,
    imaging,
    similar_cases,
)

__all__ = [
    "BUILTIN_TOOLS",
    "AgeArgs",
    "Args",
    "ConditionArgs",
    "ProcedureArgs",
    "LatestArgs",
    "LimitArgs",
    "ObservationArgs",
    "SimilarArgs",
    "WindowArgs",
    "Fact",
    "NoArgs",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "default_tools",
    "find_points",
    "langchain_tools",
    "matching_codes",
    "tool",
    *(t.name for t in BUILTIN_TOOLS),
]


def default_tools(*, plugins: bool = True) -> ToolRegistry:
    """The built-in tools by name, then (``plugins``) those installed through the
    ``chartsight.tools`` entry point group, which may replace a built-in only with
    ``replace=True``."""
    reg = ToolRegistry()
    for t in BUILTIN_TOOLS:
        reg.add(t.name, t)
    if plugins:
        reg.load_entry_points()
    return reg


def langchain_tools(registry: ToolRegistry, ctx: ToolContext, artifacts: bool = False) -> list[Any]:
    """The registry's tools as LangChain ``StructuredTool``s bound to one patient's record, for
    LangGraph's tool node or any LangChain agent. Each returns its facts' statements, cited; with
    ``artifacts`` the facts themselves (``FactUsed``) travel as the tool message's artifact."""
    from langchain_core.tools import StructuredTool

    def bind(tool: Tool) -> Any:
        def run(**kwargs: Any) -> Any:
            facts = tool(ctx, **kwargs)
            text = "\n".join(f.statement for f in facts)
            return (text, [f.used() for f in facts]) if artifacts else text

        return StructuredTool.from_function(
            func=run,
            name=tool.name,
            description=tool.description,
            args_schema=tool.args,
            response_format="content_and_artifact" if artifacts else "content",
        )

    return [bind(tool) for tool in registry.tools.values()]
