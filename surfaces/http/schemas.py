"""The HTTP service's request and response shapes; they are its OpenAPI document."""

from __future__ import annotations

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
