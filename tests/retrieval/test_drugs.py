"""The drug class table (``retrieval/drugs.toml``) on real product names: the medication displays
of the SMART Synthea sample and the demo patients (RxNorm SCD/SBD/BPCK names), labelled here by
hand, class by class."""

from __future__ import annotations

import pytest

from retrieval.drugs import default_drugs

# display → the classes a clinician puts it in (only the classes of the table)
LABELLED = {
    "Warfarin Sodium 5 MG Oral Tablet": {"anticoagulant", "antithrombotic"},
    "Clopidogrel 75 MG Oral Tablet": {"antiplatelet", "antithrombotic"},
    "Aspirin 81 MG Oral Tablet": {"antiplatelet", "antithrombotic"},
    "24 HR metoprolol succinate 100 MG Extended Release Oral Tablet [Toprol]": {
        "beta blocker",
        "antihypertensive",
    },
    "Lasix 40mg": {"loop diuretic", "diuretic", "antihypertensive"},
    "10 ML Furosemide 10 MG/ML Injection": {"loop diuretic", "diuretic", "antihypertensive"},
    "Hydrochlorothiazide 25 MG": {"thiazide diuretic", "diuretic", "antihypertensive"},
    "Amlodipine 5 MG Oral Tablet": {"calcium channel blocker", "antihypertensive"},
    "Verapamil Hydrochloride 40 MG": {"calcium channel blocker", "antihypertensive"},
    "Captopril 25 MG Oral Tablet": {"ACE inhibitor", "antihypertensive"},
    "Simvastatin 20 MG Oral Tablet": {"statin"},
    "Acetaminophen 325 MG / HYDROcodone Bitartrate 7.5 MG Oral Tablet": {"opioid"},
    "Acetaminophen 300 MG / HYDROcodone Bitartrate 5 MG [Vicodin]": {"opioid"},
    "Meperidine Hydrochloride 50 MG Oral Tablet": {"opioid"},
    "Abuse-Deterrent 12 HR Oxycodone Hydrochloride 15 MG Extended Release Oral Tablet": {"opioid"},
    "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet": {"antibiotic"},
    "Penicillin V Potassium 250 MG Oral Tablet": {"antibiotic"},
    "Nitrofurantoin 5 MG/ML Oral Suspension": {"antibiotic"},
    "Doxycycline Monohydrate 50 MG Oral Tablet": {"antibiotic"},
    "Ibuprofen 200 MG Oral Tablet": {"NSAID"},
    "Naproxen sodium 220 MG Oral Tablet": {"NSAID"},
    "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler": {"inhaler"},
    "60 ACTUAT Fluticasone propionate 0.25 MG/ACTUAT / salmeterol 0.05 MG/ACTUAT Dry Powder Inhaler": {
        "inhaler",
        "corticosteroid",
    },
    "Hydrocortisone 10 MG/ML Topical Cream": {"corticosteroid"},
    "Levora 0.15/30 28 Day Pack": {"hormonal contraceptive"},
    "Natazia 28 Day Pack": {"hormonal contraceptive"},
    "NuvaRing 0.12/0.015 MG per 24HR 21 Day Vaginal Ring": {"hormonal contraceptive"},
    "Mirena 52 MG Intrauterine System": {"hormonal contraceptive"},
    "1 ML medroxyprogesterone acetate 150 MG/ML Injection": {"hormonal contraceptive"},
    "Carbamazepine[Tegretol]": {"antiepileptic"},
    "Clonazepam [Klonopin]": {"benzodiazepine"},
    "Diazepam [Valium]": {"benzodiazepine"},
    # in no class of the table
    "Acetaminophen 325 MG Oral Tablet": set(),
    "Digoxin 0.125 MG Oral Tablet": set(),
    "Galantamine 4 MG Oral Tablet": set(),
    "Alendronic acid 10 MG Oral Tablet": set(),
    "Alteplase 100 MG Injection": set(),
    "NDA020800 0.3 ML Epinephrine 1 MG/ML Auto-Injector": set(),
    "Loratadine 10 MG Oral Tablet": set(),
    "ferrous sulfate 325 MG Oral Tablet": set(),
}


@pytest.mark.parametrize("display", sorted(LABELLED))
def test_products_fall_in_their_classes(display: str):
    table = default_drugs()
    assert {c.name for c in table.classes if c.members_in(display)} == LABELLED[display]


@pytest.mark.parametrize(
    ("question", "named", "classes"),
    [
        ("Is he on a beta blocker?", ["beta blocker"], ["beta blocker"]),
        ("Any blood thinners?", ["blood thinners"], ["anticoagulant"]),
        ("Is he anticoagulated?", ["anticoagulated"], ["anticoagulant"]),
        ("On ACE inhibitors or ARBs?", ["ace inhibitors", "arbs"], ["ACE inhibitor", "angiotensin receptor blocker"]),
        ("Is she on birth control?", ["birth control"], ["hormonal contraceptive"]),
        ("Is he taking Lasix?", ["lasix"], ["furosemide"]),
        ("Is she on warfarin or aspirin?", ["warfarin", "aspirin"], ["warfarin", "aspirin"]),
        ("Is this an arbitrary question about statistics?", [], []),
        ("What was his last potassium?", [], []),
    ],
)  # fmt: skip
def test_questions_name_classes_and_drugs(question: str, named: list[str], classes: list[str]):
    table = default_drugs()
    assert table.named_in(question) == named
    assert [table.get(w).name for w in named] == classes  # type: ignore[union-attr]


def test_a_class_includes_its_subclasses_and_a_drug_is_a_class_of_one():
    table = default_drugs()
    diuretic = table.get("diuretics")
    assert diuretic is not None and {"furosemide", "hydrochlorothiazide", "spironolactone"} <= set(
        diuretic.ingredients
    )
    antihypertensive = table.get("antihypertensive")
    assert antihypertensive is not None
    assert {"lisinopril", "losartan", "metoprolol", "amlodipine", "furosemide", "clonidine"} <= set(
        antihypertensive.ingredients
    )
    lasix = table.get("Lasix")
    assert lasix is not None and lasix.ingredients == ("furosemide",) and lasix.atc == ()
    assert lasix.members_in("Lasix 40mg") == ["furosemide"]
    assert table.get("homeopathy") is None
    # a word inside another word is not a drug: "insulinoma" is not insulin
    assert table.get("insulin").members_in("Insulinoma resection") == []  # type: ignore[union-attr]
