"""What every surface returns: an ``Answer`` with its citations, facts and provenance.

These pydantic models are the one shape of an answer from the graph's ``finalize`` step to the JSON
the HTTP API, CDS Hooks, MCP and the CLI print (the API uses ``Answer`` as its response model). The
graph's state keeps them as they are; the checkpointer stores them (``CHECKPOINT_TYPES``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.errors import scrub


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Citation(_Frozen):
    """An evidence item the answer cites: its FHIR reference (``Observation/…``, a similar case's
    key, or ``Patient/…`` for an absence, which rests on the whole record) and its evidence line."""

    reference: str
    text: str


class FactUsed(_Frozen):
    """A fact a tool computed from the record (``agent.tools.Fact.used`` makes it), as the answer
    carries it. ``statement`` is one sentence with its evidence cited in brackets; it stands word
    for word in the answer (it was computed, not written by a model)."""

    tool: str = Field(description="The tool that computed it, e.g. latest_observation.")
    statement: str
    value: Any = None
    unit: str | None = Field(default=None, description="UCUM unit of ``value``, when it has one.")
    date: str | None = Field(
        default=None, description="At the record's own precision: 2026, 2026-03 or a date-time."
    )
    evidence: tuple[str, ...] = Field(default=(), description="The resources it rests on.")
    comparator: str | None = Field(
        default=None, description='"<", "<=", ">=" or ">": the value is a bound, not exact.'
    )
    echo: tuple[str, ...] = Field(
        default=(),
        description="Words of the question the statement repeats (a period such as 'in the last "
        "3 years'), which the verifier does not read as claims.",
    )


class SimilarCase(_Frozen):
    """A similar past case: its key in the case index, cosine similarity and de-identified summary
    (generalised for a caller bound to one patient: ``retrieval.index.generalised_hit``)."""

    key: str
    score: float
    summary: str


class ImageUsed(_Frozen):
    """An image sent to the model, by where it came from (a FHIR reference and DICOM UIDs)."""

    reference: str
    modality: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None


class SentenceCheck(_Frozen):
    """The verifier's finding on one sentence of a draft (``agent.grounding.verify``)."""

    text: str
    citations: tuple[str, ...] = ()
    supported: bool
    problems: tuple[str, ...] = ()


class ToolCallMade(_Frozen):
    """One tool call made for a question: by the rule planner or by the model."""

    tool: str
    args: dict[str, Any] | str = Field(
        default_factory=dict,
        description="The arguments; a model's text as it wrote it when that was not a JSON object.",
    )
    by: Literal["rules", "model"]
    error: bool = False


class Answer(BaseModel):
    """A grounded answer to one question about one patient: every sentence of ``text`` cites the
    patient's own resources (or a similar case) listed in ``citations``; ``abstained`` when the
    record does not answer it. ``latency_ms`` maps each graph step to its time in milliseconds."""

    question: str
    patient_id: str
    text: str
    citations: list[Citation] = Field(default_factory=list)
    facts: list[FactUsed] = Field(default_factory=list)
    similar_cases: list[SimilarCase] = Field(default_factory=list)
    images: list[ImageUsed] = Field(default_factory=list)
    model: str = Field(default="", description="The backend that wrote it, e.g. 'evidence'.")
    prompt_version: str = ""
    supported_fraction: float = Field(
        default=1.0,
        description="Share of the shown sentences that assert something which the verifier "
        "found supported (agent.grounding.supported_fraction; after a fallback, of the evidence "
        "answer's sentences).",
    )
    abstained: bool = False
    nearest: list[Citation] = Field(
        default_factory=list,
        description="When abstained: the record's lines closest to the question, shown apart "
        "from the citations (they support no statement).",
    )
    fallback_used: bool = False
    warnings: list[str] = Field(default_factory=list)
    rejected: list[SentenceCheck] = Field(
        default_factory=list, description="The model's sentences removed as unsupported."
    )
    latency_ms: dict[str, float] = Field(default_factory=dict)
    tool_calls: list[ToolCallMade] = Field(default_factory=list)
    thread_id: str | None = None
    created_at: str = Field(
        default_factory=lambda: datetime.now().astimezone().isoformat(timespec="seconds")
    )

    def shown(self, thread: str | None) -> Answer:
        """The answer as a caller outside this deployment gets it (HTTP, its stream, CDS Hooks,
        the SMART page, MCP): ``thread_id`` the caller's own ``thread`` name (the stored key is
        per caller and patient: ``surfaces.http.security.thread_key``), and every warning without
        URLs or file paths (``common.errors.scrub``: "not found at local store <url>", "model
        server <url>"), which would name the deployment's database, FHIR or model server. The
        CLI, the operator's, keeps them whole."""
        return self.model_copy(
            update={"thread_id": thread, "warnings": [scrub(w) for w in self.warnings]}
        )


# the types the graph's state holds; the checkpointer may rebuild only these (and plain values)
CHECKPOINT_TYPES: tuple[type[BaseModel], ...] = (
    Answer,
    Citation,
    FactUsed,
    SimilarCase,
    ImageUsed,
    SentenceCheck,
    ToolCallMade,
)
