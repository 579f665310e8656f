"""A synthetic population for the population-scale benchmarks: the Synthea patients of
``../shared/data/synthea-r4-smart`` (60 transaction Bundles, Apache-2.0) replicated to N patients
with new ids and shifted dates, written as FHIR Bulk Data NDJSON (what a ``$export`` hands over, and
what ``chartsight import`` reads), streamed to disk: one patient in memory at a time.

Copy ``c`` of source patient ``s`` (patient number ``n = c·60 + s``) gets:
  - new ids: every UUID in the bundle (resource ids, ``urn:uuid`` references, the Synthea
    identifier) replaced by a UUID-5 of (seed, n, old UUID): the same seed gives the same files;
  - references made relative (``urn:uuid:<id>`` → ``<Type>/<new id>``), since NDJSON has no Bundle
    to resolve ``urn:uuid`` within;
  - every date and dateTime shifted back by the same whole number of days, drawn per patient from
    [0, 3650) (seeded), so intervals within a chart are kept and no date moves into the future;
  - the Patient's other identifiers (SSN, driver's licence, passport) suffixed ``-<n>`` and the
    family name suffixed with ``n``, so that no two patients share an identifier or a name.

Files: ``<out>/<ResourceType>.<part>.ndjson.gz``, a part per ``--per-part`` patients (default 1000),
each resource type's lines in patient order. Never commit them (they are data, and large: about
0.7 MB of JSON per patient before gzip; ``--skip-types Claim,ExplanationOfBenefit`` halves that).

    python benchmarks/make_population.py --patients 100000 --out /tmp/population-100k
    .venv/bin/chartsight import /tmp/population-100k/Patient.*.ndjson.gz /tmp/population-100k/*.ndjson.gz
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# a UUID, or a date at the start of a JSON string ("2019-03-17" or "2019-03-17T08:00:00-04:00")
_TOKEN = re.compile(rf"({_UUID})|(?<=\")(\d{{4}}-\d{{2}}-\d{{2}})(?=[T\"])")
_URN = re.compile(rf"\"urn:uuid:({_UUID})\"")


def templates(data: Path) -> list[list[tuple[str, str]]]:
    """Per source patient (in file name order), its resources as (resource type, one JSON line
    with ``urn:uuid`` references made relative), Patient first. Raises FileNotFoundError when
    ``data`` has no ``synthea-r4-smart/bundles``."""
    folder = data / "synthea-r4-smart" / "bundles"
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no Synthea bundles in {folder}")
    out = []
    for path in files:
        bundle = json.loads(path.read_text(encoding="utf-8"))
        types = {
            e["fullUrl"].removeprefix("urn:uuid:"): e["resource"]["resourceType"]
            for e in bundle["entry"]
        }
        lines = []
        for entry in bundle["entry"]:
            resource = entry["resource"]
            text = json.dumps(resource, separators=(",", ":"), ensure_ascii=False)
            text = _URN.sub(
                lambda m, types=types: (
                    f'"{types[m.group(1)]}/{m.group(1)}"' if m.group(1) in types else m[0]
                ),
                text,
            )
            lines.append((resource["resourceType"], text))
        lines.sort(key=lambda tl: tl[0] != "Patient")
        out.append(lines)
    return out


def patient_lines(
    template: list[tuple[str, str]], number: int, seed: int
) -> Iterator[tuple[str, str]]:
    """The resources of patient ``number`` made from ``template`` (see the module's docstring),
    as (resource type, JSON line)."""
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"chartsight-population/{seed}/{number}")
    shift = timedelta(days=int(np.random.default_rng([seed, number]).integers(0, 3650)))
    ids: dict[str, str] = {}
    days: dict[str, str] = {}

    def swap(match: re.Match[str]) -> str:
        old = match.group(1)
        if old is not None:
            if old not in ids:
                ids[old] = str(uuid.uuid5(namespace, old))
            return ids[old]
        day = match.group(2)
        if day not in days:
            try:
                days[day] = (date.fromisoformat(day) - shift).isoformat()
            except ValueError:  # not a calendar date
                days[day] = day
        return days[day]

    for kind, text in template:
        text = _TOKEN.sub(swap, text)
        if kind == "Patient":
            patient: dict[str, Any] = json.loads(text)
            for ident in patient.get("identifier", []):
                if "value" in ident and ident["value"] not in ids.values():
                    ident["value"] = f"{ident['value']}-{number}"
            for name in patient.get("name", []):
                if "family" in name:
                    name["family"] = f"{name['family']}{number}"
            text = json.dumps(patient, separators=(",", ":"), ensure_ascii=False)
        yield kind, text


def write_population(
    data: Path, out: Path, patients: int, seed: int, per_part: int, skip: set[str]
) -> dict[str, int]:
    """Write ``patients`` patients under ``out`` (see the module's docstring); returns resources
    written per type. Files are gzip level 1 (fast); a part is closed before the next opens."""
    source = templates(data)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for first in range(0, patients, per_part):
        part = first // per_part
        with contextlib.ExitStack() as files:
            handles: dict[str, IO[str]] = {}
            for number in range(first, min(first + per_part, patients)):
                for kind, text in patient_lines(source[number % len(source)], number, seed):
                    if kind in skip:
                        continue
                    if kind not in handles:
                        path = out / f"{kind}.{part:05d}.ndjson.gz"
                        handles[kind] = files.enter_context(
                            gzip.open(path, "wt", encoding="utf-8", compresslevel=1)
                        )
                    handles[kind].write(text + "\n")
                    counts[kind] = counts.get(kind, 0) + 1
    return counts


def import_population(population: Path, url: str) -> tuple[int, float]:
    """Import a population's NDJSON files (Patients first) into the store at the SQLAlchemy
    ``url`` through ``FhirStore.import_path``, as ``chartsight import``/``bulk`` do; returns
    (resources imported, seconds)."""
    from connectors.store import FhirStore

    store = FhirStore(url)
    files = sorted(
        population.glob("*.ndjson.gz"), key=lambda p: (p.name.split(".")[0] != "Patient", p.name)
    )
    started = time.perf_counter()
    resources = 0
    for path in files:
        resources += store.import_path(path).count
    took = time.perf_counter() - started
    store.close()
    return resources, took


def main() -> None:
    """Command line: see the module's docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per-part", type=int, default=1000, help="patients per NDJSON part")
    parser.add_argument("--skip-types", default="", help="resource types left out, comma-separated")
    args = parser.parse_args()
    started = time.perf_counter()
    skip = {t for t in args.skip_types.split(",") if t}
    counts = write_population(args.data, args.out, args.patients, args.seed, args.per_part, skip)
    took = time.perf_counter() - started
    total = sum(counts.values())
    print(
        f"{args.patients} patients, {total} resources in {args.out} ({took:.0f} s): "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
