"""Real-world FHIR shapes (``tests/fixtures/realworld/``, from public bug reports) and more of each
kind, asked through ``ChartSight`` as a clinician would: from the local store and from a real FHIR
server (SEKMET). Each test states what a clinician must get."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.service import ChartSight
from agent.settings import Settings
from connectors.store import FhirStore
from tests.peers.servers import Sekmet

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "realworld"
NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def fixture(name: str) -> dict[str, Any]:
    path = next(FIXTURES.glob(f"{name}*"))
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        return json.load(fh)


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }


def patient(pid: str, **fields: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "gender": "female", **fields}


def obs(
    oid: str, pid: str, code: str, when: str, value: Any = None, unit: str | None = None, **kw: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": kw.pop("status", "final"),
        "code": {"coding": [{"system": LOINC, "code": code}], "text": kw.pop("text", code)},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
    }
    if value is not None:
        out["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    out.update(kw)
    return out


class Chart:
    """One patient's bundle in a source, asked through ChartSight."""

    def __init__(self, settings: Settings, pid: str) -> None:
        self.settings = settings
        self.pid = pid

    def ask(self, question: str) -> Any:
        async def run() -> Any:
            async with ChartSight(self.settings, now=NOW, use_index=False) as cs:
                return await cs.ask(self.pid, question, keep=False)

        return asyncio.run(run())

    def lines(self) -> list[str]:
        async def run() -> list[str]:
            async with ChartSight(self.settings, now=NOW, use_index=False) as cs:
                ranked = await cs.evidence(self.pid, "everything", token_budget=100_000)
                return [r.evidence.text for r in ranked]

        return asyncio.run(run())

    def facts(self, tool: str, **args: Any) -> list[Any]:
        async def run() -> list[Any]:
            async with ChartSight(self.settings, now=NOW, use_index=False) as cs:
                return await cs.facts(self.pid, tool, args)

        return asyncio.run(run())


