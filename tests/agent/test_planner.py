"""The rule planner on its own: a question's words → the tool calls it plans, with their arguments;
the periods, windows, test names and follow-ups it reads from those words."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from agent.planner import (
    Plan,
    PlannedCall,
    analyte_words,
    explicit_period,
    is_follow_up,
    plan,
    window_days,
)
from retrieval.terms import Term, TermTable


def _calls(question: str, terms: TermTable | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [(c.tool, c.args) for c in plan(question, terms).calls]


def _iso(day: str, end: bool = False) -> str:
    return f"{day}T23:59:59.999999+00:00" if end else f"{day}T00:00:00+00:00"


@pytest.mark.parametrize(
    ("question", "calls"),
    [
        # a test in the term table, as the clinician wrote it
        ("What was his last HbA1c?", [("latest_observation", {"query": "HbA1c"})]),
        ("hemoglobin a1c last value", [("latest_observation", {"query": "hemoglobin a1c"})]),
        (
            "What was his blood pressure and heart rate?",
            [
                ("latest_observation", {"query": "blood pressure"}),
                ("latest_observation", {"query": "heart rate"}),
            ],
        ),
        # a statistic: observation_stats only, not also the latest value
        ("What is the average BMI?", [("observation_stats", {"query": "BMI"})]),
        (
            "What was his min glucose?",
            [("observation_stats", {"query": "glucose", "focus": "lowest"})],
        ),
        (
            "how many times was glucose measured",
            [("observation_stats", {"query": "glucose", "focus": "count"})],
        ),
        ("how has his weight changed?", [("observation_stats", {"query": "weight"})]),
        ("HbA1c change over time", [("observation_stats", {"query": "HbA1c"})]),
        # a window: statistics over it, and the latest value (which does not take the window)
        (
            "average glucose over the last 3 months",
            [("observation_stats", {"query": "glucose", "days": 3 * 30.4375})],
        ),
        (
            "glucose in the last two weeks",
            [
                ("observation_stats", {"query": "glucose", "days": 14}),
                ("latest_observation", {"query": "glucose"}),
            ],
        ),
        # an explicit period: every call takes it, as ISO strings, and it wins over a window
        (
            "highest glucose in 2019",
            [
                (
                    "observation_stats",
                    {
                        "query": "glucose",
                        "since": _iso("2019-01-01"),
                        "until": _iso("2019-12-31", end=True),
                        "focus": "highest",
                    },
                )
            ],
        ),
        (
            "glucose since 2019",
            [("latest_observation", {"query": "glucose", "since": _iso("2019-01-01")})],
        ),
        (
            "average glucose in the last 6 months since 2019",
            [("observation_stats", {"query": "glucose", "since": _iso("2019-01-01")})],
        ),
        # a test the term table lacks is looked up by its name
        ("What is the patient's creatinine?", [("latest_observation", {"query": "creatinine"})]),
        ("What's his latest sodium?", [("latest_observation", {"query": "sodium"})]),
        # diagnoses: that diagnosis, any status; a measured condition is also looked up as a value
        ("Is the patient diabetic?", [("condition_history", {"query": "diabetic"})]),
        ("Does he suffer from asthma?", [("condition_history", {"query": "asthma"})]),
        ("Has he ever had a stroke?", [("condition_history", {"query": "stroke"})]),
        (
            "Is his hypertension controlled?",  # the status cannot say: it and the readings
            [
                ("condition_history", {"query": "hypertension", "judged": "controlled"}),
                ("latest_observation", {"query": "blood pressure"}),
            ],
        ),
        (
            "Any history of diabetes or hypertension?",
            [
                ("condition_history", {"query": "diabetes"}),
                ("condition_history", {"query": "hypertension"}),
            ],
        ),
        (
            "Does she have a fever?",
            [
                ("latest_observation", {"query": "fever"}),
                ("condition_history", {"query": "fever"}),
            ],
        ),
        (
            "Does he have diabetes and what was his last a1c?",
            [  # answered in the order asked
                ("condition_history", {"query": "diabetes"}),
                ("latest_observation", {"query": "a1c"}),
            ],
        ),
        # the lists
        ("What problems does he have?", [("active_problems", {})]),
        ("What are his current medications?", [("active_medications", {})]),
        ("Was he prescribed metformin?", [("medication_use", {"query": "metformin"})]),
        ("What are his latest labs?", [("recent_results", {"category": "laboratory"})]),
        ("Any recent blood work?", [("recent_results", {"category": "laboratory"})]),
        ("What were his last vitals?", [("recent_results", {"category": "vital-signs"})]),
        ("Is he on a beta blocker?", [("medication_use", {"query": "beta blocker"})]),
        ("Any blood thinners?", [("medication_use", {"query": "blood thinners"})]),
        ("Is she on birth control?", [("medication_use", {"query": "birth control"})]),
        # a test's name inside a drug class's name is the class's, not a result to look up
        (
            "Is she on a calcium channel blocker?",
            [("medication_use", {"query": "calcium channel blocker"})],
        ),
        (
            "Is he on a potassium-sparing diuretic?",
            [("medication_use", {"query": "potassium-sparing diuretic"})],
        ),
        (
            "Her calcium, and is she on a calcium channel blocker?",
            [
                ("latest_observation", {"query": "calcium"}),
                ("medication_use", {"query": "calcium channel blocker"}),
            ],
        ),
        (
            "List his medications; is he on a statin?",
            [("medication_use", {"query": "statin"}), ("active_medications", {})],
        ),
        ("Is he allergic to aspirin?", [("allergies", {})]),
        ("Any allergies?", [("allergies", {})]),
        ("Any surgery?", [("recent_procedures", {})]),
        # a procedure named: yes or no first, from the record's Procedures
        ("Has he had a colonoscopy?", [("procedure_history", {"query": "colonoscopy"})]),
        ("When was her last mammogram?", [("procedure_history", {"query": "mammogram"})]),
        ("Did he have bypass surgery?", [("procedure_history", {"query": "bypass surgery"})]),
        (
            "Does he have diabetes, and has he had an echo?",
            [
                ("condition_history", {"query": "diabetes"}),
                ("procedure_history", {"query": "echo"}),
            ],
        ),
        ("What was his most recent visit?", [("recent_encounters", {})]),
        ("When was his last admission?", [("recent_encounters", {})]),
        ("Has he been seen recently?", [("recent_encounters", {})]),
        # demographics and age
        ("What is his age and sex?", [("age", {}), ("demographics", {})]),
        ("Is he alive?", [("demographics", {})]),
        ("What is the patient's name?", [("demographics", {})]),
        # what changed: in the period asked, else the last year; a named series is that series'
        (
            "What changed in 2020?",
            [
                (
                    "changes_in_period",
                    {"since": _iso("2020-01-01"), "until": _iso("2020-12-31", end=True)},
                )
            ],
        ),
        ("anything new?", [("changes_in_period", {"days": 365})]),
        ("What changed in his creatinine?", [("observation_stats", {"query": "creatinine"})]),
        # kidney function: creatinine and eGFR (computed by CKD-EPI 2021 when none is recorded)
        (
            "How is his kidney function?",
            [
                ("latest_observation", {"query": "kidney function"}),
                ("latest_observation", {"query": "eGFR"}),
            ],
        ),
    ],
)
def test_a_question_plans_these_calls(question: str, calls: list[tuple[str, dict[str, Any]]]):
    assert _calls(question) == calls


@pytest.mark.parametrize(
    ("question", "calls"),
    [
        # the words that ask for encounters are not the name of a test
        ("When was he last seen?", [("recent_encounters", {})]),
        ("When was he last admitted?", [("recent_encounters", {})]),
        ("When was she last hospitalized?", [("recent_encounters", {})]),
        # a request word alone is not the name of a test
        ("What is the latest?", []),
        ("What was the most recent?", []),
        ("What is the trend?", []),
        # "is he on ...?" and a drug named ask for the medications
        ("Is he on insulin?", [("medication_use", {"query": "insulin"})]),
        ("Is she on lisinopril?", [("medication_use", {"query": "lisinopril"})]),
        ("Does he take metformin?", [("medication_use", {"query": "metformin"})]),
    ],
)
def test_request_words_plan_their_list_not_a_test(
    question: str, calls: list[tuple[str, dict[str, Any]]]
):
    assert _calls(question) == calls


@pytest.mark.parametrize(
    ("question", "images"),
    [
        ("Any imaging?", True),
        ("Any CT scan?", True),
        ("Any CT?", True),
        ("Has he had a CT?", True),
        ("CT chest results", True),
        ("show me the x-ray", True),
        ("Any MRI of the knee?", True),
        ("What was his last HbA1c?", False),
        ("Is he a direct relative?", False),
    ],
)
def test_imaging_words_plan_images(question: str, images: bool):
    p = plan(question)
    assert p.images is images
    assert (PlannedCall("imaging") in p.calls) is images


@pytest.mark.parametrize(
    ("question", "similar"),
    [
        ("Find patients like this", True),
        ("Any similar cases?", True),
        ("How did other patients do?", True),
        ("What was his last HbA1c?", False),
    ],
)
def test_similar_case_words_ask_for_similar_cases(question: str, similar: bool):
    assert plan(question).similar_cases is similar


@pytest.mark.parametrize(
    "question", ["", "   ", "Hello", "thanks!", "What about June?", "and before that?"]
)
def test_a_question_it_cannot_plan_is_an_empty_plan(question: str):
    p = plan(question)
    assert p.calls == [] and not p.images and not p.similar_cases


def test_the_plan_uses_the_term_table_it_is_given():
    zinc = Term(words=("zinc", "zn"), codes=frozenset({"http://loinc.org|5763-5"}), unit="ug/dL")
    gout = Term(words=("gout",), codes=frozenset({"http://snomed.info/sct|90560007"}))
    table = TermTable([zinc, gout])
    assert _calls("zn trend", table) == [("observation_stats", {"query": "zn"})]
    assert _calls("zn trend") == []  # the shipped table has no zinc
    assert _calls("any gout?", table) == [("condition_history", {"query": "gout"})]
    # glucose is the shipped table's; this one does not know it, so it is found by its name
    assert _calls("What was his last glucose?", table) == [
        ("latest_observation", {"query": "glucose"})
    ]
    assert _calls("glucose trend", table) == []


def test_a_phrase_inside_a_longer_term_belongs_to_the_longer_one():
    hb = Term(words=("hemoglobin",), codes=frozenset({"http://loinc.org|718-7"}), unit="g/dL")
    a1c = Term(words=("hemoglobin a1c",), codes=frozenset({"http://loinc.org|4548-4"}), unit="%")
    assert _calls("last hemoglobin a1c?", TermTable([hb, a1c])) == [
        ("latest_observation", {"query": "hemoglobin a1c"})
    ]


def test_a_plan_holds_each_call_once():
    p = Plan()
    p.add("latest_observation", query="glucose")
    p.add("latest_observation", query="glucose")
    p.add("latest_observation", query="a1c")
    p.add("allergies")
    p.add("allergies")
    assert p.calls == [
        PlannedCall("latest_observation", {"query": "glucose"}),
        PlannedCall("latest_observation", {"query": "a1c"}),
        PlannedCall("allergies"),
    ]


def _utc(year: int, month: int, day: int, end: bool = False) -> datetime:
    """Midnight UTC of a day, or with ``end`` its last microsecond (the inclusive end)."""
    if end:
        return datetime(year, month, day, 23, 59, 59, 999999, tzinfo=UTC)
    return datetime(year, month, day, tzinfo=UTC)


@pytest.mark.parametrize(
    ("question", "since", "until"),
    [
        ("glucose in 2019", _utc(2019, 1, 1), _utc(2019, 12, 31, end=True)),
        ("glucose during 2019", _utc(2019, 1, 1), _utc(2019, 12, 31, end=True)),
        ("glucose for 2019", _utc(2019, 1, 1), _utc(2019, 12, 31, end=True)),
        ("glucose in 1999", _utc(1999, 1, 1), _utc(1999, 12, 31, end=True)),
        # month names, abbreviated, with a dot, any case; a month's last day (leap years too)
        ("glucose in Feb 2020", _utc(2020, 2, 1), _utc(2020, 2, 29, end=True)),
        ("glucose in Feb 2019", _utc(2019, 2, 1), _utc(2019, 2, 28, end=True)),
        ("glucose in Sept 2019", _utc(2019, 9, 1), _utc(2019, 9, 30, end=True)),
        ("glucose in May 2019", _utc(2019, 5, 1), _utc(2019, 5, 31, end=True)),
        ("glucose in december 2019", _utc(2019, 12, 1), _utc(2019, 12, 31, end=True)),
        ("glucose since Mar. 2019", _utc(2019, 3, 1), None),
        # days, written three ways
        ("glucose on 2019-03-17", _utc(2019, 3, 17), _utc(2019, 3, 17, end=True)),
        ("glucose on March 17th, 2019", _utc(2019, 3, 17), _utc(2019, 3, 17, end=True)),
        ("glucose on 17 March 2019", _utc(2019, 3, 17), _utc(2019, 3, 17, end=True)),
        # open periods: "since" includes the date, "after" starts after it; "before" ends before
        # it, "until", "till", "through" and "up to" include it
        ("glucose since 2019", _utc(2019, 1, 1), None),
        ("glucose from 2019", _utc(2019, 1, 1), None),
        ("glucose after 2019", _utc(2020, 1, 1), None),
        ("glucose after 2019-12-31", _utc(2020, 1, 1), None),
        ("glucose before March 2019", None, _utc(2019, 2, 28, end=True)),
        ("glucose till 2019", None, _utc(2019, 12, 31, end=True)),
        ("glucose through 2019", None, _utc(2019, 12, 31, end=True)),
        ("glucose up to 2019-06-30", None, _utc(2019, 6, 30, end=True)),
        # two ends, to the end of the second one's interval, across a year
        ("glucose between 2019 and 2020", _utc(2019, 1, 1), _utc(2020, 12, 31, end=True)),
        (
            "glucose between March 2019 and 2020-06",
            _utc(2019, 3, 1),
            _utc(2020, 6, 30, end=True),
        ),
        (
            "glucose from December 2019 to January 2020",
            _utc(2019, 12, 1),
            _utc(2020, 1, 31, end=True),
        ),
        ("glucose from 2019-02 to 2019-02", _utc(2019, 2, 1), _utc(2019, 2, 28, end=True)),
    ],
)
def test_an_explicit_period_is_the_interval_it_names(
    question: str, since: datetime | None, until: datetime | None
):
    assert explicit_period(question) == (since, until)


@pytest.mark.parametrize(
    "question",
    [
        "glucose in 2019-13",  # no 13th month
        "glucose on 2019-02-30",  # no 30 February
        "glucose in Foo 2019",  # not a month: no period, rather than a wrong one
        "glucose in March",  # a month without a year is not read as any one year
        "glucose in 2100",  # years are 19xx and 20xx
        "average glucose over the last 3 months",  # window_days's
        "Was he on 2000 mg of metformin?",  # a dose is not a year
        "Is he on 1000 units of insulin?",
        "metformin for 2000 mg",
        # bounds outside ``datetime``'s years 1 to 9999: no period, not an OverflowError (a 500)
        "glucose before 0001-01-01",
        "glucose after 9999-12-31",
        "average glucose between 9999-12-31 and 0001-01-01",
    ],
)
def test_no_explicit_period(question: str):
    assert explicit_period(question) is None


@pytest.mark.parametrize(
    ("question", "days"),
    [
        ("average glucose over the last 3 months", 3 * 30.4375),
        ("average glucose over the past 24 hours", 1.0),
        ("glucose in the last year", 365.25),
        ("glucose in the previous two weeks", 14),
        ("glucose last a month", 30.4375),
        ("glucose in the last day", 1),
        ("glucose over the past six months", 6 * 30.4375),
        ("glucose in the LAST 2 YEARS", 2 * 365.25),
        ("glucose in 2019", None),
        ("What was his last glucose?", None),
        ("last visit", None),
    ],
)
def test_window_days(question: str, days: float | None):
    assert window_days(question) == days


@pytest.mark.parametrize(
    ("phrase", "name"),
    [
        ("average troponin", "troponin"),
        ("most recent ferritin", "ferritin"),
        ("mean of the glucose", "glucose"),
        ("highest of her sodium", "sodium"),
        ("latest", None),
        ("trend", None),
        ("most recent", None),
        ("last month", None),
        ("last visit", None),
        ("3 months", None),
        ("few days", None),
        ("march 2019", None),
        ("summer", None),
        ("results", None),
    ],
)
def test_analyte_words(phrase: str, name: str | None):
    assert analyte_words(phrase) == name


@pytest.mark.parametrize(
    ("question", "follows"),
    [
        ("and before that?", True),
        ("What about June?", True),
        ("what about the one before", True),
        ("And his glucose?", True),
        ("Same for potassium", True),
        ("The previous one please", True),
        ("What was his last HbA1c?", False),
        ("Any allergies?", False),
        # a long question stands on its own even with a follow-up word
        ("What was his last HbA1c and what medications is he on today please now?", False),
    ],
)
def test_is_follow_up(question: str, follows: bool):
    assert is_follow_up(question) is follows
