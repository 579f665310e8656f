"""References in resources being imported: listing them, and resolving the ones a Bundle
writes for resources it does not know the ids of yet.

A transaction Bundle may point at another entry by its ``fullUrl`` (``urn:uuid:...``, as Synthea
writes) and at a resource by a conditional reference (``Organization?identifier=sys|val``); both
become ``Type/id`` before anything is stored (FHIR R4 http.html#trules, bundle.html#references).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection, select

from connectors.resources import is_resource_type
from connectors.store.schema import tokens_t


def references_in(node: Any) -> Iterator[str]:
    """Every ``reference`` string anywhere in the JSON ``node`` (a resource as a dict), depth
    first, in document order; contained resources included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from references_in(item)


class ConditionalLookup:
    """Resolves conditional references (``Organization?identifier=sys|val``) in a bundle or the store."""

    def __init__(self, conn: Connection, bundle_resources: list[dict[str, Any]]) -> None:
        self.conn = conn
        self.by_identifier: dict[tuple[str, str, str], list[str]] = {}
        for res in bundle_resources:
            # Not validated yet: an identifier of the wrong shape fails validation later.
            idents = res.get("identifier")
            for ident in idents if isinstance(idents, list) else []:
                if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                    system = ident.get("system")
                    key = (
                        res["resourceType"],
                        system if isinstance(system, str) else "",
                        ident["value"],
                    )
                    self.by_identifier.setdefault(key, []).append(
                        f"{res['resourceType']}/{res['id']}"
                    )

    def __call__(self, reference: str) -> str:
        """The ``Type/id`` that ``reference`` (``Type?identifier=[system|]value``) names: the one
        resource of the Bundle, else of the store, with that identifier. Raises ``ValueError``
        for any other search, or when it matches no resource or more than one."""
        rtype, _, query = reference.partition("?")
        name, _, value = query.partition("=")
        if name != "identifier" or "&" in value or not is_resource_type(rtype):
            raise ValueError(
                f"conditional reference {reference!r}: only Type?identifier=system|value is supported"
            )
        system, bar, code = value.partition("|")
        if not bar:
            system, code = "", value
        found = list(self.by_identifier.get((rtype, system, code), []))
        if not found:
            t = tokens_t
            rows = self.conn.execute(
                select(t.c.resource_id).where(
                    t.c.resource_type == rtype,
                    t.c.param == "identifier",
                    t.c.code == code,
                    *([t.c.system == system] if system else []),
                )
            ).all()
            found = [f"{rtype}/{row[0]}" for row in rows]
        if len(set(found)) != 1:
            what = "matches nothing" if not found else f"matches {len(set(found))} resources"
            raise ValueError(f"broken reference {reference!r}: {what}")
        return found[0]


def resolve_references(
    node: Any, targets: dict[str, str], conditional: Callable[[str], str]
) -> Any:
    """A copy of the JSON ``node`` whose references are ``Type/id``: a key of ``targets`` (a
    ``fullUrl`` of the Bundle) becomes its value, a conditional reference (with ``?``, not an
    absolute URL or a ``#`` contained one) becomes what ``conditional`` returns; others are kept.
    Raises what ``conditional`` raises (``ValueError`` from ``ConditionalLookup``)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                if value in targets:
                    value = targets[value]
                elif "?" in value and not value.startswith(("http:", "https:", "#")):
                    value = conditional(value)
            else:
                value = resolve_references(value, targets, conditional)
            out[key] = value
        return out
    if isinstance(node, list):
        return [resolve_references(v, targets, conditional) for v in node]
    return node
