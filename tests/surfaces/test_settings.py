"""The surfaces' settings: the agent's settings plus ``[serve]``, from one TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.settings import load_settings
from surfaces.settings import AppSettings, load_app_settings

SHARED = """
home = "/srv/cs"
[fhir]
url = "https://ehr.example/fhir"
[serve]
host = "0.0.0.0"
public_url = "https://chartsight.hospital.example"
[serve.auth]
issuer = "https://ehr.example/auth"
[[serve.auth.api_keys]]
client_id = "ehr-plugin"
key_sha256 = "ab12"
scopes = "system/*.read"
[serve.smart]
issuers = ["https://ehr.example/fhir"]
"""


def test_one_file_serves_the_cli_and_the_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "chartsight.toml"
    config.write_text(SHARED)
    monkeypatch.setenv("CHARTSIGHT_SERVE__PORT", "9090")
    app = load_app_settings(config)
    assert isinstance(app, AppSettings)
    assert app.serve.host == "0.0.0.0" and app.serve.port == 9090  # the environment wins
    assert app.serve.auth.issuer == "https://ehr.example/auth"
    assert [k.client_id for k in app.serve.auth.api_keys] == ["ehr-plugin"]
    assert app.serve.smart.issuers == ["https://ehr.example/fhir"]
    assert (
        app.fhir.url == "https://ehr.example/fhir" and app.store_url == "sqlite:////srv/cs/store.db"
    )
    # the agent's own settings read the same file and pass over the surfaces' section
    core = load_settings(config)
    assert core.fhir.url == "https://ehr.example/fhir" and not hasattr(core, "serve")
    # ./chartsight.toml is found without --config as well
    assert load_app_settings().serve.public_url == "https://chartsight.hospital.example"


def test_unknown_sections_are_still_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "cs.toml"
    config.write_text(SHARED + '[fhri]\nurl = "https://typo.example"\n')
    with pytest.raises(ValidationError, match="fhri"):
        load_settings(config)
    with pytest.raises(ValidationError, match="fhri"):
        load_app_settings(config)
    config.write_text('[serve]\nport = "not a port"\n')
    with pytest.raises(ValidationError, match="serve.port"):
        load_app_settings(config)
