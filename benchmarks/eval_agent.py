"""Answer accuracy and latency of ``ask`` with the embedded default (no model).

Structured questions over the Synthea patients (``synthea-r4-smart`` from ``--data``, else the demo
patients), modelled on MedAgentBench's query task types: patient lookup by name and birth date, age,
the latest value of a test and its date, the last HbA1c, the average over a time window; plus
active medications, active problems and allergies; whether the patient is on a drug class (yes or
no first, with hand-written ingredient lists); and the latest labs (every laboratory result of the
newest day). Expected answers are computed here from the FHIR JSON, independently of ChartSight. An
answer is exact when its text states the expected value (and date) and cites exactly the expected
resources: a statistic over more than 12 results its first, lowest, highest and newest; questions
are asked on ``NOW``, so a "latest" result is the newest up to it, and the first one dated after
it (Synthea charts run on past it) must be cited as not taken. Latency: per stage and end to end
for warm questions; cold start of `chartsight ask` as a fresh process. Results are appended to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.service import ChartSight  # noqa: E402
from agent.settings import Settings  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from connectors.demo import demo_bundles  # noqa: E402
from connectors.record import find_patients  # noqa: E402
from connectors.store import FhirStore, StoreSource  # noqa: E402

NOW = datetime(2021, 1, 1, tzinfo=UTC)
DEFAULT_DATA = ROOT.parent / "shared" / "data"
Check = Callable[[Any], bool]


def _obs(resources: list[dict[str, Any]], loinc: str) -> list[dict[str, Any]]:
    found = [
        r
        for r in resources
        if r["resourceType"] == "Observation"
        and "valueQuantity" in r
        and any(c.get("code") == loinc for c in r["code"].get("coding", []))
    ]
    return sorted(found, key=lambda r: r["effectiveDateTime"])


def _when(resource: dict[str, Any]) -> datetime | None:
    """A result's effectiveDateTime (else its effectivePeriod's start), timezone-aware (a date
    alone: its start, UTC); None for an undated one."""
    period = resource.get("effectivePeriod") or {}
    value = resource.get("effectiveDateTime") or period.get("start")
    if not value:
        return None
    when = datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _up_to_now(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The dated results up to NOW (the day the questions are asked on), in their order."""
    return [r for r in results if (w := _when(r)) is not None and w <= NOW]


# the FHIR elements that date a resource, in the order ChartSight's rules read them
_DATED = ("effectiveDateTime", "effectiveInstant", "onsetDateTime", "performedDateTime",
          "occurrenceDateTime", "authoredOn", "started", "recordedDate", "dateTime",
          "dateAsserted", "createdDateTime", "date", "issued", "created")  # fmt: skip
_DATED_PERIODS = ("effectivePeriod", "performedPeriod", "onsetPeriod", "period")


