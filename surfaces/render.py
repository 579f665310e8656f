"""Readable (terminal) and JSON renderings of an assembled record."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent import (
    ChartSections,
    Evidence,
    ImageSet,
    PatientRecord,
    display_name,
    fhir_date,
    line_label,
    patient_age,
    reference_of,
)


def _row(item: Evidence) -> tuple[str, str, str]:
    return item.day, line_label(item), item.id


def render_record(
    console: Console, record: PatientRecord, images: ImageSet | None, sections: ChartSections
) -> None:
    """A one-screen summary of the record in the terminal, from the same evidence lines the
    answers cite (entered-in-error resources left out, partial dates as given)."""
    p = record.patient
    age = patient_age(p)
    born = fhir_date(p.birthDate)
    died = fhir_date(p.deceasedDateTime)
    head = Text()
    head.append(display_name(p), style="bold")
    head.append(f"  {p.gender or ''}" + (f", born {born.text}" if born else ", birth date unknown"))
    if age is not None:
        head.append(f" ({age.short}{' at death' if age.at_death else ''})")
    if died is not None:
        head.append(f", died {died.text}")
    console.rule(head)
    console.print(Text(f"Patient/{p.id} from {record.source}", style="dim"))
    counts = record.counts()
    console.print(Text(", ".join(f"{t} {n}" for t, n in sorted(counts.items())), style="dim"))
    if sections.voided:
        console.print(
            Text(
                f"{sections.voided} entered-in-error resource{'s' if sections.voided > 1 else ''} "
                "left out",
                style="dim",
            )
        )

    def section(title: str, items: list[Evidence], cols: tuple[str, str, str]) -> None:
        if not items:
            # "none recorded", not "none": an empty section is not "no known allergies"
            console.print(Text.assemble((f"{title}:", "bold"), " none recorded"))
            return
        table = Table(title=title, title_justify="left", title_style="bold", show_edge=False)
        for col in cols:
            table.add_column(col, overflow="fold", ratio=2 if col == cols[1] else 1)
        for item in items:
            table.add_row(*(Text(cell) for cell in _row(item)))
        console.print(table)

    section("Active problems", sections.problems, ("date", "condition", "reference"))
    section("Latest observations", sections.latest_results[:12], ("date", "result", "reference"))
    section("Active medications", sections.medications, ("since", "medication", "reference"))
    section("Allergies", sections.allergies, ("recorded", "allergy", "reference"))
    section("Recent encounters", sections.encounters[:3], ("date", "encounter", "reference"))
    section("Imaging studies", sections.imaging, ("date", "imaging", "reference"))
    if images is not None:
        table = Table(title="Images", title_justify="left", title_style="bold", show_edge=False)
        for col in ("size", "modality", "type", "provenance"):
            table.add_column(col)
        for img in images.images:
            table.add_row(
                f"{img.size[0]}×{img.size[1]}",
                Text(img.modality or ""),
                Text(img.content_type or ""),
                Text(_provenance_text(img.provenance)),
            )
        if images.images:
            console.print(table)
        for failure in images.failures:
            console.print(Text.assemble(("image not available: ", "yellow"), str(failure.error)))
    for problem in record.problems:
        console.print(Text.assemble(("not fetched ", "yellow"), f"{problem.what}: {problem.error}"))
    for bad in record.invalid:
        console.print(
            Text.assemble(("invalid resource kept raw ", "yellow"), f"{bad.reference}: {bad.error}")
        )


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
    """An answer with its citations, warnings and provenance, in the terminal. Answer and record
    text are printed as text, never read as markup."""
    style = "yellow" if answer.abstained else "bold"
    console.print(Text(answer.text, style=style))
    if answer.citations:
        table = Table(title="Citations", title_justify="left", show_edge=False)
        table.add_column("reference")
        table.add_column("evidence", overflow="fold")
        for c in answer.citations:
            table.add_row(Text(c.reference), Text(c.text))
        console.print(table)
    if getattr(answer, "nearest", None):
        table = Table(
            title="Nearest in the record (not cited: they do not answer it)",
            title_justify="left",
            show_edge=False,
        )
        table.add_column("reference")
        table.add_column("line", overflow="fold")
        for c in answer.nearest:
            table.add_row(Text(c.reference), Text(c.text), style="dim")
        console.print(table)
    for warning in answer.warnings:
        console.print(Text.assemble(("warning: ", "yellow"), str(warning)))
    stages = ", ".join(f"{k} {v:.0f}" for k, v in answer.latency_ms.items())
    console.print(
        Text(
            f"model {answer.model} · prompt {answer.prompt_version} · "
            + ("abstained" if answer.abstained else f"supported {answer.supported_fraction:.0%}")
            + (f" · thread {answer.thread_id}" if answer.thread_id else "")
            + f" · ms: {stages}",
            style="dim",
        )
    )
