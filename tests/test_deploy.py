"""The documented deployment (``deploy/``) is consistent with the product: every ChartSight replica
loads its settings as written, shares the store, threads, audit log and index location, points at
the model server and databases the file defines, the proxy balances over exactly the replicas, and
the image holds every package. (Running it needs Docker, which this machine lacks; replicas
sharing one PostgreSQL and index location run for real in tests/surfaces/http/test_replicas.py.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from surfaces.settings import load_app_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "VLLM_API_KEY": "vllm-secret", "HF_TOKEN": ""}


def _interpolate(value: Any) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` with ``SECRETS``."""
    if isinstance(value, str):

        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in SECRETS:
                raise AssertionError(f"compose.yaml uses ${{{name}}}, which is not documented")
            return SECRETS[name]

        return re.sub(r"\$\{([A-Z_]+)(?::[-?][^}]*)?\}", one, value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _interpolate(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def _replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in compose["services"].items() if k.startswith("chartsight")}


def test_every_replica_loads_its_settings_and_shares_the_state(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
):
    replicas = _replicas(compose)
    assert len(replicas) >= 2
    postgres = compose["services"]["postgres"]
    databases = {postgres["environment"]["POSTGRES_DB"]} | set(
        re.findall(r"CREATE DATABASE (\w+)", (DEPLOY / "initdb" / "10-chartsight.sql").read_text())
    )
    loaded = []
    for service in replicas.values():
        env = service["environment"]
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("CHARTSIGHT_CONFIG", str(DEPLOY / "chartsight.toml"))
        settings = load_app_settings(DEPLOY / "chartsight.toml")
        urls = [
            settings.store_url,
            settings.threads_url,
            settings.serve.audit_url or "",
            settings.serve.cds.database_url or "",
        ]
        for url in urls:
            parts = urlsplit(url)
            assert parts.scheme == "postgresql+psycopg" and parts.hostname == "postgres", url
            assert parts.password == SECRETS["POSTGRES_PASSWORD"]
            assert parts.path.lstrip("/") in databases, url
        assert len(set(urls)) == 4  # store, threads, audit and CDS kept apart
        # the index and the Bulk exports in progress outlive the container (named volumes)
        for folder in (settings.index_path, settings.bulk_state_dir):
            mounts = [v for v in service["volumes"] if v.endswith(":" + str(folder))]
            assert mounts and not mounts[0].startswith(("./", "/")), folder
        model = settings.model
        assert urlsplit(model.base_url or "").hostname == "vllm"
        assert model.api_key and model.api_key.get_secret_value() == SECRETS["VLLM_API_KEY"]
        loaded.append((tuple(urls), settings.index_path, tuple(service["command"])))
    assert len(set(loaded)) == 1  # every replica alike


def test_the_model_server_serves_the_model_the_settings_name(compose: dict[str, Any]):
    config = tomllib.loads((DEPLOY / "chartsight.toml").read_text())
    args = compose["services"]["vllm"]["command"]
    served = next(a.split("=", 1)[1] for a in args if a.startswith("--served-model-name="))
    assert served == config["model"]["model"]
    assert urlsplit(config["model"]["base_url"]).port == 8000  # vLLM's port
    assert f"--api-key={SECRETS['VLLM_API_KEY']}" in args


def test_the_proxy_balances_over_exactly_the_replicas(compose: dict[str, Any]):
    conf = (DEPLOY / "nginx.conf").read_text()
    replicas = _replicas(compose)
    ports = {str(s["command"][s["command"].index("--port") + 1]) for s in replicas.values()}
    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\}", conf, re.S))
    assert set(upstreams) == {"chartsight", "chartsight_smart"}
    for body in upstreams.values():
        servers = set(re.findall(r"server (chartsight-[\w-]+):(\d+)", body))
        assert {name for name, _ in servers} == set(replicas)
        assert {port for _, port in servers} == ports
    # the SMART page's sessions are per process: its paths stay on one replica per client
    assert "ip_hash;" in upstreams["chartsight_smart"]
    smart = re.search(r"location ~ \^/\((.*?)\)", conf)
    assert smart and set(smart.group(1).split("|")) == {"launch", "callback", "app"}
    assert "proxy_pass http://chartsight_smart;" in conf
    assert "proxy_buffering off" in conf  # Server-Sent Events pass through
    assert "non_idempotent" not in conf  # a POST is never replayed on another replica


def test_the_image_holds_every_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) ", (DEPLOY / "Dockerfile").read_text(), re.M))
    assert packages <= copied, packages - copied
