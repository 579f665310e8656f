"""Clinical semantics decided once (``retrieval/clinical.py``): status per resource type, FHIR dates
at their precision, patient names and ages, censored values and UCUM conversions."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from retrieval.clinical import (
    Measurement,
    convert,
    display_name,
    fhir_date,
    measurement_of,
    observation_points,
    patient_age,
    read_status,
    when_of,
)


def res(rtype: str, **fields: Any) -> Any:
    return get_fhir_model_class(rtype).model_validate({"resourceType": rtype, **fields})


def concept(code: str, system: str = "http://example.org") -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


CODE = {"text": "thing"}
SUBJECT = {"reference": "Patient/p"}


@pytest.mark.parametrize(
    ("resource", "voided", "not_done", "active", "refuted"),
    [
        (res("Observation", status="entered-in-error", code=CODE), True, False, False, False),
        (res("Observation", status="cancelled", code=CODE), False, True, False, False),
        (res("Observation", status="final", code=CODE), False, False, False, False),
        (
            res("Condition", subject=SUBJECT, code=CODE,
                clinicalStatus=concept("active"), verificationStatus=concept("refuted")),
            False, False, False, True,
        ),
        (
            res("Condition", subject=SUBJECT, code=CODE,
                verificationStatus=concept("entered-in-error")),
            True, False, False, False,
        ),
        (
            res("Condition", subject=SUBJECT, code=CODE, clinicalStatus=concept("resolved")),
            False, False, False, False,
        ),
        (
            res("Condition", subject=SUBJECT, code=CODE, clinicalStatus=concept("recurrence")),
            False, False, True, False,
        ),
        (
            res("AllergyIntolerance", patient=SUBJECT, code=CODE,
                verificationStatus=concept("refuted")),
            False, False, False, True,
        ),
        (res("AllergyIntolerance", patient=SUBJECT, code=CODE), False, False, True, False),
        (
            res("MedicationRequest", status="entered-in-error", intent="order", subject=SUBJECT,
                medicationCodeableConcept=CODE),
            True, False, False, False,
        ),
        (
            res("MedicationRequest", status="cancelled", intent="order", subject=SUBJECT,
                medicationCodeableConcept=CODE),
            False, True, False, False,
        ),
        (
            res("MedicationRequest", status="on-hold", intent="order", subject=SUBJECT,
                medicationCodeableConcept=CODE),
            False, False, True, False,
        ),
        (
            res("MedicationStatement", status="not-taken", subject=SUBJECT,
                medicationCodeableConcept=CODE),
            False, True, False, False,
        ),
        (
            res("MedicationAdministration", status="not-done", subject=SUBJECT,
                medicationCodeableConcept=CODE, effectiveDateTime="2026-01-01"),
            False, True, False, False,
        ),
        (res("Procedure", status="not-done", subject=SUBJECT, code=CODE), False, True, False, False),
        (
            res("Immunization", status="not-done", patient=SUBJECT, vaccineCode=CODE,
                occurrenceDateTime="2026-01-01"),
            False, True, False, False,
        ),
        (
            res("DiagnosticReport", status="entered-in-error", code=CODE),
            True, False, False, False,
        ),
        (
            res("DocumentReference", status="current", docStatus="entered-in-error",
                content=[{"attachment": {"contentType": "text/plain"}}]),
            True, False, False, False,
        ),
        (
            res("DocumentReference", status="entered-in-error",
                content=[{"attachment": {"contentType": "text/plain"}}]),
            True, False, False, False,
        ),
        (res("Encounter", status="cancelled", **{"class": {"code": "AMB"}}), False, True, False, False),
        (
            res("Encounter", status="entered-in-error", **{"class": {"code": "AMB"}}),
            True, False, False, False,
        ),
    ],
)  # fmt: skip
def test_status_semantics_per_resource_type(resource, voided, not_done, active, refuted):
    status = read_status(resource)
    assert (status.voided, status.not_done, status.active, status.refuted) == (
        voided,
        not_done,
        active,
        refuted,
    )


def test_partial_dates_keep_their_precision_and_compare_as_intervals():
    year, month, day = fhir_date("2019"), fhir_date("2026-03"), fhir_date(date(2026, 3, 4))
    assert (year.text, year.precision) == ("2019", "year")
    assert (month.text, month.precision) == ("2026-03", "month")
    assert month.start == datetime(2026, 3, 1, tzinfo=UTC)
    assert month.end == datetime(2026, 4, 1, tzinfo=UTC)
    assert day.text == "2026-03-04" and str(day) == "2026-03-04"
    assert fhir_date("2026-13") is None and fhir_date("") is None and fhir_date(None) is None
    assert fhir_date("2020-02") is not None and fhir_date("2020-12").end.year == 2021


def test_one_timezone_aware_ordering():
    # 23:30 at UTC-5 is 04:30 UTC the next day: later than 02:00 UTC that day
    west = res(
        "Observation", status="final", code=CODE, effectiveDateTime="2026-03-04T23:30:00-05:00"
    )
    utc = res("Observation", status="final", code=CODE, effectiveDateTime="2026-03-05T02:00:00Z")
    ordered = sorted([west, utc], key=lambda o: when_of(o).sort_key)
    assert ordered == [utc, west]


def test_patient_names():
    assert display_name(res("Patient")) == "(no name)"
    assert display_name(res("Patient", name=[{"family": "Ng"}])) == "Ng"
    assert (
        display_name(
            res(
                "Patient",
                name=[
                    {"use": "old", "family": "Smith", "given": ["Ann"]},
                    {"use": "usual", "given": ["Annie"], "family": "Jones"},
                    {"use": "official", "given": ["Ann", "Marie"], "family": "Jones"},
                ],
            )
        )
        == "Ann Marie Jones"
    )
    assert display_name(res("Patient", name=[{"text": " Dr  Kim "}])) == "Dr Kim"


def test_ages_from_partial_birth_dates_and_at_death():
    on = date(2026, 11, 29)
    exact = patient_age(res("Patient", birthDate="1958-12-01"), on)
    assert (exact.years, exact.approximate) == (67, False)
    approx = patient_age(res("Patient", birthDate="1958"), on)
    assert approx.approximate and approx.years in (67, 68) and approx.text.startswith("about ")
    month = patient_age(res("Patient", birthDate="1958-06"), on)
    assert (month.years, month.approximate) == (68, False)  # every day of June 1958 gives 68
    dead = patient_age(res("Patient", birthDate="1940-05-05", deceasedDateTime="2020-05-04"), on)
    assert (dead.years, dead.at_death) == (79, True)
    assert patient_age(res("Patient"), on) is None
    assert (exact.spoken, exact.short, exact.unit) == ("67 years", "67 y", "years")
    assert (approx.spoken, approx.unit) == (f"about {approx.years} years", "years")


@pytest.mark.parametrize(
    ("born", "spoken", "short", "amount", "unit"),
    [
        ("2026-11-26", "3 days", "3 d", 3, "days"),  # a neonate is days old, not "0 years"
        ("2026-11-29", "0 days", "0 d", 0, "days"),
        ("2026-10-30", "30 days", "30 d", 30, "days"),  # a month not yet complete
        ("2026-10-29", "1 month", "1 mo", 1, "months"),
        ("2026-06-15", "5 months", "5 mo", 5, "months"),
        ("2024-11-30", "23 months", "23 mo", 23, "months"),
        ("2024-11-29", "2 years", "2 y", 2, "years"),  # from 2 years on, years
        ("2026", "about 0 years", "about 0 y", 0, "years"),  # partial: no days or months
    ],
)
def test_a_young_childs_age_is_said_in_days_or_months(born, spoken, short, amount, unit):
    reading = patient_age(res("Patient", birthDate=born), date(2026, 11, 29))
    assert (reading.spoken, reading.short, reading.amount, reading.unit) == (
        spoken,
        short,
        amount,
        unit,
    )


def test_censored_values_keep_their_comparator():
    assert measurement_of("<5") == Measurement(5.0, None, "<")
    assert measurement_of("≥ 200 mg/dL") == Measurement(200.0, "mg/dL", ">=")
    q = res("Observation", status="final", code=CODE, valueQuantity={
        "value": 0.5, "comparator": "<", "unit": "ng/mL", "system": "http://unitsofmeasure.org",
        "code": "ng/mL"})  # fmt: skip
    m = measurement_of(q.valueQuantity)
    assert m is not None and not m.exact and m.text == "<0.5 ng/mL"
    assert measurement_of("positive") is None


@pytest.mark.parametrize(
    ("value", "unit", "to", "molar_mass", "expected"),
    [
        (5.8, "mmol/L", "mg/dL", 180.156, 104.49),  # glucose
        (126.0, "mg/dL", "mmol/L", 180.156, 6.99),
        (88.42, "umol/L", "mg/dL", 113.12, 1.0),  # creatinine
        (5.0, "mmol/L", "mg/dL", 386.65, 193.3),  # cholesterol
        (6.5, "%", "mmol/mol", None, 47.5),  # HbA1c, IFCC–NGSP master equation
        (53.0, "mmol/mol", "%", None, 7.0),
        (38.4, "Cel", "[degF]", None, 101.12),
        (137.0, "g/L", "g/dL", None, 13.7),
    ],
)
def test_unit_conversions(value, unit, to, molar_mass, expected):
    out = convert(Measurement(value, unit), to, molar_mass)
    assert out is not None and out.unit == to
    assert out.value == pytest.approx(expected, rel=2e-3)


def test_conversions_that_cannot_be_made_are_refused():
    assert convert(Measurement(5.8, "mmol/L"), "mg/dL") is None  # no molar mass
    assert convert(Measurement(5.0, "mg/dL"), "mm[Hg]") is None
    assert convert(Measurement(5.0, None), "mg/dL") is None
    assert convert(Measurement(5.0, "not a unit!"), "mg/dL") is None
    bound = convert(Measurement(5.0, "mmol/L", "<"), "mg/dL", 180.156)
    assert bound is not None and bound.comparator == "<"


def test_components_are_measurements_and_absent_values_say_why():
    panel = res(
        "Observation",
        status="final",
        code={"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        effectiveDateTime="2026-01-02",
        component=[
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "valueQuantity": {"value": 150, "unit": "mm[Hg]"},
            },
            {
                "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                "dataAbsentReason": {"text": "patient moved"},
            },
        ],
    )
    top, systolic, diastolic = observation_points(panel, "Observation/bp")
    assert not top.has_value and systolic.measurement == Measurement(150.0, "mm[Hg]")
    assert systolic.codes == ("http://loinc.org|8480-6",) and systolic.component == 0
    assert not diastolic.has_value and diastolic.absent == "patient moved"
    voided = panel.model_copy(update={"status": "entered-in-error"})
    assert observation_points(voided, "Observation/bp") == []
    cancelled = res("Observation", status="cancelled", code=CODE, effectiveDateTime="2026-01-02",
                    dataAbsentReason={"text": "Not Performed"})  # fmt: skip
    (point,) = observation_points(cancelled, "Observation/c")
    assert not point.has_value and point.absent == "cancelled; Not Performed"


def test_the_last_day_datetime_has_is_a_day_not_an_overflow():
    """9999-12-31, EHRs' "no end" date, has no next day in ``datetime``: it is the interval up to
    the last instant, from a date and from its text alike."""
    for value in (date(9999, 12, 31), "9999-12-31"):
        found = fhir_date(value)
        assert found is not None and found.precision == "day"
        assert found.start == datetime(9999, 12, 31, tzinfo=UTC)
        assert found.end == datetime.max.replace(tzinfo=UTC)
