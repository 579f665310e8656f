"""Hypothesis strategies for FHIR JSON: arbitrary JSON-ish documents, and mutations of valid
resources and Bundles (fields dropped or altered, wrong types, odd unicode, deep nesting)."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

# Keys and values that steer arbitrary documents towards what the importer looks at.
FHIR_KEYS = (
    "resourceType",
    "id",
    "type",
    "entry",
    "resource",
    "fullUrl",
    "request",
    "method",
    "url",
    "meta",
    "versionId",
    "lastUpdated",
    "subject",
    "patient",
    "reference",
    "identifier",
    "system",
    "value",
    "code",
    "coding",
    "status",
    "valueQuantity",
    "effectiveDateTime",
    "contained",
    "extension",
)
FHIR_WORDS = (
    "Bundle",
    "Patient",
    "Observation",
    "Condition",
    "MedicationRequest",
    "collection",
    "transaction",
    "batch",
    "DELETE",
    "PUT",
    "Patient/p1",
    "urn:uuid:p1",
    "urn:uuid:o1",
    "Organization?identifier=urn:npi|42",
    "#m1",
    "final",
    "2026-03-01T10:00:00Z",
    "1",
    "2",
)

# Text a hostile or broken export may hold: controls, surrogate-free astral characters, RTL marks,
# NUL, a byte order mark inside a string.
odd_text = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.sampled_from(["\x00", "\ufeff", "\u202e", "𝔘𝔫𝔦", "é", "\r\n", " ", ""]),
    st.sampled_from(FHIR_WORDS),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    odd_text,
)


def json_values(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    """Arbitrary JSON values, with object keys drawn mostly from FHIR's own names."""
    keys = st.one_of(st.sampled_from(FHIR_KEYS), st.text(max_size=8))
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)
        ),
        max_leaves=max_leaves,
    )


# Built once: a strategy built inside a draw is validated again at every draw (slow).
_SMALL_JSON = json_values(max_leaves=8)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indexes) to a value inside ``node``, the root excluded."""
    out: list[tuple[Any, ...]] = []
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in children:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def _parent(root: Any, path: tuple[Any, ...]) -> Any:
    node = root
    for key in path[:-1]:
        node = node[key]
    return node


def _nest(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


@st.composite
def mutated(draw: st.DrawFn, original: Any, *, max_mutations: int = 4, under: int = 0) -> Any:
    """``original`` after up to ``max_mutations`` changes at paths at least ``under`` keys deep:
    a field dropped, a value replaced (wrong type, odd unicode, arbitrary JSON, deep nesting), or
    a list item duplicated."""
    doc = copy.deepcopy(original)
    for _ in range(draw(st.integers(min_value=1, max_value=max_mutations))):
        paths = [p for p in _paths(doc) if len(p) > under]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _parent(doc, path), path[-1]
        action = draw(st.sampled_from(["drop", "replace", "retype", "nest", "duplicate"]))
        if action == "drop":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(_SMALL_JSON)
        elif action == "retype":
            value = parent[key]
            parent[key] = draw(
                st.sampled_from(
                    [str(value), [value], {"value": value}, None, 0, -1, 1.5e300, True, ""]
                )
            )
        elif action == "nest":
            parent[key] = _nest(parent[key], draw(st.integers(min_value=1, max_value=150)))
        elif isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        else:
            parent[key] = [parent[key], copy.deepcopy(parent[key])]
    return doc
