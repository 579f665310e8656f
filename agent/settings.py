"""The one settings object, built at the edge (CLI, server) and passed down.

Sources, highest first: explicit arguments, ``CHARTSIGHT_*`` environment variables (nested with
``__``, e.g. ``CHARTSIGHT_FHIR__URL``), a TOML file (``--config``, ``CHARTSIGHT_CONFIG`` or
``./chartsight.toml``), then defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from agent.api.settings import ServeSettings
from agent.backends import BackendSettings
from connectors.errors import ConfigurationError
from connectors.settings import DicomWebSettings, FhirServerSettings, ImageSettings, StoreSettings
from retrieval.settings import RetrievalSettings


def _config_file() -> Path | None:
    explicit = os.environ.get("CHARTSIGHT_CONFIG")
    if explicit:
        return Path(explicit)
    local = Path("chartsight.toml")
    return local if local.is_file() else None


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
    dicomweb: DicomWebSettings = DicomWebSettings()
    images: ImageSettings = ImageSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    model: BackendSettings = BackendSettings()
    serve: ServeSettings = ServeSettings()
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = cls.config_file or _config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
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
    def index_path(self) -> Path:
        """Folder of the similar-case index."""
        return (self.retrieval.index.path or self.home / "index").expanduser()


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment and a TOML file (``config`` or the default), ``overrides`` on top."""
    if config is None:
        return Settings(**overrides)
    if not config.is_file():
        raise ConfigurationError(f"config file {config} does not exist")
    from_file = type("Settings", (Settings,), {"config_file": config})
    return from_file(**overrides)
