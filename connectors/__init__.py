"""Everything that brings patient data in: FHIR servers, the local store, DICOMweb, images."""

from connectors.errors import ChartSightError, ConnectorError
from connectors.fhir_client import FhirClient
from connectors.record import PatientRecord, assemble_record
from connectors.source import FhirSource
from connectors.store import FhirStore, StoreSource

__all__ = [
    "ChartSightError",
    "ConnectorError",
    "FhirClient",
    "FhirSource",
    "FhirStore",
    "PatientRecord",
    "StoreSource",
    "assemble_record",
]
