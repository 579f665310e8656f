"""The local store's tables (SQLAlchemy Core; one schema for SQLite and PostgreSQL).

``fhir_resource`` holds each resource's JSON once, keyed by ``Type/id``, with the patient whose
compartment it is in. Four index tables hold one row per value a search parameter takes in a
resource (``connectors.indexing`` says which parameters and how values are normalised); searches
join them to ``fhir_resource`` by owner. ``fhir_import`` logs each imported file's SHA-256, so an
unchanged file is not imported twice.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text

# FHIR R4 ids: [A-Za-z0-9\-\.]{1,64} (http://hl7.org/fhir/R4/datatypes.html#id); the id columns
# and the patient_id column are this long.
MAX_ID = 64

metadata = MetaData()

resources_t = Table(
    "fhir_resource",
    metadata,
    Column("resource_type", String(64), primary_key=True),
    Column("resource_id", String(MAX_ID), primary_key=True),
    Column("patient_id", String(MAX_ID), index=True),
    Column("last_updated", String(40), nullable=False),
    Column("origin", String(1024)),
    Column("content", Text, nullable=False),
)


def _index_table(
    name: str, short: str, *values: Column[Any], lookup: tuple[str, ...] | None
) -> Table:
    """An index table ``name``: columns ``resource_type``, ``resource_id`` (the owner), ``param``,
    then ``values`` (in the order ``connectors.indexing.index_rows`` yields them), with an index
    ``ix_{short}_owner`` for deletes and, if ``lookup`` names columns, ``ix_{short}_lookup``."""
    return Table(
        name,
        metadata,
        Column("resource_type", String(64), nullable=False),
        Column("resource_id", String(MAX_ID), nullable=False),
        Column("param", String(64), nullable=False),
        *values,
        *([Index(f"ix_{short}_lookup", *lookup)] if lookup else []),
        Index(f"ix_{short}_owner", "resource_type", "resource_id"),
    )


tokens_t = _index_table(
    "fhir_token",
    "token",
    Column("system", String(255), nullable=False),
    Column("code", String(255), nullable=False),
    lookup=("param", "code", "resource_type"),
)
dates_t = _index_table(
    "fhir_date",
    "date",
    Column("start", String(32), nullable=False),
    Column("end", String(32), nullable=False),
    lookup=None,
)
strings_t = _index_table(
    "fhir_string",
    "string",
    Column("value", String(255), nullable=False),
    lookup=("param", "value"),
)
refs_t = _index_table(
    "fhir_reference",
    "ref",
    Column("target", String(255), nullable=False),
    lookup=("param", "target"),
)
imports_t = Table(
    "fhir_import",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", String(1024), nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("imported_at", String(40), nullable=False),
    Column("resources", Integer, nullable=False),
)
# the keys of connectors.indexing.index_rows -> the table their rows go to
INDEX_TABLES = {"tokens": tokens_t, "dates": dates_t, "strings": strings_t, "refs": refs_t}
