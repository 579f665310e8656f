"""The evidence model: ``Evidence`` (one citable line of the chart), ``CompactContext`` and the
``Compactors`` registry that turns a record's resources into evidence."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from common.plugins import installed_entry_points
from connectors.errors import ConfigurationError
from connectors.record import PatientRecord
from connectors.resources import Resource, reference_of
from retrieval.clinical import FhirDate, codes_of, read_status, when_of
from retrieval.evidence.guard import withhold_instructions
from retrieval.evidence.text import MAX_NOTE_CHARS, clean_text, iso_day, number
from retrieval.terms import TermTable, default_terms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evidence:
    """One fact of the chart, citable by its FHIR reference."""

    id: str  # the FHIR reference, e.g. "Observation/abc"
    text: str  # compact line, ending in "[Observation/abc]"
    date: datetime | None
    category: str  # condition, observation, medication, ...
    codes: tuple[str, ...] = ()  # "system|code"
    abnormal: bool = False  # outside its reference (or usual) range, or flagged by the lab
    active: bool = False  # an active problem, medication or allergy
    withheld: str | None = None  # why the resource's own text was kept from the model
    # "year", "month", "day" or "time": how precise ``date`` is (a partial FHIR date is the start
    # of its interval there, and printed at its own precision by ``day``)
    precision: str = "day"

    @property
    def day(self) -> str:
        """The date as the chart gives it: "2019", "2026-03" or "2026-03-04"; "" when undated."""
        if self.date is None:
            return ""
        if self.precision == "year":
            return f"{self.date.year:04d}"
        if self.precision == "month":
            return f"{self.date.year:04d}-{self.date.month:02d}"
        return self.date.date().isoformat()


@dataclass
class CompactContext:
    """What compactors may consult besides the resource: the record (to resolve references)."""

    record: PatientRecord
    terms: TermTable = field(default_factory=default_terms)

    def resolve(self, reference: str, from_resource: Resource | None = None) -> Resource | None:
        """What ``reference`` points at: ``#id`` in ``from_resource``'s contained, else a
        resource the record holds (``PatientRecord.resolve``)."""
        return self.record.resolve(reference, from_resource)


# (value, registry) -> compact text; "" when the value says nothing
DatatypeCompactor = Callable[[Any, "Compactors"], str]
# (resource, registry, context) -> its evidence item(s), or None to leave it out
ResourceCompactor = Callable[
    [Any, "Compactors", CompactContext], "Evidence | list[Evidence] | None"
]


class CompactorConflict(ConfigurationError):
    """A compactor was registered for a datatype or resource type that already has one, without
    ``replace=True``."""


class Compactors:
    """The registry: compactors by FHIR datatype and by resource type.

    A name holds one compactor. Registering a second for a name raises CompactorConflict unless
    the call says ``replace=True``; a replacement is logged with who replaced whom (the built-ins,
    a plug-in by its entry point, or the calling code).
    """

    def __init__(self) -> None:
        self.datatypes: dict[str, DatatypeCompactor] = {}
        self.resources: dict[str, ResourceCompactor] = {}
        # ("datatype" | "resource", name) -> who registered the compactor held now
        self.origins: dict[tuple[str, str], str] = {}
        self._registering = "code"  # who registers now: "built-in", "plug-in <name>" or "code"

    def _put(self, kind: str, name: str, fn: Any, replace: bool) -> None:
        table: dict[str, Any] = self.datatypes if kind == "datatype" else self.resources
        previous = self.origins.get((kind, name))
        if name in table:
            if not replace:
                raise CompactorConflict(
                    f"{self._registering} registers a {kind} compactor for {name}, which "
                    f"{previous or 'code'} already has; pass replace=True to replace it"
                )
            log.info(
                "%s replaces the %s compactor for %s registered by %s",
                self._registering,
                kind,
                name,
                previous or "code",
            )
        table[name] = fn
        self.origins[(kind, name)] = self._registering

    @contextmanager
    def registering_as(self, who: str) -> Iterator[None]:
        """Inside the block, compactors registered count as ``who``'s ("built-in", "plug-in
        <name> (<module:attr>)"), in the log and in ``origins``; outside, as "code"'s."""
        outer, self._registering = self._registering, who
        try:
            yield
        finally:
            self._registering = outer

    def add_datatype(self, name: str, fn: DatatypeCompactor, *, replace: bool = False) -> None:
        """Register ``fn`` as the compactor of the FHIR datatype ``name`` (the pydantic class name,
        e.g. "Quantity"). Raises CompactorConflict when ``name`` has one and ``replace`` is False."""
        self._put("datatype", name, fn, replace)

    def add_resource(self, name: str, fn: ResourceCompactor, *, replace: bool = False) -> None:
        """Register ``fn`` as the compactor of the FHIR resource type ``name`` (e.g.
        "Observation"). Raises CompactorConflict when ``name`` has one and ``replace`` is False."""
        self._put("resource", name, fn, replace)

    def datatype(
        self, name: str, *, replace: bool = False
    ) -> Callable[[DatatypeCompactor], DatatypeCompactor]:
        """Decorator form of ``add_datatype``: ``@reg.datatype("Quantity", replace=True)``;
        returns the function unchanged."""

        def register(fn: DatatypeCompactor) -> DatatypeCompactor:
            self.add_datatype(name, fn, replace=replace)
            return fn

        return register

    def resource(
        self, *names: str, replace: bool = False
    ) -> Callable[[ResourceCompactor], ResourceCompactor]:
        """Decorator form of ``add_resource`` for one or more resource types:
        ``@reg.resource("MedicationRequest", "MedicationStatement")``; returns the function
        unchanged."""

        def register(fn: ResourceCompactor) -> ResourceCompactor:
            for name in names:
                self.add_resource(name, fn, replace=replace)
            return fn

        return register

    def text(self, value: Any) -> str:
        """Compact text of any FHIR value: by its datatype's compactor, else its plain form."""
        if value is None:
            return ""
        if isinstance(value, list):
            return ", ".join(t for t in (self.text(v) for v in value) if t)
        kind = type(value).__name__
        fn = self.datatypes.get(kind)
        if fn is not None:
            return fn(value, self)
        if isinstance(value, datetime | date):
            return iso_day(value)
        if isinstance(value, Decimal | float):
            return number(value)
        return clean_text(str(value))

    def load_entry_points(self, group: str = "chartsight.compactors") -> None:
        """Let installed packages register compactors: each entry point is ``fn(registry)``. A
        plug-in that fails (raises, or registers over a compactor without ``replace=True``) is
        logged and leaves the registry as it was before it."""
        for ep in installed_entry_points(group):
            before = (dict(self.datatypes), dict(self.resources), dict(self.origins))
            try:
                with self.registering_as(f"plug-in {ep.name} ({ep.value})"):
                    ep.load()(self)
            except Exception as exc:  # a broken plug-in must not take the chart down
                log.warning("compactor plug-in %s failed to load: %s", ep.name, exc)
                self.datatypes, self.resources, self.origins = before

    def evidence(self, record: PatientRecord) -> list[Evidence]:
        """Every evidence item of the record, in chart order (patient, then by category)."""
        ctx = CompactContext(record)
        out: list[Evidence] = []
        for res in record.resources():
            fn = self.resources.get(res.get_resource_type())
            if fn is None or read_status(res).voided:  # entered in error: never a fact
                continue
            try:
                made = fn(res, self, ctx)
            except Exception as exc:  # one odd resource must not hide the rest of the chart
                log.warning("could not compact %s: %s", reference_of(res), exc)
                made = fallback(res, self, ctx)
            if made is None:
                continue
            out.extend(
                withhold_instructions(e) for e in (made if isinstance(made, list) else [made])
            )
        return out


