"""Readable (terminal) and JSON renderings of an assembled record."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from agent import ImageSet, PatientRecord, age_of, human_name, reference_of


def concept_text(concept: Any) -> str:
    """Display text of a CodeableConcept (text, else the first coding's display or code)."""
    if concept is None:
        return ""
    if getattr(concept, "text", None):
        return str(concept.text)
    for coding in getattr(concept, "coding", None) or []:
        if coding.display or coding.code:
            return str(coding.display or coding.code)
    return ""


def _num(value: Any) -> str:
    return f"{float(value):.4g}" if value is not None else ""


def observation_value(obs: Any) -> str:
    """An Observation's value as text: quantity with unit, coded value, or its components."""
    if obs.valueQuantity is not None:
        return f"{_num(obs.valueQuantity.value)} {obs.valueQuantity.unit or obs.valueQuantity.code or ''}".strip()
    if obs.valueCodeableConcept is not None:
        return concept_text(obs.valueCodeableConcept)
    for attr in ("valueString", "valueBoolean", "valueInteger", "valueDateTime"):
        if getattr(obs, attr, None) is not None:
            return str(getattr(obs, attr))
    parts = []
    for comp in obs.component or []:
        if comp.valueQuantity is not None:
            parts.append(
                f"{concept_text(comp.code)} {_num(comp.valueQuantity.value)} {comp.valueQuantity.unit or ''}".strip()
            )
    return "; ".join(parts)


def when(resource: Any) -> str:
    """The clinically relevant date of a resource, as ISO text ('' if none)."""
    for attr in (
        "effectiveDateTime",
        "onsetDateTime",
        "performedDateTime",
        "authoredOn",
        "recordedDate",
        "occurrenceDateTime",
        "started",
        "date",
        "createdDateTime",
        "issued",
    ):
        value = getattr(resource, attr, None)
        if value:
            return value.isoformat() if isinstance(value, date | datetime) else str(value)
    for attr in ("effectivePeriod", "performedPeriod", "period"):
        period = getattr(resource, attr, None)
        if period is not None and period.start:
            return (
                period.start.isoformat()
                if isinstance(period.start, date | datetime)
                else str(period.start)
            )
    return ""


def _is_active(resource: Any) -> bool:
    status = getattr(resource, "clinicalStatus", None)
    if status is not None:
        return concept_text(status).lower() == "active" or any(
            c.code == "active" for c in status.coding or []
        )
    return getattr(resource, "status", None) in ("active", "on-hold")


def render_record(console: Console, record: PatientRecord, images: ImageSet | None) -> None:
    """A one-screen summary of the record in the terminal."""
    p = record.patient
    years = age_of(record)
    deceased = f", died {p.deceasedDateTime.date()}" if p.deceasedDateTime else ""
    console.rule(
        f"[bold]{human_name(p)}[/]  {p.gender or ''}, born {p.birthDate}"
        f"{f' ({years} y)' if years is not None else ''}{deceased}"
    )
    console.print(f"Patient/{p.id} from {record.source}", style="dim")
    counts = record.counts()
    console.print(", ".join(f"{t} {n}" for t, n in sorted(counts.items())), style="dim")

    def section(title: str, rows: list[tuple[str, ...]], cols: tuple[str, ...]) -> None:
        if not rows:
            console.print(f"[bold]{title}:[/] none")
            return
        table = Table(title=title, title_justify="left", title_style="bold", show_edge=False)
        for col in cols:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        console.print(table)

    active = [c for c in record.conditions if _is_active(c)]
    section(
        "Active problems",
        [(when(c)[:10], concept_text(c.code), reference_of(c)) for c in sorted(active, key=when)],
        ("since", "condition", "reference"),
    )
    latest: dict[str, Any] = {}
    for obs in sorted(record.observations, key=when):
        latest[concept_text(obs.code)] = obs
    recent = sorted(latest.values(), key=when, reverse=True)[:12]
    section(
        "Latest observations",
        [
            (when(o)[:10], concept_text(o.code), observation_value(o), reference_of(o))
            for o in recent
        ],
        ("date", "observation", "value", "reference"),
    )
    meds = [m for m in record.medications if _is_active(m)]
    section(
        "Active medications",
        [
            (
                when(m)[:10],
                concept_text(getattr(m, "medicationCodeableConcept", None)),
                reference_of(m),
            )
            for m in meds
        ],
        ("since", "medication", "reference"),
    )
    section(
        "Allergies",
        [
            (concept_text(a.code), ", ".join(str(c) for c in a.category or []), reference_of(a))
            for a in record.allergies
        ],
        ("substance", "category", "reference"),
    )
    enc = sorted(record.encounters, key=when, reverse=True)[:3]
    section(
        "Recent encounters",
        [(when(e)[:10], concept_text(e.type[0] if e.type else None), reference_of(e)) for e in enc],
        ("date", "type", "reference"),
    )
    section(
        "Imaging studies",
        [
            (
                when(s)[:10],
                ", ".join(
                    concept_text(se.modality) or (se.modality.code or "") for se in s.series or []
                ),
                f"{s.numberOfInstances or 0} instances",
                reference_of(s),
            )
            for s in record.imaging_studies
        ],
        ("date", "modality", "size", "reference"),
    )
    if images is not None:
        section(
            "Images",
            [
                (
                    f"{img.size[0]}×{img.size[1]}",
                    img.modality or "",
                    img.content_type or "",
                    _provenance_text(img.provenance),
                )
                for img in images.images
            ],
            ("size", "modality", "type", "provenance"),
        )
        for failure in images.failures:
            console.print(f"[yellow]image not available:[/] {failure.error}")
    for problem in record.problems:
        console.print(f"[yellow]not fetched[/] {problem.what}: {problem.error}")
    for bad in record.invalid:
        console.print(f"[yellow]invalid resource kept raw[/] {bad.reference}: {bad.error}")


def _provenance_text(prov: Any) -> str:
    text = prov.fhir_reference
    if prov.sop_instance_uid:
        text += f" SOP {prov.sop_instance_uid}"
    elif prov.attachment_url:
        text += f" ({prov.attachment_url})"
    return text


def record_as_json(record: PatientRecord, images: ImageSet | None) -> dict[str, Any]:
    """The record as JSON: resources by category, what was left out, image provenance."""
    out: dict[str, Any] = {
        "patient": record.patient.model_dump(mode="json", exclude_none=True),
        "source": record.source,
        "fetched_at": record.fetched_at.isoformat(),
        "counts": record.counts(),
        "resources": [reference_of(r) for r in record.resources()],
        "problems": [{"what": p.what, "error": p.error} for p in record.problems],
        "invalid": [{"reference": i.reference, "error": i.error} for i in record.invalid],
    }
    if images is not None:
        out["images"] = [
            {
                "size": img.size,
                "modality": img.modality,
                "content_type": img.content_type,
                "provenance": vars(img.provenance),
            }
            for img in images.images
        ]
        out["image_failures"] = [
            {"reference": f.provenance.fhir_reference, "error": f.error} for f in images.failures
        ]
    return out


def render_answer(console: Console, answer: Any) -> None:
    """An answer with its citations, warnings and provenance, in the terminal."""
    style = "yellow" if answer.abstained else "bold"
    console.print(f"[{style}]{answer.text}[/]", highlight=False)
    if answer.citations:
        table = Table(title="Citations", title_justify="left", show_edge=False)
        table.add_column("reference")
        table.add_column("evidence", overflow="fold")
        for c in answer.citations:
            table.add_row(c.reference, c.text)
        console.print(table)
    for warning in answer.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    stages = ", ".join(f"{k} {v:.0f}" for k, v in answer.latency_ms.items())
    console.print(
        f"model {answer.model} · prompt {answer.prompt_version} · supported "
        f"{answer.supported_fraction:.0%} · thread {answer.thread_id} · ms: {stages}",
        style="dim",
        highlight=False,
    )
