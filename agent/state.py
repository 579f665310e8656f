"""The graph's state: plain JSON values and the answer's own pydantic models (``agent.answer``),
which the checkpointer stores and may rebuild (``agent.answer.CHECKPOINT_TYPES``, an allow-list).

The patient's record itself is not in the state (it is large and re-fetchable); nodes read it from
the runtime's cache by patient id.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

from agent.answer import Answer, FactUsed, ImageUsed, SentenceCheck, SimilarCase, ToolCallMade


def _merge(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    """Parallel nodes add their entries; ``None`` (sent when a new question starts) clears."""
    return {} if right is None else {**(left or {}), **right}


def _collect(left: list[Any] | None, right: list[Any] | None) -> list[Any]:
    """Parallel nodes add their items; ``None`` (sent when a new question starts) clears."""
    return [] if right is None else [*(left or []), *right]


class AskState(TypedDict, total=False):
    """One question's way through the graph (and, per thread, the conversation so far)."""

    question: str
    patient_key: str
    patient_id: str
    patient_line: str
    history: Annotated[list[dict[str, str]], operator.add]  # earlier turns of the thread
    plan: list[dict[str, Any]]  # tool calls: {"tool": ..., "args": {...}}
    want_images: bool
    want_similar: bool
    facts: list[FactUsed]
    evidence: dict[str, str]  # id → the line the model sees (ranked order)
    all_lines: dict[str, str]  # every evidence line of the record, for citations of facts
    similar: list[SimilarCase]
    images: list[ImageUsed]  # provenance of the images sent
    draft: str
    given: dict[str, str]  # what a sentence may cite (evidence_map), made once by generate
    model: str
    checked: list[SentenceCheck]  # sentence checks of the latest draft
    attempts: int
    fallback: bool
    warnings: Annotated[list[str], _collect]
    timings: Annotated[dict[str, float], _merge]
    evidence_scores: dict[str, dict[str, float]]
    answer: Answer
    # the model's tool loop (agent/tool_planner.py), when the model calls tools
    transcript: list[dict[str, Any]]  # OpenAI wire-format messages of the loop
    tool_steps: int
    pending_calls: list[dict[str, Any]]
    model_facts: list[FactUsed]  # facts from the model's tool calls
    tool_log: Annotated[list[ToolCallMade], _collect]  # every tool call, by rules or model
