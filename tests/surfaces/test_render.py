"""surfaces.render on its own: answers and records built here, rendered to a recording console."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import numpy as np
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from rich.console import Console

from agent.answer import Answer, Citation, FactUsed
from connectors.images import ImageFailure, ImageProvenance, ImageSet, PatientImage
from connectors.record import FetchProblem, PatientRecord
from connectors.resources import InvalidResource
from retrieval.cases import ChartSections
from retrieval.evidence import Evidence
from surfaces.render import record_as_json, render_answer, render_record

# Rich markup, an unbalanced closing tag (a MarkupError if it were parsed) and a link: all of it
# is record or model text, to be printed as it stands.
HOSTILE = "[bold]loud[/bold] [/] [red]alarm[/red] [link=https://evil.example]x[/link]"
RED = "\x1b[31m"
YELLOW = "\x1b[33m"
BOLD = "\x1b[1m"


def _console() -> Console:
    return Console(record=True, width=200, force_terminal=True, color_system="standard")


def _plain(console: Console) -> str:
    """The printed text, table rules dropped and runs of whitespace made one space."""
    return " ".join(re.sub("[│┃]", " ", console.export_text(clear=False)).split())


def _answer(**kw: object) -> Answer:
    fields: dict[str, object] = {
        "question": "What was his last HbA1c?",
        "patient_id": "p1",
        "text": "The latest HbA1c was 6.3 % on 2024-03-04 [Observation/a1c-2].",
        "citations": [
            Citation(
                reference="Observation/a1c-2",
                text="2024-03-04 Hemoglobin A1c 6.3 % [Observation/a1c-2]",
            )
        ],
        "model": "evidence",
        "prompt_version": "v7",
        "supported_fraction": 0.75,
        "latency_ms": {"plan": 12.4, "generate": 339.6},
        "thread_id": "visit-1",
    }
    fields.update(kw)
    return Answer(**fields)  # type: ignore[arg-type]


# --- render_answer --------------------------------------------------------------------------------


def test_an_answer_prints_its_text_citations_and_provenance():
    console = _console()
    render_answer(console, _answer())
    out = _plain(console)
    assert out.startswith("The latest HbA1c was 6.3 % on 2024-03-04 [Observation/a1c-2].")
    assert "Citations" in out
    assert "Observation/a1c-2 2024-03-04 Hemoglobin A1c 6.3 % [Observation/a1c-2]" in out
    assert (
        "model evidence · prompt v7 · supported 75% · thread visit-1 · ms: plan 12, generate 340"
        in out
    )
    assert "warning:" not in out


def test_every_citation_is_a_row_and_no_citations_is_no_table():
    cited = [Citation(reference=f"Condition/c{i}", text=f"Condition {i} line") for i in range(3)]
    console = _console()
    render_answer(console, _answer(citations=cited))
    out = _plain(console)
    for i in range(3):
        assert f"Condition/c{i} Condition {i} line" in out
    bare = _console()
    render_answer(bare, _answer(citations=[]))
    assert "Citations" not in _plain(bare) and "Observation/a1c-2 2024" not in _plain(bare)


def test_each_warning_is_its_own_line():
    console = _console()
    render_answer(
        console,
        _answer(warnings=["the model server was not reachable", "the images step failed"]),
    )
    lines = console.export_text(clear=False).splitlines()
    assert "warning: the model server was not reachable" in lines
    assert "warning: the images step failed" in lines


def test_an_abstention_is_yellow_and_an_answer_bold():
    abstained = _console()
    render_answer(
        abstained,
        _answer(text="The record holds no HbA1c.", citations=[], abstained=True),
    )
    first = abstained.export_text(clear=False, styles=True).splitlines()[0]
    assert YELLOW in first and BOLD not in first and "The record holds no HbA1c." in first
    answered = _console()
    render_answer(answered, _answer())
    first = answered.export_text(clear=False, styles=True).splitlines()[0]
    assert BOLD in first and YELLOW not in first


def test_facts_are_not_printed_apart_from_the_answer_text():
    """The terminal shows the answer and what it cites; the tools' facts reach the reader
    through the answer's own sentences (and in full with ``--json``)."""
    fact = FactUsed(
        tool="latest_observation",
        statement="Latest hemoglobin A1c: 6.3 %",
        value=6.3,
        unit="%",
        date="2024-03-04",
        evidence=("a",),
    )
    console = _console()
    render_answer(console, _answer(text="No answer text here.", citations=[], facts=[fact]))
    assert "Latest hemoglobin A1c" not in _plain(console)


