"""What the local store indexes for search: tokens, dates, strings and the patient compartment.

Search parameters follow the FHIR R4 definitions for the resource types a chart is made of; each
entry maps a parameter name to the element paths it reads. Choice elements (``effective[x]``) are
listed by their concrete names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

COMMON_TOKENS: dict[str, tuple[str, ...]] = {
    "identifier": ("identifier",),
    "status": ("status",),
}

TOKENS: dict[str, dict[str, tuple[str, ...]]] = {
    "Patient": {"gender": ("gender",)},
    "Observation": {
        "code": ("code",),
        "category": ("category",),
        "combo-code": ("code", "component.code"),
    },
    "Condition": {
        "code": ("code",),
        "category": ("category",),
        "clinical-status": ("clinicalStatus",),
        "verification-status": ("verificationStatus",),
    },
    "AllergyIntolerance": {"code": ("code",), "clinical-status": ("clinicalStatus",)},
    "Procedure": {"code": ("code",)},
    "MedicationRequest": {"code": ("medicationCodeableConcept",), "intent": ("intent",)},
    "MedicationStatement": {"code": ("medicationCodeableConcept",)},
    "Immunization": {"vaccine-code": ("vaccineCode",)},
    "DiagnosticReport": {"code": ("code",), "category": ("category",)},
    "DocumentReference": {"type": ("type",), "category": ("category",)},
    "Encounter": {"type": ("type",), "class": ("class",)},
    "ImagingStudy": {"modality": ("series.modality",)},
    "Media": {"modality": ("modality",), "type": ("type",)},
    "CarePlan": {"category": ("category",)},
    "Goal": {"lifecycle-status": ("lifecycleStatus",)},
}

DATES: dict[str, dict[str, tuple[str, ...]]] = {
    "Patient": {"birthdate": ("birthDate",)},
    "Observation": {"date": ("effectiveDateTime", "effectivePeriod", "effectiveInstant")},
    "Condition": {
        "onset-date": ("onsetDateTime", "onsetPeriod"),
        "abatement-date": ("abatementDateTime", "abatementPeriod"),
        "recorded-date": ("recordedDate",),
    },
    "AllergyIntolerance": {"date": ("recordedDate",)},
    "Procedure": {"date": ("performedDateTime", "performedPeriod")},
    "MedicationRequest": {"authoredon": ("authoredOn",)},
    "MedicationStatement": {"effective": ("effectiveDateTime", "effectivePeriod")},
    "Immunization": {"date": ("occurrenceDateTime",)},
    "DiagnosticReport": {"date": ("effectiveDateTime", "effectivePeriod"), "issued": ("issued",)},
    "DocumentReference": {"date": ("date",), "period": ("context.period",)},
    "Encounter": {"date": ("period",)},
    "ImagingStudy": {"started": ("started",)},
    "Media": {"created": ("createdDateTime", "createdPeriod")},
    "CarePlan": {"date": ("period",)},
}

STRINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "Patient": {
        "name": ("name.family", "name.given", "name.text", "name.prefix", "name.suffix"),
        "family": ("name.family",),
        "given": ("name.given",),
    },
    "Practitioner": {"name": ("name.family", "name.given", "name.text")},
    "Organization": {"name": ("name",)},
}

# Elements whose reference puts a resource into a patient's compartment.
COMPARTMENT_ELEMENTS = ("subject", "patient", "beneficiary")


def values_at(node: Any, path: str) -> Iterator[Any]:
    """Every value at a dotted path, descending through lists."""
    head, _, rest = path.partition(".")
    items = node if isinstance(node, list) else [node]
    for item in items:
        if not isinstance(item, dict) or head not in item:
            continue
        value = item[head]
        if rest:
            yield from values_at(value, rest)
        elif isinstance(value, list):
            yield from value
        else:
            yield value


def tokens_of(value: Any) -> Iterator[tuple[str | None, str]]:
    """(system, code) pairs of a code, Coding, CodeableConcept or Identifier."""
    if isinstance(value, str | bool):
        yield None, str(value).lower() if isinstance(value, bool) else value
    elif isinstance(value, dict):
        if "coding" in value:
            for coding in value.get("coding") or []:
                yield from tokens_of(coding)
        elif "code" in value:
            yield value.get("system"), str(value["code"])
        elif "value" in value:  # Identifier
            yield value.get("system"), str(value["value"])


_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def date_range(value: str) -> tuple[str, str] | None:
    """The instant range a FHIR date, dateTime or instant covers, as UTC ISO strings."""
    value = value.strip()
    m = _PARTIAL.match(value)
    if m:
        year, month, day = int(m[1]), int(m[2] or 1), int(m[3] or 1)
        start = datetime(year, month, day)
        try:
            if m[3]:
                end = start + timedelta(days=1)
            elif m[2]:
                end = datetime(year + (month == 12), month % 12 + 1, 1)
            else:
                end = datetime(year + 1, 1, 1)
        except (OverflowError, ValueError):  # the last day, month or year of 9999 (a common
            return _fmt(start), _fmt(datetime.max)  # "no end" in EHR data): nothing comes later
        return _fmt(start), _fmt(end - timedelta(microseconds=1))
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return _fmt(moment), _fmt(moment)


def _fmt(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")


def dates_of(value: Any) -> Iterator[tuple[str, str]]:
    """Ranges of a date/dateTime/instant string or a Period."""
    if isinstance(value, str):
        rng = date_range(value)
        if rng:
            yield rng
    elif isinstance(value, dict) and ("start" in value or "end" in value):
        start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
        end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
        yield (start[0] if start else "0001"), (end[1] if end else "9999")


def normalise_string(value: str) -> str:
    """Case- and accent-insensitive form used for string search (FHIR: starts-with match)."""
    import unicodedata

    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().strip()


def compartment_patient(resource: dict[str, Any]) -> str | None:
    """Id of the patient whose compartment holds this resource, if any."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    for element in COMPARTMENT_ELEMENTS:
        ref = resource.get(element)
        if isinstance(ref, dict):
            target = str(ref.get("reference") or "")
            if target.startswith("Patient/"):
                return target.split("/", 2)[1]
    return None


def index_rows(resource: dict[str, Any]) -> dict[str, list[tuple[str, ...]]]:
    """The search-index rows of one resource: tokens, dates, strings and references."""
    rtype = resource["resourceType"]
    tokens: set[tuple[str, str, str]] = set()
    for param, paths in {**COMMON_TOKENS, **TOKENS.get(rtype, {})}.items():
        for path in paths:
            for value in values_at(resource, path):
                for system, code in tokens_of(value):
                    tokens.add((param, system or "", code))
    dates: set[tuple[str, str, str]] = set()
    for param, paths in DATES.get(rtype, {}).items():
        for path in paths:
            for value in values_at(resource, path):
                for start, end in dates_of(value):
                    dates.add((param, start, end))
    strings: set[tuple[str, str]] = set()
    for param, paths in STRINGS.get(rtype, {}).items():
        for path in paths:
            for value in values_at(resource, path):
                if isinstance(value, str):
                    strings.add((param, normalise_string(value)))
    refs: set[tuple[str, str]] = set()
    for element in (*COMPARTMENT_ELEMENTS, "encounter", "basedOn", "result", "context"):
        for value in values_at(resource, element):
            if isinstance(value, dict) and isinstance(value.get("reference"), str):
                refs.add((element, value["reference"]))
    return {
        "tokens": sorted(tokens),
        "dates": sorted(dates),
        "strings": sorted(strings),
        "refs": sorted(refs),
    }
