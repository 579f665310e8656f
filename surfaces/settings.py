"""The surfaces' settings: the agent's ``Settings`` plus the HTTP service's ``[serve]`` section
(limits, authentication, audit, CDS Hooks, the SMART app), composed here at the edge so that the
agent knows nothing of the surfaces."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from agent import Settings
from agent.settings import settings_from
from connectors.settings import SmartBackendSettings


class ApiKey(BaseModel):
    """A service account. Only the key's SHA-256 is configured, never the key itself."""

    client_id: str
    key_sha256: str = Field(
        pattern=r"^[0-9A-Fa-f]{64}$",
        description="Hex SHA-256 of the key (64 hex digits; `chartsight api-key` makes one).",
    )
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


class CdsClient(BaseModel):
    """A CDS Client (an EHR) trusted to call the CDS Hooks services with a signed JWT (CDS Hooks
    2.0, "Trusting CDS Clients"): its ``iss``, where its public keys are (a JWK Set URL, or the
    set itself, agreed out of band), the other ``jku`` URLs it may name, and what it may read."""

    iss: str = Field(description="The `iss` its JWTs carry (compared exactly).")
    jwks_url: str | None = Field(
        default=None, description="Its JWK Set URL: the keys used when a JWT has no `jku`."
    )
    jwks: dict[str, Any] | None = Field(
        default=None, description='Its JWK Set itself (`{"keys": [...]}`), instead of a URL.'
    )
    jku: list[str] = Field(
        default=[],
        description="Other JWK Set URLs a JWT's `jku` header may name; a `jku` that is neither "
        "this nor `jwks_url` is refused without being fetched.",
    )
    tenants: list[str] = Field(
        default=[], description="When set, the JWT's `tenant` must be one of these."
    )
    client_id: str | None = Field(
        default=None, description="Its name in the audit log and rate limits (default: `iss`)."
    )
    scopes: str = Field(
        default="user/*.read",
        description="SMART scopes it is granted: user/*.read reads the patient the EHR's user "
        "opened; patient/… scopes are not meaningful for an EHR.",
    )

    @model_validator(mode="after")
    def _has_keys(self) -> CdsClient:
        if not self.jwks_url and not self.jwks:
            raise ValueError(f"CDS client {self.iss!r}: set jwks_url or jwks (its public keys)")
        return self


class CdsSettings(BaseModel):
    """CDS Hooks 2.0 trust and state (``[serve.cds]``): the trusted CDS Clients whose signed JWTs
    are verified on each call, whether other credentials are accepted too, and where the seen
    ``jti`` values, issued cards and feedback are kept."""

    clients: list[CdsClient] = []
    signed_only: bool = Field(
        default=False,
        description="Accept only CDS Client JWTs on /cds-services (discovery included), as the "
        "spec asks; false also accepts the service's API keys and SMART bearer tokens.",
    )
    max_lifetime_s: float = Field(
        default=300.0, gt=0, description="Longest a CDS Client JWT may live (`exp` - `iat`)."
    )
    leeway_s: float = Field(default=30.0, ge=0, description="Clock skew allowed on exp and iat.")
    algorithms: list[str] = Field(
        default=["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384"],
        description="Asymmetric algorithms only: the spec forbids `none` and HMAC.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL for seen jti values, issued cards and feedback (default: "
        "<home>/cds.db); one database shared by every worker makes replay refusal hold across "
        "them.",
    )


class AuditRepositorySettings(BaseModel):
    """A hospital's audit repository: a FHIR R4 server that accepts AuditEvents (IHE RESTful
    ATNA / BALP). The audit log's rows are sent there as batch Bundles of AuditEvents; what it
    has not accepted yet waits in the audit database (the spool) and is sent again with backoff."""

    url: str = Field(description="The repository's FHIR base URL, e.g. https://arr.example/fhir.")
    token: SecretStr | None = Field(default=None, description="A static bearer token.")
    smart: SmartBackendSettings | None = Field(
        default=None, description="SMART Backend Services (client credentials, signed JWT)."
    )
    batch_size: int = Field(default=50, ge=1, le=1000, description="AuditEvents per Bundle.")
    timeout_s: float = Field(default=15.0, gt=0, description="One POST's timeout.")
    poll_s: float = Field(
        default=5.0, gt=0, description="How often to look for rows when none was announced."
    )
    backoff_base_s: float = Field(
        default=1.0, gt=0, description="First wait after a failed POST; doubles each failure."
    )
    backoff_max_s: float = Field(default=300.0, gt=0, description="The longest wait.")


class AuditSettings(BaseModel):
    """Where the audit log goes besides its own database (``serve.audit_url``)."""

    repository: AuditRepositorySettings | None = Field(
        default=None, description="Forward every audit row as a FHIR AuditEvent to this server."
    )


class OpsSettings(BaseModel):
    """Operations (``[serve.ops]``): the request log's caller hash, who may read ``/metrics``,
    and the docs pages."""

    log_salt: SecretStr | None = Field(
        default=None,
        description="Salt of the request log's `caller` (the first 16 hex digits of SHA-256 of "
        "salt + client id). Set the same value on every worker and restart to keep a caller's "
        "hash comparable across them; unset, each process draws a random one.",
    )
    metrics: Literal["loopback", "token", "off"] = Field(
        default="loopback",
        description="Who may read `GET /metrics`: `loopback` (clients connecting from 127.0.0.1 "
        "or ::1 only; behind a reverse proxy on the same host use `token`), `token` (a bearer "
        "token whose SHA-256 is `metrics_token_sha256`), or `off` (404).",
    )
    metrics_token_sha256: str | None = Field(
        default=None,
        description='Hex SHA-256 of the scraper\'s bearer token, for `metrics = "token"`.',
    )
    docs: bool = Field(
        default=True,
        description="Serve the OpenAPI docs pages `/docs` (Swagger UI) and `/redoc`, with their "
        "scripts and styles from the installed package (no CDN).",
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
    auth: AuthSettings = AuthSettings()
    smart: SmartAppSettings = SmartAppSettings()
    cds: CdsSettings = CdsSettings()
    audit: AuditSettings = AuditSettings()
    ops: OpsSettings = OpsSettings()


class AppSettings(Settings):
    """The agent's settings and the ``[serve]`` section (``CHARTSIGHT_SERVE__*``): what the
    command line and the HTTP service are built with."""

    serve: ServeSettings = ServeSettings()


def load_app_settings(config: Path | None = None, **overrides: Any) -> AppSettings:
    """``AppSettings`` from the environment and a TOML file (``config`` or the default),
    ``overrides`` on top."""
    return settings_from(AppSettings, config, **overrides)
