"""The audit log: one row per request that touches a patient, in SQL (SQLAlchemy).

Who (client and user), when, which patient, the SHA-256 of the question (never its text), the
resources cited, model and prompt version, the outcome, and the HTTP request's id
(``x-request-id``). The application only ever inserts: there is no update or delete path, and on
SQLite and PostgreSQL the table refuses UPDATE and DELETE by trigger, so a bug cannot rewrite
history either.

This table is the source of truth. ``surfaces/http/auditevent.py`` renders its rows as FHIR
AuditEvents (``GET /fhir/AuditEvent``), and ``surfaces/http/forward.py`` sends them to a
hospital's audit repository, noting each delivery in ``audit_delivery`` (a table of its own,
insert-only as well).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from common.schema import create_schema
from surfaces.http.append_only import make_append_only, open_engine
from surfaces.http.middleware import current_request_id
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
    sa.Column("request_id", sa.String(64)),  # the HTTP request's x-request-id
)
# one row per audit row delivered to (or refused for good by) an audit repository: the spool of
# what is still to send is every audit_log row without one for that repository
audit_delivery = sa.Table(
    "audit_delivery",
    metadata,
    sa.Column("repository", sa.String(500), primary_key=True),
    sa.Column("audit_id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),  # "delivered" | "refused"
    sa.Column("location", sa.String(500)),  # the repository's AuditEvent/<id>, or its refusal
)
# columns added since the first release: (name, DDL type), added to an existing table on open
_ADDED_COLUMNS = [("request_id", "VARCHAR(64)")]


def question_hash(question: str) -> str:
    """The question's SHA-256 as 64 lower-case hex digits (of its UTF-8 bytes): what the audit log
    keeps instead of the text, so a known question can be matched without the log holding PHI."""
    return hashlib.sha256(question.encode()).hexdigest()


def _upgrade(conn: sa.Connection) -> None:
    """Columns added since an older release made the table (``ALTER TABLE … ADD COLUMN``; its
    rows keep NULL there), then the append-only triggers."""
    present = {c["name"] for c in sa.inspect(conn).get_columns("audit_log")}
    for name, ddl in _ADDED_COLUMNS:
        if name not in present:
            conn.exec_driver_sql(f"ALTER TABLE audit_log ADD COLUMN {name} {ddl}")
    make_append_only(conn, ["audit_log"])


class AuditLog:
    """The append-only ``audit_log`` table at a SQLAlchemy URL (``serve.audit_url``, else
    ``sqlite:///<home>/audit.db``): created on first use, with the UPDATE/DELETE-refusing triggers
    on SQLite and PostgreSQL. A table made by an older release gains the columns added since
    (``request_id``) by ``ALTER TABLE … ADD COLUMN`` on open; its rows keep NULL there."""

    def __init__(self, url: str) -> None:
        self.listeners: list[Callable[[], None]] = []  # told after each row (the forwarder)
        self.engine = open_engine(url)  # survives a database restart (pre-ping)
        create_schema(self.engine, metadata, _upgrade)

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
        request_id: str | None = None,
    ) -> None:
        """Insert one row, committed before returning: ``principal``'s client id (cut to 200
        characters) and subject (400), ``endpoint`` (e.g. ``ask``, ``mcp:ask``; 100), the
        ``outcome`` (answered, abstained, denied, error, timeout, cancelled, over budget; 40), the
        patient id (200), the question's ``question_hash``, and from ``answer`` (an answer's JSON)
        the cited references, model (300) and prompt version (20); every text cut to its column's
        width, so that a database enforcing widths (PostgreSQL) records what a caller sent rather
        than failing the request unaudited; ``detail`` (an error's name) cut to 300 characters;
        ``request_id``, else the id of the HTTP request being served
        (``middleware.current_request_id``). Raises SQLAlchemy's errors when the database refuses
        the write."""
        rid = request_id or current_request_id()
        cited = [c["reference"] for c in (answer or {}).get("citations", [])]

        def cell(value: str | None, width: int) -> str | None:
            # what fits the column and every database: PostgreSQL's text cannot hold NUL (a
            # caller's "id\u0000" made the insert fail, so the refusal went unaudited)
            return value.replace("\x00", "\ufffd")[:width] if value else None

        with self.engine.begin() as conn:
            conn.execute(
                audit_log.insert().values(
                    at=datetime.now(UTC),
                    client_id=cell(principal.client_id, 200) or "",
                    subject=cell(principal.subject, 400) or "",
                    endpoint=cell(endpoint, 100) or "",
                    patient_id=cell(patient_id, 200),
                    question_sha256=question_hash(question) if question is not None else None,
                    cited=json.dumps(cited),
                    model=cell((answer or {}).get("model"), 300),
                    prompt_version=cell((answer or {}).get("prompt_version"), 20),
                    outcome=cell(outcome, 40) or "",
                    detail=cell(detail, 300),
                    request_id=cell(rid, 64),
                )
            )

    async def arecord(self, *args: Any, **kwargs: Any) -> None:
        """``record`` in a worker thread, so a commit does not hold up the event loop (the
        request id is read here, in the request's own context)."""
        kwargs.setdefault("request_id", current_request_id())
        await asyncio.to_thread(self.record, *args, **kwargs)
        for listener in self.listeners:
            listener()

    def rows(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The first ``limit`` rows, oldest first, as dicts keyed by column (``at`` a timezone-
        aware datetime, ``cited`` a JSON list); the readiness check reads one to see that the
        database answers."""
        with self.engine.connect() as conn:
            result = conn.execute(audit_log.select().order_by(audit_log.c.id).limit(limit))
            return [dict(r._mapping) for r in result]

    def search(
        self,
        *,
        patient: str | None = None,
        dates: list[tuple[str, datetime, datetime]] | None = None,
        after_id: int = 0,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Rows (as ``rows`` gives them) with id above ``after_id``, oldest first, at most
        ``limit``: only those about ``patient`` (the id as recorded; ``Patient/<id>`` also
        accepted) and within every ``(prefix, start, end)`` of ``dates`` (a searched date as the
        interval [start, end) its precision spans, timezone-aware; FHIR R4 search.html#prefix:
        ``eq`` within the interval, ``ge`` from its start, ``gt`` from its end, ``le`` before its
        end, ``lt`` before its start)."""
        query = audit_log.select().where(audit_log.c.id > after_id)
        if patient is not None:
            query = query.where(audit_log.c.patient_id == patient.removeprefix("Patient/"))
        # SQLite keeps datetimes without their offset: compare in UTC, as they were written
        naive = self.engine.dialect.name == "sqlite"
        for prefix, *interval in dates or []:
            start, end = (w.astimezone(UTC).replace(tzinfo=None) if naive else w for w in interval)
            at = audit_log.c.at
            query = query.where(
                {
                    "eq": sa.and_(at >= start, at < end),
                    "ge": at >= start,
                    "gt": at >= end,
                    "le": at < end,
                    "lt": at < start,
                }[prefix]
            )
        with self.engine.connect() as conn:
            result = conn.execute(query.order_by(audit_log.c.id).limit(limit))
            return [dict(r._mapping) for r in result]

    def undelivered(
        self, repository: str, after_id: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The rows above ``after_id`` not yet delivered to (nor refused by) ``repository``
        (its base URL), oldest first, at most ``limit``: the forwarding spool."""
        done = sa.select(audit_delivery.c.audit_id).where(
            audit_delivery.c.repository == repository,
            audit_delivery.c.audit_id == audit_log.c.id,
        )
        query = (
            audit_log.select()
            .where(audit_log.c.id > after_id, ~sa.exists(done))
            .order_by(audit_log.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def delivered(self, repository: str, outcomes: list[tuple[int, str, str | None]]) -> None:
        """Note ``(audit row id, "delivered" or "refused", the repository's location or
        refusal)`` for ``repository``, in one commit; a row noted already (another process sent
        it) is left as it is."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            noted = {
                r[0]
                for r in conn.execute(
                    sa.select(audit_delivery.c.audit_id).where(
                        audit_delivery.c.repository == repository,
                        audit_delivery.c.audit_id.in_([o[0] for o in outcomes]),
                    )
                )
            }
            fresh = [
                {"repository": repository, "audit_id": i, "at": now, "status": s,
                 "location": (loc or "")[:500] or None}
                for i, s, loc in outcomes
                if i not in noted
            ]  # fmt: skip
            if fresh:
                conn.execute(audit_delivery.insert(), fresh)

    def close(self) -> None:
        """Close the engine's pooled connections (at the service's shutdown)."""
        self.engine.dispose()
