"""Cases for similar-case retrieval: a patient (or one imaging study) as a summary and images."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Literal

from PIL import Image

from connectors.images import ImageSet, PatientImage
from connectors.record import PatientRecord
from retrieval.clinical import is_voided, observation_series, patient_age
from retrieval.evidence import Compactors, Evidence, clean_text, default_compactors
from retrieval.settings import IndexSettings

# Longest summary text; the text encoders read ~256 tokens at most anyway.
MAX_SUMMARY_CHARS = 1500

# How similar cases are shown: "full" (keys, ids, summaries) to callers who may read any patient
# (user/system scopes), "generalised" (``generalised_summary``) to callers bound to one patient.
CasePrivacy = Literal["full", "generalised"]


@dataclass
class Case:
    """One retrievable case, with the metadata that search filters use."""

    key: str  # "Patient/<id>" or "ImagingStudy/<id>" (or any stable id for external cases)
    patient_id: str
    summary: str
    images: list[Image.Image] = field(default_factory=list)
    sex: str | None = None
    age_band: str | None = None  # "40-49"
    modalities: tuple[str, ...] = ()
    label: str | None = None  # a known finding or diagnosis, where the source gives one
    kind: str = "patient"
    # the patient's identifiers ("system|value"): the same person read from another source (with
    # another id) is still recognised as the patient's own case
    identifiers: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """Changes whenever what the case is embedded from changes."""
        digest = hashlib.sha256()
        for part in (self.summary, self.sex or "", self.age_band or "", ",".join(self.modalities)):
            digest.update(part.encode())
            digest.update(b"\0")
        for image in self.images:
            digest.update(f"{image.mode}{image.size}".encode())
            digest.update(hashlib.sha256(image.tobytes()).digest())
        return digest.hexdigest()


def patient_identifiers(record: PatientRecord) -> tuple[str, ...]:
    """The patient's identifiers as "system|value" (those with both parts)."""
    out = []
    for ident in record.patient.identifier or []:
        if ident.system and ident.value:
            out.append(f"{ident.system}|{ident.value}")
    return tuple(dict.fromkeys(out))


def age_band(years: int | None, width: int = 10) -> str | None:
    """The decade band of an age: 47 → '40-49'."""
    if years is None or years < 0:
        return None
    low = years // width * width
    return f"{low}-{low + width - 1}"


def age_of(record: PatientRecord, on: date | None = None) -> int | None:
    """Age in whole years on a date (today by default), or at death; from a partial birth date the
    middle of its range (see ``retrieval.clinical.patient_age``, which also says so)."""
    reading = patient_age(record.patient, on)
    return reading.years if reading is not None else None


_CODE = re.compile(r" \((?:LOINC|SNOMED|RxNorm|CVX|ICD-10(?:-CM)?|DCM) [^)]*\)")


def line_label(item: Evidence) -> str:
    """The evidence line without its date, reference, kind prefix and code brackets: for
    summaries and tables ("Chronic congestive heart failure (disorder), active")."""
    text = _CODE.sub("", item.text.rsplit(" [", 1)[0])
    if item.date is not None:
        text = text.removeprefix(item.day + " ")
    for prefix in ("Condition: ", "Medication: ", "Allergy: ", "Report: "):
        text = text.removeprefix(prefix)
    return text


@dataclass
class ChartSections:
    """The parts of a chart a summary shows, each a list of evidence lines (entered-in-error
    resources are never among them): active problems, latest result per test (only results with a
    value), active medications, allergies (a refuted one says so), encounters and imaging, newest
    first, and how many entered-in-error resources were left out."""

    problems: list[Evidence]
    latest_results: list[Evidence]
    medications: list[Evidence]
    allergies: list[Evidence]
    encounters: list[Evidence]
    imaging: list[Evidence]
    reports: list[Evidence]
    voided: int = 0


