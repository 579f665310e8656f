"""The audit log's table itself: a database made by the release before ``request_id`` existed
gains the column on open (SQLite and PostgreSQL), keeps its rows and stays append-only; the page's
drafts open beside it on PostgreSQL, and what callers send fits its PostgreSQL columns."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from agent import Answer
from connectors.demo import TOMMY_FRIESEN
from connectors.store import FhirStore
from surfaces.http.audit import AuditLog
from surfaces.http.drafts import DraftStore
from surfaces.http.security import Principal, key_digest
from surfaces.settings import ApiKey
from tests.peers.issuer import Issuer
from tests.surfaces.http.conftest import BOUND_KEY, EHR_KEY, Running, api_settings
from tests.surfaces.http.test_mcp import _http

# the first release's triggers, as it wrote them
_SQLITE_GUARDS = [
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
]
_POSTGRES_GUARDS = [
    "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'the audit log is append-only'; END; $$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log",
    "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
]
WHO = Principal("ehr", "Practitioner/123", frozenset({"system/*.read"}), kind="api-key")


def _old_database(url: str) -> None:
    """``audit_log`` exactly as the first release created it: no ``request_id``, one row, and
    the triggers that refuse UPDATE and DELETE."""
    old = sa.MetaData()
    table = sa.Table(
        "audit_log",
        old,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client_id", sa.String(200), nullable=False),
        sa.Column("subject", sa.String(400), nullable=False),
        sa.Column("endpoint", sa.String(100), nullable=False),
        sa.Column("patient_id", sa.String(200)),
        sa.Column("question_sha256", sa.String(64)),
        sa.Column("cited", sa.Text, nullable=False, default="[]"),
        sa.Column("model", sa.String(300)),
        sa.Column("prompt_version", sa.String(20)),
        sa.Column("outcome", sa.String(40), nullable=False),
        sa.Column("detail", sa.String(300)),
    )
    engine = sa.create_engine(url)
    old.create_all(engine)
    guards = _SQLITE_GUARDS if engine.dialect.name == "sqlite" else _POSTGRES_GUARDS
    with engine.begin() as conn:
        for statement in guards:
            conn.exec_driver_sql(statement)
        conn.execute(
            table.insert().values(
                at=sa.func.now(), client_id="old", subject="old", endpoint="ask",
                patient_id="p1", cited="[]", outcome="answered",
            )
        )  # fmt: skip
    engine.dispose()


def _check_upgraded(url: str) -> None:
    _old_database(url)
    log = AuditLog(url)
    try:
        log.record(WHO, "similar", "answered", patient_id="p1", request_id="req-42")
        rows = log.rows()
        assert [(r["client_id"], r["request_id"]) for r in rows] == [
            ("old", None),
            ("ehr", "req-42"),
        ]
        # still append-only after the ALTER TABLE
        for statement in ("UPDATE audit_log SET outcome = 'x'", "DELETE FROM audit_log"):
            with pytest.raises(sa.exc.DBAPIError, match="append-only"), log.engine.begin() as c:
                c.exec_driver_sql(statement)
        assert len(log.rows()) == 2
    finally:
        log.close()
    # opening it again changes nothing
    again = AuditLog(url)
    assert [r["request_id"] for r in again.rows()] == [None, "req-42"]
    again.close()


def test_an_old_sqlite_audit_log_gains_the_request_id_column(tmp_path: Path):
    _check_upgraded(f"sqlite:///{tmp_path / 'audit.db'}")


@pytest.mark.integration
def test_an_old_postgresql_audit_log_gains_the_request_id_column(postgres: Any):
    _check_upgraded(postgres.create_database("old_audit"))


@pytest.mark.integration
def test_the_drafts_open_on_postgresql_and_refuse_changes(postgres: Any):
    """The page's drafts and approvals live beside the audit log (``serve.audit_url``); on
    PostgreSQL their append-only trigger's statement held a ``%`` that psycopg took for a
    placeholder, so the service could not start with a PostgreSQL audit database."""
    url = postgres.create_database("drafts_append_only")
    drafts = DraftStore(url)
    answer = Answer(question="q?", patient_id="p-1", text="t", model="evidence")
    draft_id = drafts.keep(answer, session_sha256="0" * 64, iss="https://ehr/fhir", user="u")
    kept = drafts.get(draft_id)
    assert kept is not None and kept.answer.text == "t"
    with (
        pytest.raises(sa.exc.DBAPIError, match="ai_draft is append-only"),
        drafts.engine.begin() as conn,
    ):
        conn.execute(sa.text("DELETE FROM ai_draft"))
    drafts.close()


@pytest.mark.integration
def test_a_long_patient_key_is_refused_and_audited_on_postgresql(
    tmp_path: Path, demo_store: FhirStore, issuer: Issuer, postgres: Any
):
    """PostgreSQL enforces the audit columns' widths: a patient key over 200 characters (in the
    similar-cases path, or an MCP tool's argument) used to fail the audit insert, so the request
    was a 500 and went unaudited. Now the endpoints refuse it (422, a tool error) and the audit
    log keeps what fits its columns."""
    settings = api_settings(tmp_path / "home", demo_store, issuer, rate_burst=10_000)
    settings.serve.audit_url = postgres.create_database("long_patient_keys")
    settings.serve.auth.api_keys.append(
        ApiKey(client_id="auditor", key_sha256=key_digest("auditor"), scopes="user/AuditEvent.rs")
    )
    with Running(settings) as running:
        search = f"{running.url}/fhir/AuditEvent"
        auditor = {"X-API-Key": "auditor"}
        for cursor, status in ((2**31 - 1, 200), (2**31, 422)):  # past PostgreSQL's INTEGER
            found = httpx.get(search, params={"_cursor": cursor}, headers=auditor)
            assert found.status_code == status, found.text
        for key in (BOUND_KEY, EHR_KEY):
            reply = httpx.get(
                f"{running.url}/v1/patients/{'a' * 300}/similar", headers={"X-API-Key": key}
            )
            assert reply.status_code == 422, reply.text

        async def mcp() -> Any:
            async with _http(running, BOUND_KEY) as client:
                return await client.call_tool(
                    "patient_facts", {"patient": "b" * 300, "tool": "demographics"}
                )

        result = asyncio.run(mcp())
        assert result.is_error and "over 200 characters" in str(result.content)
        # a NUL in a patient key (PostgreSQL's text cannot hold one) is refused and audited
        other = httpx.post(
            f"{running.url}/v1/ask",
            json={"patient": f"{TOMMY_FRIESEN}x\u0000", "question": "age?"},
            headers={"X-API-Key": BOUND_KEY},
        )
        assert other.status_code == 403, other.text
        nul = httpx.get(search, params={"patient": "a\x00b"}, headers=auditor)
        assert nul.status_code == 400 and "control character" in nul.text
    audit = AuditLog(settings.serve.audit_url)
    denied = [r for r in audit.rows() if r["outcome"] == "denied" and r["endpoint"] == "ask"]
    assert denied and denied[-1]["patient_id"] == f"{TOMMY_FRIESEN}x\ufffd"
    audit.record(Principal("c", "c", frozenset()), "e" * 150, "o" * 60, patient_id="p" * 300)
    row = audit.rows()[-1]
    assert (len(row["endpoint"]), len(row["outcome"]), len(row["patient_id"])) == (100, 40, 200)
    audit.close()
