"""Large charts: import, ``record`` and ``ask`` on a chronic/ICU-sized patient.

Generates patients of 10k and 50k resources from a seed (Observations of 30 LOINC series over years,
vital signs charted many times a day in hospital stays, blood-pressure panels with components, labs,
Conditions, MedicationRequests with refills, Encounters), imports them into a fresh local store and
measures, in one run and on one machine:

- import time (``chartsight import``, a new process) and ``chartsight record`` time;
- cold ``chartsight ask`` p50 (a new process each: imports, model load, record, ranking) on the 10k
  chart and on a small demo patient (Tommy Friesen, 318 resources), and their ratio;
- warm ``ask`` p50 (in-process ``ChartSight``, record cached, questions of several kinds: latest
  value, average over a window, active medications, blood pressure) on the 10k and 50k charts;
- peak RSS of the process answering questions about the 50k chart.

Results are appended to ``benchmarks/results.md``.

    python benchmarks/large_chart.py                 # 10k and 50k
    python benchmarks/large_chart.py --sizes 10000   # the 10k chart only (no memory figure)
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
SMALL_PATIENT = "6234b038-fa0d-476f-b373-6c22de018cf7"  # Tommy Friesen, a demo patient

# (LOINC, display, unit, typical value, spread, category, relative frequency). Vital signs are
# charted many times a day in hospital; labs daily to yearly.
SERIES: list[tuple[str, str, str, float, float, str, float]] = [
    ("8867-4", "Heart rate", "/min", 78, 9, "vital-signs", 20),
    ("9279-1", "Respiratory rate", "/min", 16, 2.5, "vital-signs", 12),
    ("8310-5", "Body temperature", "Cel", 37.0, 0.4, "vital-signs", 8),
    ("2708-6", "Oxygen saturation in Arterial blood", "%", 96, 1.8, "vital-signs", 12),
    (
        "72514-3",
        "Pain severity - 0-10 verbal numeric rating [Score] - Reported",
        "{score}",
        2,
        2,
        "vital-signs",
        4,
    ),
    ("29463-7", "Body Weight", "kg", 84, 3, "vital-signs", 2),
    ("8302-2", "Body Height", "cm", 176, 0.5, "vital-signs", 0.3),
    ("39156-5", "Body Mass Index", "kg/m2", 27.1, 1, "vital-signs", 1),
    ("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL", 128, 25, "laboratory", 6),
    ("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 7.1, 0.5, "laboratory", 0.4),
    ("38483-4", "Creatinine [Mass/volume] in Blood", "mg/dL", 1.3, 0.2, "laboratory", 2),
    ("6299-2", "Urea nitrogen [Mass/volume] in Blood", "mg/dL", 19, 5, "laboratory", 2),
    (
        "33914-3",
        "Glomerular filtration rate/1.73 sq M.predicted",
        "mL/min/{1.73_m2}",
        58,
        8,
        "laboratory",
        1,
    ),
    ("2951-2", "Sodium [Moles/volume] in Blood", "mmol/L", 139, 2.5, "laboratory", 2),
    ("2823-3", "Potassium [Moles/volume] in Blood", "mmol/L", 4.3, 0.4, "laboratory", 2),
    ("2075-0", "Chloride [Moles/volume] in Blood", "mmol/L", 103, 3, "laboratory", 2),
    ("2028-9", "Carbon dioxide, total [Moles/volume] in Blood", "mmol/L", 25, 2.5, "laboratory", 2),
    ("49765-1", "Calcium [Mass/volume] in Blood", "mg/dL", 9.3, 0.4, "laboratory", 1.5),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 12.8, 1.2, "laboratory", 2),
    (
        "6690-2",
        "Leukocytes [#/volume] in Blood by Automated count",
        "10*3/uL",
        8,
        2.5,
        "laboratory",
        2,
    ),
    (
        "777-3",
        "Platelets [#/volume] in Blood by Automated count",
        "10*3/uL",
        240,
        50,
        "laboratory",
        2,
    ),
    (
        "4544-3",
        "Hematocrit [Volume Fraction] of Blood by Automated count",
        "%",
        39,
        3,
        "laboratory",
        2,
    ),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 190, 25, "laboratory", 0.3),
    ("2571-8", "Triglycerides", "mg/dL", 150, 40, "laboratory", 0.3),
    ("18262-6", "Low Density Lipoprotein Cholesterol", "mg/dL", 110, 25, "laboratory", 0.3),
    ("2085-9", "High Density Lipoprotein Cholesterol", "mg/dL", 48, 8, "laboratory", 0.3),
    (
        "1742-6",
        "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
        "U/L",
        28,
        10,
        "laboratory",
        0.8,
    ),
    (
        "1920-8",
        "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
        "U/L",
        26,
        9,
        "laboratory",
        0.8,
    ),
    ("2524-7", "Lactate [Moles/volume] in Serum or Plasma", "mmol/L", 1.4, 0.6, "laboratory", 1),
]
BP_PANEL = ("85354-9", "Blood pressure panel with all children optional", 14.0)
CHRONIC = [  # SNOMED, display, onset year offset from the chart's start
    ("59621000", "Essential hypertension (disorder)", 0),
    ("44054006", "Diabetes mellitus type 2 (disorder)", 1),
    ("431855005", "Chronic kidney disease stage 1 (disorder)", 3),
    ("55822004", "Hyperlipidemia (disorder)", 2),
    ("49436004", "Atrial fibrillation (disorder)", 5),
    ("84114007", "Heart failure (disorder)", 6),
    ("13645005", "Chronic obstructive lung disease (disorder)", 4),
]
EPISODIC = [
    ("444814009", "Viral sinusitis (disorder)"),
    ("195662009", "Acute viral pharyngitis (disorder)"),
    ("10509002", "Acute bronchitis (disorder)"),
    ("68566005", "Urinary tract infectious disease (disorder)"),
    ("233604007", "Pneumonia (disorder)"),
    ("91302008", "Sepsis (disorder)"),
]
CHRONIC_MEDS = [
    ("860975", "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("259255", "atorvastatin 80 MG Oral Tablet"),
    ("855332", "Warfarin Sodium 5 MG Oral Tablet"),
    ("200031", "carvedilol 6.25 MG Oral Tablet"),
    ("313988", "Furosemide 40 MG Oral Tablet"),
]
SHORT_MEDS = [
    ("308182", "Amoxicillin 250 MG Oral Capsule"),
    ("313782", "Acetaminophen 325 MG Oral Tablet"),
    ("1659149", "piperacillin 4000 MG / tazobactam 500 MG Injection"),
    ("1736854", "Cefuroxime 250 MG Oral Tablet"),
]
ENCOUNTER_TYPES = [
    ("AMB", "185349003", "Encounter for check up (procedure)"),
    ("AMB", "390906007", "Follow-up encounter (procedure)"),
    ("EMER", "50849002", "Emergency room admission (procedure)"),
    ("IMP", "32485007", "Hospital admission (procedure)"),
]


def _concept(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {
        "value": round(value, 2 if abs(value) < 10 else 1),
        "unit": unit,
        "system": UCUM,
        "code": unit,
    }


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def generate_patient(resources: int, seed: int = 1, end: datetime | None = None) -> dict[str, Any]:
    """A collection Bundle of one patient with about ``resources`` resources, from ``seed``.

    Roughly 88% Observations (30 series, blood-pressure panels with systolic and diastolic
    components), 5% Encounters, 4% MedicationRequests (chronic drugs refilled, the newest active;
    short courses completed), 3% Conditions (chronic ones active, episodes resolved), spread over
    ten years to ``end`` (default 2026-06-01).
    """
    rnd = random.Random(seed)
    end = end or datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
    start = end - timedelta(days=3650)
    pid = f"large-{resources}-{seed}"
    patient = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": "Okonkwo-Lindqvist", "given": ["Marit"]}],
        "gender": "female",
        "birthDate": "1949-03-17",
    }
    out: list[dict[str, Any]] = [patient]
    subject = {"reference": f"Patient/{pid}"}
    n_enc = max(10, resources * 5 // 100)
    n_med = max(10, resources * 4 // 100)
    n_cond = max(len(CHRONIC) + 3, resources * 3 // 100)
    n_obs = resources - 1 - n_enc - n_med - n_cond
    span = (end - start).total_seconds()

    def when() -> datetime:
        # more charting in recent years (and in hospital stays): skewed towards the end
        return start + timedelta(seconds=int(span * rnd.random() ** 0.5))

    encounters = sorted(when() for _ in range(n_enc))
    for i, t in enumerate(encounters):
        cls, code, display = rnd.choices(ENCOUNTER_TYPES, weights=[5, 6, 2, 2])[0]
        out.append(
            {
                "resourceType": "Encounter",
                "id": f"{pid}-enc{i:06d}",
                "status": "finished",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": cls,
                },
                "type": [_concept(SNOMED, code, display)],
                "subject": subject,
                "period": {
                    "start": _iso(t),
                    "end": _iso(t + timedelta(hours=rnd.choice([0.5, 4, 72]))),
                },
            }
        )
    for i in range(n_cond):
        if i < len(CHRONIC):
            code, display, years = CHRONIC[i]
            onset, status, abated = start + timedelta(days=365 * years + 30), "active", None
        else:
            code, display = rnd.choice(EPISODIC)
            onset = when()
            status, abated = "resolved", onset + timedelta(days=rnd.randint(5, 30))
            if abated > end:
                status, abated = "active", None
        cond: dict[str, Any] = {
            "resourceType": "Condition",
            "id": f"{pid}-cond{i:06d}",
            "clinicalStatus": _concept(
                "http://terminology.hl7.org/CodeSystem/condition-clinical", status, status
            ),
            "verificationStatus": _concept(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "confirmed",
                "confirmed",
            ),
            "code": _concept(SNOMED, code, display),
            "subject": subject,
            "onsetDateTime": _iso(onset),
        }
        if abated is not None:
            cond["abatementDateTime"] = _iso(abated)
        out.append(cond)
    n_chronic_rx = n_med * 3 // 4
    refills = sorted(when() for _ in range(n_chronic_rx))
    newest: dict[str, int] = {}
    meds: list[dict[str, Any]] = []
    for i, t in enumerate(refills):
        code, display = CHRONIC_MEDS[i % len(CHRONIC_MEDS)]
        newest[code] = len(meds)
        meds.append(_med(pid, len(meds), code, display, t, "stopped", subject))
    for _ in range(n_med - n_chronic_rx):
        code, display = rnd.choice(SHORT_MEDS)
        meds.append(_med(pid, len(meds), code, display, when(), "completed", subject))
    for index in newest.values():
        meds[index]["status"] = "active"
    out += meds
    weights = [s[6] for s in SERIES] + [BP_PANEL[2]]
    level = {s[0]: s[3] for s in SERIES}
    for i, t in enumerate(sorted(when() for _ in range(n_obs))):
        pick = rnd.choices(range(len(SERIES) + 1), weights=weights)[0]
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": f"{pid}-obs{i:06d}",
            "status": "final",
            "subject": subject,
            "effectiveDateTime": _iso(t),
        }
        if pick == len(SERIES):
            category = "vital-signs"
            obs["code"] = _concept(LOINC, BP_PANEL[0], BP_PANEL[1])
            obs["component"] = [
                {
                    "code": _concept(LOINC, "8480-6", "Systolic blood pressure"),
                    "valueQuantity": _quantity(rnd.gauss(138, 14), "mm[Hg]"),
                },
                {
                    "code": _concept(LOINC, "8462-4", "Diastolic blood pressure"),
                    "valueQuantity": _quantity(rnd.gauss(82, 9), "mm[Hg]"),
                },
            ]
        else:
            code, display, unit, typical, spread, category, _ = SERIES[pick]
            # a random walk around the typical value: a chronic patient's values drift
            level[code] = 0.9 * level[code] + 0.1 * typical + rnd.gauss(0, spread * 0.4)
            obs["code"] = _concept(LOINC, code, display)
            obs["valueQuantity"] = _quantity(
                max(0.0, level[code] + rnd.gauss(0, spread * 0.3)), unit
            )
        obs["category"] = [{"coding": [{"system": OBS_CATEGORY, "code": category}]}]
        out.append(obs)
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r} for r in out],
    }


def _med(
    pid: str, i: int, code: str, display: str, when: datetime, status: str, subject: dict[str, str]
) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": f"{pid}-med{i:06d}",
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": _concept(RXNORM, code, display),
        "subject": subject,
        "authoredOn": _iso(when),
        "dosageInstruction": [{"text": "1 tablet by mouth daily"}],
    }


# --- measuring ----------------------------------------------------------------------------------

QUESTIONS = [
    "What was the last HbA1c?",
    "What is the average glucose over the last 3 years?",
    "What medications is the patient currently taking?",
    "What was the last blood pressure?",
    "Latest creatinine?",
    "Does the patient have heart failure?",
]


def _cli(home: Path, *args: str) -> float:
    """Seconds one ``chartsight`` command takes in a new process (it must succeed)."""
    env = {
        **os.environ,
        "CHARTSIGHT_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "surfaces.cli", *args], env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"chartsight {' '.join(args)} failed: {done.stderr[-2000:]}")
    return elapsed


def _warm(home: Path, patient: str, rounds: int) -> dict[str, Any]:
    """In this process: the first ask (record, compaction, ranking index), then ``rounds`` rounds
    of every question; peak RSS at the end."""
    os.environ["CHARTSIGHT_HOME"] = str(home)
    from agent.service import ChartSight
    from agent.settings import load_settings

    async def run() -> dict[str, Any]:
        async with ChartSight(load_settings(), use_index=False) as agent:
            start = time.perf_counter()
            first = await agent.ask(patient, QUESTIONS[0], keep=False)
            first_s = time.perf_counter() - start
            times: list[float] = []
            stages: dict[str, list[float]] = {}
            for _ in range(rounds):
                for question in QUESTIONS:
                    start = time.perf_counter()
                    answer = await agent.ask(patient, question, keep=False)
                    times.append((time.perf_counter() - start) * 1000)
                    for stage, ms in answer.latency_ms.items():
                        stages.setdefault(stage, []).append(ms)
            return {
                "first_s": first_s,
                "first_answer": first.text,
                "p50_ms": statistics.median(times),
                "p95_ms": sorted(times)[int(0.95 * (len(times) - 1))],
                "stages": {k: statistics.median(v) for k, v in stages.items()},
                "asked": len(times),
            }

    out = asyncio.run(run())
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _warm_in_child(home: Path, patient: str, rounds: int) -> dict[str, Any]:
    """``_warm`` in a new process, so that its peak RSS is the chart's alone."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, __file__, "--warm", str(home), patient, str(rounds)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"warm asks failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(rows: list[str], row: str) -> None:
    """Keep a result row, and show it at once (a 50k chart takes minutes)."""
    rows.append(row)
    print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="Rounds of the warm questions.")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument(
        "--warm", nargs=3, metavar=("HOME", "PATIENT", "ROUNDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.warm:
        print(json.dumps(_warm(Path(args.warm[0]), args.warm[1], int(args.warm[2]))))
        return

    from connectors.demo import demo_bundles

    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        tommy = next(p for p in demo_bundles() if SMALL_PATIENT in p.name or "Tommy" in p.name)
        _cli(home, "import", str(tommy))
        small_cold = [_cli(home, "ask", SMALL_PATIENT, QUESTIONS[0]) for _ in range(args.cold_runs)]
        small_warm = _warm_in_child(home, SMALL_PATIENT, args.rounds)
        _row(
            rows,
            f"| small (demo, 318 resources) | – | {_cli(home, 'record', SMALL_PATIENT, '--no-images'):.1f} s | "
            f"{statistics.median(small_cold):.1f} s | – | {small_warm['p50_ms']:.0f} ms | "
            f"{small_warm['p95_ms']:.0f} ms | {small_warm['peak_rss_mib']:.0f} MiB |",
        )
        stages_lines = []
        for size in args.sizes:
            bundle = generate_patient(size, args.seed)
            pid = bundle["entry"][0]["resource"]["id"]
            path = Path(tmp) / f"{pid}.json.gz"
            with gzip.open(path, "wt", encoding="utf-8") as fh:
                json.dump(bundle, fh)
            import_s = _cli(home, "import", str(path))
            record_s = _cli(home, "record", pid, "--no-images")
            cold = [_cli(home, "ask", pid, QUESTIONS[0]) for _ in range(args.cold_runs)]
            warm = _warm_in_child(home, pid, args.rounds)
            ratio = statistics.median(cold) / statistics.median(small_cold)
            _row(
                rows,
                f"| {size:,} resources | {import_s:.1f} s | {record_s:.1f} s | "
                f"{statistics.median(cold):.1f} s | {ratio:.2f}× | {warm['p50_ms']:.0f} ms | "
                f"{warm['p95_ms']:.0f} ms | {warm['peak_rss_mib']:.0f} MiB |",
            )
            stages = ", ".join(f"{k} {v:.1f} ms" for k, v in warm["stages"].items() if v >= 0.05)
            stages_lines.append(
                f"- {size:,}: first in-process ask (record, compaction, ranking index) "
                f"{warm['first_s']:.1f} s; median per stage when warm: {stages}."
            )
    report = "\n".join(
        [
            f"\n## Large charts — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
            f"Machine: {describe()}. Generated patients (seed {args.seed}; ~88% Observations of 30 "
            "LOINC series incl. blood-pressure panels, Encounters, MedicationRequests, Conditions "
            "over ten years) in a fresh local SQLite store. Import, `record` (no images) and cold "
            f"`ask` are new `chartsight` processes; cold `ask` is the median of {args.cold_runs} "
            '("What was the last HbA1c?"), and its ratio is to the small demo patient\'s in the '
            f"same run. Warm `ask`: in-process `ChartSight`, record cached, {len(QUESTIONS)} "
            f"question kinds × {args.rounds} rounds (latest value, average over a window, active "
            "medications, blood pressure, a problem); peak RSS of that process.\n",
            "| chart | import | `record` | cold `ask` p50 | × small | warm `ask` p50 | warm p95 | peak RSS |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *stages_lines,
        ]
    )
    print(report)
    with args.results.open("a") as fh:
        fh.write(report + "\n")


if __name__ == "__main__":
    main()
