"""Saving an answer to the chart only after a clinician approves it, in a real headless browser:
a SMART EHR launch (tests/peers/smart_ehr.py) in front of a real SEKMET that accepts the writes,
the page's "Approve and save to chart" with its confirm, then the DocumentReference and
Provenance read back from SEKMET itself. No save without the approval, none for a session the
draft was not shown in, and no button (403 at the endpoint) for a token without write scopes.
Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from tests.conftest import LoadedServer, _load, load_bundle
from tests.peers.issuer import Issuer
from tests.peers.servers import Sekmet
from tests.peers.smart_ehr import SmartEhr
from tests.surfaces.http.conftest import Running, api_settings
from tests.surfaces.http.test_smart_app import _ask, _page_session

WRITE = "patient/DocumentReference.c patient/Provenance.c"
A1C = "What was his last HbA1c?"


@pytest.fixture(scope="module")
def chart(bundles: list[Path]) -> Iterator[LoadedServer]:
    """A SEKMET of its own holding Tommy Friesen only: the writes stay out of the shared one."""
    tommy = next(
        p for p in bundles if load_bundle(p)["entry"][0]["resource"]["id"] == TOMMY_FRIESEN
    )
    with Sekmet() as server:
        yield _load(server, [tommy])


@pytest.fixture(scope="module")
def launched(
    tmp_path_factory: pytest.TempPathFactory,
    demo_store: FhirStore,
    issuer: Issuer,
    chart: LoadedServer,
) -> Iterator[tuple[Running, SmartEhr, str]]:
    home = tmp_path_factory.mktemp("write-back-home")
    settings = api_settings(home, demo_store, issuer, rate_burst=10_000)
    settings.serve.smart.scope = f"launch openid fhirUser patient/*.read {WRITE}"
    running = Running(settings)
    settings.serve.public_url = running.url
    with SmartEhr(chart.base_url, f"{running.url}/callback") as ehr:
        settings.serve.smart.issuers = [ehr.fhir_url]
        with running:
            yield running, ehr, chart.patient_ids[TOMMY_FRIESEN]


def _ai_notes(chart: LoadedServer, pid: str) -> list[dict[str, Any]]:
    """The patient's DocumentReferences in SEKMET labelled AI-asserted, read from SEKMET itself."""
    found = httpx.get(
        f"{chart.base_url}/DocumentReference", params={"patient": pid}, timeout=30
    ).json()
    return [
        e["resource"]
        for e in found.get("entry", [])
        if any(s.get("code") == "AIAST" for s in e["resource"].get("meta", {}).get("security", []))
    ]


def _table(running: Running, sql: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(f"sqlite:///{running.settings.home / 'audit.db'}")
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text(sql))]
    engine.dispose()
    return rows


def _launch_and_ask(browser: Any, running: Running, ehr: SmartEhr, pid: str) -> list[str]:
    """Launch the page in the browser, ask for the last HbA1c, return the cited references."""
    wait = WebDriverWait(browser, 120)
    browser.get("about:blank")  # a page launched before has the same banner
    browser.get(f"{running.url}/launch?iss={ehr.fhir_url}&launch={ehr.launch(pid)}")
    wait.until(ec.text_to_be_present_in_element((By.ID, "banner"), "Friesen"))
    browser.find_element(By.ID, "question").send_keys(A1C)
    browser.find_element(By.ID, "send").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#answer a.cite")))
    cited = [
        a.get_attribute("data-ref")
        for a in browser.find_elements(By.CSS_SELECTOR, "#answer a.cite")
    ]
    return [c for c in cited if c]


