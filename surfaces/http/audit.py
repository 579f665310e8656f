"""The audit log: one row per request that touches a patient, in SQL (SQLAlchemy).

Who (client and user), when, which patient, the SHA-256 of the question (never its text), the
resources cited, model and prompt version, and the outcome. The application only ever inserts:
there is no update or delete path, and on SQLite and PostgreSQL the table refuses UPDATE and DELETE
by trigger, so a bug cannot rewrite history either.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from surfaces.http.security import Principal

metadata = sa.MetaData()
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("client_id", sa.String(200), nullable=False),
    sa.Column("subject", sa.String(400), nullable=False),
    sa.Column("endpoint", sa.String(100), nullable=False),
    sa.Column("patient_id", sa.String(200)),
    sa.Column("question_sha256", sa.String(64)),
    sa.Column("cited", sa.Text, nullable=False, default="[]"),  # JSON list of references
    sa.Column("model", sa.String(300)),
    sa.Column("prompt_version", sa.String(20)),
    sa.Column("outcome", sa.String(40), nullable=False),
    sa.Column("detail", sa.String(300)),
)

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


def question_hash(question: str) -> str:
    """The question's SHA-256 as 64 lower-case hex digits (of its UTF-8 bytes): what the audit log
    keeps instead of the text, so a known question can be matched without the log holding PHI."""
    return hashlib.sha256(question.encode()).hexdigest()


class AuditLog:
    """The append-only ``audit_log`` table at a SQLAlchemy URL (``serve.audit_url``, else
    ``sqlite:///<home>/audit.db``): created on first use, with the UPDATE/DELETE-refusing triggers
    on SQLite and PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        metadata.create_all(self.engine)
        guards = {"sqlite": _SQLITE_GUARDS, "postgresql": _POSTGRES_GUARDS}.get(
            self.engine.dialect.name, []
        )
        with self.engine.begin() as conn:
            for statement in guards:
                conn.exec_driver_sql(statement)

    def record(
        self,
        principal: Principal,
        endpoint: str,
        outcome: str,
        *,
        patient_id: str | None = None,
        question: str | None = None,
        answer: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> None:
        """Insert one row, committed before returning: ``principal``'s client id (cut to 200
        characters) and subject (400), ``endpoint`` (e.g. ``ask``, ``mcp:ask``), the ``outcome``
        (answered, abstained, denied, error, timeout, cancelled, over budget), the patient id, the
        question's ``question_hash``, and from ``answer`` (an answer's JSON) the cited references,
        model and prompt version; ``detail`` (an error's name) cut to 300 characters. Raises
        SQLAlchemy's errors when the database refuses the write."""
        cited = [c["reference"] for c in (answer or {}).get("citations", [])]
        with self.engine.begin() as conn:
            conn.execute(
                audit_log.insert().values(
                    at=datetime.now(UTC),
                    client_id=principal.client_id[:200],
                    subject=principal.subject[:400],
                    endpoint=endpoint,
                    patient_id=patient_id,
                    question_sha256=question_hash(question) if question is not None else None,
                    cited=json.dumps(cited),
                    model=(answer or {}).get("model"),
                    prompt_version=(answer or {}).get("prompt_version"),
                    outcome=outcome,
                    detail=(detail or "")[:300] or None,
                )
            )

    async def arecord(self, *args: Any, **kwargs: Any) -> None:
        """``record`` in a worker thread, so a commit does not hold up the event loop."""
        await asyncio.to_thread(self.record, *args, **kwargs)

    def rows(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The first ``limit`` rows, oldest first, as dicts keyed by column (``at`` a timezone-
        aware datetime, ``cited`` a JSON list); the readiness check reads one to see that the
        database answers."""
        with self.engine.connect() as conn:
            result = conn.execute(audit_log.select().order_by(audit_log.c.id).limit(limit))
            return [dict(r._mapping) for r in result]

    def close(self) -> None:
        """Close the engine's pooled connections (at the service's shutdown)."""
        self.engine.dispose()
