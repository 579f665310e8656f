"""The HTTP service's request and response shapes; they are its OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# a conversation thread's name as callers give it (REST, the SMART page, MCP's ``ask``): at most
# 100 characters of letters, digits and ``._:-`` (it becomes part of a checkpoint key)
THREAD_MAX_CHARS = 100
THREAD_PATTERN = r"^[A-Za-z0-9._:-]+$"


class AskRequest(BaseModel):
    """A question about one patient (``POST /v1/ask`` and ``/v1/ask/stream``). A field not listed
    here is refused (422 ``extra_forbidden``): a misspelt ``thread_id`` would otherwise start a new
    conversation without a word."""

    model_config = ConfigDict(extra="forbid")

    patient: str = Field(min_length=1, max_length=200, description="Patient id (or identifier).")
    question: str = Field(min_length=1, description="The clinician's question.")
    thread: str | None = Field(
        default=None,
        max_length=THREAD_MAX_CHARS,
        pattern=THREAD_PATTERN,
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


def problem(description: str) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry for an error status: the ``Problem`` shape, with what the
    status means for that operation (``description``); ``app._json_problems`` lists it under
    ``application/json`` whatever the operation's success media type (HTML, SVG, PNG, SSE)."""
    return {"model": Problem, "description": description}


# a request body that is not UTF-8: FastAPI refuses it with 400 before reading any field (a body
# that is UTF-8 but not JSON is a 422 naming ``json_invalid``)
UNREADABLE_BODY = problem("A request body that cannot be decoded (not UTF-8 JSON).")
