"""The similar-cases tool: past cases most like this patient's, from the case index."""

from __future__ import annotations

import logging

from agent.tools.base import (
    Fact,
    SimilarArgs,
    ToolContext,
    ToolError,
    _cite,
    tool,
)
from retrieval.evidence import clean_text

log = logging.getLogger(__name__)


# what a question about similar cases is told when there is no index, or an empty one
NO_INDEX = "no similar-case index (run `chartsight index build`)"


@tool(
    "similar_cases",
    "Past cases most similar to this patient's (images and summary), the patient's own left "
    "out: each with its similarity score and a de-identified summary.",
    SimilarArgs,
)
def similar_cases(ctx: ToolContext, k: int = 3) -> list[Fact]:
    """The ``k`` cases most like this patient's (the patient's own left out), one fact each with
    its score and summary, citing the case key. Raises ``ToolError`` when there is no case
    index."""
    if ctx.similar is None:
        raise ToolError(NO_INDEX)
    return [
        Fact(
            "similar_cases",
            # one sentence: the summary's own full stops would split it from its citation
            f"Similar case (score {hit.score:.2f}): "
            f"{clean_text(hit.summary, 240).replace('. ', '; ').rstrip('.')}{_cite([hit.key])}",
            value=round(float(hit.score), 4),
            evidence=(hit.key,),
            details={"key": hit.key, "patient_id": hit.patient_id},
        )
        for hit in ctx.similar(k)
    ]
