"""The CDS Hooks store on SQLite and a real PostgreSQL server: a ``jti`` is accepted once until it
expires (two stores on one database, as two workers), expired ones are forgotten, and issued cards
and feedback refuse UPDATE and DELETE."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from surfaces.http.cds_store import CdsStore


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cds.db'}"
    else:
        postgres: Any = request.getfixturevalue("postgres")
        yield postgres.create_database(f"cds_{tmp_path.name[-20:].lower().replace('-', '_')}")


def test_a_jti_is_accepted_once_across_workers_until_it_expires(url: str):
    one, two = CdsStore(url), CdsStore(url)  # two worker processes' stores on one database
    try:
        soon = datetime.now(UTC) + timedelta(minutes=5)
        assert one.first_use("https://ehr.example", "jti-1", soon)
        assert not two.first_use("https://ehr.example", "jti-1", soon)
        assert two.first_use("https://other-ehr.example", "jti-1", soon)  # per issuer
        # many workers racing on one new jti: exactly one wins
        results: list[bool] = []
        threads = [
            threading.Thread(
                target=lambda s=s: results.append(s.first_use("https://ehr.example", "race", soon))
            )
            for s in (one, two) * 4
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 7 + [True]
        past = datetime.now(UTC) - timedelta(seconds=1)
        assert one.first_use("https://ehr.example", "old", past)
        # an expired jti is deleted on the next use, so the table does not grow without end
        assert two.first_use("https://ehr.example", "next", soon)
        with one.engine.connect() as conn:
            jtis = {r.jti for r in conn.execute(sqlalchemy.text("SELECT jti FROM cds_jti"))}
        assert "old" not in jtis and {"jti-1", "race", "next"} <= jtis
    finally:
        one.close()
        two.close()


def test_cards_and_feedback_are_append_only(url: str):
    store = CdsStore(url)
    try:
        store.issued(
            "0f8c2c8e-1111-4a4a-9b9b-000000000001", service_id="s", hook_instance="h",
            patient_id="p", client_id="c", realm="", kind="summary", cited=["Condition/x"],
        )  # fmt: skip
        store.add_feedback(
            [{"service_id": "s", "card": "0f8c2c8e-1111-4a4a-9b9b-000000000001",
              "patient_id": "p", "client_id": "c", "subject": "u", "outcome": "overridden",
              "accepted_suggestions": "[]", "outcome_timestamp": datetime.now(UTC)}]
        )  # fmt: skip
        assert [r["outcome"] for r in store.feedback("s")] == ["overridden"]
        assert store.cards(["0f8c2c8e-1111-4a4a-9b9b-000000000001"])
        for statement in (
            "UPDATE cds_feedback SET outcome = 'accepted'",
            "DELETE FROM cds_feedback",
            "UPDATE cds_card SET patient_id = 'q'",
            "DELETE FROM cds_card",
        ):
            with (
                pytest.raises(sqlalchemy.exc.DatabaseError, match="append-only"),
                store.engine.begin() as conn,
            ):
                conn.execute(sqlalchemy.text(statement))
    finally:
        store.close()
