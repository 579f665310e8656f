"""The embedded default backend: a cited answer composed from the facts and evidence, no model.

The tools' statements come first (each once; they stand word for word, computed from the record);
when no tool answered and no result was asked for, up to three evidence lines that share words,
codes or the category with the question are quoted, each as one sentence; similar cases follow.
An empty text means nothing matched, and the answer then abstains.
"""

from __future__ import annotations

import re

from agent.answer import SimilarCase
from agent.backends import BackendError, Generation, Grounds, Message

# tools whose facts are results: when one was asked for and the record has none, other lines that
# share a word with the question (hemoglobin for an A1c, HDL for an LDL) are never the answer
MEASURED_TOOLS = frozenset({"latest_observation", "observation_stats"})
MAX_QUOTED_LINES = 3
MAX_SIMILAR_SUMMARY = 240  # characters of a similar case's summary in one sentence


def matches(scores: dict[str, float]) -> bool:
    """Whether an evidence item shares words, codes or the category with the question (not only
    its meaning), by the ranker's part scores (``retrieval.rank.RankedEvidence.parts``)."""
    return (
        scores.get("lexical", 0) > 0 or scores.get("code", 0) > 0 or scores.get("category", 0) > 0
    )


def one_sentence(line: str) -> str:
    """A record line as one sentence: its inner sentence ends become semicolons, so a note's own
    full stops ("The patient is healthy.") never make a sentence of the answer on their own."""
    body, sep, cite = line.rpartition(" [")
    body = re.sub(r"(?<!\d)[.!?]+(?=\s|$)", ";", body).rstrip(";")
    return f"{body}{sep}{cite}" if sep else re.sub(r"[.!?]+(?=\s|$)", ";", line).rstrip(";")


def similar_line(case: SimilarCase) -> str:
    """A similar case as one evidence line (its summary cut at a word, never mid-word)."""
    summary = case.summary
    if len(summary) > MAX_SIMILAR_SUMMARY:
        summary = summary[:MAX_SIMILAR_SUMMARY].rsplit(" ", 1)[0].rstrip(" ;,.") + " …"
    summary = summary.replace(". ", "; ").rstrip(".")
    return f"Similar case (score {case.score:.2f}): {summary}"


def compose(grounds: Grounds) -> str:
    """The evidence answer's text for ``grounds``: one cited sentence per line; empty when
    nothing matches."""
    sentences = list(dict.fromkeys(f.statement for f in grounds.facts if f.evidence))
    asked_for_a_result = any(f.tool in MEASURED_TOOLS for f in grounds.facts)
    if not sentences and not asked_for_a_result:
        lines = [
            line
            for ref, line in grounds.evidence.items()
            if matches(grounds.evidence_scores.get(ref, {}))
        ][:MAX_QUOTED_LINES]
        sentences = [f"Relevant record entry: {one_sentence(line)}" for line in lines]
    for case in grounds.similar:
        sentences.append(f"{similar_line(case)} [{case.key}]")
    # one line each: a listed chart line ends in its citation, not a full stop, and must still be
    # a sentence of its own (``agent.grounding.split_sentences`` splits at line ends)
    return "\n".join(s if s.rstrip().endswith((".", "]")) else s + "." for s in sentences)


class EvidenceBackend:
    """The ``evidence`` backend: ``generate`` composes from ``grounds`` and ignores ``messages``.
    Raises ``BackendError`` when called without grounds."""

    name = "evidence"

    async def generate(self, messages: list[Message], grounds: Grounds | None = None) -> Generation:
        """The composed answer (``compose``) as a generation by the model ``evidence``."""
        if grounds is None:
            raise BackendError("the evidence backend composes from grounds; none were given")
        return Generation(compose(grounds), self.name)

    async def aclose(self) -> None:
        """Nothing to release."""
