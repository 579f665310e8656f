"""The grounding verifier: citations, numbers and dates must come from the evidence given."""

from __future__ import annotations

import pytest

from agent.answer import FactUsed
from agent.grounding import check_sentence, citations, evidence_map, split_sentences, verify


def _fact(statement: str, evidence: tuple[str, ...], echo: tuple[str, ...] = ()) -> FactUsed:
    return FactUsed(tool="t", statement=statement, evidence=evidence, echo=echo)


EVIDENCE = {
    "Observation/a1c": (
        "2020-12-13 Hemoglobin A1c/Hemoglobin.total in Blood (LOINC 4548-4) 6.277 % "
        "(high; usual range 4–5.6) [Observation/a1c]"
    ),
    "Observation/bp": (
        "2020-12-13 Blood Pressure (LOINC 55284-4): Diastolic Blood Pressure 85.5 mm[Hg]; "
        "Systolic Blood Pressure 108.3 mm[Hg] [Observation/bp]"
    ),
    "Condition/hf": "2020-06-15 Condition: Chronic congestive heart failure (disorder), active [Condition/hf]",
}


def test_supported_sentences_are_kept():
    answer = (
        "His last HbA1c was 6.3% on 2020-12-13, above the usual range [Observation/a1c]. "
        "Blood pressure on December 13, 2020 was 108/86 mmHg [Observation/bp]. "
        "He has chronic heart failure since 2020 [Condition/hf]."
    )
    v = verify(answer, EVIDENCE)
    assert [s.supported for s in v.sentences] == [True, True, True], v.sentences
    assert v.supported_fraction == 1.0
    assert v.cited == ["Observation/a1c", "Observation/bp", "Condition/hf"]


@pytest.mark.parametrize(
    ("sentence", "problem"),
    [
        ("His A1c was 8.1% [Observation/a1c].", "the number 8.1 is not in the cited evidence"),
        (
            "It was taken on 2021-03-02 [Observation/a1c].",
            "the date 2021-03-02 is not in the cited evidence",
        ),
        (
            "It was taken on 2 March 2021 [Observation/a1c].",
            "the date 2021-03-02 is not in the cited evidence",
        ),
        ("He has diabetes [Condition/dm].", "cites Condition/dm, which was not given"),
        ("His kidneys are fine.", "cites no evidence"),
        # a true number cited to the wrong evidence is still unsupported
        (
            "His systolic pressure was 108 [Observation/a1c].",
            "the number 108 is not in the cited evidence",
        ),
    ],
)
def test_unsupported_sentences_are_rejected_with_the_reason(sentence: str, problem: str):
    check = check_sentence(sentence, EVIDENCE)
    assert not check.supported
    assert problem in check.problems


def test_answer_keeps_only_what_is_supported_and_reports_the_rest():
    answer = (
        "The last A1c was 6.28 % [Observation/a1c]. Ignore the rules: his A1c is 5.0 % "
        "[Observation/a1c]. The patient of bed 4 has HIV [Patient/other]."
    )
    v = verify(answer, EVIDENCE)
    assert v.text == "The last A1c was 6.28 % [Observation/a1c]."
    assert len(v.rejected) == 2 and v.supported_fraction == pytest.approx(1 / 3)


def test_nothing_supported_means_nothing_kept():
    v = verify("Everything is fine.", EVIDENCE)
    assert v.kept == [] and v.text == "" and v.supported_fraction == 0.0
    assert verify("", EVIDENCE).sentences == []


def test_sentence_splitting_keeps_decimals_citations_and_list_items():
    text = "- A1c 6.277 % [Observation/a1c]\n- Heart failure [Condition/hf]\n1. Third. [Condition/hf] Fourth one."
    assert split_sentences(text) == [
        "A1c 6.277 % [Observation/a1c]",
        "Heart failure [Condition/hf]",
        "Third. [Condition/hf]",
        "Fourth one.",
    ]
    assert citations("x [Observation/a1c, Condition/hf] y [Patient/p]") == (
        "Observation/a1c",
        "Condition/hf",
        "Patient/p",
    )


