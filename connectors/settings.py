"""Settings of the connectors layer; composed into the one ``Settings`` object by ``agent.settings``."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr


class SmartBackendSettings(BaseModel):
    """SMART Backend Services: client-credentials grant with a signed JWT assertion."""

    client_id: str = Field(description="Client id registered with the EHR's authorization server.")
    private_key_path: Path = Field(description="PEM file of the client's private key (RSA or EC).")
    key_id: str | None = Field(default=None, description="`kid` of the key in the client's JWKS.")
    algorithm: str = Field(default="RS384", description="RS384 or ES384, as SMART requires.")
    scope: str = Field(default="system/*.read", description="Scopes requested with the token.")
    token_url: str | None = Field(
        default=None,
        description="Token endpoint; discovered from .well-known/smart-configuration when unset.",
    )


class HttpSettings(BaseModel):
    """Timeouts and retries shared by every HTTP connector."""

    timeout_s: float = Field(default=30.0, description="Connect/read/write timeout of one attempt.")
    deadline_s: float = Field(
        default=120.0, description="Upper bound for one request, retries included."
    )
    max_retries: int = Field(default=4, description="Retries on 429, 5xx and connection errors.")
    backoff_base_s: float = Field(default=0.5, description="First backoff; doubles each retry.")
    backoff_max_s: float = Field(
        default=30.0, description="Cap of one backoff, Retry-After included."
    )
    verify_tls: bool = True
    follow_redirects: bool = Field(
        default=True,
        description="Follow 3xx answers. Off for a server a caller names (a CDS request's "
        "fhirServer, a SMART launch's iss): only the listed address may be reached.",
    )


class FhirServerSettings(BaseModel):
    """A remote FHIR R4 server. Without a URL ChartSight uses the embedded local store."""

    url: str | None = Field(default=None, description="Base URL, e.g. https://ehr.example/fhir.")
    token: SecretStr | None = Field(default=None, description="Static bearer token.")
    smart: SmartBackendSettings | None = None
    page_size: int = Field(default=200, ge=1, le=1000, description="`_count` asked per page.")
    max_pages: int = Field(default=1000, description="Guard against a server that pages forever.")
    concurrency: int = Field(default=8, ge=1, description="Parallel per-type searches.")
    use_everything: bool = Field(
        default=True, description="Use Patient/$everything when the server offers it."
    )
    http: HttpSettings = HttpSettings()


class BulkSettings(BaseModel):
    """FHIR Bulk Data Access ($export, HL7 Bulk Data Access IG v2.0.0) into the local store."""

    concurrency: int = Field(default=4, ge=1, description="Output files downloaded at once.")
    poll_initial_s: float = Field(
        default=1.0,
        gt=0,
        description="Wait before the next status request when the server sends no Retry-After; "
        "doubles each time up to poll_max_s.",
    )
    poll_max_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest wait between status requests, Retry-After included.",
    )
    max_wait_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="Give up (keeping the export to resume later) when it is not complete by then.",
    )
    file_hosts: list[str] = Field(
        default_factory=list,
        description="Host names besides the FHIR server's that export files may be downloaded "
        "from (e.g. the object store a server hands files out of); the access token goes there "
        "too when the manifest sets requiresAccessToken. Others are refused: a manifest must not "
        "send ChartSight to an address nobody listed.",
    )
    max_file_bytes: int = Field(
        default=8 * 2**30,
        ge=1,
        description="Largest export file accepted, in bytes: as downloaded (checked against "
        "Content-Length and while streaming) and, for a gzip file, once decompressed. A larger "
        "file counts as failed and nothing of it is imported.",
    )
    state_dir: Path | None = Field(
        default=None,
        description="Where exports in progress (status URL, manifest, downloaded files) are kept "
        "so that a killed run resumes; default: <home>/bulk.",
    )


class StoreSettings(BaseModel):
    """The embedded local FHIR store."""

    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default: a SQLite file under the ChartSight home folder.",
    )
    batch_size: int = Field(default=500, description="Resources written per flush during import.")


class DicomWebSettings(BaseModel):
    """A PACS reached over DICOMweb, used for ImagingStudy resources without an Endpoint."""

    url: str | None = Field(default=None, description="DICOMweb root, e.g. http://pacs/dicom-web.")
    token: SecretStr | None = None
    http: HttpSettings = HttpSettings()


class ImageSettings(BaseModel):
    """Limits on the images fetched for a patient."""

    max_bytes: int = Field(default=64 * 1024 * 1024, description="Largest image payload accepted.")
    max_pixels: int = Field(default=64_000_000, description="Largest decoded image accepted.")
    max_instances_per_series: int = Field(
        default=3, description="DICOM instances taken per series (evenly spaced)."
    )
    max_images: int = Field(default=32, description="Images taken per patient.")
    fetch_external_urls: bool = Field(
        default=False,
        description="Fetch attachment URLs outside the FHIR server (off: avoids server-side "
        "request forgery through a crafted record).",
    )