def _transaction(doc: dict[str, Any]) -> dict[str, Any]:
    """A collection Bundle as a transaction that keeps each resource's id (PUT)."""
    entries = []
    for entry in doc["entry"]:
        r = entry["resource"]
        entries.append(
            {
                "resource": r,
                "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.fixture(scope="module")
def own_sekmet() -> Iterator[Any]:
    """A SEKMET of this module's own: its patients must not show up in other tests' server."""
    with Sekmet() as server:
        yield server


@pytest.fixture(params=["store", "sekmet"])
def chart(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """``chart(bundle) -> Chart``: the bundle loaded into the local store, or into SEKMET."""
    stores: list[FhirStore] = []

    def load(doc: dict[str, Any]) -> Chart:
        pid = next(
            e["resource"]["id"] for e in doc["entry"] if e["resource"]["resourceType"] == "Patient"
        )
        if request.param == "store":
            store = FhirStore(f"sqlite:///{tmp_path / f'{pid}.db'}")
            stores.append(store)
            store.import_json(doc, f"{pid}.json")
            settings = Settings(home=tmp_path / "home", store={"url": str(store.engine.url)})
        else:
            server = request.getfixturevalue("own_sekmet")
            reply = httpx.post(
                server.base_url,
                json=_transaction(doc),
                headers={"Content-Type": "application/fhir+json"},
                timeout=60,
            )
            reply.raise_for_status()
            settings = Settings(home=tmp_path / "home", fhir={"url": server.base_url})
        return Chart(settings, pid)

    yield load
    for store in stores:
        store.close()


# --- the shared examples ------------------------------------------------------------------------


def test_contained_medication_is_named(chart):
    c = chart(fixture("01"))
    assert any(
        "amlodipine 5 mg tablet" in line and "MedicationRequest/bug01-mr1" in line
        for line in c.lines()
    )
    answer = c.ask("What medications is she on?")
    assert "amlodipine 5 mg tablet" in answer.text and "unnamed" not in answer.text


def test_refuted_and_entered_in_error_conditions(chart):
    c = chart(fixture("03"))
    problems = c.facts("active_problems")
    assert [f.evidence for f in problems] == [("Condition/bug03-htn",)]
    lines = "\n".join(c.lines())
    assert "bug03-dm-eie" not in lines and "diabetes" not in lines.lower()
    assert "Pneumonia (SNOMED 233604007), ruled out" in lines
    answer = c.ask("What are her active problems?")
    assert "Hypertension" in answer.text
    assert "Pneumonia" not in answer.text and "diabetes" not in answer.text.lower()
    pneumonia = c.ask("Does she have pneumonia?")
    assert "Pneumonia" not in pneumonia.text or "ruled out" in pneumonia.text


def test_entered_in_error_and_cancelled_results(chart):
    c = chart(fixture("04"))
    (latest,) = c.facts("latest_observation", query="potassium")
    assert latest.value == 4.1 and latest.unit == "mmol/L"
    assert latest.date.date().isoformat() == "2026-10-01"
    assert "bug04-k-eie" not in latest.evidence and "6.8" not in latest.statement
    assert "2026-11-25" in latest.statement and "no result" in latest.statement
    assert "1 entered-in-error result left out" in latest.statement
    answer = c.ask("What was his last potassium?")
    assert "4.1 mmol/L" in answer.text and "2026-10-01" in answer.text and "6.8" not in answer.text
    (stats,) = c.facts("observation_stats", query="potassium")
    assert stats.details["count"] == 1 and stats.value == 4.1
    assert not any("bug04-k-eie" in line for line in c.lines())


def test_glucose_in_mixed_units(chart):
    c = chart(fixture("07"))
    lines = {line.split(" [")[-1]: line for line in c.lines()}
    assert "low" not in lines["Observation/bug07-glu-c]"]  # 5.8 mmol/L is 104 mg/dL
    (latest,) = c.facts("latest_observation", query="glucose")
    assert latest.value == 5.8 and latest.unit == "mmol/L"
    (stats,) = c.facts("observation_stats", query="glucose")
    assert stats.details["count"] == 3  # the molar-code result is glucose too
    assert stats.unit == "mg/dL"
    expected = (105 + 5.2 * 18.0156 + 5.8 * 18.0156) / 3
    assert stats.value == pytest.approx(expected, rel=1e-3)
    assert "results in other units converted to mg/dL" in stats.statement


def test_partial_dates(chart):
    c = chart(fixture("09"))
    (demo,) = c.facts("demographics")
    assert demo.value["name"] == "Hodan Abdi" and demo.value["birth_date"] == "1958"
    assert demo.value["age_approximate"]
    lines = "\n".join(c.lines())
    assert "2026-03 HbA1c (LOINC 4548-4) 6.4 %" in lines and "2026-03-01" not in lines
    assert "2019 Condition: Asthma" in lines and "2019-01-01" not in lines
    age = c.ask("How old is she?")
    assert "about 68" in age.text and "approximate" in age.text
    a1c = c.ask("What was her last HbA1c?")
    assert "6.4 %" in a1c.text and "2026-03" in a1c.text and "2026-03-01" not in a1c.text


def test_patient_without_a_name(chart):
    c = chart(fixture("18"))
    (demo,) = c.facts("demographics")
    assert demo.value["name"] == "(no name)"
    answer = c.ask("What was the last temperature?")
    assert "38.4 Cel" in answer.text and not answer.abstained
    assert "(no name)" in c.ask("What is the patient's name?").text
    fever = c.ask("Does the patient have a fever?")  # a measurement shows it, not a diagnosis
    assert "38.4 Cel (high" in fever.text and "Observation/bug18-temp" in fever.text


# --- more of each kind: other resource types and fields -----------------------------------------


def test_status_kinds_across_resource_types(chart):
    pid = "kinds-pat"
    subject = {"reference": f"Patient/{pid}"}
    doc = bundle(
        patient(pid, name=[{"family": "Ito", "given": ["Mei"]}], birthDate="1970-05-05"),
        {"resourceType": "MedicationRequest", "id": "mr-eie", "status": "entered-in-error",
         "intent": "order", "subject": subject, "authoredOn": "2026-05-01",
         "medicationCodeableConcept": {"text": "warfarin 5 mg"}},
        {"resourceType": "MedicationRequest", "id": "mr-cancel", "status": "cancelled",
         "intent": "order", "subject": subject, "authoredOn": "2026-05-02",
         "medicationCodeableConcept": {"text": "apixaban 5 mg"}},
        {"resourceType": "MedicationRequest", "id": "mr-ok", "status": "active",
         "intent": "order", "subject": subject, "authoredOn": "2026-05-03",
         "medicationCodeableConcept": {"text": "metoprolol 25 mg"}},
        {"resourceType": "MedicationStatement", "id": "ms-not", "status": "not-taken",
         "subject": subject, "medicationCodeableConcept": {"text": "aspirin 81 mg"}},
        {"resourceType": "AllergyIntolerance", "id": "al-ref", "patient": subject,
         "recordedDate": "2025-02-03", "code": {"text": "Penicillin"},
         "verificationStatus": {"coding": [{"code": "refuted"}]}},
        {"resourceType": "AllergyIntolerance", "id": "al-eie", "patient": subject,
         "code": {"text": "Latex"}, "verificationStatus": {"coding": [{"code": "entered-in-error"}]}},
        {"resourceType": "Immunization", "id": "im-not", "status": "not-done", "patient": subject,
         "vaccineCode": {"text": "Influenza vaccine"}, "occurrenceDateTime": "2026-10-01",
         "statusReason": {"text": "patient refused"}},
        {"resourceType": "Procedure", "id": "pr-not", "status": "not-done", "subject": subject,
         "code": {"text": "Colonoscopy"}, "performedDateTime": "2026-06-01"},
        {"resourceType": "Procedure", "id": "pr-eie", "status": "entered-in-error",
         "subject": subject, "code": {"text": "Appendectomy"}, "performedDateTime": "2026-06-02"},
        {"resourceType": "DiagnosticReport", "id": "dr-eie", "status": "entered-in-error",
         "subject": subject, "code": {"text": "CT head"}, "effectiveDateTime": "2026-07-01",
         "conclusion": "Large bleed"},
        {"resourceType": "DocumentReference", "id": "doc-eie", "status": "current",
         "docStatus": "entered-in-error", "subject": subject, "type": {"text": "Note"},
         "content": [{"attachment": {"contentType": "text/plain", "data": "V3JvbmcgcGF0aWVudA=="}}]},
        {"resourceType": "Encounter", "id": "enc-cancel", "status": "cancelled",
         "class": {"code": "AMB"}, "subject": subject, "type": [{"text": "Clinic visit"}],
         "period": {"start": "2026-08-01"}},
        {"resourceType": "Encounter", "id": "enc-eie", "status": "entered-in-error",
         "class": {"code": "AMB"}, "subject": subject, "type": [{"text": "ER visit"}],
         "period": {"start": "2026-08-02"}},
    )  # fmt: skip
    c = chart(doc)
    lines = "\n".join(c.lines())
    for voided in ("mr-eie", "al-eie", "pr-eie", "dr-eie", "doc-eie", "enc-eie"):
        assert voided not in lines
    for gone in ("warfarin", "Latex", "Appendectomy", "Large bleed", "Wrong patient", "ER visit"):
        assert gone not in lines
    meds = c.facts("active_medications")
    assert [f.evidence for f in meds] == [("MedicationRequest/mr-ok",)]
    assert "Penicillin: not allergic (refuted on 2025-02-03)" in lines
    assert "Influenza vaccine, not done; reason: patient refused" in lines
    assert "Colonoscopy, not done" in lines
    assert "Clinic visit, cancelled" in lines
    (allergy,) = c.facts("allergies")
    assert "not allergic" in allergy.statement
    assert "apixaban" not in c.ask("What medications is she taking?").text


def test_components_units_bounds_and_offsets(chart):
    pid = "mix-pat"

    def bp(oid: str, when: str, sys: float, dia: float | None) -> dict[str, Any]:
        comps: list[dict[str, Any]] = [
            {"code": {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}]},
             "valueQuantity": {"value": sys, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}},
        ]  # fmt: skip
        dia_comp: dict[str, Any] = {
            "code": {
                "coding": [
                    {"system": LOINC, "code": "8462-4", "display": "Diastolic blood pressure"}
                ]
            }
        }
        if dia is None:
            dia_comp["dataAbsentReason"] = {"text": "cuff slipped"}
        else:
            dia_comp["valueQuantity"] = {
                "value": dia,
                "unit": "mm[Hg]",
                "system": UCUM,
                "code": "mm[Hg]",
            }
        comps.append(dia_comp)
        return {"resourceType": "Observation", "id": oid, "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "85354-9"}], "text": "Blood pressure"},
                "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when,
                "component": comps}  # fmt: skip

    doc = bundle(
        patient(
            pid, name=[{"family": "Berg"}], birthDate="1950-01-01", deceasedDateTime="2026-09-01"
        ),
        bp("bp1", "2026-01-01T08:00:00Z", 150, 95),
        bp("bp2", "2026-02-01T08:00:00Z", 130, 85),
        bp("bp3", "2026-03-01T08:00:00Z", 170, None),
        # creatinine in mg/dL and µmol/L (mass and molar LOINC codes)
        obs("cr1", pid, "2160-0", "2026-01-05", 1.0, "mg/dL", text="Creatinine"),
        obs("cr2", pid, "14682-9", "2026-02-05", 176.84, "umol/L", text="Creatinine"),
        # a censored troponin
        obs(
            "tn1",
            pid,
            "6598-7",
            "2026-03-01",
            0.5,
            "ng/mL",
            text="Troponin T",
            valueQuantity={
                "value": 0.01,
                "comparator": "<",
                "unit": "ng/mL",
                "system": UCUM,
                "code": "ng/mL",
            },
        ),
        obs("tn2", pid, "6598-7", "2026-03-02", 0.4, "ng/mL", text="Troponin T"),
        # two sodium results whose order depends on their offsets: 23:30 at UTC-5 is the later
        obs("na1", pid, "2951-2", "2026-04-04T23:30:00-05:00", 140, "mmol/L", text="Sodium"),
        obs("na2", pid, "2951-2", "2026-04-05T02:00:00Z", 132, "mmol/L", text="Sodium"),
    )
    c = chart(doc)
    systolic, diastolic = c.facts("observation_stats", query="blood pressure")
    assert systolic.details["count"] == 3 and systolic.value == pytest.approx(150)
    assert diastolic.details["count"] == 2 and diastolic.value == pytest.approx(90)
    (sys_latest,) = c.facts("latest_observation", query="systolic")
    assert sys_latest.value == 170 and "Observation/bp3" in sys_latest.evidence
    assert "no value (cuff slipped)" in "\n".join(c.lines())
    (cr,) = c.facts("observation_stats", query="creatinine")
    assert cr.unit == "mg/dL" and cr.details["count"] == 2
    assert cr.details["max"] == pytest.approx(2.0, rel=1e-3) and cr.details["trend"] == "rising"
    (tn,) = c.facts("observation_stats", query="troponin")
    assert tn.details["count"] == 1 and tn.details["bounds_left_out"] == 1
    assert "<0.01 ng/mL" in tn.statement
    (tn_latest,) = c.facts("latest_observation", query="troponin")
    assert tn_latest.value == 0.4
    troponin_first = c.facts("latest_observation", query="troponin", nth=2)[0]
    assert troponin_first.value == "<0.01 ng/mL"
    assert troponin_first.used().comparator == "<"
    (na,) = c.facts("latest_observation", query="sodium")
    assert na.value == 140 and na.evidence == ("Observation/na1",)
    age = c.ask("How old is he?")
    assert "died on 2026-09-01" in age.text and "76 years" in age.text


def test_a_ruled_out_condition_asked_about(chart):
    c = chart(fixture("03"))
    answer = c.ask("Does she have pneumonia?")
    assert "Pneumonia" in answer.text and "ruled out" in answer.text
    assert "Condition/bug03-pna-refuted" in {x.reference for x in answer.citations}
    diabetes = c.ask("Does she have diabetes?")
    assert "No diabetes diagnosis is in the record's conditions" in diabetes.text
    assert "bug03-dm-eie" not in diabetes.model_dump_json()


# --- the analyte asked for, or an honest "no" --------------------------------------------------


def test_a_test_not_in_the_chart_is_never_answered_with_another(chart):
    """Asked for HbA1c, LDL, sodium or troponin on a chart that has hemoglobin, total and HDL
    cholesterol, creatinine and triglycerides from one draw: the answer says the test is not in
    the record and what was searched, citing the Patient; never another test's value (a
    hemoglobin of 13.7 g/dL "for" an A1c is the worst error a grounded tool can make)."""
    pid = "panel-pat"
    draw = "2024-05-01T08:00:00Z"
    c = chart(
        bundle(
            patient(pid),
            obs("hb", pid, "718-7", draw, 13.7, "g/dL", text="Hemoglobin [Mass/volume] in Blood"),
            obs("chol", pid, "2093-3", draw, 210, "mg/dL", text="Cholesterol [Mass/volume]"),
            obs("hdl", pid, "2085-9", draw, 45, "mg/dL", text="Cholesterol in HDL"),
            obs("tg", pid, "2571-8", draw, 150, "mg/dL", text="Triglyceride [Mass/volume]"),
            obs("cr", pid, "2160-0", draw, 1.1, "mg/dL", text="Creatinine [Mass/volume]"),
        )
    )
    for question, named in (
        ("What was the last hemoglobin A1c?", "hemoglobin A1c"),
        ("What was the last HbA1c?", "HbA1c"),
        ("Latest LDL?", "LDL"),
        ("What was his LDL cholesterol?", "LDL cholesterol"),
        ("latest serum sodium?", "sodium"),
        ("What is the latest troponin?", "troponin"),
    ):
        answer = c.ask(question)
        assert answer.text.startswith(f"No {named} result in the record: none of its 5 "), (
            question,
            answer.text,
        )
        assert [x.reference for x in answer.citations] == [f"Patient/{pid}"], answer.text
        for other in ("13.7", "210", "45", "150", "1.1"):  # no value of another test
            assert not re.search(rf"(?<![\d.-]){re.escape(other)}(?![\d.-])", answer.text)
    # the tests it has are answered as before
    assert c.ask("What was the last hemoglobin?").citations[0].reference == "Observation/hb"
    assert c.ask("Latest HDL?").citations[0].reference == "Observation/hdl"


def _condition(cid: str, pid: str, code: str, display: str, onset: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f"Patient/{pid}"},
        "code": {
            "coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]
        },
        "clinicalStatus": {"coding": [{"code": "active"}]},
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
        "onsetDateTime": onset,
    }