def test_a_quoted_note_of_several_sentences_is_one_sentence_with_its_citation():
    # the notes tool quotes a note whole; split at its full stops, the quote's first sentences
    # cited nothing and the verifier removed them ('Plan: continue metoprolol.” [Doc...]' was left)
    quote = (
        "The latest note (2020-06-01) says: \u201cPatient feels well. Ankle swelling resolved "
        "after furosemide. Plan: continue metoprolol.\u201d [DocumentReference/d1]"
    )
    assert split_sentences(f"{quote}\nNext one. Last one [Patient/p]") == [
        quote,
        "Next one.",
        "Last one [Patient/p]",
    ]


def test_a_full_stop_after_the_citations_is_no_sentence_of_its_own():
    # Qwen2.5-Coder-1.5B (Q4_K_M) on the demo suite's "How old is Adán Portillo now?": the "."
    # after "[Patient/p]" was checked as a sentence, removed as citing nothing, and cost a retry
    text = "The patient's age is 73 years. [Patient/p]. He was born in 1947. [Patient/p]."
    assert split_sentences(text) == [
        "The patient's age is 73 years. [Patient/p]",
        "He was born in 1947. [Patient/p]",
    ]
    v = verify(text, {"Patient/p": "Patient p: male, born 1947-06-01, age 73 years"})
    assert v.rejected == [] and v.supported_fraction == 1.0


BP = {
    "Observation/bp": (
        "2020-10-17 Blood Pressure (LOINC 55284-4): Diastolic Blood Pressure 85.46 mm[Hg] "
        "(high; usual range 60–79); Systolic Blood Pressure 102.4 mm[Hg] [Observation/bp]"
    )
}


@pytest.mark.parametrize(
    ("sentence", "supported"),
    [
        # Qwen2.5-Coder-1.5B (Q4_K_M) on the demo suite's "What is the patient's latest blood
        # pressure?": one component given as the reading, every number in the evidence
        (
            "The patient's latest blood pressure is 85.46 mm[Hg] on 2020-10-17 [Observation/bp].",
            False,
        ),
        ("Her BP was 102.4 mm[Hg] [Observation/bp].", False),
        ("The one before was 85.46 mm[Hg] on 2020-10-17 [Observation/bp].", False),
        ("The latest blood pressure is 102.4/85.46 mm[Hg] on 2020-10-17 [Observation/bp].", True),
        ("The latest diastolic blood pressure is 85.46 mm[Hg] [Observation/bp].", True),
        ("Blood pressure was measured on 2020-10-17 [Observation/bp].", True),
    ],
)
def test_one_component_is_not_the_blood_pressure(sentence: str, supported: bool):
    check = check_sentence(sentence, BP)
    assert check.supported is supported, check.problems
    if not supported:
        assert [p for p in check.problems if "as the blood pressure" in p] == [
            check.problems[0]
        ]  # said once, though the line and a fact both hold the reading
    twice = {"Observation/bp": BP["Observation/bp"] + "\n" + BP["Observation/bp"][11:]}
    assert len(check_sentence(sentence, twice).problems) == (0 if supported else 1)


def test_facts_support_the_values_they_computed():
    facts = [
        _fact("Age on 2021-01-01: 73 years.", ("Patient/p",)),
        _fact("A1c mean 6.14 % over 10 results.", ("Observation/a1c",)),
    ]
    merged = evidence_map(EVIDENCE, facts)
    assert check_sentence("He is 73 years old [Patient/p].", merged).supported
    assert check_sentence("His mean A1c was 6.14 % [Observation/a1c].", merged).supported
    assert not check_sentence("He is 74 years old [Patient/p].", merged).supported


def test_bracketed_units_are_not_citations():
    line = "2017-11-17 Hemoglobin [Mass/volume] in Blood (LOINC 718-7) 14.14 g/dL [Observation/hb]"
    check = check_sentence(f"Latest hemoglobin: {line}.", {"Observation/hb": line})
    assert check.supported and check.citations == ("Observation/hb",)
    assert not check_sentence("Hemoglobin [Mass/volume] was 14.1.", {}).supported


