"""The HTTP service running for real under uvicorn on 127.0.0.1, with a token issuer beside it, and
a headless browser (Debian's chromium, driven by Selenium) for the SMART page's tests. Every log
record the service writes during these tests, at the levels ``chartsight serve`` logs by default,
is kept and searched for the demo patients' PHI when the session ends (``service_log_has_no_phi``)."""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.http.app import create_app
from surfaces.http.security import key_digest
from surfaces.settings import ApiKey, AppSettings
from tests.peers.asgi import ThreadedServer
from tests.peers.issuer import Issuer

EHR_KEY = "test-ehr-key"  # system/*.read
BOUND_KEY = "test-bound-key"  # patient/*.read, Tommy only


def patient_phi(store: FhirStore) -> set[str]:
    """Every patient's record id, name parts, birth date and identifier values in ``store``, each
    of at least 4 characters ("Li" would match anything)."""
    found: set[str] = set()
    for patient in store.search("Patient").resources:
        data = patient.model_dump(mode="json")
        found.add(data["id"])
        found.add(data.get("birthDate") or "")
        for name in data.get("name", []):
            found.update(name.get("given", []))
            found.add(name.get("family") or "")
        found.update(str(i.get("value") or "") for i in data.get("identifier", []))
    return {v for v in found if len(v) >= 4}


class ServiceLog(logging.Handler):
    """The records ``chartsight serve`` would write at its default levels (``surfaces.cli.serve``:
    its request log ``chartsight.api`` and uvicorn's at INFO, everything else at WARNING), with
    their tracebacks; the tests' own HTTP clients (httpx, httpcore) left out."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("httpx", "httpcore")):
            return
        floor = logging.INFO if record.name.startswith(("chartsight.api", "uvicorn")) else 30
        if record.levelno < floor:
            return
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info))
        self.lines.append((record.name, text))


@pytest.fixture(scope="session", autouse=True)
def service_log_has_no_phi(demo_store: FhirStore) -> Iterator[ServiceLog]:
    """Keeps what the service logs during every test of this package, at ``chartsight serve``'s
    default levels, and fails the session when a line holds a demo patient's name, birth date,
    identifier or record id."""
    handler = ServiceLog()
    root, api = logging.getLogger(), logging.getLogger("chartsight.api")
    level = api.level
    api.setLevel(logging.INFO)  # as ``chartsight serve`` sets it
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    api.setLevel(level)
    phi = patient_phi(demo_store)
    leaks = [
        (name, value, text[:300]) for name, text in handler.lines for value in phi if value in text
    ]
    assert not leaks, f"PHI in the service's log: {leaks[:5]}"


@pytest.fixture(scope="session")
def issuer() -> Iterator[Issuer]:
    with Issuer() as server:
        yield server


def api_settings(home: Path, store: FhirStore, issuer: Issuer, **serve: Any) -> AppSettings:
    settings = AppSettings(home=home, store={"url": str(store.engine.url)})
    settings.serve.auth.issuer = issuer.url
    settings.serve.auth.jwks_url = issuer.jwks_url
    settings.serve.auth.audience = "chartsight"
    settings.serve.auth.api_keys = [
        ApiKey(client_id="ehr", key_sha256=key_digest(EHR_KEY), scopes="system/*.read"),
        ApiKey(
            client_id="bound",
            key_sha256=key_digest(BOUND_KEY),
            scopes="patient/*.read",
            patient=TOMMY_FRIESEN,
        ),
    ]
    settings.serve.public_url = "https://chartsight.example"
    settings.serve.cds_budget_s = 60.0  # cards, not timing: the budget has its own test
    for name, value in serve.items():
        setattr(settings.serve, name, value)
    return settings


class Running:
    """ChartSight's service in a background thread, ready when /readyz says so."""

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.http = ThreadedServer(create_app(settings), access_log=False)
        self.port = self.http.port

    @property
    def url(self) -> str:
        return self.http.url

    def __enter__(self) -> Running:
        self.http.start(60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the service did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.http.stop()


def ask_events(url: str, body: dict[str, Any], headers: dict[str, str]) -> list[tuple[str, Any]]:
    """``POST /v1/ask/stream``'s server-sent events as ``(event, data parsed as JSON)``, in order;
    the reply must be 200 ``text/event-stream``."""
    events: list[tuple[str, Any]] = []
    with httpx.stream(
        "POST", f"{url}/v1/ask/stream", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind:
                events.append((kind, json.loads(line[5:])))
    return events


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, demo_store: FhirStore, issuer: Issuer
) -> Iterator[Running]:
    home = tmp_path_factory.mktemp("api-home")
    with Running(api_settings(home, demo_store, issuer, rate_burst=10_000)) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail("chromium and chromedriver are needed (scripts/setup-peers.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(driver_path), options=options)
    yield driver
    driver.quit()
