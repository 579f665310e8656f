"""What the database makes of the statements the store runs, asked of the database itself
(``EXPLAIN``): for tests that an import's look-ups and deletes by id do not read whole tables."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event

from connectors.store import FhirStore


def observations_ndjson(folder: Path, patient: str, count: int) -> list[Path]:
    """A Patient file and an NDJSON file of ``count`` Observations of ``patient``, as a Bulk Data
    export hands them over."""
    folder.mkdir(parents=True, exist_ok=True)
    people = folder / "Patient.ndjson.gz"
    with gzip.open(people, "wt") as fh:
        fh.write(json.dumps({"resourceType": "Patient", "id": patient}) + "\n")
    observations = folder / "Observation.ndjson.gz"
    with gzip.open(observations, "wt") as fh:
        for i in range(count):
            obs = {
                "resourceType": "Observation",
                "id": f"obs-{i}",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                "subject": {"reference": f"Patient/{patient}"},
                "effectiveDateTime": f"2020-01-{1 + i % 28:02d}",
                "valueQuantity": {
                    "value": i % 10,
                    "unit": "%",
                    "system": "http://unitsofmeasure.org",
                },
            }
            fh.write(json.dumps(obs) + "\n")
    return [people, observations]


@contextmanager
def plans_of(store: FhirStore) -> Iterator[list[str]]:
    """Collects SQLite's plan (``EXPLAIN QUERY PLAN``, one text) of every statement naming
    resources by id (``resource_id IN``: the look-ups and deletes that replace stored
    resources) that the store runs inside the block."""
    plans: list[str] = []

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "resource_id IN" in statement:
            rows = cursor.connection.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            plans.append("\n".join(str(r[-1]) for r in rows.fetchall()))

    with _listening(store, explain):
        yield plans


@contextmanager
def estimates_of(store: FhirStore, resource_type: str) -> Iterator[list[tuple[float, int]]]:
    """On PostgreSQL: before every statement naming resources by id that the store runs inside the
    block, the planner's estimate of how many rows ``fhir_resource`` holds of ``resource_type``
    and how many it holds, asked on the same connection (inside the same transaction)."""
    pairs: list[tuple[float, int]] = []
    query = "FROM fhir_resource WHERE resource_type = %s"

    def look(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "resource_id IN" not in statement:
            return
        raw = cursor.connection
        plan = raw.execute(f"EXPLAIN SELECT 1 {query}", (resource_type,)).fetchall()[0][0]
        estimate = float(re.search(r"rows=(\d+)", plan).group(1))  # type: ignore[union-attr]
        held = raw.execute(f"SELECT count(*) {query}", (resource_type,)).fetchone()[0]
        pairs.append((estimate, held))

    with _listening(store, look):
        yield pairs


@contextmanager
def _listening(store: FhirStore, listener: Callable[..., None]) -> Iterator[None]:
    event.listen(store.engine, "before_cursor_execute", listener)
    try:
        yield
    finally:
        event.remove(store.engine, "before_cursor_execute", listener)


def by_owner(plans: list[str]) -> bool:
    """Whether every SQLite plan finds its rows through an index on ``resource_id`` (a
    ``SEARCH ... USING INDEX``) and none reads a table whole (``SCAN``)."""
    return all(
        not re.search(r"\bSCAN fhir_", plan)
        and re.search(
            r"SEARCH fhir_\w+ USING (?:COVERING INDEX|INDEX|PRIMARY KEY).*resource_id", plan
        )
        for plan in plans
    )