def test_a_diagnosis_asked_about_is_that_diagnosis(chart):
    """ "Does she have diabetes?" on a chart with prediabetes and a high HbA1c: no, with the related
    condition named apart; never "yes" by prediabetes, never an HbA1c labelled "diabetic", never
    the whole problem list. With type 2 diabetes charted, that Condition is the answer."""
    pid = "dm-pat"
    c = chart(
        bundle(
            patient(pid),
            _condition("pre", pid, "15777000", "Prediabetes", "2019-02-01"),
            _condition("hf", pid, "88805009", "Chronic congestive heart failure", "2020-01-01"),
            obs("a1c", pid, "4548-4", "2024-05-01", 6.3, "%", text="Hemoglobin A1c"),
        )
    )
    for question in (
        "Does she have diabetes?",
        "Is she diabetic?",
        "Was she ever diagnosed with diabetes?",
    ):
        answer = c.ask(question)
        assert answer.text.startswith("No diabet"), (question, answer.text)
        assert "A related condition is recorded: " in answer.text and "Prediabetes" in answer.text
        refs = [x.reference for x in answer.citations]
        assert refs == [f"Patient/{pid}", "Condition/pre"], (question, refs)
    assert c.ask("Does she have prediabetes?").citations[0].reference == "Condition/pre"
    t2 = chart(
        bundle(
            patient("dm2-pat"),
            _condition("t2", "dm2-pat", "44054006", "Diabetes mellitus type 2", "2015-06-01"),
            _condition("pre2", "dm2-pat", "15777000", "Prediabetes", "2010-01-01"),
        )
    )
    answer = t2.ask("Does she have diabetes?")
    assert [x.reference for x in answer.citations] == ["Condition/t2"], answer.text


