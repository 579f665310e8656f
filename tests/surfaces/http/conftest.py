"""The HTTP service running for real under uvicorn on 127.0.0.1, with a token issuer beside it, and
a headless browser (Debian's chromium, driven by Selenium) for the SMART page's tests."""

from __future__ import annotations

import shutil
import time
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