def test_approve_and_save_writes_the_draft_and_its_provenance_to_the_chart(
    browser: Any, launched: Any, chart: LoadedServer, artifacts: Path
):
    running, ehr, pid = launched
    cited = _launch_and_ask(browser, running, ehr, pid)
    assert cited and all(c.startswith("Observation/") for c in cited)
    wait = WebDriverWait(browser, 60)
    save = browser.find_element(By.ID, "approve-save")
    wait.until(lambda _: save.is_displayed())
    browser.save_screenshot(str(artifacts / "smart-write-1-offered.png"))

    # the clinician clicks, then cancels the confirmation: nothing is written
    save.click()
    wait.until(ec.alert_is_present())
    assert "Approve" in browser.switch_to.alert.text
    browser.switch_to.alert.dismiss()
    wait.until(ec.text_to_be_present_in_element((By.ID, "save-status"), "Not saved"))
    assert ehr.transactions == [] and _ai_notes(chart, pid) == []

    # approved: saved as one transaction, then read back from SEKMET
    save.click()
    wait.until(ec.alert_is_present())
    browser.switch_to.alert.accept()
    wait.until(ec.text_to_be_present_in_element((By.ID, "save-status"), "Saved to the chart"))
    status = browser.find_element(By.ID, "save-status").text
    assert "approved by Practitioner/dr-who" in status
    browser.save_screenshot(str(artifacts / "smart-write-2-saved.png"))
    doc_id = re.search(r"DocumentReference/([A-Za-z0-9\-.]+)", status)
    assert doc_id and len(ehr.transactions) == 1

    (note,) = _ai_notes(chart, pid)
    assert note["id"] == doc_id.group(1)
    assert (note["status"], note["docStatus"]) == ("current", "preliminary")
    assert note["subject"]["reference"] == f"Patient/{pid}"
    approvals = _table(running, "SELECT * FROM ai_approval")
    assert [a["outcome"] for a in approvals] == ["saved"]
    doc_loc, prov_loc = json.loads(approvals[0]["locations"])
    assert doc_loc.startswith(f"DocumentReference/{note['id']}")
    prov_path = prov_loc.split("/_history")[0]
    provenance = httpx.get(f"{chart.base_url}/{prov_path}", timeout=30).json()
    assert provenance["target"] == [{"reference": f"DocumentReference/{note['id']}"}]
    roles = {a["type"]["coding"][0]["code"]: a["who"]["reference"] for a in provenance["agent"]}
    assert roles["verifier"] == "Practitioner/dr-who"  # the SMART user who approved
    device = next(c for c in provenance["contained"] if c["resourceType"] == "Device")
    assert roles["author"] == f"#{device['id']}"
    sources = [e["what"]["reference"] for e in provenance["entity"] if e["role"] == "source"]
    assert sources == list(dict.fromkeys(cited))  # the cited resources, each once
    for ref in sources:  # each resolves in the EHR's chart
        assert httpx.get(f"{chart.base_url}/{ref}", timeout=30).status_code == 200
    assert provenance["recorded"]
    card = next(c for c in provenance["contained"] if c["resourceType"] == "DocumentReference")
    assert card["content"][0]["attachment"]["url"] == f"{running.url}/model-card"

    # what was generated is kept beside what was saved; the save is audited with its user
    (draft,) = _table(running, "SELECT * FROM ai_draft")
    assert approvals[0]["draft_id"] == draft["id"] and draft["user"] == "Practitioner/dr-who"
    generated = json.loads(draft["answer"])
    assert [c["reference"] for c in generated["citations"]] == cited
    sent = json.loads(approvals[0]["bundle"])
    assert sent == ehr.transactions[0]
    saves = [r for r in _table(running, "SELECT * FROM audit_log") if r["endpoint"] == "smart:save"]
    assert [(r["outcome"], r["subject"]) for r in saves] == [("saved", "Practitioner/dr-who")]
    assert json.loads(saves[0]["cited"]) == cited
    with pytest.raises(sa.exc.DBAPIError):  # append-only, as the audit log
        _table(running, "DELETE FROM ai_draft")


def test_no_save_without_approval_or_for_another_sessions_draft(launched: Any):
    running, ehr, pid = launched
    client, csrf = _page_session(running, ehr, pid)
    assert 'name="can-save" content="yes"' in client.get("/app").text
    draft = _ask(client, csrf, A1C)["draft_id"]
    before = len(ehr.transactions)
    headers = {"X-CSRF-Token": csrf}
    assert client.post("/app/save", json={"draft": draft}, headers=headers).status_code == 400
    refused = client.post("/app/save", json={"draft": draft, "approved": False}, headers=headers)
    assert refused.status_code == 400 and "approval" in refused.json()["detail"]
    no_csrf = client.post("/app/save", json={"draft": draft, "approved": True})
    assert no_csrf.status_code == 403
    made_up = {"draft": "x" * 32, "approved": True}
    assert client.post("/app/save", json=made_up, headers=headers).status_code == 404
    # another clinician's session cannot save this session's draft
    other, other_csrf = _page_session(running, ehr, pid)
    stolen = other.post(
        "/app/save", json={"draft": draft, "approved": True}, headers={"X-CSRF-Token": other_csrf}
    )
    assert stolen.status_code == 404
    assert len(ehr.transactions) == before


def test_a_token_without_write_scope_gets_no_button_and_a_403(
    browser: Any, launched: Any, artifacts: Path
):
    running, ehr, pid = launched
    granted = ehr.client.scope
    ehr.client.scope = granted.replace(WRITE, "")  # this user may read, not write
    try:
        cited = _launch_and_ask(browser, running, ehr, pid)
        assert cited
        assert not browser.find_element(By.ID, "save").is_displayed()
        assert not browser.find_element(By.ID, "approve-save").is_displayed()
        browser.save_screenshot(str(artifacts / "smart-write-3-read-only.png"))
        client, csrf = _page_session(running, ehr, pid)
        assert 'name="can-save" content="no"' in client.get("/app").text
        answer = _ask(client, csrf, A1C)
        assert "draft_id" not in answer  # nothing kept for a session that cannot save
        refused = client.post(
            "/app/save", json={"draft": "x" * 32, "approved": True}, headers={"X-CSRF-Token": csrf}
        )
        assert refused.status_code == 403 and "write scopes" in refused.json()["detail"]
    finally:
        ehr.client.scope = granted
    denied = [
        r
        for r in _table(running, "SELECT * FROM audit_log")
        if r["endpoint"] == "smart:save" and r["outcome"] == "denied"
    ]
    assert denied


def test_an_answer_is_saved_to_the_chart_once(launched: Any):
    """Saving the same approved draft again (a second click, a replayed request) used to write a
    second DocumentReference and Provenance to the chart; now it is 409 naming the first."""
    running, ehr, pid = launched
    client, csrf = _page_session(running, ehr, pid)
    draft = _ask(client, csrf, A1C)["draft_id"]
    before = len(ehr.transactions)
    save = {"draft": draft, "approved": True}
    headers = {"X-CSRF-Token": csrf}
    first = client.post("/app/save", json=save, headers=headers)
    assert first.status_code == 200, first.text
    again = client.post("/app/save", json=save, headers=headers)
    assert again.status_code == 409
    assert first.json()["document_reference"] in again.json()["detail"]
    assert len(ehr.transactions) == before + 1
    approvals = _table(running, "SELECT * FROM ai_approval")
    assert [a["outcome"] for a in approvals if a["draft_id"] == draft] == ["saved"]
