"""The surfaces' settings: the agent's ``Settings`` plus the HTTP service's ``[serve]`` section
(limits, authentication, audit, CDS Hooks, the SMART app), composed here at the edge so that the
agent knows nothing of the surfaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr

from agent import Settings
from agent.settings import settings_from


class ApiKey(BaseModel):
    """A service account. Only the key's SHA-256 is configured, never the key itself."""

    client_id: str
    key_sha256: str = Field(description="Hex SHA-256 of the key (`chartsight api-key` makes one).")
    scopes: str = Field(default="system/*.read", description="SMART scopes granted to the key.")
    patient: str | None = Field(default=None, description="Bind the key to one patient.")


class AuthSettings(BaseModel):
    """Who may call the service: OAuth2 bearer JWTs from an issuer (SMART), and API keys."""

    api_keys: list[ApiKey] = []
    issuer: str | None = Field(default=None, description="The `iss` a bearer JWT must carry.")
    jwks_url: str | None = Field(
        default=None, description="Where the issuer's signing keys are (JWKS)."
    )
    audience: str | None = Field(default=None, description="The `aud` a bearer JWT must carry.")
    algorithms: list[str] = ["RS256", "RS384", "ES256", "ES384"]
    leeway_s: float = 30.0
    anonymous: bool = Field(
        default=False,
        description="Let unauthenticated requests in with `user/*.read` (local development only).",
    )


class SmartAppSettings(BaseModel):
    """The SMART on FHIR app page: which EHRs may launch it, and as which client: public (PKCE
    only), confidential symmetric (``client_secret``) or confidential asymmetric
    (``private_key_path``: ``private_key_jwt``, SMART App Launch 2.2
    "client-confidential-asymmetric", with PKCE as well)."""

    issuers: list[str] = Field(
        default=[], description="FHIR base URLs (iss) allowed to launch the app; none by default."
    )
    client_id: str = "chartsight"
    client_secret: SecretStr | None = Field(
        default=None, description="For a confidential client; a public client relies on PKCE."
    )
    scope: str = Field(
        default="launch openid fhirUser patient/*.read",
        description="Scopes the page requests; `openid fhirUser` names the user in the audit log "
        "(from the EHR's signed id_token). SMART v2 scopes (patient/Observation.rs, ...) are "
        "enforced per resource type.",
    )
    private_key_path: Path | None = Field(
        default=None,
        description="PEM file of the client's private key (RSA or EC): the token request is "
        "authenticated with a signed client_assertion (private_key_jwt); the public key is "
        "served at /.well-known/jwks.json for the EHR to register.",
    )
    key_id: str | None = Field(
        default=None, description="`kid` of that key, in the JWKS and in each assertion."
    )
    algorithm: Literal["RS384", "ES384"] = Field(
        default="RS384", description="How assertions are signed (SMART allows RS384 or ES384)."
    )


class ServeSettings(BaseModel):
    """The HTTP service (``chartsight serve``): where it listens, its limits and who may call it."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = Field(
        default=None, description="This service's URL as EHRs reach it (for links in CDS cards)."
    )
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    cds_max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="CDS Hooks requests (with prefetch)."
    )
    max_question_chars: int = Field(default=2000, ge=10)
    request_timeout_s: float = Field(default=120.0, gt=0)
    rate_per_minute: float = Field(
        default=120.0, gt=0, description="Sustained requests per client."
    )
    rate_burst: int = Field(default=30, ge=1, description="Requests a client may make at once.")
    audit_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the audit log (default: <home>/audit.db)."
    )
    cds_budget_s: float = Field(
        default=2.0, gt=0, description="How long a CDS Hooks call may take before an info card."
    )
    cds_fhir_servers: list[str] = Field(
        default=[],
        description="FHIR base URLs a CDS Hooks request's fhirServer may name (with the "
        "configured fhir.url); any other is refused with 400 before a connection is made, and "
        "the request's fhirAuthorization token is never sent to it.",
    )
    cds_question: str = Field(
        default="What are the active problems, current medications and latest abnormal results?",
        description="The question the patient-view service answers.",
    )
    auth: AuthSettings = AuthSettings()
    smart: SmartAppSettings = SmartAppSettings()


class AppSettings(Settings):
    """The agent's settings and the ``[serve]`` section (``CHARTSIGHT_SERVE__*``): what the
    command line and the HTTP service are built with."""

    serve: ServeSettings = ServeSettings()


def load_app_settings(config: Path | None = None, **overrides: Any) -> AppSettings:
    """``AppSettings`` from the environment and a TOML file (``config`` or the default),
    ``overrides`` on top."""
    return settings_from(AppSettings, config, **overrides)