def test_every_statistic_and_latest_value_honours_the_period_asked(chart):
    """ "Average glucose in 2020", "between … and …", "since 2018", "glucose in 2019": computed over
    that period only (expected values computed here from the data), and a period without results
    says so and names the nearest ones, never a value from outside it as if it were inside."""
    pid = "period-pat"
    values = {
        "g1": ("2012-02-05", 66.0),
        "g2": ("2017-06-01", 90.0),
        "g3": ("2019-03-17", 71.0),
        "g4": ("2020-03-22", 96.0),
        "g5": ("2020-06-15", 84.0),
        "g6": ("2020-12-13", 70.0),
    }
    c = chart(
        bundle(
            patient(pid),
            *(obs(k, pid, "2339-0", d, v, "mg/dL", text="Glucose") for k, (d, v) in values.items()),
        )
    )

    def mean(lo: str, hi: str) -> float:
        picked = [v for d, v in values.values() if lo <= d <= hi]
        return round(sum(picked) / len(picked), 2)

    in_2020 = c.ask("What was the average glucose in 2020?").text
    assert "3 results" in in_2020 and f"mean {mean('2020-01-01', '2020-12-31'):g} mg/dL" in in_2020
    between = c.ask("average glucose between 2019-01-01 and 2020-12-31").text
    assert "4 results" in between and f"mean {mean('2019-01-01', '2020-12-31'):g}" in between
    since = c.ask("Mean glucose since 2018?").text
    assert "4 results" in since and f"mean {mean('2018-01-01', '2026-12-31'):g}" in since
    latest_2019 = c.ask("What was her glucose in 2019?")
    assert [x.reference for x in latest_2019.citations] == ["Observation/g3"]
    none = c.ask("What was her glucose in 2005?")
    assert none.text.startswith("No glucose result from 2005-01-01 to 2005-12-31 in the record.")
    assert [x.reference for x in none.citations] == [f"Patient/{pid}", "Observation/g1"]


