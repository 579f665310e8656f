"""The HTTP service's request and response shapes; they are its OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class AskRequest(BaseModel):
    """A question about one patient (``POST /v1/ask`` and ``/v1/ask/stream``)."""

    patient: str = Field(min_length=1, max_length=200, description="Patient id (or identifier).")
    question: str = Field(min_length=1, description="The clinician's question.")
    thread: str | None = Field(
        default=None,
        max_length=100,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Continue this conversation thread (yours, about this patient).",
    )


class CitationOut(BaseModel):
    """A cited resource: its FHIR reference (``Observation/abc``) and the evidence line the
    answer was checked against."""

    reference: str
    text: str


class FactOut(BaseModel):
    """A fact a structured tool computed from the record: the tool, its statement, the value and
    UCUM unit, the date and the references of the evidence it rests on."""

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
    """A past case the answer drew on: its key, score (the inner product of fused vectors: the
    weighted mean of image and text cosines, at most 1) and summary."""

    key: str
    score: float
    summary: str


class ImageOut(BaseModel):
    """An image the answer used: the FHIR reference it came from (Media, DocumentReference or
    ImagingStudy) and, for DICOM, its study, series and SOP instance UIDs."""

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
    """A similar case (``GET /v1/patients/{patient_id}/similar``): its key and patient, the score
    (the weighted mean of image and text cosines, at most 1), summary, and the metadata that
    filters use (sex, age band, modalities, label, kind)."""

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
    """An error response: ``detail`` says what was wrong, without echoing PHI."""

    detail: str