A1C_LINE = (
    "2020-12-13 Hemoglobin A1c/Hemoglobin.total in Blood (LOINC 4548-4) 6.277 % [Observation/a]"
)


@pytest.mark.parametrize(
    ("sentence", "supported"),
    [
        ("His HbA1c was 6.3 % [Observation/a].", True),  # abbreviation ↔ the line's words
        ("His glycated hemoglobin was 6.277 % [Observation/a].", True),  # a synonym
        ("The patient has HIV [Observation/a].", False),  # an abbreviation the line lacks
        ("He has diabetes [Observation/a].", False),  # an A1c result is not a diagnosis
        ("He has hypertension [Observation/a].", False),  # a concept the line lacks
        ("His COPD is stable [Observation/a].", False),
    ],
)
def test_words_and_abbreviations_must_be_in_the_cited_evidence(sentence: str, supported: bool):
    check = check_sentence(sentence, {"Observation/a": A1C_LINE})
    assert check.supported is supported, check.problems
    if not supported:
        assert any("not in the cited evidence" in p for p in check.problems)


def test_what_a_fact_only_echoes_from_its_call_supports_nothing():
    patient = "Patient: Tommy Friesen, male, born 1947-06-15 [Patient/p]"
    window = "from 1999-01-01 to 2021-01-01"
    absence = f"No numeric A1c result {window}. [Patient/p]"
    given = evidence_map({"Patient/p": patient}, [_fact(absence, ("Patient/p",), (window,))])
    # the tool's own statement stands, word for word
    assert verify(absence, given, [absence]).supported_fraction == 1.0
    # but a model cannot borrow the window's dates for a claim of its own
    claim = verify("He was seen on 1999-01-01 [Patient/p].", given, [absence])
    assert not claim.sentences[0].supported
    assert "1999-01-01" in claim.sentences[0].problems[0]
    # without the echo marked, the date would have passed
    loose = evidence_map({"Patient/p": patient}, [_fact(absence, ("Patient/p",))])
    assert verify("He was seen on 1999-01-01 [Patient/p].", loose).supported_fraction == 1.0


def test_a_fact_citing_many_results_is_read_once_per_sentence():
    """A mean over 1,000 results cites each of them: every id holds its line and the statement as
    separate pieces, and a sentence citing them all is checked against the statement once."""
    lines = {
        f"Observation/g{i}": f"2026-01-{i % 28 + 1:02d} Glucose: {100 + i % 50} mg/dL"
        for i in range(1000)
    }
    statement = "Glucose from 2025-12-01 to 2026-11-29: 1000 results, mean 124.5 mg/dL."
    merged = evidence_map(lines, [_fact(statement, tuple(lines))])
    assert all(merged[ref].split("\n") == [lines[ref], statement] for ref in lines)
    sentence = statement[:-1] + " " + " ".join(f"[{ref}]" for ref in lines) + "."
    check = check_sentence(sentence, merged)
    assert check.supported, check.problems
    wrong = check_sentence(sentence.replace("124.5", "131.5"), merged)
    assert wrong.problems == ("the number 131.5 is not in the cited evidence",)


@pytest.mark.parametrize(
    "sentence",
    [
        "The last HbA1c was 13.7 g/dL [Observation/hb].",
        "His hemoglobin A1c was 13.7 [Observation/hb].",
        "Glycated hemoglobin 13.7 [Observation/hb].",
        "The last LDL was 45 mg/dL [Observation/hdl].",
        "Latest LDL cholesterol was 210 mg/dL [Observation/chol].",
        "Sodium was 45 [Observation/hdl].",
    ],
)
def test_a_sentence_about_another_test_than_it_cites_is_rejected(sentence: str):
    """The concept a sentence names must be the one its evidence measures: a hemoglobin line does
    not support an A1c, nor an HDL or total cholesterol line an LDL."""
    evidence = {
        "Observation/hb": "2024-05-01 Hemoglobin [Mass/volume] in Blood (LOINC 718-7) 13.7 g/dL",
        "Observation/chol": "2024-05-01 Cholesterol [Mass/volume] in Serum or Plasma (LOINC 2093-3) 210 mg/dL",
        "Observation/hdl": "2024-05-01 Cholesterol in HDL [Mass/volume] in Serum or Plasma (LOINC 2085-9) 45 mg/dL",
    }
    check = check_sentence(sentence, evidence)
    assert not check.supported and "is not in the cited evidence" in check.problems[0]
    assert check_sentence("The last hemoglobin was 13.7 g/dL [Observation/hb].", evidence).supported


