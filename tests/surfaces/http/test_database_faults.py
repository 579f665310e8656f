"""PostgreSQL restarted while the service answers: the store, conversation threads and audit log
all on one real PostgreSQL server, which is shut down mid-traffic and started again.

During the outage every request that needs the database gets 503 in the documented ``Problem``
shape with ``Retry-After`` (a stream ends in an ``error`` event with status 503); once the server
is back the same service process answers again without a restart; and nothing acknowledged is
lost: every answer returned has its audit row, and a thread's earlier turns are still there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from connectors.demo import TOMMY_FRIESEN, import_demo
from connectors.store import FhirStore
from surfaces.settings import AppSettings
from tests.peers.postgres import PostgresServer
from tests.surfaces.http.conftest import Running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATABASES = ("store", "threads", "audit")


@pytest.fixture(scope="module")
def postgres_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[PostgresServer, Running]]:
    """A PostgreSQL server of the module's own (it is stopped and started by the test) and the
    service with its store, threads and audit log on it, answering anonymous loopback calls."""
    with PostgresServer() as pg:
        urls = {name: pg.create_database(name) for name in DATABASES}
        store = FhirStore(urls["store"])
        import_demo(store)
        store.close()
        settings = AppSettings(
            home=tmp_path_factory.mktemp("pg-home"),
            store={"url": urls["store"]},
            threads=urls["threads"],
        )
        settings.serve.audit_url = urls["audit"]
        settings.serve.auth.anonymous = True
        settings.serve.rate_burst = 100_000
        with Running(settings) as service:
            yield pg, service


def _ask(url: str, rid: str, question: str = "latest labs", **body: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/ask",
        json={"patient": TOMMY_FRIESEN, "question": question, **body},
        headers={"x-request-id": rid},
        timeout=60,
    )


def _stream_end(url: str, rid: str) -> tuple[str, dict[str, Any]]:
    """The last event of ``POST /v1/ask/stream`` and its data."""
    last: tuple[str, dict[str, Any]] = ("", {})
    event = ""
    with httpx.stream(
        "POST",
        f"{url}/v1/ask/stream",
        json={"patient": TOMMY_FRIESEN, "question": "latest labs"},
        headers={"x-request-id": rid},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event not in ("", "ping"):
                last = (event, json.loads(line.split(":", 1)[1]))
    return last


def _assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str)
    text = r.text.lower()
    for leak in ("postgres", "psycopg", "sqlalchemy", "127.0.0.1", "traceback", "select "):
        assert leak not in text, r.text


def _audited(pg: PostgresServer) -> dict[str, str]:
    with psycopg.connect(pg.url("audit", driver="postgresql")) as conn:
        rows = conn.execute("SELECT request_id, outcome FROM audit_log").fetchall()
    return {rid: outcome for rid, outcome in rows if rid}


def test_postgres_restart_gives_503s_then_recovers_without_losing_answers(
    postgres_service: tuple[PostgresServer, Running],
):
    pg, service = postgres_service
    answered: list[str] = []
    for n, question in enumerate(["latest labs", "and the latest blood pressure?"]):
        r = _ask(service.url, f"before-{n}", question, thread="visit")
        assert r.status_code == 200, r.text
        answered.append(f"before-{n}")
    assert _stream_end(service.url, "before-stream")[0] == "answer"
    answered.append("before-stream")

    pg.pause("fast")
    try:
        _assert_unavailable(_ask(service.url, "down-plain"))
        _assert_unavailable(_ask(service.url, "down-thread", thread="visit"))
        ready = httpx.get(f"{service.url}/readyz", timeout=30)
        assert (ready.status_code, ready.json()["status"]) == (503, "not ready")
        event, data = _stream_end(service.url, "down-stream")
        assert (event, data.get("status")) == ("error", 503), (event, data)
    finally:
        pg.resume()

    started = time.monotonic()
    first = _ask(service.url, "after-0", "what about the heart rate?", thread="visit")
    assert first.status_code == 200, first.text  # the first request after the restart
    answered.append("after-0")
    assert time.monotonic() - started < 30
    assert httpx.get(f"{service.url}/readyz", timeout=30).status_code == 200
    assert _stream_end(service.url, "after-stream")[0] == "answer"
    answered.append("after-stream")

    audited = _audited(pg)
    missing = [rid for rid in answered if audited.get(rid) not in ("answered", "abstained")]
    assert not missing, f"answers returned without their audit row: {missing}"
    assert not any(rid.startswith("down-") and o == "answered" for rid, o in audited.items())
    turns = first.json()
    assert turns["thread_id"] == "visit"


@pytest.mark.parametrize("mode", ["immediate"])
def test_postgres_crash_recovers_too(
    postgres_service: tuple[PostgresServer, Running], mode: str, tmp_path: Path
):
    """An immediate shutdown (no checkpoint: crash recovery at the next start) is survived the
    same way."""
    pg, service = postgres_service
    assert _ask(service.url, f"{mode}-before").status_code == 200
    pg.pause(mode)
    try:
        _assert_unavailable(_ask(service.url, f"{mode}-down"))
    finally:
        pg.resume()
    assert _ask(service.url, f"{mode}-after").status_code == 200
    audited = _audited(pg)
    assert audited.get(f"{mode}-before") == "answered"
    assert audited.get(f"{mode}-after") == "answered"
