"""What an error tells a caller outside the deployment (``ChartSightError.public``): what was
sent and what went wrong, never a server URL, a file path or a setting."""

from __future__ import annotations

import pytest

from connectors.errors import (
    AuthError,
    ChartSightError,
    ConfigurationError,
    FhirImportError,
    HttpStatusError,
    IncompletePaging,
    InvalidResponse,
    ResourceNotFound,
    StoreError,
    TransportError,
    scrub,
)

INTERNALS = ("http", "127.0.0.1", "8443", "/srv", "store.db", "secret", "C:\\\\")


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            ResourceNotFound("sqlite:////srv/cs/store.db#Patient/no-such", 404, "not in the store"),
            "Patient/no-such was not found",
        ),
        (
            ResourceNotFound("https://ehr.example:8443/fhir/Observation/abc-1", 404),
            "Observation/abc-1 was not found",
        ),
        (ResourceNotFound("https://ehr.example/secret?x=1", 404), "the resource was not found"),
        (HttpStatusError("https://ehr.example/fhir/Patient", 500, "secret trace"), "HTTP 500"),
        (
            TransportError("http://127.0.0.1:8443/fhir", "connection refused"),
            "could not be reached",
        ),
        (InvalidResponse("https://ehr.example/fhir/metadata", "not JSON"), "could not be used"),
        (IncompletePaging("https://ehr.example/fhir/Observation", 10, 20, "a 500"), "to its end"),
        (AuthError("token endpoint https://auth.example/token said invalid_client"), "authorize"),
        (StoreError("sqlite3.OperationalError at /srv/cs/store.db: disk full"), "local store"),
        (
            FhirImportError("/srv/in/secret.json", "duplicate Observation/x", "entry 3"),
            "entry 3: duplicate Observation/x",
        ),
        (ConfigurationError("no index at /srv/cs/index (see https://x.example)"), "no index at"),
        (ChartSightError("C:\\data\\cs\\store.db failed"), "failed"),
    ],
)
def test_public_messages_name_no_internals(error: ChartSightError, said: str):
    assert said in error.public
    for internal in INTERNALS:
        assert internal not in error.public, error.public
    assert str(error)  # the full message stays for the operator


def test_scrub_keeps_clinical_text():
    text = "Glucose 5.5 mmol/L and 99 mg/dL, 72 /min, Patient/abc, see https://x.example/a and /etc/passwd"
    assert (
        scrub(text) == "Glucose 5.5 mmol/L and 99 mg/dL, 72 /min, Patient/abc, see <url> and <path>"
    )
