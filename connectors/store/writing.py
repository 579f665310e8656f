"""Writing resources into the store's tables: a resource's row and its search-index rows, replaced
together, inside the caller's transaction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, tuple_

from connectors.indexing import compartment_patient, index_rows
from connectors.store.schema import INDEX_TABLES, resources_t


def now() -> str:
    """The current time as the store writes it: ISO 8601 in UTC, to the millisecond
    (``2024-05-01T09:30:00.000+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def delete_resources(conn: Connection, keys: Sequence[tuple[str, str]]) -> None:
    """Remove the resources ``keys`` (``(resource type, id)`` pairs) and their index rows; a key
    the store does not hold is no error."""
    for table in (resources_t, *INDEX_TABLES.values()):
        conn.execute(
            delete(table).where(tuple_(table.c.resource_type, table.c.resource_id).in_(keys))
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
    conn.execute(insert(resources_t), rows)
    for name, table_rows in index_rows_by_table.items():
        if table_rows:
            conn.execute(insert(INDEX_TABLES[name]), table_rows)
