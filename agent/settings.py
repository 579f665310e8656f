"""The agent's settings object, built at the edge (CLI, server) and passed down. A surface adds
its own sections by subclassing (``surfaces.settings.AppSettings`` adds ``[serve]``).

Sources, highest first: explicit arguments, ``CHARTSIGHT_*`` environment variables (nested with
``__``, e.g. ``CHARTSIGHT_FHIR__URL``), a TOML file (``--config``, ``CHARTSIGHT_CONFIG`` or
``./chartsight.toml``), then defaults.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.backends import BackendSettings
from connectors.errors import ConfigurationError
from connectors.settings import (
    BulkSettings,
    DicomWebSettings,
    FhirServerSettings,
    ImageSettings,
    StoreSettings,
)
from retrieval.settings import RetrievalSettings

# Sections of a shared settings file that the surfaces read (``surfaces.settings.AppSettings``
# adds ``serve``): the agent's own settings pass over them instead of refusing the file.
EDGE_SECTIONS = frozenset({"serve"})


def _config_file() -> Path | None:
    explicit = os.environ.get("CHARTSIGHT_CONFIG")
    if explicit:
        return Path(explicit)
    local = Path("chartsight.toml")
    return local if local.is_file() else None


class IndexBuildSettings(BaseModel):
    """How ``chartsight index build`` runs: on this process (``local``, the default) or on a Ray
    cluster (``ray``: patients' cases built and encoded in batches on Ray actors, the FAISS index
    filled in shards and merged; ``agent.index_ray``). Both write the same index."""

    engine: Literal["local", "ray"] = Field(
        default="local", description="'local' (this process) or 'ray' (Ray actors)."
    )
    address: str | None = Field(
        default=None,
        description="The Ray cluster to use ('ray://head:10001', or 'auto' for one already "
        "running on this machine); none: a Ray instance started on this machine for the build "
        "and stopped after it.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="Ray actors that build and encode cases (default: one per GPU of the "
        "cluster, else one per CPU).",
    )
    batch_patients: int = Field(
        default=64, ge=1, description="Patients per Ray task (cases built and encoded together)."
    )
    gpus_per_worker: float | None = Field(
        default=None,
        ge=0,
        description="GPUs each actor reserves (default: 1 when the cluster has GPUs, else 0); "
        "encoders then run on the actor's GPU (encoders.device 'auto').",
    )


class Settings(BaseSettings):
    """All of ChartSight's settings."""

    model_config = SettingsConfigDict(
        env_prefix="CHARTSIGHT_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    # The TOML file to read; set by load_settings(config), else CHARTSIGHT_CONFIG or ./chartsight.toml.
    config_file: ClassVar[Path | None] = None

    home: Path = Field(
        default=Path("~/.chartsight"), description="Folder for the local store and other state."
    )
    fhir: FhirServerSettings = FhirServerSettings()
    store: StoreSettings = StoreSettings()
    bulk: BulkSettings = BulkSettings()
    dicomweb: DicomWebSettings = DicomWebSettings()
    images: ImageSettings = ImageSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    index_build: IndexBuildSettings = IndexBuildSettings()
    model: BackendSettings = BackendSettings()
    cache_patients: int = Field(
        default=256, ge=1, description="Patients whose record a running agent keeps in memory."
    )
    cache_ttl_s: float = Field(
        default=300.0,
        ge=0,
        description="A kept record older than this is fetched again for the next question.",
    )
    threads: str | None = Field(
        default=None,
        description="Where conversation threads are kept: a SQLite path or a PostgreSQL URL "
        "(default: <home>/threads.db).",
    )

    @model_validator(mode="after")
    def _models_under_home(self) -> Settings:
        """ONNX exports of text encoders live in ``<home>/models`` unless set elsewhere."""
        if self.retrieval.encoders.cache_dir is None:
            self.retrieval.encoders.cache_dir = self.home.expanduser() / "models"
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Settings come from init arguments, then ``CHARTSIGHT_*`` environment variables (``__``
        between levels), then the TOML file, then defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = cls.config_file or _config_file()
        if path is not None:
            toml = TomlConfigSettingsSource(settings_cls, toml_file=path)
            foreign = EDGE_SECTIONS - set(settings_cls.model_fields)
            if foreign & set(toml.toml_data):
                kept = {k: v for k, v in toml.toml_data.items() if k not in foreign}
                sources.append(InitSettingsSource(settings_cls, kept))
            else:
                sources.append(toml)
        return tuple(sources)

    @property
    def store_url(self) -> str:
        """SQLAlchemy URL of the local store."""
        if self.store.url:
            return self.store.url
        return f"sqlite:///{self.home.expanduser() / 'store.db'}"

    @property
    def threads_url(self) -> str:
        """Checkpointer location of conversation threads."""
        return self.threads or str(self.home.expanduser() / "threads.db")

    @property
    def bulk_state_dir(self) -> Path:
        """Folder of the Bulk Data exports in progress and of each export's last transactionTime."""
        return (self.bulk.state_dir or self.home / "bulk").expanduser()

    @property
    def index_path(self) -> Path:
        """Folder of the similar-case index."""
        return (self.retrieval.index.path or self.home / "index").expanduser()


S = TypeVar("S", bound=Settings)


def settings_from(kind: type[S], config: Path | None = None, **overrides: Any) -> S:
    """Settings of ``kind`` (``Settings``, or a surface's subclass of it) from the environment and
    a TOML file (``config`` or the default), ``overrides`` on top. Raises ``ConfigurationError``
    naming the file, line and setting when the file is not TOML or a value is wrong."""
    path = config or _config_file()
    try:
        if config is None:
            return kind(**overrides)
        if not config.is_file():
            raise ConfigurationError(f"config file {config} does not exist")
        from_file = type(kind.__name__, (kind,), {"config_file": config})
        return from_file(**overrides)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from exc
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        origin = f" in {path} or the CHARTSIGHT_ environment" if path else ""
        raise ConfigurationError(f"setting {where}{origin}: {first.get('msg')}{more}") from exc


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """The agent's settings from the environment and a TOML file (``config`` or the default),
    ``overrides`` on top."""
    return settings_from(Settings, config, **overrides)