def test_answer_citation_and_warning_text_is_never_markup():
    console = _console()
    render_answer(
        console,
        _answer(
            text=f"Glucose {HOSTILE} [Observation/g1]",
            citations=[Citation(reference="Observation/g1", text=f"note {HOSTILE}")],
            warnings=[f"odd {HOSTILE}"],
            thread_id="[bold]t[/]",
        ),
    )
    out = _plain(console)
    assert f"Glucose {HOSTILE} [Observation/g1]" in out
    assert f"Observation/g1 note {HOSTILE}" in out
    assert f"warning: odd {HOSTILE}" in out
    assert "thread [bold]t[/]" in out
    assert RED not in console.export_text(clear=False, styles=True)
    assert (
        "evil.example"
        not in console.export_html(clear=False, inline_styles=True).split("<body>")[0]
    )


# --- render_record ---------------------------------------------------------------------------------


def _line(ref: str, day: str, text: str, category: str) -> Evidence:
    when = datetime.fromisoformat(day).replace(tzinfo=UTC)
    return Evidence(ref, f"{day} {text} [{ref}]", when, category)


def _record(name: str = "Tommy Friesen") -> PatientRecord:
    patient = Patient.model_validate(
        {
            "resourceType": "Patient",
            "id": "p1",
            "name": [{"text": name}],
            "gender": "male",
            "birthDate": "1940-05-01",
            "deceasedDateTime": "2020-05-02",
        }
    )
    glucose = Observation.model_validate(
        {
            "resourceType": "Observation",
            "id": "g1",
            "status": "final",
            "code": {"text": "Glucose"},
            "subject": {"reference": "Patient/p1"},
        }
    )
    return PatientRecord(
        patient=patient,
        source="http://fhir.example/R4",
        fetched_at=datetime(2026, 11, 29, 12, 0, tzinfo=UTC),
        observations=[glucose],
        problems=[FetchProblem("DiagnosticReport", "HTTP 500 from the server")],
        invalid=[
            InvalidResource("Observation", "bad", {"id": "bad"}, "valueQuantity: not a number", "x")
        ],
    )


def _sections(**kw: object) -> ChartSections:
    fields: dict[str, object] = {
        "problems": [],
        "latest_results": [],
        "medications": [],
        "allergies": [],
        "encounters": [],
        "imaging": [],
        "reports": [],
    }
    fields.update(kw)
    return ChartSections(**fields)  # type: ignore[arg-type]


def _images() -> ImageSet:
    ct = ImageProvenance(
        "ImagingStudy/s1",
        "dicomweb",
        study_uid="1.2",
        series_uid="1.2.3",
        sop_instance_uid="1.2.3.4",
    )
    photo = ImageProvenance("Media/m1", "fhir", attachment_url="Binary/b1")
    return ImageSet(
        images=[
            PatientImage(np.zeros((32, 64), np.uint8), "CT", "application/dicom", ct),
            PatientImage(np.zeros((10, 20, 3), np.uint8), None, "image/png", photo),
        ],
        failures=[ImageFailure(ImageProvenance("Media/m2", "fhir"), "HTTP 404 for Binary/b2")],
    )


def test_the_record_header_names_the_patient_the_source_and_the_counts():
    console = _console()
    render_record(console, _record(), None, _sections(voided=2))
    out = _plain(console)
    assert "Tommy Friesen male, born 1940-05-01 (80 y at death), died 2020-05-02" in out
    assert "Patient/p1 from http://fhir.example/R4" in out
    assert "Observation 1, Patient 1" in out
    assert "2 entered-in-error resources left out" in out
    one = _console()
    render_record(one, _record(), None, _sections(voided=1))
    assert "1 entered-in-error resource left out" in _plain(one)
    none = _console()
    render_record(none, _record(), None, _sections())
    assert "entered-in-error" not in _plain(none)