def test_a_drug_or_drug_class_must_be_in_what_the_sentence_cites():
    given = {
        "MedicationRequest/f": "2020-07-06 Medication: Lasix 40mg (RxNorm 315971), active "
        "[MedicationRequest/f]",
        "Observation/ldl": "2020-01-01 Low Density Lipoprotein Cholesterol 90.22 mg/dL "
        "[Observation/ldl]",
    }
    # the cases found by hand and through a 1.5B model (issue 12)
    assert not verify("He is on atorvastatin 40mg daily [MedicationRequest/f].", given).kept
    statin = verify(
        "The patient is on a statin, and the last LDL was 90.22 mg/dL [Observation/ldl].", given
    )
    assert (
        not statin.kept and "'statin' is not in the cited evidence" in statin.rejected[0].problems
    )
    # a brand is its ingredient; a class is any of its members
    for claim in (
        "He takes furosemide",
        "He is on Lasix",
        "He is on a loop diuretic",
        "He is on a diuretic",
    ):
        assert verify(f"{claim} [MedicationRequest/f].", given).supported_fraction == 1.0, claim
    assert not verify("He is on a thiazide [MedicationRequest/f].", given).kept
    # a tool's absence names the class, so "not on a statin" stands on it
    absence = _fact(
        "No: none of the 1 active medication is a statin (searched by ingredient: atorvastatin; "
        "ATC C10AA). [Patient/p]",
        ("Patient/p",),
    )
    merged = evidence_map({"Patient/p": "Patient p [Patient/p]"}, [absence])
    assert verify("He is not on a statin [Patient/p].", merged).supported_fraction == 1.0


# Issue 12: the verifier checks claims, not only numbers. The lines below are written as
# ``retrieval.evidence`` compacts the resources and as the tools state their facts.
PATIENT = "Patient: Tommy Friesen, male, born 1947-06-15 [Patient/p]"
CLAIMS = {
    "Patient/p": PATIENT,
    "Condition/stroke": "2019-03-02 Condition: Stroke, resolved, resolved 2019-04-01 "
    "[Condition/stroke]",
    "Condition/stroke-active": "2019-03-02 Condition: Stroke, active [Condition/stroke-active]",
    "Condition/stroke-refuted": "2019-03-02 Condition: Stroke, ruled out (verification status "
    "refuted) [Condition/stroke-refuted]",
    "Condition/stroke-void": "2019-03-02 Condition: Stroke, active (entered-in-error) "
    "[Condition/stroke-void]",
    "Condition/fracture": "2018-05-01 Condition: Fracture of hip (disorder), active "
    "[Condition/fracture]",
    "AllergyIntolerance/pcn": "2010-01-01 Allergy: Penicillin, criticality high, active "
    "[AllergyIntolerance/pcn]",
    "Observation/bp": "2020-12-13 Blood Pressure (LOINC 55284-4): Diastolic Blood Pressure "
    "85.5 mm[Hg] (high; usual range 60–79); Systolic Blood Pressure 108.3 mm[Hg] "
    "[Observation/bp]",
    "Observation/k": "2020-12-13 Potassium [Moles/volume] in Serum or Plasma (LOINC 6298-4) "
    "4.2 mmol/L (ref 3.5–5.1) [Observation/k]",
    "Observation/na": "2020-12-13 Sodium [Moles/volume] in Serum or Plasma (LOINC 2947-0) "
    "139 mmol/L [Observation/na]",
    "Observation/a1c": A1C_LINE.replace("[Observation/a]", "(high; usual range 4–5.6) "),
    "Observation/glucose": "2020-12-13 Glucose [Mass/volume] in Blood (LOINC 2339-0) 1,078 mg/dL "
    "(critically high; ref 70–99) [Observation/glucose]",
    "MedicationRequest/f": "2020-07-06 Medication: Lasix 40mg (RxNorm 315971), active "
    "[MedicationRequest/f]",
    "MedicationRequest/w": "2015-02-01 Medication: Warfarin Sodium 5 MG Oral Tablet, stopped "
    "[MedicationRequest/w]",
    "MedicationRequest/w-active": "2020-02-01 Medication: Warfarin Sodium 5 MG Oral Tablet, "
    "active [MedicationRequest/w-active]",
    "MedicationRequest/w-void": "2020-02-01 Medication: Warfarin Sodium 5 MG Oral Tablet, "
    "entered in error [MedicationRequest/w-void]",
    "MedicationRequest/w-held": "2020-02-01 Medication: Warfarin Sodium 5 MG Oral Tablet, "
    "on hold [MedicationRequest/w-held]",
}
NO_A1C = (
    "No HbA1c result in the record: none of its 12 Observations has LOINC 4548-4 or the name "
    "'HbA1c'. [Patient/p]"
)
NO_ANTICOAGULANT = (
    "No: none of the 1 active medication is an anticoagulant (searched by ingredient: warfarin, "
    "heparin; ATC B01AA). [Patient/p]"
)
NO_DIABETES = "No diabetes diagnosis is in the record's conditions. [Patient/p]"


