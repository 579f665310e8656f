"""Forwarding the audit log to a hospital's audit repository, a real SEKMET FHIR server: while it
is down the events wait in the audit database (across a restart of the service), and once it is up
every one arrives exactly once."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.http.forward import _outcome
from surfaces.settings import AuditRepositorySettings
from tests.peers.issuer import Issuer
from tests.peers.servers import Sekmet
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, Running, api_settings

pytestmark = pytest.mark.integration


def _pending(home: Path, repository: str) -> tuple[int, int, list[str]]:
    """(audit rows, rows not yet delivered to ``repository``, the rows' request ids), read from
    the audit database."""
    engine = sa.create_engine(f"sqlite:///{home / 'audit.db'}")
    with engine.connect() as conn:
        total = conn.execute(sa.text("SELECT count(*) FROM audit_log")).scalar_one()
        waiting = conn.execute(
            sa.text(
                "SELECT count(*) FROM audit_log a WHERE NOT EXISTS (SELECT 1 FROM audit_delivery d"
                " WHERE d.audit_id = a.id AND d.repository = :r)"
            ),
            {"r": repository},
        ).scalar_one()
        ids = [r[0] for r in conn.execute(sa.text("SELECT request_id FROM audit_log"))]
    engine.dispose()
    return total, waiting, ids


def _requests(running: Running) -> None:
    """Patient-data calls that each leave one audit row: refusals, a failed lookup, an answer."""
    url = running.url
    for patient in (MARTINA_MURAZIK, "someone-else"):
        denied = httpx.post(
            f"{url}/v1/ask",
            json={"patient": patient, "question": "age?"},
            headers={"X-API-Key": BOUND_KEY},
        )
        assert denied.status_code == 403
    missing = httpx.get(f"{url}/v1/patients/nobody/similar", headers={"X-API-Key": EHR_KEY})
    assert missing.status_code >= 400


def _audit_events(sekmet: Sekmet) -> list[dict[str, Any]]:
    reply = httpx.get(f"{sekmet.base_url}/AuditEvent", params={"_count": 1000}, timeout=30)
    assert reply.status_code == 200, reply.text
    return [e["resource"] for e in reply.json().get("entry", [])]


def test_events_wait_for_the_repository_and_arrive_exactly_once(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer
):
    repository = Sekmet()  # its port is chosen; nothing listens there yet
    home = tmp_path / "home"
    settings = api_settings(home, demo_store, issuer, rate_burst=10_000)
    settings.serve.audit.repository = AuditRepositorySettings(
        url=repository.base_url, poll_s=0.2, backoff_base_s=0.2, backoff_max_s=1.0
    )
    try:
        with Running(settings) as first:
            started = time.monotonic()
            _requests(first)
            # the repository being down holds up no request
            assert time.monotonic() - started < 10
            time.sleep(2)  # several tries have failed by now
            total, waiting, _ = _pending(home, repository.base_url)
            assert total == 3 and waiting == 3
        # the spool outlives the service: a new process finds the same events waiting
        with Running(settings) as second:
            time.sleep(1)
            assert _pending(home, repository.base_url)[1] == 3
            answered = httpx.post(
                f"{second.url}/v1/ask",
                json={"patient": TOMMY_FRIESEN, "question": "What was his last HbA1c?"},
                headers={"X-API-Key": EHR_KEY},
                timeout=120,
            )
            assert answered.status_code == 200
            repository.start()
            deadline = time.monotonic() + 60
            while _pending(home, repository.base_url)[1] and time.monotonic() < deadline:
                time.sleep(0.3)
            total, waiting, request_ids = _pending(home, repository.base_url)
            assert total == 4 and waiting == 0
        events = _audit_events(repository)
        # exactly once: one AuditEvent per audit row, told apart by their request ids
        sent = Counter(
            e["what"]["identifier"]["value"]
            for event in events
            for e in event["entity"]
            if e["type"]["code"] == "XrequestId"
        )
        assert sent == Counter(request_ids) and len(events) == 4
        assert Counter(e["outcome"] for e in events) == Counter({"4": 2, "8": 1, "0": 1})
        answer = next(e for e in events if e["outcome"] == "0")
        cited = [x for x in answer["entity"] if x.get("role", {}).get("code") == "4"]
        assert cited and all(x["what"]["reference"].startswith("Observation/") for x in cited)
        # the repository files them under the patient (FHIR search on AuditEvent.patient)
        tommy = httpx.get(
            f"{repository.base_url}/AuditEvent", params={"patient": f"Patient/{TOMMY_FRIESEN}"}
        ).json()
        assert len(tommy.get("entry", [])) == 1
        # a third start sends nothing again
        with Running(settings):
            time.sleep(2)
        assert len(_audit_events(repository)) == 4
    finally:
        repository.stop()


@pytest.mark.parametrize(
    ("status", "noted"),
    [
        ("201 Created", "delivered"),
        ("200", "delivered"),
        ("400 Bad Request", "refused"),
        ("422 Unprocessable Entity", "refused"),
        ("429 Too Many Requests", None),  # sent again later
        ("503", None),
        ("", None),
    ],
)
def test_each_batch_entry_is_delivered_refused_or_sent_again(status: str, noted: str | None):
    got = _outcome(7, {"response": {"status": status, "location": "AuditEvent/x"}})
    assert (got[1] if got else None) == noted
