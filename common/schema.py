"""Creating tables in a database several processes open at once (replicas of ``chartsight
serve``, workers, an index build beside a running service, all on one PostgreSQL): PostgreSQL's
``CREATE TABLE IF NOT EXISTS`` and ``CREATE OR REPLACE FUNCTION`` are not safe against each other
when two sessions run them together (``duplicate key value violates unique constraint
"pg_type_typname_nsp_index"``, ``tuple concurrently updated``), so on PostgreSQL the whole schema
step runs in one transaction holding a transaction-level advisory lock (``pg_advisory_xact_lock``,
PostgreSQL manual §9.27.10 "Advisory Lock Functions"): the second process waits, then finds every
table there. SQLite serialises schema changes itself (its database lock)."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

# the advisory lock key every ChartSight schema step takes (any fixed 64-bit number; this one is
# the ASCII of "CSschema" read as a signed big-endian integer)
SCHEMA_LOCK = int.from_bytes(b"CSschema", "big", signed=True)


def create_schema(
    engine: sa.Engine,
    metadata: sa.MetaData,
    then: Callable[[sa.Connection], None] | None = None,
) -> None:
    """Create ``metadata``'s missing tables and run ``then`` (migrations, triggers) in one
    transaction, under ``SCHEMA_LOCK`` on PostgreSQL so that processes opening the same database
    together do it one after the other. Raises SQLAlchemy's errors when the database refuses."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
        metadata.create_all(conn)
        if then is not None:
            then(conn)
