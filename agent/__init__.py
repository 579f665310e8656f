"""ChartSight's agent: the LangGraph graph, its tools, model backends and grounding, behind one
front door, ``ChartSight`` (``agent/service.py``).

The surfaces (``surfaces/``: CLI, HTTP, MCP) import what they need from here: the front door, the
settings, and the domain types and errors they show or construct. Those types are defined once in
the lower layers (``retrieval``, ``connectors``) and only re-exported here, so that a surface
depends on the agent alone (plus ``connectors`` for importing data and administering the store).
"""

from agent.answer import Answer, Citation
from agent.index_build import BuildReport, build_index, open_index
from agent.service import ChartSight, connected, ehr_source
from agent.settings import Settings, load_settings
from agent.tools import Fact, ToolError
from connectors.errors import (
    ChartSightError,
    ConfigurationError,
    ConnectorError,
    FhirImportError,
    ResourceNotFound,
)
from connectors.images import ImageSet
from connectors.prefetch import PrefetchSource
from connectors.record import PatientRecord
from connectors.resources import reference_of
from connectors.source import FhirSource
from connectors.store import human_name
from retrieval.cases import Case, age_of
from retrieval.encoders import EncoderRegistry
from retrieval.index import CaseFilter, CaseHit
from retrieval.rank import RankedEvidence

__all__ = [
    "Answer",
    "BuildReport",
    "Case",
    "CaseFilter",
    "CaseHit",
    "ChartSight",
    "ChartSightError",
    "Citation",
    "ConfigurationError",
    "ConnectorError",
    "EncoderRegistry",
    "Fact",
    "FhirImportError",
    "FhirSource",
    "ImageSet",
    "PatientRecord",
    "PrefetchSource",
    "RankedEvidence",
    "ResourceNotFound",
    "Settings",
    "ToolError",
    "age_of",
    "build_index",
    "connected",
    "ehr_source",
    "human_name",
    "load_settings",
    "open_index",
    "reference_of",
]
