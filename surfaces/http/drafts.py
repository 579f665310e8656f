"""The SMART page's AI drafts and the clinicians' approvals, in SQL (SQLAlchemy), append-only.

Every answer the page shows is kept as a draft (``ai_draft``): the Answer's JSON exactly as the
service produced it, the patient, the EHR (``iss``) and the session it was produced for (a
SHA-256 of the session cookie, never the cookie). Saving it to the chart reads the draft from
here by its id, so what is written is what the service generated, never text or citations a
browser sends. Each approval (``ai_approval``) records who approved (the SMART ``fhirUser``),
when, the transaction Bundle sent to the EHR, and the outcome with the locations the EHR
assigned, so what was generated and what was saved can both be shown.

Unlike the audit log, these tables hold PHI (the question and the answer's text): they live in
the service's database beside it (``serve.audit_url``, else ``<home>/audit.db``), which is
protected as the audit log is. Both tables refuse UPDATE and DELETE by trigger on SQLite and
PostgreSQL, as the audit log does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from agent import Answer
from common.schema import create_schema
from surfaces.http.append_only import make_append_only, open_engine

metadata = sa.MetaData()
ai_draft = sa.Table(
    "ai_draft",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("session_sha256", sa.String(64), nullable=False),
    sa.Column("iss", sa.String(500), nullable=False),
    sa.Column("patient_id", sa.String(200), nullable=False),
    sa.Column("user", sa.String(400), nullable=False),
    sa.Column("answer", sa.Text, nullable=False),  # the Answer's JSON as produced
)
ai_approval = sa.Table(
    "ai_approval",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("draft_id", sa.String(64), sa.ForeignKey("ai_draft.id"), nullable=False),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("approver", sa.String(400), nullable=False),
    sa.Column("outcome", sa.String(40), nullable=False),  # saved | refused | failed
    sa.Column("bundle", sa.Text, nullable=False),  # the transaction Bundle sent
    sa.Column("locations", sa.Text, nullable=False, default="[]"),  # JSON list from the EHR
    sa.Column("detail", sa.String(300)),
)


@dataclass(frozen=True)
class Draft:
    """One stored draft: its id, when it was kept (UTC), the session's cookie digest, the EHR's
    FHIR base, the patient, the user it was shown to, and the Answer as produced."""

    id: str
    at: datetime
    session_sha256: str
    iss: str
    patient_id: str
    user: str
    answer: Answer


class DraftStore:
    """The ``ai_draft`` and ``ai_approval`` tables at a SQLAlchemy URL, created on first use with
    their UPDATE/DELETE-refusing triggers. Methods raise SQLAlchemy's errors when the database
    refuses a write."""

    def __init__(self, url: str) -> None:
        self.engine = open_engine(url)  # survives a database restart (pre-ping)
        create_schema(
            self.engine, metadata, lambda conn: make_append_only(conn, ("ai_draft", "ai_approval"))
        )

    def keep(self, answer: Answer, *, session_sha256: str, iss: str, user: str) -> str:
        """Store ``answer`` (as produced, before any display change) as a draft for the session
        whose cookie digest is ``session_sha256``; return its new id (24 random bytes, base64 URL
        form: not guessable, so one session cannot name another's draft by counting)."""
        draft_id = secrets.token_urlsafe(24)
        with self.engine.begin() as conn:
            conn.execute(
                ai_draft.insert().values(
                    id=draft_id,
                    at=datetime.now(UTC),
                    session_sha256=session_sha256,
                    iss=iss[:500],
                    patient_id=answer.patient_id,
                    user=user[:400],
                    answer=answer.model_dump_json(),
                )
            )
        return draft_id

    def get(self, draft_id: str) -> Draft | None:
        """The draft ``draft_id``, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(ai_draft.select().where(ai_draft.c.id == draft_id)).first()
        if row is None:
            return None
        m = row._mapping
        return Draft(
            id=m["id"],
            at=m["at"],
            session_sha256=m["session_sha256"],
            iss=m["iss"],
            patient_id=m["patient_id"],
            user=m["user"],
            answer=Answer.model_validate_json(m["answer"]),
        )

    def approve(
        self,
        draft_id: str,
        *,
        approver: str,
        at: datetime,
        outcome: str,
        bundle: dict[str, Any],
        locations: list[str] | None = None,
        detail: str | None = None,
    ) -> None:
        """Record an approval of ``draft_id`` by ``approver`` (a FHIR reference) at ``at``: the
        ``outcome`` (``saved``, or ``failed`` when the EHR refused or could not be reached, with
        the error's name in ``detail``, cut to 300 characters), the transaction Bundle sent, and
        the locations the EHR gave its entries."""
        with self.engine.begin() as conn:
            conn.execute(
                ai_approval.insert().values(
                    draft_id=draft_id,
                    at=at,
                    approver=approver[:400],
                    outcome=outcome,
                    bundle=json.dumps(bundle),
                    locations=json.dumps(locations or []),
                    detail=(detail or "")[:300] or None,
                )
            )

    async def akeep(self, *args: Any, **kwargs: Any) -> str:
        """``keep`` in a worker thread."""
        return await asyncio.to_thread(self.keep, *args, **kwargs)

    async def aapprove(self, *args: Any, **kwargs: Any) -> None:
        """``approve`` in a worker thread."""
        await asyncio.to_thread(self.approve, *args, **kwargs)

    def approvals(self, draft_id: str) -> list[dict[str, Any]]:
        """The approvals of ``draft_id``, oldest first, as dicts keyed by column (``bundle`` the
        Bundle's JSON and ``locations`` a list, decoded)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                ai_approval.select()
                .where(ai_approval.c.draft_id == draft_id)
                .order_by(ai_approval.c.id)
            )
            out = []
            for row in rows:
                item = dict(row._mapping)
                item["bundle"] = json.loads(item["bundle"])
                item["locations"] = json.loads(item["locations"])
                out.append(item)
            return out

    def close(self) -> None:
        """Close the engine's pooled connections (at the service's shutdown)."""
        self.engine.dispose()
