"""ChartSight's agent: the LangGraph graph, its tools, model backends and grounding, behind one
front door, ``ChartSight`` (``agent/service.py``).

The surfaces (``surfaces/``: CLI, HTTP, MCP) import what they need from here: the front door, the
settings, and the domain types and errors they show or construct. Those types are defined once in
the lower layers (``retrieval``, ``connectors``) and only re-exported here, so that a surface
depends on the agent alone (plus ``connectors`` for importing data and administering the store).
"""

from agent.answer import Answer, Citation
from agent.index_build import (
    BuildReport,
    build_index,
    install_rebuilt,
    ndjson_source,
    open_index,
)
from agent.provenance import (
    AI_ASSERTED,
    Approval,
    answer_bundle,
    answer_resources,
    cited_references,
    save_to_chart,
)
from agent.series import CitedSeries, cited_series
from agent.service import ChartSight, NotPermitted, QuestionError, connected, ehr_source
from agent.settings import Settings, load_settings
from agent.threads import DamagedThread, ThreadStoreError
from agent.tools import Fact, ToolError
from connectors.errors import (
    ChartSightError,
    ConfigurationError,
    ConnectorError,
    FhirImportError,
    ResourceNotFound,
    scrub,
)
from connectors.images import ImageSet
from connectors.prefetch import PrefetchSource
from connectors.record import PatientRecord
from connectors.resources import display_name, reference_of
from connectors.source import FhirSource, RecordScope
from retrieval.cases import Case, CasePrivacy, ChartSections, age_of, line_label
from retrieval.clinical import aware, fhir_date, patient_age
from retrieval.encoders import EncoderRegistry
from retrieval.evidence import Evidence
from retrieval.index import CaseFilter, CaseHit
from retrieval.rank import RankedEvidence

__all__ = [
    "AI_ASSERTED",
    "Answer",
    "Approval",
    "BuildReport",
    "Case",
    "CaseFilter",
    "CaseHit",
    "CasePrivacy",
    "ChartSections",
    "ChartSight",
    "ChartSightError",
    "Citation",
    "CitedSeries",
    "ConfigurationError",
    "ConnectorError",
    "DamagedThread",
    "EncoderRegistry",
    "Evidence",
    "Fact",
    "FhirImportError",
    "FhirSource",
    "ImageSet",
    "NotPermitted",
    "PatientRecord",
    "PrefetchSource",
    "QuestionError",
    "RankedEvidence",
    "RecordScope",
    "ResourceNotFound",
    "Settings",
    "ThreadStoreError",
    "ToolError",
    "age_of",
    "answer_bundle",
    "answer_resources",
    "aware",
    "build_index",
    "cited_references",
    "cited_series",
    "connected",
    "display_name",
    "ehr_source",
    "fhir_date",
    "install_rebuilt",
    "line_label",
    "load_settings",
    "ndjson_source",
    "open_index",
    "patient_age",
    "reference_of",
    "save_to_chart",
    "scrub",
]
