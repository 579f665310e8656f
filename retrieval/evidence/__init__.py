"""Chart evidence: one compact, citable line per clinically meaningful fact of a ``PatientRecord``.

Compaction follows a registry of compactors: per FHIR *datatype* (Quantity, CodeableConcept,
Period, Reference, ...) and per *resource type* (Observation, Condition, ...). Datatype compactors
turn verbose JSON into short text; resource compactors compose them into one ``Evidence`` line.
``meta``, narrative and empty fields never reach the text. Third parties add compactors, or replace
a built-in with ``replace=True``, through the ``chartsight.compactors`` entry point group (see
``Compactors.load_entry_points``).

Modules: ``model`` (``Evidence``, ``CompactContext``, the ``Compactors`` registry), ``compactors``
(the built-ins and ``record_evidence``), ``flags`` (abnormal results against ranges), ``guard``
(text addressed to an AI model), ``text`` (plain text, numbers and dates).
"""

from __future__ import annotations

from retrieval.evidence.compactors import (
    SYSTEM_NAMES,
    default_compactors,
    record_evidence,
    register_builtins,
)
from retrieval.evidence.guard import addressed_to_model, withhold_instructions
from retrieval.evidence.model import (
    CompactContext,
    CompactorConflict,
    Compactors,
    DatatypeCompactor,
    Evidence,
    ResourceCompactor,
    iter_lines,
)
from retrieval.evidence.text import MAX_NOTE_CHARS, clean_text

__all__ = [
    "MAX_NOTE_CHARS",
    "SYSTEM_NAMES",
    "CompactContext",
    "CompactorConflict",
    "Compactors",
    "DatatypeCompactor",
    "Evidence",
    "ResourceCompactor",
    "addressed_to_model",
    "clean_text",
    "default_compactors",
    "iter_lines",
    "record_evidence",
    "register_builtins",
    "withhold_instructions",
]