def test_sections_list_their_lines_and_an_empty_one_says_none_recorded():
    problem = _line(
        "Condition/c1",
        "2019-03-17",
        "Condition: Hypertension (SNOMED 38341003), active",
        "condition",
    )
    console = _console()
    render_record(console, _record(), None, _sections(problems=[problem]))
    out = _plain(console)
    assert "Active problems" in out
    assert "2019-03-17 Hypertension, active Condition/c1" in out
    assert "SNOMED" not in out and "Condition: " not in out
    for empty in ("Latest observations", "Active medications", "Allergies", "Recent encounters"):
        assert f"{empty}: none recorded" in out
    assert "Active problems: none recorded" not in out


def test_latest_results_show_twelve_and_encounters_three():
    results = [
        _line(f"Observation/o{i:02d}", f"2020-01-{i + 1:02d}", f"Test {i:02d} 1 mg", "observation")
        for i in range(14)
    ]
    visits = [
        _line(f"Encounter/e{i}", f"2021-02-0{i + 1}", f"Visit {i}", "encounter") for i in range(5)
    ]
    console = _console()
    render_record(console, _record(), None, _sections(latest_results=results, encounters=visits))
    out = _plain(console)
    assert "Observation/o11" in out and "Observation/o12" not in out
    assert "Encounter/e2" in out and "Encounter/e3" not in out


def test_images_failures_problems_and_invalid_resources_are_shown():
    console = _console()
    render_record(console, _record(), _images(), _sections())
    out = _plain(console)
    assert "64×32 CT application/dicom ImagingStudy/s1 SOP 1.2.3.4" in out
    assert "20×10 image/png Media/m1 (Binary/b1)" in out
    assert "image not available: HTTP 404 for Binary/b2" in out
    assert "not fetched DiagnosticReport: HTTP 500 from the server" in out
    assert "invalid resource kept raw Observation/bad: valueQuantity: not a number" in out
    without = _console()
    render_record(without, _record(), None, _sections())
    assert "Images" not in _plain(without) and "SOP" not in _plain(without)


def test_record_text_is_never_markup():
    problem = _line("Condition/c1", "2019-03-17", f"Condition: {HOSTILE}", "condition")
    console = _console()
    render_record(console, _record(name=HOSTILE), None, _sections(problems=[problem]))
    out = _plain(console)
    assert f"{HOSTILE} male" in out
    assert f"2019-03-17 {HOSTILE} Condition/c1" in out
    assert RED not in console.export_text(clear=False, styles=True)


# --- record_as_json --------------------------------------------------------------------------------


def test_record_as_json_lists_resources_gaps_and_image_provenance():
    data = json.loads(json.dumps(record_as_json(_record(), _images())))
    assert data["patient"]["id"] == "p1" and data["patient"]["birthDate"] == "1940-05-01"
    assert data["source"] == "http://fhir.example/R4"
    assert data["fetched_at"] == "2026-11-29T12:00:00+00:00"
    assert data["counts"] == {"Patient": 1, "Observation": 1}
    assert data["resources"] == ["Patient/p1", "Observation/g1"]
    assert data["problems"] == [{"what": "DiagnosticReport", "error": "HTTP 500 from the server"}]
    assert data["invalid"] == [
        {"reference": "Observation/bad", "error": "valueQuantity: not a number"}
    ]
    ct = data["images"][0]
    assert ct["size"] == [64, 32] and ct["modality"] == "CT"
    assert ct["provenance"]["sop_instance_uid"] == "1.2.3.4"
    assert ct["provenance"]["fhir_reference"] == "ImagingStudy/s1"
    assert data["image_failures"] == [{"reference": "Media/m2", "error": "HTTP 404 for Binary/b2"}]


def test_record_as_json_without_images_has_no_image_keys():
    data = record_as_json(_record(), None)
    assert "images" not in data and "image_failures" not in data
