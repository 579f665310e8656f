"""What the CDS Hooks services remember, in SQL (SQLAlchemy): the ``jti`` of every CDS Client JWT
until it expires (replay refusal), every card issued (its ``uuid``, service, patient and caller,
so that feedback can be checked against it) and the feedback on cards (CDS Hooks 2.0 "Feedback").

Cards and feedback are append-only: the application only inserts, and on SQLite and PostgreSQL
triggers refuse UPDATE and DELETE. Seen ``jti`` rows are deleted once expired. One database shared
by every worker process (``serve.cds.database_url``, e.g. PostgreSQL) makes a replayed JWT fail
whichever worker it reaches: the refusal is the primary key's uniqueness, checked by the database
in the insert itself, not a read-then-write.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from common.schema import create_schema
from surfaces.http.append_only import make_append_only, open_engine

metadata = sa.MetaData()

cds_jti = sa.Table(
    "cds_jti",
    metadata,
    sa.Column("iss", sa.String(400), primary_key=True),
    sa.Column("jti", sa.String(256), primary_key=True),
    sa.Column("exp", sa.DateTime(timezone=True), nullable=False, index=True),
)

cds_card = sa.Table(
    "cds_card",
    metadata,
    sa.Column("uuid", sa.String(36), primary_key=True),
    sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("service_id", sa.String(100), nullable=False),
    sa.Column("hook_instance", sa.String(36), nullable=False),
    sa.Column("patient_id", sa.String(200), nullable=False),
    sa.Column("client_id", sa.String(200), nullable=False),
    sa.Column("realm", sa.String(400), nullable=False, default=""),
    sa.Column("kind", sa.String(20), nullable=False),  # summary | pending
    sa.Column("cited", sa.Text, nullable=False, default="[]"),  # JSON list of references
)

cds_feedback = sa.Table(
    "cds_feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("service_id", sa.String(100), nullable=False, index=True),
    sa.Column("card", sa.String(36), nullable=False, index=True),
    sa.Column("patient_id", sa.String(200), nullable=False),
    sa.Column("client_id", sa.String(200), nullable=False),
    sa.Column("subject", sa.String(400), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("accepted_suggestions", sa.Text, nullable=False, default="[]"),  # JSON ids
    sa.Column("override_system", sa.String(400)),
    sa.Column("override_code", sa.String(200)),
    sa.Column("override_display", sa.String(400)),
    sa.Column("user_comment", sa.Text),
    sa.Column("outcome_timestamp", sa.DateTime(timezone=True), nullable=False),
)

_APPEND_ONLY = ("cds_card", "cds_feedback")


class CdsStore:
    """The ``cds_jti``, ``cds_card`` and ``cds_feedback`` tables at a SQLAlchemy URL
    (``serve.cds.database_url``, else ``sqlite:///<home>/cds.db``), created on first use with the
    append-only triggers on SQLite and PostgreSQL. Every method commits before returning and
    raises SQLAlchemy's errors when the database refuses; the ``a…`` methods run them in a worker
    thread."""

    def __init__(self, url: str) -> None:
        self.engine = open_engine(url)  # survives a database restart (pre-ping)
        create_schema(self.engine, metadata, lambda conn: make_append_only(conn, _APPEND_ONLY))

    def first_use(self, iss: str, jti: str, exp: datetime) -> bool:
        """Record ``(iss, jti)`` as seen until ``exp`` (timezone-aware); True the first time,
        False when it was seen before and has not expired (a replay, RFC 7519 4.1.7). Expired
        rows are deleted first, so the table holds only JWTs that could still be presented."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(cds_jti.delete().where(cds_jti.c.exp < now))
        try:
            with self.engine.begin() as conn:
                conn.execute(cds_jti.insert().values(iss=iss[:400], jti=jti[:256], exp=exp))
        except sa.exc.IntegrityError:
            return False
        return True

    async def afirst_use(self, iss: str, jti: str, exp: datetime) -> bool:
        """``first_use`` in a worker thread."""
        return await asyncio.to_thread(self.first_use, iss, jti, exp)

    def issued(
        self,
        card: str,
        *,
        service_id: str,
        hook_instance: str,
        patient_id: str,
        client_id: str,
        realm: str,
        kind: str,
        cited: list[str],
    ) -> None:
        """Remember a card handed out: its ``uuid``, the service and ``hookInstance`` it answered,
        the patient, the caller's client id and realm, its ``kind`` (``summary`` or ``pending``)
        and the references it cites."""
        with self.engine.begin() as conn:
            conn.execute(
                cds_card.insert().values(
                    uuid=card, issued_at=datetime.now(UTC), service_id=service_id,
                    hook_instance=hook_instance, patient_id=patient_id[:200],
                    client_id=client_id[:200], realm=realm[:400], kind=kind,
                    cited=json.dumps(cited),
                )
            )  # fmt: skip

    async def aissued(self, card: str, **kwargs: Any) -> None:
        """``issued`` in a worker thread."""
        await asyncio.to_thread(lambda: self.issued(card, **kwargs))

    def cards(self, uuids: list[str]) -> dict[str, dict[str, Any]]:
        """The issued cards among ``uuids``, keyed by uuid (each a dict of ``cds_card``'s
        columns); unknown uuids are absent."""
        if not uuids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(cds_card.select().where(cds_card.c.uuid.in_(uuids)))
            return {r.uuid: dict(r._mapping) for r in rows}

    async def acards(self, uuids: list[str]) -> dict[str, dict[str, Any]]:
        """``cards`` in a worker thread."""
        return await asyncio.to_thread(self.cards, uuids)

    def add_feedback(self, rows: list[dict[str, Any]]) -> None:
        """Insert feedback rows (``cds_feedback``'s columns but ``id`` and ``received_at``) in one
        transaction: all of them or none."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(cds_feedback.insert(), [{**r, "received_at": now} for r in rows])

    async def aadd_feedback(self, rows: list[dict[str, Any]]) -> None:
        """``add_feedback`` in a worker thread."""
        await asyncio.to_thread(self.add_feedback, rows)

    def feedback(
        self,
        service_id: str,
        *,
        card: str | None = None,
        outcome: str | None = None,
        patient_id: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        issued_to: tuple[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """A service's feedback, newest first, at most ``limit`` rows, filtered by card uuid,
        outcome (``accepted``/``overridden``), patient, ``received_at >= since`` and, with
        ``issued_to`` ``(client_id, realm)``, cards issued to that client and realm only; each
        row a dict of ``cds_feedback``'s columns (``accepted_suggestions`` decoded to a list)."""
        query = cds_feedback.select().where(cds_feedback.c.service_id == service_id)
        if issued_to is not None:
            client_id, realm = issued_to
            theirs = sa.select(cds_card.c.uuid).where(
                cds_card.c.client_id == client_id[:200], cds_card.c.realm == realm[:400]
            )
            query = query.where(cds_feedback.c.card.in_(theirs))
        if card is not None:
            query = query.where(cds_feedback.c.card == card)
        if outcome is not None:
            query = query.where(cds_feedback.c.outcome == outcome)
        if patient_id is not None:
            query = query.where(cds_feedback.c.patient_id == patient_id)
        if since is not None:
            query = query.where(cds_feedback.c.received_at >= since)
        query = query.order_by(cds_feedback.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for row in rows:
            row["accepted_suggestions"] = json.loads(row["accepted_suggestions"])
        return rows

    async def afeedback(self, service_id: str, **kwargs: Any) -> list[dict[str, Any]]:
        """``feedback`` in a worker thread."""
        return await asyncio.to_thread(lambda: self.feedback(service_id, **kwargs))

    def close(self) -> None:
        """Close the engine's pooled connections (at the service's shutdown)."""
        self.engine.dispose()
