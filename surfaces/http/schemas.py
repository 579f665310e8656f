"""The HTTP service's request and response shapes; they are its OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class AskRequest(BaseModel):
    patient: str = Field(min_length=1, max_length=200, description="Patient id (or identifier).")
    question: str = Field(min_length=1, description="The clinician's question.")
    thread: str | None = Field(
        default=None,
        max_length=100,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Continue this conversation thread (yours, about this patient).",
    )


class CitationOut(BaseModel):
    reference: str
    text: str


class FactOut(BaseModel):
    tool: str
    statement: str
    value: Any = None
    unit: str | None = None
    date: str | None = Field(
        default=None, description="At the record's own precision: 2026, 2026-03 or a date-time."
    )
    evidence: list[str]
    comparator: str | None = Field(
        default=None, description='"<", "<=", ">=" or ">": the value is a bound, not exact.'
    )


class SimilarCaseOut(BaseModel):
    key: str
    score: float
    summary: str


class ImageOut(BaseModel):
    reference: str
    modality: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None


class AnswerOut(BaseModel):
    """A grounded answer: every sentence cites the patient's own resources."""

    question: str
    patient_id: str
    text: str
    citations: list[CitationOut]
    facts: list[FactOut]
    similar_cases: list[SimilarCaseOut]
    images: list[ImageOut]
    model: str
    prompt_version: str
    supported_fraction: float
    abstained: bool
    fallback_used: bool
    warnings: list[str]
    rejected: list[dict[str, Any]]
    latency_ms: dict[str, float]
    tool_calls: list[dict[str, Any]]
    thread_id: str | None
    created_at: str


class CaseHitOut(BaseModel):
    key: str
    patient_id: str
    score: float
    summary: str
    sex: str | None
    age_band: str | None
    modalities: list[str]
    label: str | None
    kind: str


class Problem(BaseModel):
    detail: str