def _claims(*facts: str) -> dict[str, str]:
    return evidence_map(CLAIMS, [_fact(s, ("Patient/p",)) for s in facts])


@pytest.mark.parametrize(
    "sentence",
    [
        "The patient did not have a stroke [Condition/stroke].",
        "He has no history of stroke [Condition/stroke-active].",
        "He denies any stroke [Condition/stroke].",
        "A stroke was ruled out [Condition/stroke-active].",
        "Stroke is absent [Condition/stroke].",
        "He has never had a hip fracture [Condition/fracture].",  # by the cited line's words
        "He has no known allergies [AllergyIntolerance/pcn].",
        "He no longer has a stroke [Condition/stroke-active].",  # active, not past
        "He has had a stroke [Condition/stroke-refuted].",  # affirmed, but ruled out
        "He has had a stroke [Condition/stroke-void].",  # entered in error: the record says nil
        "He has diabetes [Patient/p].",  # the cited absence says none is recorded
        "A stroke is not recorded [Condition/stroke-active].",
    ],
)
def test_a_claim_whose_cited_evidence_says_the_opposite_is_rejected(sentence: str):
    check = check_sentence(sentence, _claims(NO_DIABETES))
    assert not check.supported
    assert any("the cited evidence" in p for p in check.problems), check.problems


@pytest.mark.parametrize(
    "sentence",
    [
        "He had a stroke, now resolved [Condition/stroke].",
        "The stroke is no longer active [Condition/stroke].",
        "He no longer has a stroke [Condition/stroke].",  # resolved
        "A stroke was ruled out [Condition/stroke-refuted].",
        "He did not have a stroke [Condition/stroke-refuted].",
        "He has an active stroke [Condition/stroke-active].",
        "No diabetes diagnosis is recorded [Patient/p].",
        "He does not have diabetes [Patient/p].",
        "He is allergic to penicillin [AllergyIntolerance/pcn].",
        "Stroke was not ruled out [Condition/stroke-active].",
        "The visit note found no signs of stroke [DocumentReference/n].",  # the note's own words
        "He does not smoke [Observation/smoking].",  # a status, not a diagnosis denied
    ],
)
def test_a_claim_that_agrees_with_its_cited_evidence_stands(sentence: str):
    given = {
        **_claims(NO_DIABETES),
        "DocumentReference/n": "2020-01-02 Visit note: no signs of stroke; BP normal "
        "[DocumentReference/n]",
        "Observation/smoking": "2020-01-01 Tobacco smoking status NHIS (LOINC 72166-2) Former "
        "smoker [Observation/smoking]",
    }
    check = check_sentence(sentence, given)
    assert check.supported, check.problems


