"""Writing resources into the store's tables: a resource's row and its search-index rows, replaced
together, inside the caller's transaction."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table, delete, insert, select, text
from sqlalchemy.exc import DBAPIError

from connectors.indexing import compartment_patient, index_rows
from connectors.store.schema import INDEX_TABLES, resources_t

# ids per DELETE: well inside SQLite's bound-parameter limit (32,766 since 3.32, 999 before)
_DELETE_CHUNK = 500


def now() -> str:
    """The current time as the store writes it: ISO 8601 in UTC, to the millisecond
    (``2024-05-01T09:30:00.000+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def delete_resources(conn: Connection, keys: Sequence[tuple[str, str]]) -> None:
    """Remove the resources ``keys`` (``(resource type, id)`` pairs) and their index rows; a key
    the store does not hold is no error.

    Per resource type and ``_DELETE_CHUNK`` ids: one look-up of which of them are stored (index
    rows exist only beside their resource's row), then one statement per table for those, as
    ``resource_type = ? AND resource_id IN (...)``, which both databases answer from the key and
    the owner indexes (``ix_*_owner``). The row-value form ``(resource_type, resource_id) IN
    (VALUES ...)`` made SQLite scan every table whole for each batch, so an import slowed as the
    store grew; a first import now deletes nothing."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for rtype, rid in keys:
        by_type[rtype].append(rid)
    for rtype, ids in by_type.items():
        for start in range(0, len(ids), _DELETE_CHUNK):
            held = list(
                conn.scalars(
                    select(resources_t.c.resource_id).where(
                        resources_t.c.resource_type == rtype,
                        resources_t.c.resource_id.in_(ids[start : start + _DELETE_CHUNK]),
                    )
                )
            )
            if not held:
                continue
            for table in (resources_t, *INDEX_TABLES.values()):
                conn.execute(
                    delete(table).where(
                        table.c.resource_type == rtype, table.c.resource_id.in_(held)
                    )
                )


def write_resources(conn: Connection, batch: list[dict[str, Any]], origin: str) -> None:
    """Store the validated resources of ``batch`` (JSON dicts with ``resourceType`` and ``id``),
    replacing any stored version and its index rows; of two entries for one resource the later
    wins. ``origin`` (the file, its last 1024 characters) is kept with each row; a resource
    without ``meta.lastUpdated`` is stamped with ``now()``. Index values longer than 255
    characters are not indexed (the columns' width); the resource is still stored."""
    if not batch:
        return
    # Of two versions of one resource in a batch, the newer came last (see Identities).
    unique = {(r["resourceType"], r["id"]): r for r in batch}
    delete_resources(conn, list(unique))
    stamp = now()
    rows = []
    index_rows_by_table: dict[str, list[dict[str, Any]]] = {name: [] for name in INDEX_TABLES}
    for (rtype, rid), res in unique.items():
        rows.append(
            {
                "resource_type": rtype,
                "resource_id": rid,
                "patient_id": compartment_patient(res),
                "last_updated": (res.get("meta") or {}).get("lastUpdated") or stamp,
                "origin": origin[-1024:],
                "content": json.dumps(res, separators=(",", ":"), ensure_ascii=False),
            }
        )
        for name, values in index_rows(res).items():
            cols = [c.name for c in INDEX_TABLES[name].columns][2:]
            index_rows_by_table[name].extend(
                {"resource_type": rtype, "resource_id": rid, **dict(zip(cols, v, strict=True))}
                for v in values
                if all(len(str(x)) <= 255 for x in v)
            )
    insert_rows(conn, resources_t, rows)
    for name, table_rows in index_rows_by_table.items():
        insert_rows(conn, INDEX_TABLES[name], table_rows)


def insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (dicts by column name) into ``table``: on PostgreSQL through psycopg 3 with
    ``COPY ... FROM STDIN`` (``Cursor.copy``) inside the caller's transaction, since an
    executemany sends one statement per row and the server's per-statement work made an import
    there 7× slower than on SQLite; with any other driver or database ``executemany`` (whose loop
    runs in C on SQLite). A driver error during COPY is raised as SQLAlchemy's (``DataError``,
    ``OperationalError``, ...: ``DBAPIError.instance``), as every other statement's is."""
    if not rows:
        return
    if conn.dialect.name != "postgresql" or conn.dialect.driver != "psycopg":
        conn.execute(insert(table), rows)
        return
    import psycopg

    names = [c.name for c in table.columns if c.name in rows[0]]
    columns = ", ".join(f'"{n}"' for n in names)
    statement = f'COPY "{table.name}" ({columns}) FROM STDIN'
    try:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row([row[n] for n in names])
    except psycopg.Error as exc:
        raise DBAPIError.instance(statement, None, exc, psycopg.Error) from exc


def refresh_statistics(conn: Connection, written: int) -> None:
    """On PostgreSQL, ``ANALYZE`` the store's tables when ``written`` (the resources this
    transaction has written so far) is a fifth or more of what the planner believes
    ``fhir_resource`` holds (``pg_class.reltuples``; -1: never analysed). ANALYZE counts the
    transaction's own rows. Without it a long import into a young store ran with the statistics of
    an empty one: the planner answered each batch's owner deletes from the ``resource_type`` half
    of the index and read every stored row of the type, so an import slowed as it went (an
    import into PostgreSQL was 7× slower than into SQLite). Elsewhere a no-op.

    ``SKIP_LOCKED`` (PostgreSQL 12+): ANALYZE's lock is held until the import commits, so another
    import analysing at the same time skips the tables instead of waiting for it. A rolled-back
    import leaves the estimates it set until autovacuum's next ANALYZE."""
    if conn.dialect.name != "postgresql":
        return
    believed = conn.execute(
        text("SELECT reltuples FROM pg_class WHERE oid = CAST(:t AS regclass)"),
        {"t": resources_t.name},
    ).scalar()
    if believed is None or believed < 0 or written * 5 >= believed:
        tables = ", ".join(f'"{t.name}"' for t in (resources_t, *INDEX_TABLES.values()))
        conn.execute(text(f"ANALYZE (SKIP_LOCKED) {tables}"))
