"""The HTTP service's request and response shapes; they are its OpenAPI document."""

from __future__ import annotations

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


class Problem(BaseModel):
    """An error response: ``detail`` says what was wrong, without echoing PHI."""

    detail: str