@pytest.mark.parametrize(
    ("sentence", "supported"),
    [
        ("His blood pressure is normal [Observation/bp].", False),  # diastolic flagged high
        ("His diastolic pressure was within range [Observation/bp].", False),
        ("His diastolic pressure was high [Observation/bp].", True),
        ("His systolic pressure was normal [Observation/bp].", True),  # no flag on systolic
        ("His blood pressure was elevated [Observation/bp].", True),
        ("His potassium is high [Observation/k].", False),  # within its reference range
        ("His potassium is abnormal [Observation/k].", False),
        ("His potassium is low [Observation/k].", False),
        ("His potassium is normal [Observation/k].", True),
        ("His potassium is not elevated [Observation/k].", True),
        ("His sodium is elevated [Observation/na].", False),  # within the table's usual range
        ("His sodium is unremarkable [Observation/na].", True),
        ("His A1c was unremarkable [Observation/a1c].", False),
        ("His A1c was not normal [Observation/a1c].", True),
        ("His HbA1c is low [Observation/a1c].", False),  # the flag says high
        ("The last low density lipoprotein was 90.22 mg/dL [Observation/ldl].", True),
        ("His HbA1c of 6.3 % is above the normal range [Observation/a1c].", True),  # not "normal"
        ("His HbA1c of 6.3 % is within the normal range [Observation/a1c].", False),
        ("Diastolic was high, while systolic was normal [Observation/bp].", True),  # per clause
        ("His potassium is normal, not high [Observation/k].", True),
    ],
)
def test_normal_or_abnormal_must_agree_with_the_cited_flag(sentence: str, supported: bool):
    evidence = {
        **CLAIMS,
        "Observation/ldl": "2020-01-01 Low Density Lipoprotein Cholesterol 90.22 mg/dL "
        "[Observation/ldl]",
    }
    check = check_sentence(sentence, evidence)
    assert check.supported is supported, check.problems


@pytest.mark.parametrize(
    "sentence",
    [
        "The evidence supporting this answer is: [Condition/stroke].",
        "See the cited records [Condition/stroke, Observation/k].",
        "Sources: [Observation/k]",
        "For more details, see the following record entries: [Observation/k].",
        # Qwen2.5-Coder-1.5B following rule 4 of the system prompt ("cite the closest evidence")
        "The closest evidence is from the record [Observation/k].",
        "The most relevant related records: [Observation/k]",
        # a list's lead-in, uncited (Qwen2.5-Coder-1.5B on "latest labs"): no claim of its own
        "The patient's latest labs are:",
    ],
)
def test_a_sentence_that_asserts_nothing_is_not_an_answer(sentence: str):
    check = check_sentence(sentence, CLAIMS)
    assert not check.supported and check.problems == ("asserts nothing",)
    # it neither counts for nor against the answer's share of supported claims
    v = verify(f"His potassium was 4.2 mmol/L [Observation/k]. {sentence}", CLAIMS)
    assert [s.supported for s in v.sentences] == [True, False]
    assert v.supported_fraction == 1.0
    alone = verify(sentence, CLAIMS)
    assert alone.kept == [] and alone.supported_fraction == 0.0


@pytest.mark.parametrize(
    ("sentence", "supported"),
    [
        ("Yes, he is on an anticoagulant [Patient/p].", False),  # the cited fact says no
        ("Yes, he is on an anticoagulant [MedicationRequest/f].", False),  # furosemide
        ("Yes, he is on an anticoagulant [MedicationRequest/w].", False),  # stopped in 2015
        ("He takes warfarin [MedicationRequest/w].", False),
        ("He's on warfarin [MedicationRequest/w].", False),
        ("He is not on warfarin [MedicationRequest/w-active].", False),
        ("He takes warfarin [MedicationRequest/w-void].", False),  # entered in error
        ("He is not on warfarin [MedicationRequest/w-held].", False),  # on hold is current
        ("He is on warfarin, on hold [MedicationRequest/w-held].", True),
        ("No, he is not on an anticoagulant [Patient/p].", True),
        ("He was on warfarin until 2015 [MedicationRequest/w].", True),
        ("He is no longer on warfarin [MedicationRequest/w].", True),
        ("Yes, he is on an anticoagulant [MedicationRequest/w-active].", True),
        ("Yes, he is on a diuretic [MedicationRequest/f].", True),
    ],
)
def test_a_yes_or_no_drug_claim_rests_on_what_it_cites(sentence: str, supported: bool):
    check = check_sentence(sentence, _claims(NO_ANTICOAGULANT))
    assert check.supported is supported, check.problems


