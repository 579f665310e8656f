"""What every surface returns: an ``Answer`` with its citations, facts and provenance."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Citation:
    """An evidence item the answer cites: its FHIR reference and the line the model saw."""

    reference: str
    text: str


@dataclass(frozen=True)
class FactUsed:
    tool: str
    statement: str
    value: Any
    unit: str | None
    date: str | None  # at the record's own precision: "2026", "2026-03" or an ISO date-time
    evidence: tuple[str, ...]
    comparator: str | None = None  # "<", "<=", ">=", ">": the value is a bound, not exact


@dataclass(frozen=True)
class SimilarCase:
    key: str
    score: float
    summary: str


@dataclass(frozen=True)
class ImageUsed:
    reference: str
    modality: str | None
    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None


@dataclass
class Answer:
    """A grounded answer to one question about one patient."""

    question: str
    patient_id: str
    text: str
    citations: list[Citation] = field(default_factory=list)
    facts: list[FactUsed] = field(default_factory=list)
    similar_cases: list[SimilarCase] = field(default_factory=list)
    images: list[ImageUsed] = field(default_factory=list)
    model: str = ""
    prompt_version: str = ""
    supported_fraction: float = 1.0
    abstained: bool = False
    fallback_used: bool = False
    warnings: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    # every tool call made: {"tool", "args", "by": "rules" | "model", "error"}
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    thread_id: str | None = None
    created_at: str = field(
        default_factory=lambda: datetime.now().astimezone().isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
