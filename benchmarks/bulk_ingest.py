"""Bulk ingest: a population's FHIR Bulk Data NDJSON (``benchmarks/make_population.py``, what a
``$export`` hands over) imported into the store, SQLite and PostgreSQL side by side in one run.

This is the store half of ``chartsight bulk``: after its downloads (loopback-fast here, network-
bound in a hospital), each NDJSON file goes through ``FhirStore.import_path`` (validated, all or
nothing per file, streamed line by line). Each store kind is imported in a new process of its
own, Patients first; reported: resources/s, the whole import's time, the importing process's
peak resident memory (it stays flat as files grow: nothing holds a file), and the store's size.
PostgreSQL is a real server started for the run (``tests/peers/postgres.py``: the
distribution's binaries, default settings, on the same disk and cores).

    python benchmarks/bulk_ingest.py --patients 2000            # ~0.8M resources
    python benchmarks/bulk_ingest.py --patients 2000 --results -  # print only

Results are appended to ``--results`` (default ``benchmarks/results.md``) with the machine and its
load average named.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402


def _child(population: Path, url: str) -> dict[str, Any]:
    """In the child process: import every file into the store at ``url``."""
    from benchmarks.make_population import import_population

    resources, took = import_population(population, url)
    files = len(list(population.glob("*.ndjson.gz")))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB
    return {"resources": resources, "seconds": took, "files": files, "peak_mib": peak}


def _run(population: Path, url: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(population), url],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _postgres_size(url: str) -> float:
    import psycopg

    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return float(row[0]) / 2**20 if row else float("nan")


def main() -> None:
    """Command line: see the module's docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--work", type=Path, default=None, help="population and SQLite store")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results.md"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(Path(args.child[0]), args.child[1])))
        return

    from benchmarks.make_population import write_population

    work = args.work or Path(tempfile.mkdtemp(prefix="chartsight-bulk-ingest-"))
    population = work / f"population-{args.patients}"
    if not list(population.glob("Patient.*.ndjson.gz")):
        write_population(
            args.data,
            population,
            args.patients,
            1,
            1000,
            {"Claim", "ExplanationOfBenefit"},
        )
    size = sum(p.stat().st_size for p in population.glob("*.ndjson.gz")) / 2**20
    load = os.getloadavg()[0]
    rows = []
    for kind in args.stores:
        if kind == "sqlite":
            db = work / f"store-{args.patients}-{time.time_ns()}.db"
            result = _run(population, f"sqlite:///{db}")
            result["size_mib"] = db.stat().st_size / 2**20
            db.unlink()
            for extra in (Path(f"{db}-wal"), Path(f"{db}-shm")):
                extra.unlink(missing_ok=True)
        else:
            from tests.peers.postgres import PostgresServer

            with PostgresServer() as server:
                url = server.create_database("bulk_ingest")
                result = _run(population, url)
                result["size_mib"] = _postgres_size(url)
        rows.append((kind, result))
        print(kind, result, file=sys.stderr)

    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## Bulk ingest (store side of `chartsight bulk`) — {when}",
        "",
        f"Machine: {describe()}; load average {load:.1f} at the start"
        + (" (a loaded machine: other jobs were running)" if load > 1.5 else "")
        + f". {args.patients:,} patients from `benchmarks/make_population.py` (seed 1, Claims and "
        f"ExplanationOfBenefits left out), {size:.0f} MiB of gzipped NDJSON, imported file by file "
        "through `FhirStore.import_path` (validated, all or nothing per file), Patients first, each "
        "store in a new process.",
        "",
        "| store | resources | time | resources/s | peak RSS | store size |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in rows:
        lines.append(
            f"| {'SQLite' if kind == 'sqlite' else 'PostgreSQL'} | {r['resources']:,} | "
            f"{r['seconds']:.0f} s | {r['resources'] / r['seconds']:,.0f} | "
            f"{r['peak_mib']:.0f} MiB | {r['size_mib']:.0f} MiB |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results != "-":
        with open(args.results, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