def test_bnp_and_nt_probnp_are_two_tests(chart):
    """BNP and NT-proBNP are different assays with different cut-offs: asked for BNP on a chart
    with only NT-proBNP (coded, or a local code named by text), the answer is an honest no."""
    pid = "bnp-pat"
    local = obs("local", pid, "X-1", "2024-05-02", 700, "pg/mL", text="NT-proBNP (local)")
    local["code"] = {"coding": [{"system": "urn:local", "code": "X-1"}], "text": "NT-proBNP"}
    c = chart(
        bundle(
            patient(pid),
            obs("nt", pid, "33762-6", "2024-05-01", 616.4, "pg/mL", text="NT-proBNP"),
            local,
        )
    )
    answer = c.ask("What is his BNP?")
    assert answer.text.startswith("No BNP result in the record"), answer.text
    assert "616.4" not in answer.text and "700" not in answer.text
    assert c.ask("Latest NT-proBNP?").citations[0].reference == "Observation/nt"


def test_a_diagnosis_question_is_answered_yes_or_no_first(chart):
    c = chart(fixture("03"))
    # every pneumonia Condition of this chart is refuted (or entered in error)
    pneumonia = c.ask("Does she have pneumonia?")
    assert pneumonia.text.startswith("No: pneumonia was ruled out."), pneumonia.text
    diabetes = c.ask("Does she have diabetes?")
    assert diabetes.text.startswith("No diabetes diagnosis is in the record's conditions")


