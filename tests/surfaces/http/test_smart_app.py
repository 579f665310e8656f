"""The SMART on FHIR app page in a real headless browser (Debian's chromium, driven by Selenium):
EHR launch with PKCE against an authorization server built from the SMART App Launch spec, the page
reading the record from the EHR's FHIR server with the user's token, asking, a streamed answer,
clicking a citation, a trend plot whose points open their citations, similar-case cards.
Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from typer.testing import CliRunner

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.cli import app as cli
from tests.conftest import LoadedServer
from tests.peers.issuer import Issuer
from tests.peers.smart_ehr import SmartEhr
from tests.surfaces.http.conftest import Running, api_settings


@pytest.fixture(scope="module")
def launched(
    tmp_path_factory: pytest.TempPathFactory,
    demo_store: FhirStore,
    issuer: Issuer,
    sekmet: LoadedServer,
) -> Iterator[tuple[Running, SmartEhr, str]]:
    home = tmp_path_factory.mktemp("smart-home")
    env = {"CHARTSIGHT_HOME": str(home), "CHARTSIGHT_STORE__URL": str(demo_store.engine.url)}
    built = CliRunner().invoke(cli, ["index", "build"], env=env)  # similar cases for the page
    assert built.exit_code == 0, built.output
    settings = api_settings(home, demo_store, issuer, rate_burst=10_000)
    running = Running(settings)
    settings.serve.public_url = running.url
    with SmartEhr(sekmet.base_url, f"{running.url}/callback") as ehr:
        settings.serve.smart.issuers = [ehr.fhir_url]
        with running:
            yield running, ehr, sekmet.patient_ids[TOMMY_FRIESEN]


def test_launch_ask_and_click_a_citation(browser: Any, launched: Any, artifacts: Path):
    running, ehr, pid = launched
    wait = WebDriverWait(browser, 90)
    browser.get(f"{running.url}/launch?iss={ehr.fhir_url}&launch={ehr.launch(pid)}")
    wait.until(ec.text_to_be_present_in_element((By.ID, "banner"), "Friesen"))
    assert browser.current_url == f"{running.url}/app"
    assert pid in browser.find_element(By.ID, "banner").text
    browser.save_screenshot(str(artifacts / "smart-app-1-launched.png"))

    box = browser.find_element(By.ID, "question")
    box.send_keys("What was his last HbA1c?")
    browser.find_element(By.ID, "send").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#answer a.cite")))
    answer = browser.find_element(By.ID, "answer").text
    assert "Latest" in answer and "%" in answer
    browser.save_screenshot(str(artifacts / "smart-app-2-answer.png"))

    link = browser.find_element(By.CSS_SELECTOR, "#answer a.cite")
    ref = link.get_attribute("data-ref")
    assert ref and ref.startswith("Observation/")
    link.click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "cited-json"), '"resourceType"'))
    shown = browser.find_element(By.ID, "cited-json").text
    assert '"Observation"' in shown and ref.split("/")[1] in shown
    assert "Hemoglobin A1c" in browser.find_element(By.ID, "cited-line").text
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#similar .card")))
    browser.save_screenshot(str(artifacts / "smart-app-3-citation.png"))
    # the record came from the EHR's FHIR server, with the user's token
    assert any(p.startswith(f"Patient/{pid}") for p in ehr.fhir_requests)


def test_the_app_refuses_what_the_launch_does_not_allow(launched: Any):
    running, ehr, pid = launched
    client = httpx.Client(base_url=running.url, follow_redirects=False)
    # an EHR that is not configured may not launch it (the server would fetch from iss)
    elsewhere = client.get("/launch", params={"iss": "http://127.0.0.1:9/fhir", "launch": "x"})
    assert elsewhere.status_code == 400
    # a made-up state is refused
    assert client.get("/callback", params={"state": "forged", "code": "x"}).status_code == 400
    # no session: no page, no questions, no resources
    assert client.get("/app").status_code == 401
    assert client.post("/app/ask", json={"question": "x"}).status_code == 401
    # a real launch, then the session is scoped to its patient
    launched_to = client.get("/launch", params={"iss": ehr.fhir_url, "launch": ehr.launch(pid)})
    authorize = httpx.get(launched_to.headers["location"], follow_redirects=False)
    assert "code_challenge=" in launched_to.headers["location"]
    back = client.get(authorize.headers["location"])
    assert back.status_code == 303 and back.headers["location"] == "/app"
    session = client.cookies.get("chartsight_session")
    assert session
    page = client.get("/app")
    assert page.status_code == 200 and "Friesen" in page.text
    # without the page's CSRF token the session cannot ask
    assert client.post("/app/ask", json={"question": "age?"}).status_code == 403
    foreign = client.get("/app/resource/Patient/someone-else")
    assert foreign.status_code == 404  # not in this patient's record
    # the index was built from the local store, where this patient has another id: the patient's
    # own case is still recognised (by identifier) and left out
    similar = client.get("/app/similar")
    assert similar.status_code == 200 and similar.json()
    assert all(h["patient_id"] != TOMMY_FRIESEN for h in similar.json())
    # the launch's scopes are patient-level: other patients' cases come without ids, dates,
    # free text or pictures (tests/surfaces/http/test_case_privacy.py has the rule)
    for n, hit in enumerate(similar.json(), 1):
        assert hit["key"] == f"similar-case-{n}" and hit["patient_id"] == ""
        assert hit["thumbnail"] is None and not re.search(r"\b20\d\d-\d\d", hit["summary"])


def test_resource_paths_are_validated(launched: Any):
    running, ehr, pid = launched
    client = httpx.Client(base_url=running.url, follow_redirects=False)
    start = client.get("/launch", params={"iss": ehr.fhir_url, "launch": ehr.launch(pid)})
    client.get(httpx.get(start.headers["location"]).headers["location"])
    assert client.get("/app/resource/patient/x").status_code == 422  # not a resource type
    assert client.get("/app/resource/Patient/" + "x" * 65).status_code == 422
    own = client.get(f"/app/resource/Patient/{pid}")
    assert own.status_code == 200 and own.json()["id"] == pid


def _creatinines(tommy_json: list[dict[str, Any]]) -> int:
    return sum(
        1
        for r in tommy_json
        if r["resourceType"] == "Observation"
        and "valueQuantity" in r
        and any(c.get("code") == "38483-4" for c in r["code"].get("coding", []))
    )


def test_a_trend_question_shows_a_plot_whose_points_open_their_citations(
    browser: Any, launched: Any, artifacts: Path, tommy_json: list[dict[str, Any]]
):
    running, ehr, pid = launched
    wait = WebDriverWait(browser, 90)
    browser.get(f"{running.url}/launch?iss={ehr.fhir_url}&launch={ehr.launch(pid)}")
    wait.until(ec.text_to_be_present_in_element((By.ID, "banner"), "Friesen"))
    browser.find_element(By.ID, "question").send_keys("creatinine trend")
    browser.find_element(By.ID, "send").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#trend svg")))
    points = browser.find_elements(By.CSS_SELECTOR, "#trend svg a")
    cited = {
        a.get_attribute("data-ref")
        for a in browser.find_elements(By.CSS_SELECTOR, "#answer a.cite")
    }
    expected = _creatinines(tommy_json)
    assert expected >= 3 and len(points) == expected
    targets = [
        browser.execute_script(
            "return arguments[0].getAttributeNS('http://www.w3.org/1999/xlink', 'href')", p
        )
        for p in points
    ]
    assert all(t.startswith("#Observation/") for t in targets), targets
    assert {t[1:] for t in targets} == cited  # every point is one of the answer's citations
    size = browser.find_element(By.CSS_SELECTOR, "#trend svg").size
    assert 300 <= size["width"] <= 700 and 120 <= size["height"] <= 300
    assert "Creatinine" in browser.find_element(By.ID, "trend").text
    browser.save_screenshot(str(artifacts / "smart-app-4-trend.png"))

    # a point opens its resource in the cited-evidence panel, as a citation in the text does
    last = points[-1]
    last.find_element(By.CSS_SELECTOR, "use").click()  # the marker itself, as a mouse clicks it
    wait.until(ec.text_to_be_present_in_element((By.ID, "cited-json"), '"resourceType"'))
    assert targets[-1][len("#Observation/") :] in browser.find_element(By.ID, "cited-json").text
    assert "Creatinine" in browser.find_element(By.ID, "cited-line").text
    assert browser.execute_script("return arguments[0].classList.contains('active')", last)
    browser.save_screenshot(str(artifacts / "smart-app-5-trend-point.png"))

    # the next question, not about a series, clears the plot
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys("What was his last HbA1c?")
    browser.find_element(By.ID, "send").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "answer"), "%"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#trend svg")


def _page_session(running: Running, ehr: SmartEhr, pid: str) -> tuple[httpx.Client, str]:
    """A launched session over plain HTTP, and the page's CSRF token."""
    client = httpx.Client(base_url=running.url, follow_redirects=False, timeout=120)
    start = client.get("/launch", params={"iss": ehr.fhir_url, "launch": ehr.launch(pid)})
    client.get(httpx.get(start.headers["location"]).headers["location"])
    found = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/app").text)
    assert found
    return client, found.group(1)


