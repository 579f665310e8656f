"""The surfaces' settings: the agent's settings plus ``[serve]``, from one TOML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import ConfigurationError
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
key_sha256 = "ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12ab12"
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
    with pytest.raises(ConfigurationError, match="fhri"):
        load_settings(config)
    with pytest.raises(ConfigurationError, match="fhri"):
        load_app_settings(config)
    config.write_text('[serve]\nport = "not a port"\n')
    with pytest.raises(ConfigurationError, match="setting serve.port in .*cs.toml"):
        load_app_settings(config)
    # the README's placeholder pasted as it is: no key could ever match it
    config.write_text('[[serve.auth.api_keys]]\nclient_id = "x"\nkey_sha256 = "…"\n')
    with pytest.raises(ConfigurationError, match="serve.auth.api_keys.0.key_sha256"):
        load_app_settings(config)


def test_a_broken_config_file_is_a_clear_error_in_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A pasted config with a TOML error or a wrong value: one line naming the file, the line or
    the setting, never a traceback (``chartsight serve`` included)."""
    from typer.testing import CliRunner

    from surfaces.cli import app

    monkeypatch.chdir(tmp_path)
    env = {"CHARTSIGHT_HOME": str(tmp_path / "home")}
    for text, says in (
        ("[serve.auth\nanonymous = true\n", "chartsight.toml is not valid TOML"),
        ('[serve]\nport = "abc"\n', "setting serve.port in chartsight.toml"),
    ):
        (tmp_path / "chartsight.toml").write_text(text)
        for command in (["record", "x"], ["serve"], ["ask", "x", "age?"]):
            result = CliRunner().invoke(app, command, env=env)
            assert result.exit_code == 1, (command, result.output)
            assert says in " ".join(result.output.split()), (command, result.output)
            assert "Traceback" not in result.output
            assert result.exception is None or isinstance(result.exception, SystemExit)


def test_api_key_prints_a_settings_entry_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import tomllib

    from typer.testing import CliRunner

    from surfaces.cli import app
    from surfaces.http.security import key_digest

    monkeypatch.chdir(tmp_path)
    made = CliRunner().invoke(
        app, ["api-key", 'ehr "plug-in"', "--scopes", "patient/*.read", "--patient", "p-1"]
    )
    assert made.exit_code == 0, made.output
    key = made.output.split("key (shown once): ", 1)[1].split()[0]
    entry = made.output.split("settings entry (chartsight.toml):\n", 1)[1]
    (tmp_path / "chartsight.toml").write_text(entry)
    (loaded,) = load_app_settings().serve.auth.api_keys
    assert loaded.client_id == 'ehr "plug-in"' and loaded.patient == "p-1"
    assert loaded.key_sha256 == key_digest(key) and loaded.scopes == "patient/*.read"
    assert tomllib.loads(entry)["serve"]["auth"]["api_keys"][0]["patient"] == "p-1"
    # a patient-level key without its patient, or scopes that read nothing, are refused
    unbound = CliRunner().invoke(app, ["api-key", "x", "--scopes", "patient/*.read"])
    assert unbound.exit_code == 1 and "need --patient" in unbound.output
    useless = CliRunner().invoke(app, ["api-key", "x", "--scopes", "openid"])
    assert useless.exit_code == 1 and "let the key read neither" in " ".join(useless.output.split())
    # an auditor's key reads the audit trail and no record: made as the README shows it
    auditor = CliRunner().invoke(
        app, ["api-key", "privacy-office", "--scopes", "user/AuditEvent.rs"]
    )
    assert auditor.exit_code == 0 and 'scopes = "user/AuditEvent.rs"' in auditor.output


def test_serve_warns_when_no_credentials_are_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from typer.testing import CliRunner

    from surfaces.cli import app

    started: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(a))
    monkeypatch.chdir(tmp_path)
    env = {"CHARTSIGHT_HOME": str(tmp_path / "home")}
    bare = CliRunner().invoke(app, ["serve"], env=env)
    assert bare.exit_code == 0 and started
    assert "no credentials are configured" in " ".join(bare.output.split())
    (tmp_path / "chartsight.toml").write_text(SHARED.replace('home = "/srv/cs"\n', ""))
    configured = CliRunner().invoke(app, ["serve"], env=env)
    assert configured.exit_code == 0 and "no credentials" not in configured.output
    # the request log is the service's output without -v (its root logger says WARNING), bare
    # JSON lines through a handler of its own (never a root handler's decorated, wrapped lines)
    import logging

    api = logging.getLogger("chartsight.api")
    ours = [h for h in api.handlers if getattr(h, "chartsight_request_log", False)]
    try:
        assert api.getEffectiveLevel() == logging.INFO and not api.propagate
        assert len(ours) == 1  # once, though serve ran twice
        record = logging.makeLogRecord({"msg": '{"event": "request"}', "levelno": logging.INFO})
        assert ours[0].format(record) == '{"event": "request"}'
    finally:  # the handler writes to the runner's stderr, gone now: leave the logger as it was
        for handler in ours:
            api.removeHandler(handler)
        api.propagate = True
        api.setLevel(logging.NOTSET)