def _newest_first(items: list[Evidence]) -> list[Evidence]:
    return sorted(items, key=lambda e: e.date or datetime.min.replace(tzinfo=UTC), reverse=True)


def chart_sections(record: PatientRecord, evidence: list[Evidence]) -> ChartSections:
    """The chart's summary sections from its evidence lines (see ``ChartSections``)."""
    by_category: dict[str, list[Evidence]] = {}
    for item in evidence:
        by_category.setdefault(item.category, []).append(item)
    latest: dict[tuple[str, ...], Evidence] = {}
    valued = {ref for ref, _, pts in observation_series(record) if any(p.has_value for p in pts)}
    for item in sorted(
        by_category.get("observation", []),
        key=lambda e: e.date or datetime.min.replace(tzinfo=UTC),
    ):
        if item.id in valued:  # cancelled or without a value: not a result
            latest[item.codes[:1] or (item.text,)] = item  # latest result per code
    return ChartSections(
        problems=_newest_first([e for e in by_category.get("condition", []) if e.active]),
        latest_results=_newest_first(list(latest.values())),
        medications=_newest_first([e for e in by_category.get("medication", []) if e.active]),
        allergies=_newest_first(by_category.get("allergy", [])),
        encounters=_newest_first(by_category.get("encounter", [])),
        imaging=_newest_first(by_category.get("imaging", []) + by_category.get("image", [])),
        reports=_newest_first(
            [e for e in by_category.get("report", []) if "conclusion:" in e.text]
        ),
        voided=sum(1 for r in record.resources() if is_voided(r)),
    )


def summarise(record: PatientRecord, evidence: list[Evidence], on: date | None = None) -> str:
    """A case summary: demographics band, active problems, key abnormal results, report
    impressions, active medications and allergies, imaging."""
    sex = record.patient.gender or "unknown sex"
    band = age_band(age_of(record, on))
    parts = [f"{sex.capitalize()}, age {band}." if band else f"{sex.capitalize()}."]
    sections = chart_sections(record, evidence)

    def names(items: list[Evidence]) -> list[str]:
        return list(dict.fromkeys(line_label(e).split(", ")[0] for e in reversed(items)))

    if sections.problems:
        parts.append("Active problems: " + "; ".join(names(sections.problems)) + ".")
    abnormal = [e for e in reversed(sections.latest_results) if e.abnormal]
    if abnormal:
        parts.append(
            "Abnormal results: "
            + "; ".join(f"{line_label(e)} ({e.day})" for e in abnormal[-8:])
            + "."
        )
    if sections.reports:
        parts.append(
            "Report impressions: "
            + "; ".join(
                line_label(e).split("conclusion: ", 1)[1] for e in reversed(sections.reports[:3])
            )
            + "."
        )
    if sections.medications:
        parts.append("Active medications: " + "; ".join(names(sections.medications)[:10]) + ".")
    allergies = [e for e in sections.allergies if e.active]
    if allergies:
        parts.append("Allergies: " + "; ".join(names(allergies)) + ".")
    if sections.imaging:
        parts.append("Imaging: " + "; ".join(names(sections.imaging)[-3:]) + ".")
    return clean_text(" ".join(parts), MAX_SUMMARY_CHARS)


# --- similar cases shown to a caller who may read only one patient --------------------------------

_SECTIONS = (
    "Active problems",
    "Abnormal results",
    "Report impressions",
    "Active medications",
    "Allergies",
    "Imaging",
)
_KEPT_SECTIONS = ("Active problems", "Abnormal results", "Active medications", "Allergies")
_DEMOGRAPHICS = re.compile(r"\b(Male|Female|Other|Unknown|Unknown sex)(?:, age (\d+)-(\d+))?\.")
_DATES = re.compile(
    r"\s*\(\d{4}(?:-\d{2}(?:-\d{2})?)?\)"  # "(2020-04-01)" after a result
    r"|\b\d{4}-\d{2}(?:-\d{2})?(?:T[0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?)?\b"  # any other date
)