def evidence_line(
    res: Any,
    body: str,
    category: str,
    codes: tuple[str, ...] = (),
    *,
    abnormal: bool = False,
    active: bool = False,
    dated: bool = True,
) -> Evidence:
    """The ``Evidence`` of a resource: "<date> <body> [<reference>]", the date at its own precision
    (``clinical.when_of``; left out when ``dated`` is False or the resource has none), the body
    cleaned and bounded to 4 × ``MAX_NOTE_CHARS`` characters."""
    ref = reference_of(res)
    when: FhirDate | None = when_of(res) if dated else None
    prefix = f"{when.text} " if when is not None else ""
    return Evidence(
        ref,
        f"{prefix}{clean_text(body, 4 * MAX_NOTE_CHARS)} [{ref}]",
        when.start if when is not None else None,
        category,
        codes,
        abnormal,
        active,
        precision=when.precision if when is not None else "day",
    )


def fallback(res: Any, reg: Compactors, ctx: CompactContext) -> Evidence:
    """The line of a resource whose compactor failed: "<Type>: <code or type text>, <status>",
    in the category of its type name, lower-cased."""
    concept = getattr(res, "code", None) or getattr(res, "type", None)
    text = reg.text(concept) if concept is not None and not isinstance(concept, str) else ""
    status = getattr(res, "status", None)
    body = f"{res.get_resource_type()}: {text or 'no code'}" + (f", {status}" if status else "")
    return evidence_line(res, body, res.get_resource_type().lower(), codes_of(concept))


def iter_lines(items: Iterable[Evidence]) -> Iterator[str]:
    """The compact lines, one per item."""
    for item in items:
        yield item.text