def test_a_long_noisy_series_is_summarised_robustly_and_cited_readably(chart):
    """A monitored heart rate: 30 readings around 70 /min, the newest a spike to 95. A clinician
    must not read "rising from 72 to 95" (one spike at the end is not a trend): the trend
    compares the medians of the first and last thirds, and the spike is shown as the newest
    reading. The answer cites the first, lowest, highest and newest readings, not all 30; the
    fact keeps all 30 as its evidence, and every sentence is verified."""
    pid = "hr-pat"
    values = [72, 68, 71, 69, 70, 67, 73, 70, 69, 71] * 3
    values[-1] = 95
    readings = [
        obs(f"hr{i:02d}", pid, "8867-4", f"2026-{1 + i // 3:02d}-{1 + 9 * (i % 3):02d}", v, "/min",
            text="Heart rate")
        for i, v in enumerate(values)
    ]  # fmt: skip
    c = chart(bundle(patient(pid, birthDate="1960-01-01"), *readings))
    (fact,) = c.facts("observation_stats", query="heart rate")
    assert fact.details["count"] == 30 and len(fact.evidence) == 30
    assert fact.details["trend"] == "about unchanged"
    assert "median 70 /min in the first third" in fact.statement
    assert "newest 95 /min (2026-10-19)" in fact.statement
    assert "(the first, lowest, highest and newest cited)" in fact.statement
    answer = c.ask("What is her average heart rate?")
    assert answer.supported_fraction == 1.0
    cited = {x.reference for x in answer.citations}
    assert cited == {"Observation/hr00", "Observation/hr05", "Observation/hr29"}, cited
    assert "rising" not in answer.text

    # a short series keeps its endpoints, and every result is cited
    (short,) = chart(bundle(patient("hr-short"), *[
        obs(f"s{i}", "hr-short", "8867-4", f"2026-0{i + 1}-01", v, "/min", text="Heart rate")
        for i, v in enumerate([60, 64, 90])
    ])).facts("observation_stats", query="heart rate")  # fmt: skip
    assert short.details["trend"] == "rising" and "from 60 (2026-01-01) to 90" in short.statement
    assert short.statement.count("[Observation/") == 3