def generalised_summary(summary: str) -> str:
    """A case summary (``summarise``'s, or a study case's) reduced to what may be shown to a caller
    whose access is one patient's record: sex, age band (90 and over as "90+", after HIPAA Safe
    Harbor, 45 CFR 164.514(b)(2)(i)(C)), and the coded sections (active problems, abnormal results,
    active medications, allergies) with every date removed. Free text (report impressions, study
    descriptions, imaging lines) and anything not recognised as one of those sections is left out.
    """
    parts = []
    demo = _DEMOGRAPHICS.search(summary)
    if demo is not None:
        summary = summary[demo.end() :]  # a study case's free-text description comes before it
        sex, low = demo.group(1), demo.group(2)
        if low is None:
            parts.append(f"{sex}.")
        elif int(low) >= 90:
            parts.append(f"{sex}, age 90+.")
        else:
            parts.append(f"{sex}, age {low}-{demo.group(3)}.")
    following = "|".join(re.escape(s) for s in _SECTIONS)
    for section in _KEPT_SECTIONS:
        found = re.search(
            rf"(?:^|\.?\s)({re.escape(section)}: .*?)(?:\.(?=\s(?:{following}):)|\.?$)",
            summary,
        )
        if found is not None:
            text = _DATES.sub("", found.group(1)).strip()
            parts.append(text.removesuffix("…").rstrip(" ;,") + ".")
    return " ".join(parts) or "A similar case."


def indexed_cases(
    record: PatientRecord, images: ImageSet | None, settings: IndexSettings
) -> list[Case]:
    """The cases the index holds for ``record`` (and the query a similar-case search makes for it,
    so both are fused alike): ``settings.case_kind``, at most ``settings.max_images_per_case``
    images (none at 0, whatever ``images`` holds)."""
    return cases_from_record(
        record,
        images if settings.max_images_per_case > 0 else None,
        kind=settings.case_kind,
        max_images=settings.max_images_per_case,
    )


def cases_from_record(
    record: PatientRecord,
    images: ImageSet | None = None,
    *,
    kind: str = "patient",
    max_images: int = 4,
    compactors: Compactors | None = None,
    on: date | None = None,
) -> list[Case]:
    """The patient's case (and, with ``kind='study'``, one case per imaging study too)."""
    evidence = (compactors or default_compactors()).evidence(record)
    summary = summarise(record, evidence, on)
    pid = record.patient_id
    sex = record.patient.gender
    band = age_band(age_of(record, on))
    pics = list(images.images) if images is not None else []
    modalities = tuple(sorted({p.modality for p in pics if p.modality}))
    identifiers = patient_identifiers(record)
    cases = [
        Case(
            key=f"Patient/{pid}",
            patient_id=pid,
            summary=summary,
            images=[p.to_pil() for p in pics[:max_images]],
            sex=sex,
            age_band=band,
            modalities=modalities,
            identifiers=identifiers,
        )
    ]
    if kind == "study":
        by_study: dict[str, list[PatientImage]] = {}
        for pic in pics:
            by_study.setdefault(
                pic.provenance.study_uid or pic.provenance.fhir_reference, []
            ).append(pic)
        for study, group in by_study.items():
            first = group[0]
            ref = first.provenance.fhir_reference
            study_mods = tuple(sorted({g.modality for g in group if g.modality}))
            note = first.description or ""
            cases.append(
                Case(
                    key=f"{ref}#{study}" if study != ref else ref,
                    patient_id=pid,
                    summary=clean_text(
                        f"{'/'.join(study_mods) or 'Image'} study. {note} {summary}",
                        MAX_SUMMARY_CHARS,
                    ),
                    images=[g.to_pil() for g in group[:max_images]],
                    sex=sex,
                    age_band=band,
                    modalities=study_mods,
                    kind="study",
                    identifiers=identifiers,
                )
            )
    return cases
