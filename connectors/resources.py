"""FHIR resources as typed ``fhir.resources`` models (R4B, wire-compatible with R4)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from connectors import fast_validation

__all__ = [
    "NO_NAME",
    "InvalidResource",
    "Resource",
    "SearchResult",
    "display_name",
    "is_resource_type",
    "reference_of",
    "validate",
]

# The library's validation, with its per-element checks made cheaper (same models, same errors):
# 1.65–2.4x less CPU per resource on the demo patients (``connectors.fast_validation``, issue 14).
fast_validation.install()

NO_NAME = "(no name)"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def display_name(patient: Any) -> str:
    """The patient's name for people: the ``official`` (else ``usual``, else first current) name,
    its ``text`` when given, else given names and family; ``"(no name)"`` when the Patient has
    none (FHIR allows a Patient with identifiers only)."""
    names = [n for n in getattr(patient, "name", None) or [] if n is not None]
    current = [n for n in names if getattr(n, "use", None) not in ("old", "maiden")] or names
    chosen = next(
        (n for use in ("official", "usual") for n in current if getattr(n, "use", None) == use),
        current[0] if current else None,
    )
    if chosen is None:
        return NO_NAME
    text = str(chosen.text or "").strip()
    if not text:
        text = " ".join([*(str(g) for g in chosen.given or []), str(chosen.family or "")]).strip()
    # control and bidi characters (a terminal escape, a hidden link) are never part of a name
    return " ".join(_CONTROL.sub(" ", text).split()) or NO_NAME


@dataclass(frozen=True)
class InvalidResource:
    """A resource that failed validation: kept raw so nothing is lost, with the reason."""

    resource_type: str
    id: str | None
    raw: dict[str, Any]
    error: str
    origin: str

    @property
    def reference(self) -> str:
        """``Type/id`` of the resource as read (``id`` may be ``None`` when it had none)."""
        return f"{self.resource_type}/{self.id}"


@dataclass
class SearchResult:
    """All resources a search (every page) or $everything produced."""

    resources: list[Resource] = field(default_factory=list)
    invalid: list[InvalidResource] = field(default_factory=list)
    total: int | None = None
    pages: int = 0

    def add(self, checked: Resource | InvalidResource) -> None:
        """File what ``validate`` returned: a model under ``resources``, an ``InvalidResource``
        under ``invalid`` (``total`` is left to the caller)."""
        if isinstance(checked, InvalidResource):
            self.invalid.append(checked)
        else:
            self.resources.append(checked)

    @classmethod
    def combined(cls, patient: Resource, results: list[SearchResult]) -> SearchResult:
        """One result of ``patient`` followed by every search's resources, invalid resources and
        pages, in order, with ``total`` counting them all: a patient's record assembled from
        per-type searches (a server without ``$everything``, or a scope's allowed types)."""
        merged = cls(resources=[patient])
        for res in results:
            merged.resources.extend(res.resources)
            merged.invalid.extend(res.invalid)
            merged.pages += res.pages
        merged.total = len(merged.resources) + len(merged.invalid)
        return merged

    def of_type(self, resource_type: str) -> list[Resource]:
        """The resources of ``resource_type`` (e.g. "Observation"), in result order."""
        return [r for r in self.resources if r.get_resource_type() == resource_type]


# The abstract bases: fhir.resources has models for them, but no resource is of these types.
_ABSTRACT = frozenset({"Resource", "DomainResource"})


def is_resource_type(name: object) -> bool:
    """Whether ``name`` is a FHIR R4 resource type (not a datatype, not an abstract base)."""
    if not isinstance(name, str) or not name[:1].isupper() or name in _ABSTRACT:
        return False
    try:
        cls = get_fhir_model_class(name)
    except ValueError:
        return False
    return issubclass(cls, Resource)


def _short_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    more = exc.error_count() - 3
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def validate(raw: Any, origin: str) -> Resource | InvalidResource:
    """Validate one resource's JSON into its model, or keep it raw with the validation error."""
    if not isinstance(raw, dict):
        return InvalidResource("?", None, {"value": raw}, "not a JSON object", origin)
    rtype = raw.get("resourceType")
    rid = raw.get("id") if isinstance(raw.get("id"), str) else None
    if not is_resource_type(rtype):
        return InvalidResource(str(rtype), rid, raw, f"unknown resourceType {rtype!r}", origin)
    try:
        return get_fhir_model_class(rtype).model_validate(raw)  # type: ignore[return-value]
    except ValidationError as exc:
        return InvalidResource(str(rtype), rid, raw, _short_error(exc), origin)
    except (KeyError, TypeError) as exc:
        # fhir_core looks up the model of a contained resource (any Resource-typed element) by
        # its resourceType and raises KeyError ('R4.FooType') or TypeError (not a string) for an
        # unknown one instead of a ValidationError (fhir_core/types.py, fhir_model_validator).
        return InvalidResource(
            str(rtype),
            rid,
            raw,
            f"a nested resource has an unknown resourceType ({type(exc).__name__}: {exc})",
            origin,
        )


def reference_of(resource: Resource) -> str:
    """``Type/id`` of a resource."""
    return f"{resource.get_resource_type()}/{resource.id}"