def _ask(client: httpx.Client, csrf: str, question: str) -> dict[str, Any]:
    reply = client.post("/app/ask", json={"question": question}, headers={"X-CSRF-Token": csrf})
    assert reply.status_code == 200
    answer = re.search(r"event: answer\r?\ndata: (.*)", reply.text)
    assert answer, reply.text[-500:]
    data: dict[str, Any] = json.loads(answer.group(1))
    return data


def test_the_trend_endpoint_plots_only_a_series_of_this_patients_results(launched: Any):
    running, ehr, pid = launched
    client, csrf = _page_session(running, ehr, pid)
    plain = _ask(client, csrf, "What was his last HbA1c?")
    refs = [c["reference"] for c in plain["citations"]]
    assert refs and all(r.startswith("Observation/") for r in refs)
    # not a trend: no plot (the page asks only with 3 or more Observations; the server checks too)
    reply = client.post("/app/trend", json={"references": refs}, headers={"X-CSRF-Token": csrf})
    assert reply.status_code == 204 and not reply.content

    trend = _ask(client, csrf, "creatinine trend")
    refs = [c["reference"] for c in trend["citations"] if c["reference"].startswith("Observation/")]
    assert len(refs) >= 3
    assert client.post("/app/trend", json={"references": refs}).status_code == 403  # no CSRF
    reply = client.post("/app/trend", json={"references": refs}, headers={"X-CSRF-Token": csrf})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("image/svg+xml")
    assert reply.headers["cache-control"] == "no-store"
    root = ET.fromstring(reply.text)
    hrefs = [
        a.get("{http://www.w3.org/1999/xlink}href")
        for a in root.iter("{http://www.w3.org/2000/svg}a")
    ]
    assert sorted(h[1:] for h in hrefs if h) == sorted(refs)
    assert [
        g for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("id") == "reference-range"
    ]

    # references of resources outside this patient's record are not read: no series is left
    foreign = [f"Observation/not-{n}" for n in range(5)]
    reply = client.post("/app/trend", json={"references": foreign}, headers={"X-CSRF-Token": csrf})
    assert reply.status_code == 204
    too_many = {"references": ["Observation/x"] * 2001}
    assert (
        client.post("/app/trend", json=too_many, headers={"X-CSRF-Token": csrf}).status_code == 422
    )