def as_of(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chart as of NOW, as a clinician asking on that day sees it: every resource other than
    an Observation dated after NOW left out (a condition with a later onset, a later order, visit
    or procedure had not happened yet); Observations are kept (a later result is cited as not
    taken, and the questions bound them themselves)."""

    def when(r: dict[str, Any]) -> str | None:
        for key in _DATED:
            if isinstance(r.get(key), str):
                return str(r[key])
        for key in _DATED_PERIODS:
            period = r.get(key) or {}
            if period.get("start") or period.get("end"):
                return str(period.get("start") or period.get("end"))
        return None

    def later(r: dict[str, Any]) -> bool:
        day = when(r)
        if r["resourceType"] in ("Patient", "Observation") or day is None:
            return False
        if "T" not in day:  # a date, at its own precision: its first day
            day = {4: f"{day}-01-01", 7: f"{day}-01"}.get(len(day), day)
        start = datetime.fromisoformat(day)
        return (start if start.tzinfo else start.replace(tzinfo=UTC)) > NOW

    return [r for r in resources if not later(r)]


def first_after(results: list[dict[str, Any]]) -> list[str]:
    """The results dated first after NOW (several at one instant: any of them), as references;
    an answer asked on NOW cites one of them to say that later results exist."""
    after = [(w, r) for r in results if (w := _when(r)) is not None and w > NOW]
    if not after:
        return []
    first = min(w for w, _ in after)
    return [f"{r['resourceType']}/{r['id']}" for w, r in after if w == first]


def series_citations(rows: list[dict[str, Any]]) -> tuple[list[str], set[str], set[str]]:
    """How a statistic over ``rows`` (oldest first, each with a valueQuantity) is cited, as
    ChartSight documents it: (every result's reference, the lowest ones, the highest ones). Up
    to 12 results every one is cited; past 12 the first, the newest, one of the lowest and one
    of the highest."""
    every = [f"{r['resourceType']}/{r['id']}" for r in rows]
    values = [float(r["valueQuantity"]["value"]) for r in rows]
    lowest = {ref for ref, v in zip(every, values, strict=True) if v == min(values)}
    highest = {ref for ref, v in zip(every, values, strict=True) if v == max(values)}
    return every, lowest, highest


def _cites_series(cited: set[str], rows: list[dict[str, Any]]) -> bool:
    """Whether a statistic over ``rows`` cites them as it should (``series_citations``), and no
    other result."""
    every, lowest, highest = series_citations(rows)
    if len(rows) <= 12:
        return cited == set(every)
    return (
        {every[0], every[-1]} <= cited
        and bool(cited & lowest)
        and bool(cited & highest)
        and cited <= {every[0], every[-1]} | lowest | highest
    )


def _cited(answer: Any, prefix: str) -> set[str]:
    return {c.reference for c in answer.citations if c.reference.startswith(prefix)}


def _cites(answer: Any, expected: set[str], prefix: str) -> bool:
    return _cited(answer, prefix) == expected


def questions(resources: list[dict[str, Any]]) -> list[tuple[str, str, Check]]:
    """(type, question, check) for one patient, expected answers from the JSON."""
    resources = as_of(resources)
    patient = resources[0]
    out: list[tuple[str, str, Check]] = []
    born = date.fromisoformat(patient["birthDate"])
    end = NOW.date()
    if patient.get("deceasedDateTime"):
        end = min(end, datetime.fromisoformat(patient["deceasedDateTime"]).date())
    age = end.year - born.year - ((end.month, end.day) < (born.month, born.day))
    out.append(("age", "How old is the patient?", lambda a, n=age: f"{n} years" in a.text))
    for label, loinc in (
        ("last HbA1c", "4548-4"),
        ("latest creatinine", "38483-4"),
        ("latest body weight", "29463-7"),
        ("latest BMI", "39156-5"),
        ("latest glucose", "2339-0"),
        ("latest total cholesterol", "2093-3"),
        ("latest hemoglobin", "718-7"),
    ):
        every = _obs(resources, loinc)
        # asked on NOW: a result dated after it is not the latest (it is said and cited)
        rows = _up_to_now(every)
        later = set(first_after(every))
        if not rows:
            continue
        newest = rows[-1]
        value = f"{float(newest['valueQuantity']['value']):.4g}"
        day = newest["effectiveDateTime"][:10]
        # Synthea sometimes records the same result twice at the same instant: either is right
        ties = {
            f"Observation/{r['id']}"
            for r in rows
            if r["effectiveDateTime"] == newest["effectiveDateTime"]
            and r["valueQuantity"]["value"] == newest["valueQuantity"]["value"]
        }
        q = f"What was the {label.replace('latest ', 'most recent ')}?"
        out.append(
            (
                "latest value and date",
                q,
                lambda a, v=value, d=day, t=ties, later=later: (
                    v in a.text
                    and d in a.text
                    and len(
                        refs := {
                            c.reference
                            for c in a.citations
                            if c.reference.startswith("Observation/")
                        }
                        - later
                    )
                    == 1
                    and refs <= t
                    and (not later or len(later & _cited(a, "Observation/")) == 1)
                ),
            )
        )
    for label, loinc, years in (("glucose", "2339-0", 3), ("body weight", "29463-7", 5)):
        since = NOW - timedelta(days=365.25 * years)
        rows = [
            r
            for r in _obs(resources, loinc)
            if since <= datetime.fromisoformat(r["effectiveDateTime"]) <= NOW
        ]
        q = f"What is the average {label} over the last {years} years?"
        if rows:
            mean = statistics.fmean(float(r["valueQuantity"]["value"]) for r in rows)
            out.append(
                (
                    "average over a window",
                    q,
                    lambda a, m=mean, rows=rows: (
                        (f"mean {m:.4g}" if len(rows) > 1 else f"only 1 result, {m:.4g}") in a.text
                        and _cites_series(_cited(a, "Observation/"), rows)
                    ),
                )
            )
        else:
            out.append(("average over a window", q, lambda a: "No numeric" in a.text))
    meds = {
        f"MedicationRequest/{r['id']}"
        for r in resources
        if r["resourceType"] == "MedicationRequest" and r.get("status") == "active"
    }
    out.append(
        (
            "active medications",
            "What medications is the patient currently taking?",
            lambda a, m=meds: (
                _cites(a, m, "MedicationRequest/")
                and (bool(m) or "No active medication is recorded" in a.text)
            ),
        )
    )
    problems = {
        f"Condition/{r['id']}"
        for r in resources
        if r["resourceType"] == "Condition"
        and r.get("clinicalStatus", {}).get("coding", [{}])[0].get("code") == "active"
    }
    out.append(
        (
            "active problems",
            "What are the patient's active problems?",
            lambda a, p=problems: (
                _cites(a, p, "Condition/") and (bool(p) or "No active problem" in a.text)
            ),
        )
    )
    allergies = {
        f"AllergyIntolerance/{r['id']}"
        for r in resources
        if r["resourceType"] == "AllergyIntolerance"
    }
    out.append(
        (
            "allergies",
            "Does the patient have any allergies?",
            lambda a, al=allergies: (
                _cites(a, al, "AllergyIntolerance/")
                and (bool(al) or "No allergy is recorded" in a.text)
            ),
        )
    )
    pid = f"Patient/{patient['id']}"
    for question, words in DRUG_QUESTIONS.items():
        members = {
            f"MedicationRequest/{r['id']}": r.get("status") == "active"
            for r in resources
            if r["resourceType"] == "MedicationRequest" and _names_any(_med_display(r), words)
        }
        active = {ref for ref, on in members.items() if on}
        # yes/no first; every active member cited; nothing cited that is not a member (those no
        # longer active are listed as such)
        out.append(
            (
                "on a drug class (yes/no first)",
                question,
                lambda a, m=active, every=set(members), p=pid: (
                    a.text.startswith("Yes: on " if m else "No: ")
                    and m <= _cited(a, "MedicationRequest/") <= every
                    and (bool(m) or p in {c.reference for c in a.citations})
                ),
            )
        )
    for name, words in DIAGNOSES.items():
        conditions = [
            r
            for r in resources
            if r["resourceType"] == "Condition"
            and _names_any(_concept_text(r.get("code")), words)
            and _status(r, "verificationStatus") != "entered-in-error"
        ]
        refuted = {id(r) for r in conditions if _status(r, "verificationStatus") == "refuted"}
        active = {
            f"Condition/{r['id']}"
            for r in conditions
            if id(r) not in refuted
            and _status(r, "clinicalStatus") in ("active", "recurrence", "relapse")
        }
        past = {f"Condition/{r['id']}" for r in conditions if id(r) not in refuted} - active
        if active:
            want = ("Yes: ", active)
        elif past:
            want = ("In the past: ", past)
        else:
            want = ("No ", set())
        out.append(
            (
                "diagnosis (yes/no first)",
                f"Does the patient have {name}?",
                lambda a, w=want, p=pid: (
                    a.text.startswith(w[0])
                    and (w[1] <= _cited(a, "Condition/") if w[1] else p in _cited(a, "Patient/"))
                ),
            )
        )
    labs = [
        r
        for r in resources
        if r["resourceType"] == "Observation"
        and r.get("status") != "entered-in-error"
        and any(
            c.get("code") == "laboratory"
            for cat in r.get("category", [])
            for c in cat.get("coding", [])
        )
        and ("valueQuantity" in r or "valueCodeableConcept" in r or "component" in r)
        and "effectiveDateTime" in r
    ]
    # asked on NOW: labs dated after it are counted, the first of them cited, none shown
    later = set(first_after(labs))
    labs = _up_to_now(labs)
    if labs:
        day = max(r["effectiveDateTime"][:10] for r in labs)
        newest = {f"Observation/{r['id']}" for r in labs if r["effectiveDateTime"][:10] == day}
        out.append(
            (
                "latest labs",
                "What are the patient's latest labs?",
                lambda a, d=day, n=newest, later=later: (
                    f"on {d}, the latest day" in a.text
                    and _cited(a, "Observation/") - later == n
                    and (not later or len(later & _cited(a, "Observation/")) == 1)
                ),
            )
        )
    return out


# drug class questions → ingredient and brand words (written here, not ChartSight's table)
DRUG_QUESTIONS = {
    "Is the patient on an anticoagulant?": ("warfarin", "apixaban", "rivaroxaban", "dabigatran", "heparin", "enoxaparin"),
    "Is the patient on a beta blocker?": ("metoprolol", "atenolol", "carvedilol", "propranolol", "bisoprolol", "toprol"),
    "Is the patient on an opioid?": ("hydrocodone", "oxycodone", "morphine", "fentanyl", "tramadol", "meperidine", "codeine", "vicodin"),
    "Is the patient on birth control?": ("levora", "natazia", "yaz", "nuvaring", "jolivette", "camila", "errin", "trinessa", "seasonique", "mirena", "liletta", "ethinyl estradiol", "norelgestromin", "medroxyprogesterone", "levonorgestrel", "norethindrone"),
}  # fmt: skip


# diagnoses asked about → words of their displays (written here, not ChartSight's term table)
DIAGNOSES = {
    "hypertension": ("hypertension", "hypertensive disorder"),
    "heart failure": ("heart failure",),
    "asthma": ("asthma",),
    "a stroke": ("stroke",),
}


def _concept_text(concept: dict[str, Any] | None) -> str:
    concept = concept or {}
    return " ".join(
        [str(concept.get("text", ""))]
        + [str(c.get("display", "")) for c in concept.get("coding", [])]
    ).lower()


def _status(resource: dict[str, Any], element: str) -> str:
    codings = (resource.get(element) or {}).get("coding") or [{}]
    return str(codings[0].get("code", ""))


def _med_display(resource: dict[str, Any]) -> str:
    concept = resource.get("medicationCodeableConcept") or {}
    return " ".join(
        [str(concept.get("text", ""))]
        + [str(c.get("display", "")) for c in concept.get("coding", [])]
    ).lower()


def _names_any(text: str, words: tuple[str, ...]) -> bool:
    import re

    return any(re.search(rf"(?<![a-z]){re.escape(w)}(?![a-z])", text) for w in words)


async def evaluate(
    paths: list[Path], home: Path
) -> tuple[dict[str, list[bool]], list[float], dict[str, list[float]], list[str]]:
    store = FhirStore(f"sqlite:///{home / 'store.db'}")
    bundles = {}
    for path in paths:
        store.import_path(path)
        if path.suffix == ".gz":
            with gzip.open(path) as fh:
                data = json.loads(fh.read())
        else:
            data = json.loads(path.read_text())
        resources = [e["resource"] for e in data["entry"]]
        if resources and resources[0]["resourceType"] == "Patient":
            bundles[resources[0]["id"]] = resources
    settings = Settings(home=home, store={"url": str(store.engine.url)})
    results: dict[str, list[bool]] = defaultdict(list)
    warm: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    misses: list[str] = []
    source = StoreSource(store)
    async with ChartSight(settings, now=NOW, use_index=False) as agent:
        for pid, resources in bundles.items():
            first = True
            for kind, question, check in questions(resources):
                start = time.perf_counter()
                answer = await agent.ask(pid, question)
                elapsed = (time.perf_counter() - start) * 1000
                if not first:  # the first question of a patient fetches and embeds the record
                    warm.append(elapsed)
                    for stage, ms in answer.latency_ms.items():
                        stages[stage].append(ms)
                first = False
                ok = bool(check(answer))
                results[kind].append(ok)
                if not ok and len(misses) < 8:
                    misses.append(f"{pid[:8]} {question} → {answer.text[:160]}")
            # MedAgentBench task 1: the patient's id from name and birth date (or none)
            patient = resources[0]
            name = f"{patient['name'][0]['given'][0]} {patient['name'][0]['family']}"
            found = await find_patients(source, name, patient["birthDate"])
            results["patient lookup (name, birth date)"].append([p.id for p in found] == [pid])
            wrong = await find_patients(source, name, "1800-01-01")
            results["patient lookup (name, birth date)"].append(wrong == [])
    return results, warm, stages, misses


def cold_start(home: Path, pid: str) -> float:
    env = {**os.environ, "CHARTSIGHT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "surfaces.cli", "ask", pid, "What was the last HbA1c?"],
        check=True,
        capture_output=True,
        env=env,
        cwd=ROOT,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    folder = args.data / "synthea-r4-smart" / "bundles"
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else demo_bundles()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        results, warm, stages, misses = asyncio.run(evaluate(paths, home))
        pid = next(iter(FhirStore(f"sqlite:///{home / 'store.db'}").patients())).id
        cold = cold_start(home, pid)
    total = [ok for oks in results.values() for ok in oks]
    lines = [
        f"\n## Answer accuracy and latency, embedded default — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {describe()}. {len(paths)} Synthea patients, now = {NOW.date()}; expected answers "
        "computed from the FHIR JSON; exact = the expected value (and date) stated and exactly the "
        "expected resources cited.\n",
        "| question type | exact | of |",
        "|---|---|---|",
    ]
    for kind, oks in results.items():
        lines.append(f"| {kind} | {sum(oks) / len(oks):.1%} | {len(oks)} |")
    lines.append(f"| **all** | **{sum(total) / len(total):.1%}** | {len(total)} |")
    q = statistics.quantiles(warm, n=20)
    lines += [
        "",
        f"Warm `ask` (record cached, embedded default): p50 {statistics.median(warm):.0f} ms, "
        f"p95 {q[18]:.0f} ms over {len(warm)} questions. Median per stage: "
        + ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in stages.items())
        + f". Cold start of `chartsight ask` (new process: imports, model load, record fetch, "
        f"embedding): {cold:.1f} s.",
    ]
    if misses:
        lines += ["", "First misses:", ""] + [f"- {m}" for m in misses]
    report = "\n".join(lines) + "\n"
    print(report)
    with args.results.open("a") as fh:
        fh.write(report)


if __name__ == "__main__":
    main()
