"""Conversation threads' store (LangGraph's checkpointer, SQLite or PostgreSQL) as ChartSight reads
it: what it rebuilds is validated before a question continues the thread, and its failures are
ChartSight's own errors.

- ``ThreadStoreError``: the threads database cannot be read or written (a corrupt or missing file,
  a PostgreSQL server gone); the HTTP service answers 503.
- ``DamagedThread``: one thread's saved state does not validate (a row edited outside ChartSight:
  a field of the wrong type, a model LangGraph could only rebuild without validation, a value in
  an encoding the checkpointer refuses); that thread gives this error, other threads and the rows
  themselves are untouched (kept for the operator to inspect). The HTTP service answers 500.
"""

from __future__ import annotations

import sqlite3
import sys
from typing import Any, get_type_hints

from pydantic import BaseModel, TypeAdapter, ValidationError

from agent.state import AskState
from common.errors import ChartSightError


class ThreadStoreError(ChartSightError):
    """The conversation threads' database cannot be read or written (HTTP 503)."""

    said = "the conversation store cannot be read; try again later, or ask without a thread"


class DamagedThread(ChartSightError):
    """A thread whose saved state does not validate against the graph's state (HTTP 500)."""

    said = "this thread's saved state is damaged; start a new thread"


def store_errors() -> tuple[type[BaseException], ...]:
    """The exceptions the checkpointer's database drivers raise: ``sqlite3.Error`` (aiosqlite
    raises them as they are) and, once they are imported, ``psycopg.Error`` and the connection
    pool's ``PoolTimeout``. Read when an error is being classified: a psycopg error can only exist
    once psycopg is imported, and a process on SQLite never pays for importing it (≈60 ms)."""
    errors: list[type[BaseException]] = [sqlite3.Error]
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        errors.append(psycopg.Error)
    pool = sys.modules.get("psycopg_pool")
    if pool is not None:
        errors.append(pool.PoolTimeout)
    return tuple(errors)


# one validator per key of the graph's state, from ``AskState``'s annotations (reducers dropped);
# per key because pydantic reads a ``typing.TypedDict`` only on Python 3.12 and later
_KEYS: dict[str, TypeAdapter[Any]] = {
    key: TypeAdapter(hint) for key, hint in get_type_hints(AskState).items()
}


def _revalidated(value: Any) -> None:
    """Validate every pydantic model inside ``value`` from its own fields (inner ones first):
    LangGraph's msgpack reader falls back to ``model_construct`` (no validation) when a stored
    model's fields do not validate, and a model instance passes a ``TypeAdapter`` unchecked.
    Raises ``ValidationError``."""
    if isinstance(value, BaseModel):
        for field in value.__dict__.values():
            _revalidated(field)
        type(value).model_validate(dict(value.__dict__))
    elif isinstance(value, dict):
        for item in value.values():
            _revalidated(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _revalidated(item)


def checked_state(values: dict[str, Any]) -> None:
    """Check a thread's saved state (a checkpoint's channel values) against ``AskState``: each
    key known and of its type (``history`` a list of string maps, ``answer`` an ``Answer``, ...),
    and every model in it valid in its own right. Raises ``DamagedThread`` naming the first bad
    key or model field (for the operator's log; callers outside see ``DamagedThread.said``)."""
    for key, value in values.items():
        adapter = _KEYS.get(key)
        if adapter is None:
            raise DamagedThread(f"the thread's saved state has an unknown key {key!r}")
        try:
            adapter.validate_python(value)
            _revalidated(value)
        except ValidationError as exc:
            field = ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else ""
            raise DamagedThread(
                f"the thread's saved state does not validate: {key} ({exc.title} {field})"
            ) from exc
