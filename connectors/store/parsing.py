"""Strict JSON for untrusted input, and the admission of one resource's JSON.

``loads`` parses as ``json.loads`` does but refuses what would later fail far from its cause or
exhaust the machine: ``NaN``/``Infinity`` (not JSON, RFC 8259 section 6), numbers of more than
``MAX_NUMBER_DIGITS`` digits or beyond a double, and nesting too deep for the parser. ``admit``
checks that a parsed value is a FHIR R4 resource nested at most ``MAX_DEPTH`` levels. Every
refusal is a ``FhirImportError`` naming the file and the entry or line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from connectors.errors import FhirImportError
from connectors.resources import is_resource_type

# JSON nesting of one resource: real resources stay far below (a Questionnaire's nested items, an
# extension of an extension); the importer's own passes recurse once per level.
MAX_DEPTH = 100
# Digits of one JSON number: FHIR integers are 32-bit and decimals carry at most 18 significant
# digits in practice; Python refuses to convert integers longer than 4300 digits anyway.
MAX_NUMBER_DIGITS = 100


class _BadNumber(ValueError):
    """A JSON number the importer refuses."""


def _number_text(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:12]}…{text[-8:]}"


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise _BadNumber(
            f"the integer {_number_text(text)} has {digits} digits; at most "
            f"{MAX_NUMBER_DIGITS} are accepted"
        )
    return int(text)


def _parse_float(text: str) -> float:
    mantissa = text.lstrip("-").lower().partition("e")[0]
    digits = len(mantissa.replace(".", ""))
    if digits > MAX_NUMBER_DIGITS:
        raise _BadNumber(
            f"the number {_number_text(text)} has {digits} digits; at most "
            f"{MAX_NUMBER_DIGITS} are accepted"
        )
    value = float(text)
    if not math.isfinite(value) or (value == 0 and mantissa.strip("0.")):
        raise _BadNumber(f"the number {_number_text(text)} is out of range (beyond a double)")
    return value


def _parse_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not a JSON number (RFC 8259)")


def loads(text: str, origin: str, where: str | None = None, *, cut: bool = False) -> Any:
    """The value of the JSON ``text``, parsed strictly: numbers finite and of at most
    ``MAX_NUMBER_DIGITS`` digits, no ``NaN``/``Infinity``; ``where`` names the NDJSON line, ``cut``
    says it lacks its newline (so an error at its end means it was cut short). Every failure is a
    ``FhirImportError`` saying where (line and column) and why."""
    try:
        return json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno} column {exc.colno}" if where is None else f"column {exc.colno}"
        ends_early = (
            cut or exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        )
        kind = "truncated or malformed JSON" if ends_early else "malformed JSON"
        raise FhirImportError(origin, f"{kind} at {at}: {exc.msg}", where) from exc
    except _BadNumber as exc:
        raise FhirImportError(origin, str(exc), where) from exc
    except RecursionError as exc:
        raise FhirImportError(
            origin,
            f"JSON nested too deeply to read (more than {MAX_DEPTH} levels are refused)",
            where,
        ) from exc


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words, for messages: "array", "string", "number",
    "true", "false" or "null" (an object is never asked about)."""
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "number" if isinstance(value, int | float) else type(value).__name__


def brief(value: Any) -> str:
    """``repr(value)`` for a message, cut to 50 characters and "…" when longer than 60."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}…"


def _nesting(node: Any) -> int:
    """How deep JSON arrays and objects nest in ``node`` (a scalar 0, ``[]`` 1), counted without
    recursion; counting stops once past ``MAX_DEPTH``."""
    deepest = 0
    stack = [(node, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def admit(raw: Any, origin: str, where: str) -> dict[str, Any]:
    """``raw``, once it is one resource's JSON: an object with a FHIR R4 resourceType, nested at
    most ``MAX_DEPTH`` levels (so that validation, reference resolution and indexing, which
    recurse, cannot overflow the stack). Raises ``FhirImportError`` naming ``where`` otherwise."""
    if not isinstance(raw, dict):
        raise FhirImportError(origin, f"a JSON {json_kind(raw)}, not a FHIR resource", where)
    if "resourceType" not in raw:
        raise FhirImportError(origin, "not a FHIR resource (no resourceType)", where)
    if not is_resource_type(raw["resourceType"]):
        raise FhirImportError(origin, f"unknown resourceType {brief(raw['resourceType'])}", where)
    if _nesting(raw) > MAX_DEPTH:
        raise FhirImportError(
            origin, f"JSON nested deeper than {MAX_DEPTH} levels, the limit for a resource", where
        )
    return raw
