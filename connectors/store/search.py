"""FHIR search on the local store, as SQL: a search's parameters become one SELECT over
``fhir_resource`` with EXISTS conditions on the index tables.

Supported (FHIR R4 search.html): ``_id``; ``patient``/``subject`` (by the patient compartment);
the token, date and string parameters ``connectors.indexing`` indexes, plus ``identifier`` and
``status``; token ``system|code``, ``|code``, ``system|`` and ``:not``; date prefixes ``eq ne gt lt
ge le sa eb``; string ``:exact`` and ``:contains`` (default: starts with, normalised); comma-
separated values OR-ed; ``_sort`` by ``_id``, ``_lastUpdated`` or an indexed date. ``_count``,
``_total``, ``_format``, ``_elements`` and ``_summary`` are ignored: the store returns every match.
Anything else raises ``UnsupportedSearch`` naming what can be searched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Select, Table, and_, exists, func, or_, select

from connectors.errors import UnsupportedSearch
from connectors.indexing import DATES, STRINGS, TOKENS, date_range, normalise_string
from connectors.resources import is_resource_type
from connectors.source import SearchParams
from connectors.store.schema import dates_t, resources_t, strings_t, tokens_t

# paging and presentation: the store always returns every match, in full
_IGNORED = ("_count", "_total", "_format", "_elements", "_summary")


def search_statement(resource_type: str, params: SearchParams | None) -> Select[Any]:
    """The SELECT of ``(content, resource_type, resource_id)`` rows, in ``_sort`` order (else by
    id), of the ``resource_type`` resources matching every parameter in ``params``. Raises
    ``UnsupportedSearch`` for an unknown resource type, a parameter or ``_sort`` key the store
    does not index, an empty value or a date that is not a FHIR date."""
    if not is_resource_type(resource_type):
        raise UnsupportedSearch(f"unknown resource type {resource_type!r}")
    r = resources_t
    query = select(r.c.content, r.c.resource_type, r.c.resource_id).where(
        r.c.resource_type == resource_type
    )
    order = [r.c.resource_id]
    for name, value in _param_items(params):
        base, _, modifier = name.partition(":")
        if base in _IGNORED:
            continue
        if base == "_sort":
            order = _sort_order(resource_type, value)
            continue
        query = query.where(_condition(resource_type, base, modifier, value))
    return query.order_by(*order)


def _param_items(params: SearchParams | None) -> Iterator[tuple[str, str]]:
    for key, value in (params or {}).items():
        if isinstance(value, str):
            yield key, value
        else:
            for v in value:
                yield key, v


_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")


def _owner(table: Table) -> Any:
    return and_(
        table.c.resource_type == resources_t.c.resource_type,
        table.c.resource_id == resources_t.c.resource_id,
    )


def _condition(resource_type: str, name: str, modifier: str, value: str) -> Any:
    """SQL condition for one search parameter; comma-separated values are OR-ed."""
    values = [v for v in value.split(",") if v != ""]
    if not values:
        raise UnsupportedSearch(f"search parameter {name!r} has an empty value")
    r = resources_t
    if name == "_id":
        return r.c.resource_id.in_(values)
    if name in ("patient", "subject") and resource_type != "Patient":
        ids = [v.removeprefix("Patient/") for v in values]
        return r.c.patient_id.in_(ids)
    if name in TOKENS.get(resource_type, {}) or name in ("identifier", "status"):
        t = tokens_t
        ors = []
        for v in values:
            system, bar, code = v.partition("|")
            if not bar:
                ors.append(t.c.code == v)
            elif code:
                ors.append(and_(t.c.system == system, t.c.code == code))
            else:
                ors.append(t.c.system == system)
        cond = exists().where(_owner(t), t.c.param == name, or_(*ors))
        return ~cond if modifier == "not" else cond
    if name in DATES.get(resource_type, {}):
        d = dates_t
        return exists().where(_owner(d), d.c.param == name, or_(*(_date_cmp(v) for v in values)))
    if name in STRINGS.get(resource_type, {}):
        s = strings_t
        ors = []
        for v in values:
            norm = normalise_string(v)
            if modifier == "exact":
                ors.append(s.c.value == norm)
            elif modifier == "contains":
                ors.append(s.c.value.contains(norm, autoescape=True))
            else:
                ors.append(s.c.value.startswith(norm, autoescape=True))
        return exists().where(_owner(s), s.c.param == name, or_(*ors))
    raise UnsupportedSearch(
        f"the local store cannot search {resource_type} by {name!r}; indexed: "
        + ", ".join(
            sorted(
                {
                    "_id",
                    "identifier",
                    "status",
                    *TOKENS.get(resource_type, {}),
                    *DATES.get(resource_type, {}),
                    *STRINGS.get(resource_type, {}),
                }
            )
        )
    )


def _date_cmp(value: str) -> Any:
    prefix = value[:2] if value[:2] in _PREFIXES else "eq"
    rng = date_range(value[2:] if value[:2] in _PREFIXES else value)
    if rng is None:
        raise UnsupportedSearch(f"{value!r} is not a FHIR date")
    lo, hi = rng
    d = dates_t
    return {
        "eq": and_(d.c.start >= lo, d.c.end <= hi),
        "ne": or_(d.c.start > hi, d.c.end < lo),
        "gt": d.c.end > hi,
        "lt": d.c.start < lo,
        "ge": d.c.end >= lo,
        "le": d.c.start <= hi,
        "sa": d.c.start > hi,
        "eb": d.c.end < lo,
    }[prefix]


def _sort_order(resource_type: str, value: str) -> list[Any]:
    order = []
    for key in value.split(","):
        desc = key.startswith("-")
        key = key.lstrip("-")
        if key == "_id":
            col: Any = resources_t.c.resource_id
        elif key == "_lastUpdated":
            col = resources_t.c.last_updated
        elif key in DATES.get(resource_type, {}):
            d = dates_t
            col = select(func.min(d.c.start)).where(_owner(d), d.c.param == key).scalar_subquery()
        else:
            raise UnsupportedSearch(f"the local store cannot sort {resource_type} by {key!r}")
        order.append(col.desc() if desc else col.asc())
    order.append(resources_t.c.resource_id)
    return order
