"""Operations, end to end over real HTTP: the model card, the OpenAPI security schemes, the docs
pages with their assets served locally, the JSON request log without PHI, and Prometheus metrics
(requests, latency, outcomes, model and FHIR errors) scraped and parsed with prometheus_client."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

import prompts
from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.http.metrics import may_scrape
from surfaces.http.middleware import caller_hash
from surfaces.settings import OpsSettings
from tests.peers.issuer import Issuer
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, Running, api_settings

EHR = {"X-API-Key": EHR_KEY}
BOUND = {"X-API-Key": BOUND_KEY}
SALT = "test-salt"
METRICS_TOKEN = "scrape-token"


def _closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ops_service(
    tmp_path_factory: pytest.TempPathFactory, demo_store: FhirStore, issuer: Issuer
) -> Iterator[Running]:
    """The service with a log salt, metrics behind a token, a model server that refuses
    connections (every answer falls back to the evidence answer) and a CDS FHIR server that
    does too."""
    dead_fhir = f"http://127.0.0.1:{_closed_port()}/fhir"
    settings = api_settings(
        tmp_path_factory.mktemp("ops-home"), demo_store, issuer,
        rate_burst=10_000, cds_fhir_servers=[dead_fhir],
    )  # fmt: skip
    settings.serve.ops = OpsSettings(
        log_salt=SALT,
        metrics="token",
        metrics_token_sha256=hashlib.sha256(METRICS_TOKEN.encode()).hexdigest(),
    )
    settings.model.name = "openai"
    settings.model.model = "test-model"
    settings.model.base_url = f"http://127.0.0.1:{_closed_port()}/v1"
    settings.model.http.max_retries = 0
    with Running(settings) as running:
        running.dead_fhir = dead_fhir  # type: ignore[attr-defined]
        yield running


def _ask(service: Running, headers: dict[str, str], patient: str = TOMMY_FRIESEN, **body: Any):  # type: ignore[no-untyped-def]
    return httpx.post(
        f"{service.url}/v1/ask",
        json={"patient": patient, "question": "What was his last HbA1c?", **body},
        headers=headers,
        timeout=60,
    )


# --- the model card ---------------------------------------------------------------------------


def test_model_card_is_served_without_credentials_with_the_running_model(ops_service: Running):
    page = httpx.get(f"{ops_service.url}/model-card")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Intended use of the intervention" in page.text and "test-model" in page.text
    assert "<script" not in page.text and "://" not in page.text  # no external assets
    card = httpx.get(f"{ops_service.url}/model-card.json").json()
    assert card["deployment"] == {
        "backend": "openai",
        "model": "test-model",
        "prompt_version": prompts.DEFAULT_VERSION,
    }
    assert len(card["attributes"]) == 31
    assert all(a["text"].strip() for a in card["attributes"])


def test_readiness_names_the_model_without_the_model_servers_url(ops_service: Running):
    """/readyz needs no credentials: it names the backend and model, not where the server is."""
    ready = httpx.get(f"{ops_service.url}/readyz").json()
    assert ready["model"].startswith("openai:test-model") and "127.0.0.1" not in ready["model"]


def test_the_smart_page_links_the_model_card(ops_service: Running):
    template = Path(__file__).resolve().parents[3] / "surfaces/http/templates/app.html"
    href = re.search(r'<a href="([^"]+)" id="model-card"', template.read_text()).group(1)  # type: ignore[union-attr]
    # the page is served at /app: its link resolves to the card on the same service
    target = urljoin(f"{ops_service.url}/app", href)
    assert target == f"{ops_service.url}/model-card"
    assert httpx.get(target).status_code == 200


# --- OpenAPI security schemes and the docs pages ----------------------------------------------


def test_openapi_declares_the_api_key_and_bearer_jwt_on_the_operations_that_need_them(
    ops_service: Running,
):
    spec = httpx.get(f"{ops_service.url}/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": schemes["apiKey"]["description"],
    }
    assert schemes["bearerJWT"]["type"] == "http"
    assert schemes["bearerJWT"]["scheme"] == "bearer"
    assert schemes["bearerJWT"]["bearerFormat"] == "JWT"
    protected = [
        ("/v1/ask", "post"),
        ("/v1/ask/stream", "post"),
        ("/v1/patients/{patient_id}/similar", "get"),
        ("/cds-services/chartsight-patient-view", "post"),
        ("/cds-services/chartsight-patient-view/feedback", "post"),
        ("/cds-services/chartsight-patient-view/feedback", "get"),
        ("/fhir/AuditEvent", "get"),
    ]
    for path, method in protected:
        security = spec["paths"][path][method]["security"]
        assert {"apiKey": []} in security and {"bearerJWT": []} in security, path
    for path in ("/healthz", "/readyz", "/model-card", "/model-card.json"):
        assert "security" not in spec["paths"][path]["get"], path
    # what the docs page's "Authorize" sends is what the service accepts
    assert _ask(ops_service, EHR).status_code == 200
    assert _ask(ops_service, {}).status_code == 401


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_same_origin_assets(ops_service: Running, page: str):
    reply = httpx.get(f"{ops_service.url}{page}")
    assert reply.status_code == 200
    html = reply.text
    assert "://" not in html, "an absolute URL: the page would load something from elsewhere"
    urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    urls += re.findall(r'spec-url="([^"]+)"', html)
    assets = [u for u in urls if u.endswith((".js", ".css", ".png"))]
    assert len(assets) >= 2, urls
    for url in {*urls, *assets}:
        assert url.startswith("/"), url
        got = httpx.get(f"{ops_service.url}{url}")
        assert got.status_code == 200, url
        assert len(got.content) > 1000, url
    if page == "/docs":
        assert '"validatorUrl": null' in html  # no badge fetched from the online validator


def test_docs_page_authorizes_with_an_api_key_in_the_browser(ops_service: Running, browser: Any):
    """Swagger UI renders from the local assets, its "Authorize" dialog offers both schemes, and
    a call made from the page with the key entered there is let in (503: no similar-case index,
    rather than 401); every resource the page loaded came from the service itself."""
    wait = WebDriverWait(browser, 30)
    browser.get(f"{ops_service.url}/docs")
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "button.authorize"))).click()
    dialog = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".modal-ux")))
    assert "apiKey" in dialog.text and "bearerJWT" in dialog.text
    key_input = dialog.find_element(By.CSS_SELECTOR, "input[type=text], input[type=password]")
    key_input.send_keys(EHR_KEY)
    dialog.find_element(By.CSS_SELECTOR, "button.modal-btn.auth.authorize").click()
    dialog.find_element(By.CSS_SELECTOR, "button.close-modal").click()
    block = wait.until(
        ec.element_to_be_clickable(
            (By.ID, "operations-retrieval-similar_v1_patients__patient_id__similar_get")
        )
    )
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "button.try-out__btn"))).click()
    block.find_element(By.CSS_SELECTOR, "input[placeholder='patient_id']").send_keys(TOMMY_FRIESEN)
    block.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = wait.until(
        ec.visibility_of_element_located(
            (By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status")
        )
    )
    assert status.text.strip().startswith("503"), status.text  # 401 without the key
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert loaded and all(url.startswith(ops_service.url) for url in loaded), loaded


# --- the request log --------------------------------------------------------------------------


def _request_lines(caplog: pytest.LogCaptureFixture, prefix: str) -> list[dict[str, Any]]:
    """The request log's lines (parsed) of the requests whose x-request-id starts with
    ``prefix``, in the order logged."""
    lines = [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "chartsight.api" and r.getMessage().startswith("{")
    ]
    return [x for x in lines if x["request_id"].startswith(prefix)]


def test_one_json_log_line_per_request_with_a_hashed_caller_and_no_phi(
    ops_service: Running, caplog: pytest.LogCaptureFixture
):
    question = "What was his last HbA1c? (Tommy Friesen, secret-marker-42)"

    def rid(n: int) -> dict[str, str]:
        return {"x-request-id": f"log-test-{n}"}

    with caplog.at_level(logging.INFO):
        assert _ask(ops_service, {**EHR, **rid(1)}, question=question).status_code == 200
        httpx.get(
            f"{ops_service.url}/v1/patients/{TOMMY_FRIESEN}/similar", headers={**EHR, **rid(2)}
        )
        assert _ask(ops_service, {**BOUND, **rid(3)}, patient=MARTINA_MURAZIK).status_code == 403
        assert _ask(ops_service, {"X-API-Key": "wrong", **rid(4)}).status_code == 401
        httpx.post(  # MCP: authenticated by its own wrapper, logged under its mount
            f"{ops_service.url}/mcp/",
            json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
            headers={**EHR, **rid(5), "accept": "application/json, text/event-stream"},
        )
        httpx.get(f"{ops_service.url}/no/such/{TOMMY_FRIESEN}", headers=rid(6))
        httpx.get(f"{ops_service.url}/docs-assets/favicon.png", headers=rid(7))
        # a line is written once the response has gone out: wait for the last one
        deadline = time.monotonic() + 10
        while len(_request_lines(caplog, "log-test-")) < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = _request_lines(caplog, "log-test-")
    assert [(x["method"], x["route"]) for x in lines] == [
        ("POST", "/v1/ask"),
        ("GET", "/v1/patients/{patient_id}/similar"),
        ("POST", "/v1/ask"),
        ("POST", "/v1/ask"),
        ("POST", "/mcp/"),  # a mounted app: the mount's path and its route's
        ("GET", None),  # nothing matched: no path, so no patient id either
        ("GET", "/docs-assets"),  # static files under a mount: the mount's path
    ]
    ask, similar, denied, unauthenticated, mcp, _, _ = lines
    assert set(ask) == {
        "event", "method", "route", "status", "duration_ms", "request_id", "caller",
    }  # fmt: skip
    assert ask["status"] == 200 and ask["duration_ms"] > 0 and ask["request_id"]
    assert ask["caller"] == caller_hash(SALT.encode(), "ehr") == similar["caller"]
    assert re.fullmatch(r"[0-9a-f]{16}", ask["caller"])
    assert [x["request_id"] for x in lines] == [f"log-test-{n}" for n in range(1, 8)]
    assert denied["status"] == 403 and denied["caller"] == caller_hash(SALT.encode(), "bound")
    assert unauthenticated["status"] == 401 and unauthenticated["caller"] is None
    assert mcp["caller"] == ask["caller"]
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("chartsight"))
    for phi in ("secret-marker-42", "Tommy", "Friesen", TOMMY_FRIESEN, MARTINA_MURAZIK, "HbA1c"):
        assert phi not in text, phi
    assert "ehr" not in json.dumps(lines) and "bound" not in json.dumps(lines)


# --- Prometheus metrics -----------------------------------------------------------------------


def _scrape(service: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = httpx.get(
        f"{service.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_latency_outcomes_and_model_and_fhir_errors(ops_service: Running):
    before = _scrape(ops_service)
    for _ in range(2):
        assert _ask(ops_service, EHR).status_code == 200  # the model is down: evidence answer
    assert _ask(ops_service, BOUND, patient=MARTINA_MURAZIK).status_code == 403
    hook = {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/dr-who", "patientId": TOMMY_FRIESEN},
        "fhirServer": ops_service.dead_fhir,  # type: ignore[attr-defined]
    }
    cds = httpx.post(
        f"{ops_service.url}/cds-services/chartsight-patient-view",
        json=hook,
        headers=EHR,
        timeout=120,
    )
    # the EHR's FHIR server is down: 412 saying so (CDS Hooks 2.0), never a 5xx of our own
    assert cds.status_code == 412, cds.text
    after = _scrape(ops_service)

    def moved(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    ask = {"method": "POST", "route": "/v1/ask"}
    assert moved("chartsight_http_requests_total", **ask, status="200") == 2
    assert moved("chartsight_http_requests_total", **ask, status="403") == 1
    assert moved("chartsight_http_request_duration_seconds_count", **ask) == 3
    assert moved("chartsight_http_request_duration_seconds_sum", **ask) > 0
    assert moved("chartsight_http_request_duration_seconds_bucket", **ask, le="+Inf") == 3
    assert moved("chartsight_outcomes_total", endpoint="ask", outcome="answered") == 2
    assert moved("chartsight_outcomes_total", endpoint="ask", outcome="denied") == 1
    model_errors = {
        dict(labels)["error"]: after[(name, labels)] - before.get((name, labels), 0.0)
        for name, labels in after
        if name == "chartsight_model_errors_total" and dict(labels)["backend"] == "openai"
    }
    assert sum(model_errors.values()) >= 2, model_errors  # one per answer, at least
    assert moved("chartsight_fhir_errors_total", error="TransportError") >= 1
    # no patient id in any label value
    for _name, labels in after:
        for _key, value in labels:
            assert TOMMY_FRIESEN not in value and MARTINA_MURAZIK not in value


def test_metrics_are_refused_without_the_token(ops_service: Running):
    assert httpx.get(f"{ops_service.url}/metrics").status_code == 404
    wrong = {"Authorization": "Bearer not-the-token"}
    assert httpx.get(f"{ops_service.url}/metrics", headers=wrong).status_code == 404
    assert httpx.get(f"{ops_service.url}/metrics", headers=EHR).status_code == 404


def test_metrics_on_loopback_by_default(service: Running):
    """The default (`metrics = "loopback"`): a client on 127.0.0.1 may scrape."""
    reply = httpx.get(f"{service.url}/metrics")
    assert reply.status_code == 200 and "chartsight_http_requests_total" in reply.text


def test_request_methods_a_client_makes_up_add_no_metric_labels(service: Running):
    """HTTP lets a client send any token as the method; each one used to become a label value of
    its own (a series per made-up method, without bound)."""
    for method in ("PROBE1", "PROBE2", "GET"):
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as conn:
            conn.sendall(f"{method} /no-such-page HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert conn.recv(64).startswith(b"HTTP/1.1 404")
    methods = {
        dict(labels)["method"]
        for name, labels in _scrape(service)
        if name == "chartsight_http_requests_total"
    }
    assert "PROBE1" not in methods and "PROBE2" not in methods
    assert {"GET", "other"} <= methods


def test_who_may_scrape():
    loopback, token = (
        OpsSettings(),
        OpsSettings(metrics="token", metrics_token_sha256=hashlib.sha256(b"t").hexdigest()),
    )
    assert may_scrape(loopback, "127.0.0.1", None) and may_scrape(loopback, "::1", None)
    assert not may_scrape(loopback, "10.0.0.5", None) and not may_scrape(loopback, None, None)
    assert not may_scrape(loopback, "testclient", None)
    assert may_scrape(token, "10.0.0.5", "Bearer t")
    assert not may_scrape(token, "127.0.0.1", None)  # with a token, loopback is not enough
    assert not may_scrape(token, "10.0.0.5", "Bearer u") and not may_scrape(token, "x", "Basic t")
    assert not may_scrape(OpsSettings(metrics="off"), "127.0.0.1", None)
