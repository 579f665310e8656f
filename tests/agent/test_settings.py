"""One settings object: defaults, CHARTSIGHT_ environment variables, a TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.settings import Settings, load_settings
from connectors.errors import ConfigurationError


def test_environment_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "cs.toml"
    config.write_text(
        'home = "/srv/cs"\n[fhir]\nurl = "https://ehr.example/fhir"\npage_size = 50\n[fhir.http]\nmax_retries = 2\n'
    )
    monkeypatch.setenv("CHARTSIGHT_FHIR__PAGE_SIZE", "75")
    settings = load_settings(config)
    assert settings.fhir.url == "https://ehr.example/fhir"
    assert settings.fhir.page_size == 75  # the environment wins over the file
    assert settings.fhir.http.max_retries == 2
    assert settings.store_url == "sqlite:////srv/cs/store.db"
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_defaults_use_the_embedded_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CHARTSIGHT_HOME", str(tmp_path))
    settings = Settings()
    assert settings.fhir.url is None
    assert settings.store_url == f"sqlite:///{tmp_path / 'store.db'}"