def test_a_chart_of_10000_results_answers_with_a_bounded_citation_list(chart, request):
    """Real-world 19 (one patient, 10,001 Observations): "What is his average heart rate?" is
    the mean over all 10,000 readings, cited by four of them (it cited all 10,000: an unreadable
    answer, 44 s of verifying and rendering)."""
    if request.node.callspec.params["chart"] == "sekmet":
        pytest.skip("10,000 resources into SEKMET: the store's answer is the point here")
    c = chart(fixture("19-"))
    answer = c.ask("What is his average heart rate?")
    assert answer.supported_fraction == 1.0
    assert "10000 results" in answer.text and "mean 69.97 /min" in answer.text
    assert 1 <= len(answer.citations) <= 4
    (fact,) = [f for f in answer.facts if f.tool == "observation_stats"]
    assert len(fact.evidence) == 10000


def test_a_neonates_age_is_in_days(chart):
    """A 3-day-old: "0 years" tells a clinician nothing; the age is in days (months to 2 years)."""
    c = chart(bundle(patient("neo", birthDate="2026-11-26", name=[{"family": "Baby"}])))
    answer = c.ask("How old is she?")
    assert "Age on 2026-11-29: 3 days." in answer.text and answer.supported_fraction == 1.0
    (fact,) = c.facts("age")
    assert (fact.value, fact.unit) == (3, "days")
    (demo,) = c.facts("demographics")
    assert "age 3 days" in demo.statement


def test_a_result_dated_after_the_day_asked_is_not_the_latest(chart):
    """A potassium dated after the day the question is asked (a future-dated entry, or a chart
    read "as of" an earlier day): the latest is the newest up to that day, and the later one is
    said, cited, not silently taken; with none up to that day, the answer says so."""
    pid = "future"
    c = chart(bundle(
        patient(pid, birthDate="1950-01-01"),
        obs("k1", pid, "2823-3", "2026-10-01", 4.1, "mmol/L", text="Potassium"),
        obs("k2", pid, "2823-3", "2026-12-24", 6.2, "mmol/L", text="Potassium"),
    ))  # fmt: skip
    (fact,) = c.facts("latest_observation", query="potassium")
    assert fact.value == 4.1 and fact.details["after_now"] == 1
    assert "1 result dated after 2026-11-29 is not taken as the latest" in fact.statement
    assert fact.evidence == ("Observation/k1", "Observation/k2")
    answer = c.ask("What is her latest potassium?")
    assert answer.supported_fraction == 1.0 and "4.1 mmol/L" in answer.text
    assert "[Observation/k2]" in answer.text
    only_later = chart(bundle(
        patient("future2", birthDate="1950-01-01"),
        obs("k3", "future2", "2823-3", "2027-01-05", 5.0, "mmol/L", text="Potassium"),
    ))  # fmt: skip
    (none,) = only_later.facts("latest_observation", query="potassium")
    assert none.value is None and none.statement.startswith("No potassium result up to 2026-11-29")


def _procedure(
    rid: str,
    pid: str,
    code: str,
    display: str,
    when: str,
    status: str = "completed",
    system: str = "http://snomed.info/sct",
    **kw: Any,
) -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": rid,
        "status": status,
        "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{pid}"},
        "performedDateTime": when,
        **kw,
    }