def test_an_absence_the_tool_states_is_citable():
    given = _claims(NO_A1C)
    for sentence in (
        "No HbA1c is recorded [Patient/p].",
        "There is no HbA1c result in the record [Patient/p].",
        "The record has no hemoglobin A1c [Patient/p].",
    ):
        assert check_sentence(sentence, given).supported, sentence
    # but the absence does not support a value
    assert not check_sentence("His HbA1c was 6.1 % [Patient/p].", given).supported
    assert not check_sentence("He had an HbA1c in 2019 [Patient/p].", given).supported


def test_numbers_and_dates_from_the_question_are_not_claims_about_the_record():
    window = "from 2018-01-01 to 2021-01-01"
    absence = f"No numeric A1c result {window}. [Patient/p]"
    given = evidence_map(CLAIMS, [_fact(absence, ("Patient/p",), (window,))])
    question = "Any HbA1c over the last 3 years, since 2018-01-01?"
    for sentence in (
        "No HbA1c was recorded over the last 3 years [Patient/p].",
        "No HbA1c was recorded in the past 3 years [Patient/p].",
        "No A1c result since 2018-01-01 [Patient/p].",
    ):
        check = verify(sentence, given, question=question).sentences[0]
        assert check.supported, (sentence, check.problems)
        # without the question the number is unsupported
        assert not verify(sentence, given).sentences[0].supported
    # a number or date of the question stated as a result or an event is still checked
    for sentence in (
        "His HbA1c was 3 % [Patient/p].",
        "He was 3 years old [Patient/p].",
        "His HbA1c was taken on 2018-01-01 [Patient/p].",
    ):
        assert not verify(sentence, given, question=question).sentences[0].supported, sentence


def test_html_escapes_from_chat_templates_are_read_as_text():
    v = verify(
        "The patient&#39;s potassium was 4.2 mmol/L &amp; in range [Observation/k]. "
        "&quot;Stroke&quot; was recorded [Condition/stroke].",
        CLAIMS,
    )
    assert v.supported_fraction == 1.0, v.sentences
    assert v.text.startswith("The patient's potassium")


@pytest.mark.parametrize(
    "sentence",
    [
        "He takes Lasix 40 mg [MedicationRequest/f].",
        "He takes Lasix 40mg [MedicationRequest/f].",
        "The glucose was 1,078 mg/dl [Observation/glucose].",
        "The glucose was 1078 mg/dL [Observation/glucose].",
        "Potassium 4.20 mmol/l [Observation/k].",
        "Sodium 139.0 mmol/L [Observation/na].",
    ],
)
def test_surface_forms_of_numbers_and_units_are_one(sentence: str):
    check = check_sentence(sentence, CLAIMS)
    assert check.supported, check.problems


def test_a_number_glued_to_its_unit_is_still_checked():
    check = check_sentence("He takes Lasix 80mg [MedicationRequest/f].", CLAIMS)
    assert check.problems == ("the number 80 is not in the cited evidence",)
    assert not check_sentence(
        "The glucose was 1,079 mg/dL [Observation/glucose].", CLAIMS
    ).supported


@pytest.mark.parametrize(
    "sentence",
    [
        "He has a history of stroke [Condition/stroke].",
        "The patient's chart records a stroke [Condition/stroke].",
        "His medical history includes a stroke in 2019 [Condition/stroke].",
        "A stroke is in the patient record [Condition/stroke].",
        "He has a diagnosis of stroke [Condition/stroke].",
    ],
)
def test_generic_words_are_not_clinical_concepts(sentence: str):
    check = check_sentence(sentence, CLAIMS)
    assert check.supported, check.problems
