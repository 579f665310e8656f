"""Write the shipped evaluation suites (``agent/suites/*.jsonl``) from FHIR JSON, by code that
reads the bundles directly — never through ChartSight — so that ``chartsight eval`` checks
ChartSight against answers it did not compute.

Suites: ``demo`` (the five packaged demo patients) and ``synthea-r4-smart`` (the 60 patients of
``../shared/data/synthea-r4-smart``, Apache-2.0; only questions and expected values are written,
the bundles stay where they are). ``now`` is 2021-01-01 for both; some Synthea charts run on past
it, and a "latest" is the newest up to it (the first later result may be cited, as the answer says
it is not taken).

    python benchmarks/make_eval_suite.py [--data ../shared/data]

Expected phrases follow ChartSight's documented answer forms (a direct answer first: "Yes: on a
statin", "Last encounter: <date>", "<n> numeric glucose results"); the values, dates, counts and
resources in them are computed here from the JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.eval_agent import (  # noqa: E402
    DIAGNOSES,
    DRUG_QUESTIONS,
    _concept_text,
    _med_display,
    _names_any,
    _status,
    as_of,
    first_after,
    series_citations,
)

NOW = datetime(2021, 1, 1, tzinfo=UTC)
OUT = ROOT / "agent" / "suites"
R = dict[str, Any]

LABS = (  # (question words, LOINC codes)
    ("HbA1c", ("4548-4",)),
    ("creatinine", ("38483-4", "2160-0")),
    ("glucose", ("2339-0",)),
    ("total cholesterol", ("2093-3",)),
    ("hemoglobin", ("718-7",)),
    ("potassium", ("6298-4",)),
    ("sodium", ("2947-0",)),
    ("LDL", ("18262-6",)),
)
VITALS = (("body weight", ("29463-7",)), ("BMI", ("39156-5",)), ("body height", ("8302-2",)))
TYPOS = (("potasium", ("6298-4",)), ("cholestrol", ("2093-3",)), ("hemoglobn", ("718-7",)),
         ("creatinin", ("38483-4",)), ("glucos", ("2339-0",)))  # fmt: skip
ABSENT_TESTS = (  # (name, LOINC codes, display words): asked when the chart has none of them
    ("troponin", ("10839-9", "42757-5", "89579-7", "6598-7", "67151-1"), ("troponin",)),
    ("TSH", ("3016-3", "11580-8"), ("thyrotropin", "tsh")),
    ("ferritin", ("2276-4",), ("ferritin",)),
)
STATINS = ("atorvastatin", "simvastatin", "rosuvastatin", "pravastatin", "lovastatin", "fluvastatin", "pitavastatin")  # fmt: skip


def _n(v: float) -> str:
    return f"{float(v):.4g}"


def _mean_phrase(mean: float, n: int) -> str:
    """How the answer states a mean: "mean 77.21", or the one value when there is one result."""
    return f"mean {_n(mean)}" if n > 1 else f"only 1 result, {_n(mean)}"


def _codes(r: R, element: str = "code") -> set[str]:
    return {str(c.get("code")) for c in (r.get(element) or {}).get("coding", [])}


def _when(r: R) -> str | None:
    return r.get("effectiveDateTime") or (r.get("effectivePeriod") or {}).get("start")


def _dt(s: str) -> datetime:
    d = datetime.fromisoformat(s.replace("Z", "+00:00"))
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def _numeric(res: list[R], codes: tuple[str, ...]) -> list[R]:
    found = [
        r
        for r in res
        if r["resourceType"] == "Observation"
        and r.get("status") != "entered-in-error"
        and "valueQuantity" in r
        and _codes(r) & set(codes)
        and _when(r)
    ]
    return sorted(found, key=lambda r: _dt(_when(r)))  # type: ignore[arg-type]


def _ref(r: R) -> str:
    return f"{r['resourceType']}/{r['id']}"


def _ties(rows: list[R], chosen: R) -> list[str]:
    """Results at the same instant with the same value (Synthea repeats some): either is right."""
    return [
        _ref(r)
        for r in rows
        if _when(r) == _when(chosen)
        and r["valueQuantity"]["value"] == chosen["valueQuantity"]["value"]
    ]


def _series_cites(rows: list[R]) -> dict[str, list[str]]:
    """A statistic's citations (``series_citations``) as a suite item expects them: every result
    up to 12; past 12 the first and newest, and one of the lowest and of the highest (ties: any
    of them)."""
    every, lowest, highest = series_citations(rows)
    if len(rows) <= 12:
        return {"cites": every}
    lows, highs = [r for r in every if r in lowest], [r for r in every if r in highest]
    must = [every[0], every[-1]] + [x[0] for x in (lows, highs) if len(x) == 1]
    return {"cites": list(dict.fromkeys(must)), "may_cite": lows + highs}


def ckd_epi_2021(scr: float, age: int, female: bool) -> float:
    """CKD-EPI 2021 (Inker et al., NEJM 2021), written here independently of ChartSight."""
    k, a = (0.7, -0.241) if female else (0.9, -0.302)
    return (
        142
        * min(scr / k, 1) ** a
        * max(scr / k, 1) ** -1.2
        * 0.9938**age
        * (1.012 if female else 1)
    )


def _age(born: date, on: date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def items_for(res: list[R]) -> list[tuple[str, str, dict[str, Any]]]:
    """(family, question, expect) for one patient's resources (the Patient first), as of NOW."""
    res = as_of(res)
    p = res[0]
    pref = _ref(p)
    out: list[tuple[str, str, dict[str, Any]]] = []
    add: Callable[[str, str, dict[str, Any]], None] = lambda f, q, e: out.append((f, q, e))  # noqa: E731
    born = date.fromisoformat(p["birthDate"])
    end = NOW.date()
    if p.get("deceasedDateTime"):
        end = min(end, _dt(p["deceasedDateTime"]).date())
    age = _age(born, end)
    add("age", "How old is the patient?", {"contains": [f"{age} years"], "cites": [pref]})
    add(
        "age (other wording)",
        "What is the patient's age?",
        {"contains": [f"{age} years"], "cites": [pref]},
    )
    add("sex", "What is the patient's sex?", {"contains": [p["gender"]], "cites": [pref]})
    add("birth date", "When was the patient born?", {"contains": [p["birthDate"]], "cites": [pref]})

    def latest(family: str, question: str, codes: tuple[str, ...]) -> None:
        every = _numeric(res, codes)
        # asked on NOW: the latest is the newest up to it; the first later one may be cited
        # (the answer says it is not taken)
        rows = [r for r in every if _dt(_when(r)) <= NOW]  # type: ignore[arg-type]
        if not rows:
            return
        last = rows[-1]
        add(family, question, {
            "contains": [_n(last["valueQuantity"]["value"]), _when(last)[:10]],  # type: ignore[index]
            "cites": [], "may_cite": _ties(rows, last) + first_after(every),
            "cite_types": ["Observation"],
        })  # fmt: skip
        out[-1][2]["cites"] = []  # one of the ties, whichever: checked by may_cite ∪ at least one
        out[-1][2]["one_of"] = _ties(rows, last)

    for words, codes in LABS:
        latest("latest lab value", f"What was the most recent {words}?", codes)
    for words, codes in VITALS:
        latest("latest vital sign", f"What was the most recent {words}?", codes)
    typo = next(((w, c) for w, c in TYPOS if _numeric(res, c)), None)
    if typo:
        latest("typo in the test name", f"What was the most recent {typo[0]}?", typo[1])
    bps = [
        r for r in res
        if r["resourceType"] == "Observation" and "55284-4" in _codes(r) and r.get("component") and _when(r)
    ]  # fmt: skip
    bps.sort(key=lambda r: _dt(_when(r)))  # type: ignore[arg-type]

    def bp_values(r: R) -> list[str]:
        return [
            _n(c["valueQuantity"]["value"])
            for c in r["component"]
            if _codes(c) & {"8480-6", "8462-4"} and "valueQuantity" in c
        ]

    up_to_now = [r for r in bps if _dt(_when(r)) <= NOW]  # type: ignore[arg-type]
    if up_to_now:
        last = up_to_now[-1]
        add("latest blood pressure", "What is the patient's latest blood pressure?", {
            "contains": [*bp_values(last), _when(last)[:10]], "one_of": [_ref(last)],  # type: ignore[index]
            "cite_types": ["Observation"], "may_cite": [_ref(last), *first_after(bps)],
        })  # fmt: skip
    if bps:
        first = bps[0]
        day = _when(first)[:10]  # type: ignore[index]
        same_day = [r for r in bps if _when(r)[:10] == day]  # type: ignore[index]
        chosen = same_day[-1]
        add("value on a date", f"What was the patient's blood pressure on {day}?", {
            "contains": [*bp_values(chosen), day], "one_of": [_ref(r) for r in same_day],
            "cite_types": ["Observation"], "may_cite": [_ref(r) for r in same_day],
        })  # fmt: skip
    for label, codes, years in (("glucose", ("2339-0",), 3), ("body weight", ("29463-7",), 5)):
        since = NOW - timedelta(days=365.25 * years)
        rows = [r for r in _numeric(res, codes) if since <= _dt(_when(r)) <= NOW]  # type: ignore[arg-type]
        q = f"What is the average {label} over the last {years} years?"
        if rows:
            mean = statistics.fmean(float(r["valueQuantity"]["value"]) for r in rows)
            add("average over the last years", q, {
                "contains": [_mean_phrase(mean, len(rows))], **_series_cites(rows),
                "cite_types": ["Observation"],
            })  # fmt: skip
        else:
            add("average over the last years", q, {"contains": ["No numeric"], "abstain": True})
    a, b = datetime(2015, 1, 1, tzinfo=UTC), datetime(2019, 1, 1, tzinfo=UTC)
    rows = [r for r in _numeric(res, ("29463-7",)) if a <= _dt(_when(r)) < b]  # type: ignore[arg-type]
    q = "What was the average body weight between 2015-01-01 and 2018-12-31?"
    if rows:
        mean = statistics.fmean(float(r["valueQuantity"]["value"]) for r in rows)
        add("average between two dates", q, {
            "contains": [_mean_phrase(mean, len(rows)), "from 2015-01-01 to 2018-12-31"],
            **_series_cites(rows), "cite_types": ["Observation"],
        })  # fmt: skip
    else:
        add("average between two dates", q, {"contains": ["No numeric"], "abstain": True})
    rows = [r for r in _numeric(res, ("29463-7",)) if _when(r).startswith("2018")]  # type: ignore[union-attr]
    if rows:
        last = rows[-1]
        add("value in a year", "What was the patient's body weight in 2018?", {
            "contains": [_n(last["valueQuantity"]["value"]), _when(last)[:10]],  # type: ignore[index]
            "one_of": _ties(rows, last), "may_cite": _ties(rows, last), "cite_types": ["Observation"],
        })  # fmt: skip
    # statistics are "up to now": results dated after it (Synthea writes some) are not counted
    glucose = [r for r in _numeric(res, ("2339-0",)) if _dt(_when(r)) <= NOW]  # type: ignore[arg-type]
    if glucose:
        n = len(glucose)
        add("count of results", "How many glucose results does the record contain?", {
            "contains": [f"{n} numeric glucose result"], "cites": [_ref(r) for r in glucose],
            "cite_types": ["Observation"],
        })  # fmt: skip
        top = max(glucose, key=lambda r: float(r["valueQuantity"]["value"]))
        tops = [
            _ref(r) for r in glucose if r["valueQuantity"]["value"] == top["valueQuantity"]["value"]
        ]
        add("highest value", "What was the patient's highest glucose?", {
            "contains": ["Highest glucose", _n(top["valueQuantity"]["value"])], "one_of": tops,
        })  # fmt: skip
    weights = [r for r in _numeric(res, ("29463-7",)) if _dt(_when(r)) <= NOW]  # type: ignore[arg-type]
    if weights:
        low = min(weights, key=lambda r: float(r["valueQuantity"]["value"]))
        lows = [
            _ref(r) for r in weights if r["valueQuantity"]["value"] == low["valueQuantity"]["value"]
        ]
        add("lowest value", "What was the patient's lowest body weight?", {
            "contains": ["Lowest", _n(low["valueQuantity"]["value"])], "one_of": lows,
        })  # fmt: skip
    creat = [r for r in _numeric(res, ("38483-4", "2160-0")) if _dt(_when(r)) <= NOW]  # type: ignore[arg-type]
    if len(creat) > 1:
        values = [float(r["valueQuantity"]["value"]) for r in creat]
        # the documented trend: first to newest up to 5 results; from 6, the medians of the
        # first and last thirds (the newest said beside them)
        if len(values) >= 6:
            third = len(values) // 3
            first = statistics.median(values[:third])
            last = statistics.median(values[-third:])
        else:
            first, last = values[0], values[-1]
        # KDIGO 2012: a creatinine change under 0.3 mg/dL is not a meaningful change
        change = last - first
        meaning = (
            "no meaningful change in kidney function" if abs(change) < 0.3
            else "kidney function worsening" if change > 0 else "kidney function improving"
        )  # fmt: skip
        add("kidney function trend", "What is the trend of the patient's kidney function?", {
            "contains": ["Creatinine", _n(first), _n(last), _n(values[-1]), meaning],
            "cite_types": ["Observation"], **_series_cites(creat),
        })  # fmt: skip
    egfr = _numeric(res, ("33914-3", "62238-1", "48643-1", "98979-8"))
    if egfr:
        last = egfr[-1]
        add("eGFR", "What is the patient's eGFR?", {
            "contains": [_n(last["valueQuantity"]["value"])], "one_of": _ties(egfr, last),
        })  # fmt: skip
    elif (every := [r for r in _numeric(res, ("38483-4", "2160-0")) if _dt(_when(r)) <= NOW]) and (  # type: ignore[arg-type]
        p.get("gender") in ("male", "female")
    ):
        last = every[-1]  # the latest creatinine up to NOW, as a latest value is read
        on = _dt(_when(last)).date()  # type: ignore[arg-type]
        if _age(born, on) >= 18:  # CKD-EPI 2021 is an adult equation: none for a child
            v = ckd_epi_2021(
                float(last["valueQuantity"]["value"]), _age(born, on), p["gender"] == "female"
            )
            add("eGFR", "What is the patient's eGFR?", {
                # computed, said so, first; then that no measured eGFR is recorded
                "contains": ["Computed", f"eGFR {v:.0f}", "CKD-EPI 2021"], "cites": [_ref(last)],
            })  # fmt: skip
    for name, codes, words in ABSENT_TESTS:
        has = any(
            r["resourceType"] == "Observation"
            and (_codes(r) & set(codes) or _names_any(_concept_text(r.get("code")), words))
            for r in res
        )
        if not has:
            add("test not in the record", f"What was the most recent {name}?", {
                "contains": [f"No {name} result"], "cites": [pref], "abstain": True,
            })  # fmt: skip
            break
    meds = [r for r in res if r["resourceType"] == "MedicationRequest"]
    active_meds = [_ref(r) for r in meds if r.get("status") == "active"]
    add("active medications", "What medications is the patient currently taking?", {
        "cites": active_meds, "cite_types": ["MedicationRequest"],
        **({} if active_meds else {"contains": ["No active medication is recorded"], "abstain": True}),
    })  # fmt: skip
    for question, words in DRUG_QUESTIONS.items():
        members = {
            _ref(r): r.get("status") == "active" for r in meds if _names_any(_med_display(r), words)
        }
        on = [ref for ref, active in members.items() if active]
        add("on a drug class (yes/no first)", question, {
            "starts_with": "Yes: on " if on else "No: ", "cites": on or [pref],
            "cite_types": ["MedicationRequest"], "may_cite": list(members),
            **({} if on else {"abstain": True}),  # a "no" rests on the absence: cites the Patient
        })  # fmt: skip
    conditions = [r for r in res if r["resourceType"] == "Condition"]
    active = [_ref(r) for r in conditions if _status(r, "clinicalStatus") in ("active", "recurrence", "relapse")
              and _status(r, "verificationStatus") not in ("refuted", "entered-in-error")]  # fmt: skip
    add("active problems", "What are the patient's active problems?", {
        "cites": active, "cite_types": ["Condition"],
        **({} if active else {"contains": ["No active problem"], "abstain": True}),
    })  # fmt: skip
    for name, words in DIAGNOSES.items():
        found = [
            r for r in conditions
            if _names_any(_concept_text(r.get("code")), words)
            and _status(r, "verificationStatus") not in ("entered-in-error", "refuted")
        ]  # fmt: skip
        now_active = [
            r for r in found if _status(r, "clinicalStatus") in ("active", "recurrence", "relapse")
        ]
        past = [r for r in found if r not in now_active]
        if now_active:
            want: dict[str, Any] = {"starts_with": "Yes: ", "cites": [_ref(r) for r in now_active]}
        elif past:
            want = {"starts_with": "In the past: ", "cites": [_ref(r) for r in past]}
        else:
            want = {"starts_with": "No ", "cites": [pref], "abstain": True}
        add("diagnosis (yes/no first)", f"Does the patient have {name}?", want)
        onsets = sorted(r["onsetDateTime"][:10] for r in now_active if r.get("onsetDateTime"))
        if onsets:
            add("when a condition began", f"Since when has the patient had {name}?", {
                "contains": [f"since {onsets[0]}"], "cites": [_ref(r) for r in now_active],
            })  # fmt: skip
    allergies = [_ref(r) for r in res if r["resourceType"] == "AllergyIntolerance"]
    add("allergies", "Does the patient have any allergies?", {
        "cites": allergies, "cite_types": ["AllergyIntolerance"],
        **({} if allergies else {"contains": ["No allergy is recorded"], "abstain": True}),
    })  # fmt: skip
    labs = [
        r for r in res
        if r["resourceType"] == "Observation" and r.get("status") != "entered-in-error"
        and any(c.get("code") == "laboratory" for cat in r.get("category", []) for c in cat.get("coding", []))
        and ("valueQuantity" in r or "valueCodeableConcept" in r or "component" in r) and _when(r)
    ]  # fmt: skip
    later_labs = first_after(labs)
    labs = [r for r in labs if _dt(_when(r)) <= NOW]  # type: ignore[arg-type]
    if labs:
        day = max(_when(r)[:10] for r in labs)  # type: ignore[index]
        newest = [_ref(r) for r in labs if _when(r)[:10] == day]  # type: ignore[index]
        add("latest labs", "What are the patient's latest labs?", {
            "contains": [f"on {day}, the latest day"], "cites": newest[:25], "cite_types": ["Observation"],
            "may_cite": newest + later_labs,
        })  # fmt: skip
    encounters = sorted(
        (
            r
            for r in res
            if r["resourceType"] == "Encounter" and (r.get("period") or {}).get("start")
        ),
        key=lambda r: _dt(r["period"]["start"]),
    )
    if encounters:
        day = encounters[-1]["period"]["start"][:10]
        same = [_ref(r) for r in encounters if r["period"]["start"][:10] == day]
        add("last visit", "When was the patient's last visit?", {
            "starts_with": f"Last encounter: {day}", "one_of": same,
        })  # fmt: skip
        in_2019 = [r for r in encounters if r["period"]["start"].startswith("2019")]
        q = "How many visits did the patient have in 2019?"
        if in_2019:
            n = len(in_2019)
            add("visits in a year", q, {
                "contains": [f"{n} encounter{'s' if n > 1 else ''} from 2019-01-01 to 2019-12-31"],
                "cites": [_ref(r) for r in in_2019], "cite_types": ["Encounter"],
            })  # fmt: skip
        else:
            add("visits in a year", q, {"contains": ["No encounter is recorded"], "abstain": True})
    flu = sorted(
        (r for r in res if r["resourceType"] == "Immunization" and r.get("status") == "completed"
         and "influenza" in _concept_text(r.get("vaccineCode"))),
        key=lambda r: r["occurrenceDateTime"],
    )  # fmt: skip
    q = "When was the patient's last flu shot?"
    if flu:
        day = flu[-1]["occurrenceDateTime"][:10]
        add("last flu vaccine", q, {
            "contains": [f"Last flu vaccine: {day}"],
            "one_of": [_ref(r) for r in flu if r["occurrenceDateTime"][:10] == day],
        })  # fmt: skip
    else:
        add("last flu vaccine", q, {"contains": ["No flu vaccine is recorded"], "abstain": True})
    add(
        "vaccines due",
        "Which vaccines are due?",
        {"contains": ["cannot tell which vaccines are due"], "cites": [pref]},
    )
    if not p.get("generalPractitioner") and not any(r["resourceType"] == "CareTeam" for r in res):
        add("primary care provider", "Who is the patient's primary care physician?", {
            "contains": ["names no primary care provider"], "cites": [pref], "abstain": True,
        })  # fmt: skip
    if not any(r["resourceType"] == "Consent" for r in res):
        add("code status", "What is the patient's code status?", {
            "contains": ["holds no code status"], "cites": [pref], "abstain": True,
        })  # fmt: skip
        add("advance directives", "Does the patient have an advance directive?", {
            "contains": ["holds no code status or advance directive"], "cites": [pref], "abstain": True,
        })  # fmt: skip
    has_notes = any(
        r["resourceType"] == "DocumentReference"
        or (
            r["resourceType"] == "DiagnosticReport"
            and (r.get("conclusion") or r.get("presentedForm"))
        )
        for r in res
    )
    if not has_notes:
        add("clinical notes", "What did the last note say?", {
            "contains": ["holds no clinical notes"], "cites": [pref], "abstain": True,
        })  # fmt: skip
    smoking = sorted(
        (r for r in res if r["resourceType"] == "Observation" and "72166-2" in _codes(r)
         and "valueCodeableConcept" in r and _when(r)),
        key=lambda r: _dt(_when(r)),  # type: ignore[arg-type]
    )  # fmt: skip
    if smoking:
        last = smoking[-1]
        shown = (
            last["valueCodeableConcept"].get("text")
            or last["valueCodeableConcept"]["coding"][0]["display"]
        )
        add("smoking status", "What is the patient's smoking status?", {
            "contains": [shown, _when(last)[:10]],  # type: ignore[index]
            "one_of": [_ref(r) for r in smoking if _when(r) == _when(last)],
        })  # fmt: skip
    ldl = _numeric(res, ("18262-6",))
    if ldl:
        on_statin = [
            _ref(r)
            for r in meds
            if r.get("status") == "active" and _names_any(_med_display(r), STATINS)
        ]
        add("two questions in one", "Is the patient on a statin, and what was the most recent LDL?", {
            "contains": [_n(ldl[-1]["valueQuantity"]["value"]), "Yes: on a statin" if on_statin else "No: "],
            "cites": on_statin, "one_of": _ties(ldl, ldl[-1]),
            **({} if on_statin else {"abstain": True}),  # answered in order: the "no" first
        })  # fmt: skip
    procedures = sorted(
        (r for r in res if r["resourceType"] == "Procedure"
         and (r.get("performedDateTime") or (r.get("performedPeriod") or {}).get("start"))),
        key=lambda r: r.get("performedDateTime") or r["performedPeriod"]["start"],
    )  # fmt: skip
    if procedures:
        last = procedures[-1]
        day = (last.get("performedDateTime") or last["performedPeriod"]["start"])[:10]
        add("last procedure", "What procedures has the patient had recently?", {
            "contains": [day], "cites": [], "one_of": [
                _ref(r) for r in procedures
                if (r.get("performedDateTime") or r["performedPeriod"]["start"])[:10] == day
            ],
        })  # fmt: skip
    return out


def write_suite(name: str, bundles: list[Path], tuned: bool) -> int:
    lines = []
    for path in bundles:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        res = [e["resource"] for e in json.loads(raw)["entry"]]
        if not res or res[0]["resourceType"] != "Patient":
            continue
        for family, question, expect in items_for(res):
            one_of = expect.pop("one_of", None)
            if one_of:  # one of equally right results: at least one cited
                expect["one_of"] = one_of
            lines.append({
                "id": f"{name}-{len(lines) + 1:04d}", "family": family, "patient": res[0]["id"],
                "question": question, "now": NOW.date().isoformat(), "tuned": tuned, "expect": expect,
            })  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / f"{name}.jsonl").open("w") as fh:
        fh.write(
            f"# generated by benchmarks/make_eval_suite.py from {name} bundles; now = {NOW.date()}\n"
        )
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    from connectors.demo import demo_bundles

    print("demo:", write_suite("demo", demo_bundles(), tuned=True))
    folder = args.data / "synthea-r4-smart" / "bundles"
    if folder.is_dir():
        print(
            "synthea-r4-smart:",
            write_suite("synthea-r4-smart", sorted(folder.glob("*.json")), tuned=False),
        )


if __name__ == "__main__":
    main()
