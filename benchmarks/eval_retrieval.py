"""Retrieval quality on real data, with the embedded-default encoders.

1. Similar cases on ``covid-chestxray`` (read from ``--data``, never copied into the product):
   every labelled row is a case (its image and its clinical notes, label = ``finding``). Each case
   queries the index with its own patient left out (``CaseFilter(exclude_patient=...)``, the
   product's filter), so query and retrieved cases never share a ``patientid``. Reported:
   precision@5 of same-finding cases for image-only, text-only and fused queries, against the
   chance level of the label distribution.
2. Chart evidence on the Synthea patients (``synthea-r4-smart``, or the demo patients): questions
   whose right evidence is computed from the data (the newest result of a LOINC code, the
   patient's conditions of a kind, the active medications). Reported: hit@1, hit@5 and mean
   reciprocal rank for BM25 only, embeddings only and the hybrid ranker.
Results are appended to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from connectors.demo import demo_bundles  # noqa: E402
from connectors.record import PatientRecord, assemble_record  # noqa: E402
from connectors.store import FhirStore, StoreSource  # noqa: E402
from retrieval.cases import Case, age_band  # noqa: E402
from retrieval.encoders import EncoderRegistry, TextEncoder  # noqa: E402
from retrieval.evidence import record_evidence  # noqa: E402
from retrieval.index import CaseFilter, CaseIndex  # noqa: E402
from retrieval.rank import EvidenceRanker  # noqa: E402
from retrieval.settings import EncoderSettings, FusionSettings, IndexSettings, RankSettings  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
NARROW = 50  # dense candidates of the narrowed hybrid row (the default is 200)


# --- 1. similar cases ---------------------------------------------------------------------------


def covid_cases(folder: Path) -> list[Case]:
    cases = []
    with (folder / "metadata_subset.csv").open(newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.DictReader(fh)):
            finding = row["finding"].strip()
            if not finding or finding == "todo":
                continue
            path = folder / "images" / row["filename"]
            if not path.is_file():
                continue
            with Image.open(path) as im:
                image = im.convert("RGB")
            age = int(float(row["age"])) if row["age"].strip() else None
            cases.append(
                Case(
                    key=f"covid/{n}/{row['filename']}",
                    patient_id=row["patientid"],
                    summary=row["clinical_notes"].strip(),
                    images=[image],
                    sex={"M": "male", "F": "female"}.get(row["sex"].strip()),
                    age_band=age_band(age),
                    modalities=("CT",) if row["modality"] == "CT" else ("DX",),
                    label=finding,
                )
            )
    return cases


def similar_cases(data: Path, registry: EncoderRegistry, k: int = 5) -> list[str]:
    folder = data / "covid-chestxray"
    cases = covid_cases(folder)
    labels = Counter(c.label for c in cases)
    n = len(cases)
    with tempfile.TemporaryDirectory() as tmp:
        index = CaseIndex(
            Path(tmp), IndexSettings(), FusionSettings(), registry.text(), registry.image()
        )
        start = time.perf_counter()
        index.upsert(cases)
        build = time.perf_counter() - start
        text = registry.text().encode_texts([c.summary for c in cases])
        images = registry.image().encode_images([c.images[0] for c in cases])
        modes: dict[str, tuple[float, float]] = {
            "image only": (1.0, 0.0),
            "text only": (0.0, 1.0),
            "fused (0.5 / 0.5, the default)": (0.5, 0.5),
            "fused (0.25 / 0.75)": (0.25, 0.75),
        }
        rows = []
        for mode, (wi, wt) in modes.items():
            queries = index.fusion.fuse(text, images, image_weight=wi, text_weight=wt)
            precisions = []
            for case, query in zip(cases, queries, strict=True):
                found = index.search_vectors(
                    query[None, :], k, CaseFilter(exclude_patient=case.patient_id)
                )[0]
                hits = index.hits(found)
                precisions.append(sum(h.label == case.label for h in hits) / k)
            rows.append((mode, statistics.mean(precisions)))
    chance = sum((m / n) ** 2 for m in labels.values())
    out = [
        f"\n### Similar cases: covid-chestxray ({n} labelled images, {len({c.patient_id for c in cases})} "
        f"patients, {len(labels)} findings)\n",
        f"Encoders: {registry.text().info.name} (text) and {registry.image().info.name} (image), "
        f"fused by concatenation. Each case queries with its own patient excluded inside the "
        f"search. Encoding and indexing all cases: {build:.1f} s. Chance precision@5 "
        f"(label distribution): {chance:.3f}; most common finding "
        f"{labels.most_common(1)[0][0]} ({labels.most_common(1)[0][1] / n:.0%}).\n",
        "| query | precision@5 (same finding) |",
        "|---|---|",
    ]
    out += [f"| {mode} | {p:.3f} |" for mode, p in rows]
    return out


# --- 2. chart evidence --------------------------------------------------------------------------


@dataclass
class Question:
    text: str
    answers: Callable[[PatientRecord], set[str]]  # evidence ids that answer it (empty: skip)
    kind: str  # "newest" (one right item) or "any" (any of a set)


def _newest(*loinc: str) -> Callable[[PatientRecord], set[str]]:
    def find(record: PatientRecord) -> set[str]:
        matches = [
            o
            for o in record.observations
            if any(c.code in loinc for c in (o.code.coding or []))
            and o.effectiveDateTime is not None
        ]
        if not matches:
            return set()
        return {"Observation/" + str(max(matches, key=lambda o: o.effectiveDateTime).id)}

    return find


def _conditions(*snomed: str) -> Callable[[PatientRecord], set[str]]:
    def find(record: PatientRecord) -> set[str]:
        return {
            f"Condition/{c.id}"
            for c in record.conditions
            if any(x.code in snomed for x in (c.code.coding or []))
        }

    return find


def _newest_vaccine(*cvx: str) -> Callable[[PatientRecord], set[str]]:
    def find(record: PatientRecord) -> set[str]:
        shots = [
            i
            for i in record.immunizations
            if any(c.code in cvx for c in (i.vaccineCode.coding or []))
        ]
        if not shots:
            return set()
        return {"Immunization/" + str(max(shots, key=lambda i: i.occurrenceDateTime).id)}

    return find


def _active_medications(record: PatientRecord) -> set[str]:
    return {f"{m.get_resource_type()}/{m.id}" for m in record.medications if m.status == "active"}


QUESTIONS = [
    Question("What was the most recent hemoglobin A1c?", _newest("4548-4"), "newest"),
    Question("What is the latest creatinine?", _newest("38483-4", "2160-0"), "newest"),
    Question("What is the patient's current body weight?", _newest("29463-7"), "newest"),
    Question("What was the last blood pressure reading?", _newest("55284-4", "85354-9"), "newest"),
    Question("What is the latest BMI?", _newest("39156-5"), "newest"),
    Question("Most recent total cholesterol?", _newest("2093-3"), "newest"),
    Question("What was the last hemoglobin level?", _newest("718-7"), "newest"),
    Question("Latest glucose value?", _newest("2339-0"), "newest"),
    Question("What is the patient's smoking status?", _newest("72166-2"), "newest"),
    Question("When was the last flu shot?", _newest_vaccine("140", "141", "158"), "newest"),
    Question("Does the patient have hypertension?", _conditions("59621000", "38341003"), "any"),
    Question(
        "Does the patient have diabetes or prediabetes?",
        _conditions("44054006", "15777000", "73211009"),
        "any",
    ),
    Question("Does the patient have asthma?", _conditions("195967001", "233678006"), "any"),
    Question(
        "Is there any chronic kidney disease?",
        _conditions("431855005", "431856006", "433144002", "127013003"),
        "any",
    ),
    Question("What medications is the patient currently taking?", _active_medications, "any"),
]


async def _records(paths: list[Path]) -> list[PatientRecord]:
    with tempfile.TemporaryDirectory() as tmp:
        store = FhirStore(f"sqlite:///{tmp}/store.db")
        for path in paths:
            store.import_path(path)
        source = StoreSource(store)
        records = [await assemble_record(source, p.id) for p in store.patients(limit=10_000)]
        store.close()
    return records


class _SharedLines:
    """The text encoder with one cache for every ranker of this evaluation: each line is encoded
    once, not once per ranker (the rankers' own caches are per instance)."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self.info = encoder.info
        self.vectors: dict[str, np.ndarray] = {}

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if missing:
            self.vectors.update(zip(missing, self.encoder.encode_texts(missing), strict=True))
        if not texts:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        return np.stack([self.vectors[t] for t in texts])


def chart_evidence(data: Path, registry: EncoderRegistry) -> list[str]:
    folder = data / "synthea-r4-smart" / "bundles"
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else demo_bundles()
    records = asyncio.run(_records(paths))
    text = _SharedLines(registry.text())
    rankers = {
        "BM25 only": EvidenceRanker(
            RankSettings(
                dense_weight=0, code_weight=0, category_weight=0, recency_weight=0, active_weight=0
            )
        ),
        "embeddings only": EvidenceRanker(
            RankSettings(
                lexical_weight=0,
                code_weight=0,
                category_weight=0,
                recency_weight=0,
                active_weight=0,
                dense_candidates=0,  # no other part to narrow by: every line is embedded
            ),
            text,
        ),
        "hybrid (default)": EvidenceRanker(RankSettings(), text),
        # the narrowing large charts get, forced onto these small ones: it must not cost quality
        f"hybrid, {NARROW} dense candidates": EvidenceRanker(
            RankSettings(dense_candidates=NARROW), text
        ),
    }
    results: dict[str, list[float]] = {name: [] for name in rankers}
    per_question: dict[str, dict[str, list[float]]] = {name: {} for name in rankers}
    asked = 0
    for record in records:
        items = record_evidence(record)
        for q in QUESTIONS:
            right = q.answers(record)
            if not right:
                continue
            asked += 1
            for name, ranker in rankers.items():
                order = [r.evidence.id for r in ranker.score(q.text, items)]
                rank = next((i + 1 for i, eid in enumerate(order) if eid in right), len(order) + 1)
                results[name].append(rank)
                per_question[name].setdefault(q.text, []).append(rank)
    out = [
        f"\n### Chart evidence: {len(QUESTIONS)} question types over {len(records)} Synthea patients "
        f"({asked} patient-questions with an answer in the chart)\n",
        "Right evidence computed from the data: the newest Observation of the LOINC code (or newest "
        "Immunization), any Condition of the SNOMED codes, any active medication. Rank = position "
        "of the first right item among all of the patient's evidence items.\n",
        "| ranker | hit@1 | hit@5 | MRR | median rank |",
        "|---|---|---|---|---|",
    ]
    for name, ranks in results.items():
        out.append(
            f"| {name} | {sum(r == 1 for r in ranks) / len(ranks):.3f} | "
            f"{sum(r <= 5 for r in ranks) / len(ranks):.3f} | "
            f"{statistics.mean(1 / r for r in ranks):.3f} | {statistics.median(ranks):g} |"
        )
    out += ["", "Hit@1 per question (hybrid):", ""]
    for text, ranks in per_question["hybrid (default)"].items():
        out.append(f"- {text} — {sum(r == 1 for r in ranks)}/{len(ranks)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("--only", choices=["cases", "evidence"], help="Run one part only.")
    args = parser.parse_args()
    registry = EncoderRegistry(EncoderSettings(device="cpu"))
    lines: list[Any] = [
        f"\n## Retrieval quality — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {describe()}.",
    ]
    if args.only != "evidence":
        if (args.data / "covid-chestxray").is_dir():
            lines += similar_cases(args.data, registry)
        else:
            lines.append(f"\n(no covid-chestxray under {args.data}: similar cases skipped)")
    if args.only != "cases":
        lines += chart_evidence(args.data, registry)
    report = "\n".join(lines) + "\n"
    print(report)
    with args.results.open("a") as fh:
        fh.write(report)


if __name__ == "__main__":
    main()