def test_has_the_patient_had_a_procedure_is_answered_yes_or_no_first(chart):
    """ "Has he had a colonoscopy?": yes or no first, how often and when, from the record's
    Procedures by SNOMED CT code or, coded otherwise, by name; a procedure recorded as not done
    is not a yes; an entered-in-error one is not counted; an absence cites the Patient."""
    pid = "proc"
    c = chart(bundle(
        patient(pid, birthDate="1950-01-01", gender="male"),
        _procedure("col1", pid, "73761001", "Colonoscopy", "2015-03-02"),
        # coded in CPT, named as a colonoscopy: found by its name
        _procedure("col2", pid, "45378", "Fiberoptic colonoscopy with biopsy", "2024-05-06",
                   system="http://www.ama-assn.org/go/cpt"),
        # SNOMED CT codes of other procedures whose names share a word: never a yes
        _procedure("ure1", pid, "233555004", "Insertion of ureteric stent", "2023-01-01"),
        _procedure("ren1", pid, "306005", "Echography of kidney", "2023-02-01"),
        _procedure("mam1", pid, "24623002", "Screening mammography", "2025-01-10",
                   status="not-done", statusReason={"text": "patient declined"}),
        _procedure("app1", pid, "80146002", "Appendectomy", "2020-02-02",
                   status="entered-in-error"),
    ))  # fmt: skip
    answer = c.ask("Has he had a colonoscopy?")
    assert answer.text.startswith("Yes: colonoscopy is recorded 2 times, the last on 2024-05-06.")
    assert {x.reference for x in answer.citations} >= {"Procedure/col1", "Procedure/col2"}
    assert answer.supported_fraction == 1.0
    mammogram = c.ask("Did he have a mammogram?")
    assert mammogram.text.startswith("No mammogram is recorded as done: 1 recorded with status")
    assert "not-done" in mammogram.text and "Procedure/mam1" in mammogram.text
    appendix = c.ask("Has he had an appendectomy?")
    assert appendix.text.startswith("No appendectomy is recorded among the record's")
    assert "Procedure/app1" not in appendix.text
    assert [x.reference for x in appendix.citations] == ["Patient/proc"]
    (bypass,) = c.facts("procedure_history", query="bypass surgery")
    assert bypass.value == "none" and bypass.evidence == ("Patient/proc",)
    for question in ("Has he had a coronary stent?", "Has he had an echocardiogram?"):
        assert c.ask(question).text.startswith("No "), question


def test_a_long_procedure_history_is_cited_by_its_newest(chart, request):
    """An ICU patient's 30 daily chest X-rays: "Yes ... 30 times", the 12 newest cited and
    listed (all 30 are the fact's evidence), not 30 citations and lines."""
    if request.node.callspec.params["chart"] == "sekmet":
        pytest.skip("the rule is the tool's; the store is enough")
    pid = "icu"
    c = chart(bundle(patient(pid, birthDate="1950-01-01"), *[
        _procedure(f"cxr{i:02d}", pid, "399208008", "Plain chest X-ray", f"2026-10-{i + 1:02d}")
        for i in range(30)
    ]))  # fmt: skip
    head, *items = c.facts("procedure_history", query="chest x-ray")
    assert head.statement.startswith(
        "Yes: chest x-ray is recorded 30 times, the last on 2026-10-30 (the newest 12 cited)."
    )
    assert head.statement.count("[Procedure/") == 12 and len(head.evidence) == 30
    assert len(items) == 12


def test_dementia_and_pregnancy_are_diagnoses_asked_about(chart):
    """ "Does he have dementia?" with Alzheimer's disease recorded, "has she been pregnant?" with
    a normal pregnancy: the conditions are found (the table lacked both words)."""
    pid = "dx"
    c = chart(bundle(
        patient(pid, birthDate="1940-01-01"),
        _condition("alz", pid, "26929004", "Alzheimer's disease (disorder)", "2018-03-11"),
        _condition("preg", pid, "72892002", "Normal pregnancy", "1975-01-13"),
    ))  # fmt: skip
    assert c.ask("Does he have dementia?").text.startswith("Yes: dementia is recorded as active")
    assert "Condition/preg" in c.ask("Has she ever been pregnant?").text
