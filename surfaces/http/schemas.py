"""The HTTP service's request and response shapes; they are its OpenAPI document."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AskRequest(BaseModel):
    """A question about one patient (``POST /v1/ask`` and ``/v1/ask/stream``). A field not listed
    here is refused (422 ``extra_forbidden``): a misspelt ``thread_id`` would otherwise start a new
    conversation without a word."""

    model_config = ConfigDict(extra="forbid")

    patient: str = Field(min_length=1, max_length=200, description="Patient id (or identifier).")
    question: str = Field(min_length=1, description="The clinician's question.")
    thread: str | None = Field(
        default=None,
        max_length=100,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="Continue this conversation thread (yours, about this patient).",
    )


class FieldProblem(BaseModel):
    """One field of a request that could not be read (a 422): pydantic's error ``type``
    (``missing``, ``string_too_long``, ...), where it is (``loc``: ``["body", "patient"]``) and
    what is wrong (``msg``); never the value sent."""

    type: str
    loc: list[str | int]
    msg: str


class Problem(BaseModel):
    """An error response: ``detail`` says what was wrong, without echoing PHI: a sentence, or for
    a request whose fields could not be read (422) one ``FieldProblem`` per field."""

    detail: str | list[FieldProblem]
