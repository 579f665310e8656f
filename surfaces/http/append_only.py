"""Tables the application only ever inserts into (the audit log, AI drafts and approvals, issued
CDS cards and feedback): on SQLite and PostgreSQL a trigger refuses UPDATE and DELETE, so a bug
cannot rewrite history either. Other databases get no trigger (the application still never
updates or deletes these rows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

# one PostgreSQL trigger function for every such table, naming the table in its error (no "%" in
# the statement: psycopg reads one as a placeholder even without parameters, whatever the driver)
_POSTGRES_FUNCTION = (
    "CREATE OR REPLACE FUNCTION chartsight_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only'; END; $$ "
    "LANGUAGE plpgsql"
)


def guard_statements(dialect: str, tables: Sequence[str]) -> list[str]:
    """The DDL that makes each of ``tables`` refuse UPDATE and DELETE with the error
    "<table> is append-only" (SQLite: ``RAISE(ABORT)`` triggers; PostgreSQL: a ``BEFORE UPDATE OR
    DELETE … FOR EACH ROW`` trigger); ``[]`` for another ``dialect``. Safe to run again."""
    out: list[str] = []
    for table in tables:
        if dialect == "sqlite":
            out += [
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                for op in ("UPDATE", "DELETE")
            ]
        elif dialect == "postgresql":
            out += [
                _POSTGRES_FUNCTION,
                f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}",
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION chartsight_append_only()",
            ]
    return out


def make_append_only(bind: sa.Engine | sa.Connection, tables: Sequence[str]) -> None:
    """Install ``guard_statements`` for the database's dialect: in ``bind``'s transaction when it
    is a connection (``common.schema.create_schema``'s ``then``, under its lock), else in a
    transaction of its own. Raises SQLAlchemy's errors when the database refuses the DDL."""
    if isinstance(bind, sa.Engine):
        with bind.begin() as conn:
            make_append_only(conn, tables)
        return
    for statement in guard_statements(bind.dialect.name, tables):
        bind.exec_driver_sql(statement)


def open_engine(url: str) -> sa.Engine:
    """The engine of one of the service's append-only databases (audit log and drafts, CDS
    store) at a SQLAlchemy URL. On SQLite each connection uses the write-ahead log (readers do not
    wait for the writer; one fsync per commit instead of the rollback journal's several),
    ``synchronous=FULL`` (a committed row, such as the audit row of an answer already sent,
    survives a power cut) and waits up to 30 s for another process's write lock
    (``chartsight serve --workers N`` share the file; https://sqlite.org/pragma.html,
    https://sqlite.org/wal.html)."""
    engine = sa.create_engine(url, pool_pre_ping=True)  # survives a database restart
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()
