"""Shared fixtures: demo data, a local store, and the real peer servers (started once per session)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One ONNX export of the text encoder serves every test (each test's home would export again).
os.environ.setdefault(
    "CHARTSIGHT_RETRIEVAL__ENCODERS__CACHE_DIR",
    str(Path(__file__).resolve().parents[1] / "test-artifacts" / "models"),
)

from connectors.demo import demo_bundles, import_demo
from connectors.store import FhirStore
from tests.peers.servers import Medplum, Orthanc, Sekmet

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def install_entry_point(
    root: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str, group: str, entry: str
) -> None:
    """Make a one-module distribution importable, with ``entry`` (``name = module:attr``) in the
    entry point ``group``, the way an installed plug-in package would be."""
    (root / f"{module}.py").write_text(source)
    dist = root / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")
    monkeypatch.syspath_prepend(str(root))


def load_bundle(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def bundles() -> list[Path]:
    return demo_bundles()


@pytest.fixture(scope="session")
def smallest_bundle(bundles: list[Path]) -> Path:
    return min(bundles, key=lambda p: len(load_bundle(p)["entry"]))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh CHARTSIGHT_HOME (``tmp_path/home``) and working folder, no settings file."""
    monkeypatch.setenv("CHARTSIGHT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CHARTSIGHT_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FhirStore]:
    s = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirStore]:
    s = FhirStore(f"sqlite:///{tmp_path_factory.mktemp('demo') / 'store.db'}")
    import_demo(s)
    yield s
    s.close()


@pytest.fixture(scope="session")
def tommy_json() -> list[dict[str, Any]]:
    """The demo patient Tommy Friesen's resources as plain FHIR JSON."""
    from connectors.demo import TOMMY_FRIESEN

    path = next(
        p for p in demo_bundles() if load_bundle(p)["entry"][0]["resource"]["id"] == TOMMY_FRIESEN
    )
    return [e["resource"] for e in load_bundle(path)["entry"]]


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server for the session (the distribution's binaries)."""
    from tests.peers.postgres import PostgresServer

    with PostgresServer() as server:
        yield server


def post_transaction(base_url: str, bundle: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        base_url, json=bundle, headers={"Content-Type": "application/fhir+json"}, timeout=120
    )
    response.raise_for_status()
    return response.json()


class LoadedServer:
    """A running FHIR server with the demo patients loaded; maps Synthea ids to the server's ids."""

    def __init__(self, server: Any, patient_ids: dict[str, str]) -> None:
        self.server = server
        self.base_url: str = server.base_url
        self.patient_ids = patient_ids


def _load(server: Any, paths: list[Path]) -> LoadedServer:
    ids = {}
    for path in paths:
        bundle = load_bundle(path)
        original = bundle["entry"][0]["resource"]["id"]
        reply = post_transaction(server.base_url, bundle)
        location = reply["entry"][0]["response"]["location"]
        ids[original] = location.split("Patient/")[1].split("/")[0]
    return LoadedServer(server, ids)


@pytest.fixture(scope="session")
def sekmet(bundles: list[Path]) -> Iterator[LoadedServer]:
    with Sekmet() as server:
        yield _load(server, bundles)


@pytest.fixture(scope="session")
def medplum(smallest_bundle: Path) -> Iterator[LoadedServer]:
    # Medplum's memory repository scans every resource per query: load one small patient only.
    with Medplum() as server:
        yield _load(server, [smallest_bundle])


@pytest.fixture(scope="session")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc() as server:
        yield server


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# Property-based tests run the same examples on every run and machine (derandomize), keep no
# example database, and stay within seconds; a test may lower max_examples further. For a long
# hunt for new failing examples: CHARTSIGHT_HYPOTHESIS=explore pytest --timeout=0 tests/...
# (random, 5000 examples a test: minutes each).
settings.register_profile(
    "chartsight",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore", settings.get_profile("chartsight"), derandomize=False, max_examples=5000
)
settings.load_profile(os.environ.get("CHARTSIGHT_HYPOTHESIS", "chartsight"))
