"""Similar-case index build at population scale: the local engine and Ray with 1 and 2 workers side
by side, on one synthetic population (``benchmarks/make_population.py``) in a local SQLite store.

For each engine, in a new process of its own with a new index folder: patients/s over the whole
build, the per-stage split (``BuildReport.timings``: building cases from the store, encoding,
adding rows to SQL, and the FAISS pass: training, filling, on Ray merging, writing the
generation), and the peak memory of the build's whole process tree (the driver, and
for Ray its raylet, GCS and actors; RSS summed, sampled every 0.2 s). Then, in another process on
the local build: the similar-case query (``CaseIndex.similar``: encode the patient's case, search,
read the rows; the patient's own case left out) p50 and p95 over ``--queries`` patients, and
whether every Ray-built index returns the same top-5 keys. A cluster projection from the
measured per-worker rates closes the section; its assumptions are printed with it.

    python benchmarks/index_build.py --patients 2000                      # a check (~10 min here)
    python benchmarks/index_build.py --patients 100000 --work /data/bench # the full run

Disk: the SQLite store takes about 0.3 MB a patient without Claims and ExplanationOfBenefits (the
default ``--skip-types``; no case reads them), 0.6 MB with them; the population's NDJSON about
20 kB a patient; each index about 16 kB a patient.

The population and the store are kept under ``--work`` (default a folder in /tmp) and reused by
the next run of the same size. Results are appended to ``--results`` (default
``benchmarks/results.md``), with the machine and its load average named: numbers from a loaded
machine say so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402

ENGINES = {"local": ("local", None), "ray1": ("ray", 1), "ray2": ("ray", 2)}


def _settings(home: Path, store: str, models: Path, engine: str = "local") -> Any:
    from agent.settings import Settings

    kind, workers = ENGINES[engine]
    return Settings(
        home=home,
        store={"url": store},
        retrieval={"encoders": {"cache_dir": str(models)}},
        index_build={"engine": kind, "workers": workers},
    )


def _tree_rss(pid: int) -> int:
    """Bytes of resident memory of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            statm = Path(f"/proc/{entry}/statm").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
        rss[int(entry)] = int(statm.split()[1]) * page
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def _run_child(args: list[str]) -> tuple[dict[str, Any], int]:
    """(the child's JSON result, the peak RSS of its process tree in bytes)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed (exit {proc.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1]), peak


# ------------------------------------------------------------------ children


def child_build(engine: str, home: Path, store: str, models: Path) -> dict[str, Any]:
    """Build a new index at ``home`` with ``engine``; the BuildReport and wall seconds."""
    from agent.index_build import build_index, install_rebuilt, open_index
    from agent.service import source_for
    from retrieval.encoders import EncoderRegistry

    settings = _settings(home, store, models, engine)
    started = time.perf_counter()
    index = open_index(settings, EncoderRegistry(settings.retrieval.encoders), rebuild=True)

    async def go() -> Any:
        source = source_for(settings)
        try:
            return await build_index(index, source, settings)
        finally:
            await source.aclose()

    report = asyncio.run(go())
    wall = time.perf_counter() - started
    factory, size = index.factory, len(index)
    install_rebuilt(index, settings)  # built in a staging folder; now the live index at ``home``
    return {
        "wall": wall,
        "patients": report.patients,
        "cases": report.cases,
        "added": report.added,
        "failed": len(report.failed),
        "workers": report.workers,
        "timings": report.timings,
        "factory": factory,
        "size": size,
    }


def child_query(homes: list[Path], store: str, models: Path, queries: int) -> dict[str, Any]:
    """Similar-case query latency on the first index, and top-5 agreement of the others with it."""
    import numpy as np

    from agent.index_build import BuildReport, open_index, patient_cases, patient_ids
    from agent.service import source_for
    from retrieval.encoders import EncoderRegistry
    from retrieval.index import CaseFilter

    settings = _settings(homes[0], store, models)
    encoders = EncoderRegistry(settings.retrieval.encoders)

    async def cases() -> list[Any]:
        source = source_for(settings)
        try:
            every = await patient_ids(source)
            ids = every[:: max(1, len(every) // queries)]
            found = []
            async for cs in patient_cases(source, None, settings, ids[:queries], BuildReport()):
                found.extend(c for c in cs if c.kind == "patient")
            return found
        finally:
            await source.aclose()

    asked = asyncio.run(cases())
    index = open_index(settings, encoders)
    index.similar(asked[0], 5, CaseFilter(exclude_patient=asked[0].patient_id))  # warm
    times, top = [], []
    for case in asked:
        started = time.perf_counter()
        hits = index.similar(case, 5, CaseFilter(exclude_patient=case.patient_id))
        times.append(time.perf_counter() - started)
        top.append([h.key for h in hits])
    if not len(index):
        raise SystemExit(f"the index at {homes[0]} is empty: nothing to query")
    agree = {}
    for home in homes[1:]:
        other = open_index(_settings(home, store, models), encoders)
        same = [
            [h.key for h in other.similar(c, 5, CaseFilter(exclude_patient=c.patient_id))] == t
            for c, t in zip(asked, top, strict=True)
        ]
        agree[home.name] = float(np.mean(same))
    ms = np.asarray(times) * 1000
    return {
        "queries": len(asked),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "size": len(index),
        "factory": index.factory,
        "agree": agree,
    }


def child_warm(home: Path, store: str, models: Path) -> dict[str, Any]:
    """Load the encoders once (the ONNX export of the text encoder is kept in ``models``)."""
    from retrieval.encoders import EncoderRegistry

    settings = _settings(home, store, models)
    encoders = EncoderRegistry(settings.retrieval.encoders)
    encoders.text().encode_texts(["warm"])
    return {"image": encoders.image().info.name}


# ------------------------------------------------------------------ the run


def _import(population: Path, store_path: Path) -> dict[str, float]:
    """Import the population's NDJSON (Patients first) into a new SQLite store."""
    from benchmarks.make_population import import_population

    resources, took = import_population(population, f"sqlite:///{store_path}")
    return {"resources": resources, "seconds": took}


def _projection(rows: dict[str, dict[str, Any]], patients: int) -> list[str]:
    """Cluster projection lines from the 2-worker Ray run (else the 1-worker one)."""
    run = rows.get("ray2") or rows.get("ray1")
    if run is None:
        return []
    t = run["timings"]
    per_worker = patients / max(t["cases"] + t["encode"], 1e-9)
    driver = patients / max(t["add"], 1e-9)
    index_per_patient = t["index"] / patients
    lines = [
        "",
        f"Projection from the Ray run with {run['workers']} workers: a worker builds and encodes "
        f"{per_worker:.1f} patients/s (cases {patients / max(t['cases'], 1e-9):.1f}/s, encoding "
        f"{patients / max(t['encode'], 1e-9):.1f}/s); the driver writes {driver:.0f} patients/s "
        f"to SQL; the FAISS pass took {t['index']:.1f} s.",
        "",
        "| workers | patients/s | 1M patients |",
        "|---|---|---|",
    ]
    for workers in (8, 32, 128):
        rate = min(workers * per_worker, driver)
        hours = (1_000_000 / rate + index_per_patient * 1_000_000) / 3600
        lines.append(f"| {workers} | {rate:.0f} | {hours:.1f} h |")
    lines += [
        "",
        "Assumptions: each worker is one core like this machine's (no GPU: a GPU worker encodes "
        "faster, unmeasured here); the store (PostgreSQL or a FHIR server) serves every worker's "
        "reads at the rate measured here on local SQLite, and transfers cost nothing; the driver "
        "writes rows at the measured rate, so beyond driver-rate ÷ per-worker-rate workers it is "
        "the bound; the FAISS pass grows linearly with the population (its training on a sample "
        "of at most 65,536 does not; filling is spread over the workers).",
    ]
    return lines


def main() -> None:
    """Command line: see the module's docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=None, help="population, store and indexes")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--skip-types",
        default="Claim,ExplanationOfBenefit",
        help="resource types left out of the population (no case reads them; '' keeps all)",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "build":
            out = child_build(rest[0], Path(rest[1]), rest[2], Path(rest[3]))
        elif kind == "warm":
            out = child_warm(Path(rest[0]), rest[1], Path(rest[2]))
        else:
            out = child_query([Path(p) for p in rest[3:]], rest[0], Path(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return

    work = args.work or Path(tempfile.gettempdir()) / f"chartsight-population-{args.patients}"
    population, store_path, models = work / "population", work / "store.db", work / "models"
    load_before = os.getloadavg()[0]
    if not (population / "Patient.00000.ndjson.gz").exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "make_population.py"),
                "--patients",
                str(args.patients),
                "--out",
                str(population),
                "--data",
                str(args.data),
                "--skip-types",
                args.skip_types,
            ],
            check=True,
        )
    imported = None
    if not store_path.exists():
        imported = _import(population, store_path)
        print(f"import: {imported}", file=sys.stderr)
    store = f"sqlite:///{store_path}"
    _run_child(["--child", "warm", str(work / "warm"), store, str(models)])
    rows: dict[str, dict[str, Any]] = {}
    for engine in args.engines:
        result, peak = _run_child(
            ["--child", "build", engine, str(work / engine), store, str(models)]
        )
        result["peak"] = peak
        rows[engine] = result
        print(f"{engine}: {result}", file=sys.stderr)
    homes = [str(work / e) for e in args.engines]
    query, query_peak = _run_child(
        ["--child", "query", store, str(models), str(args.queries), *homes]
    )
    load_after = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    loaded = max(load_before, load_after) > 0.5 * cores

    lines = [
        f"\n## Index build at population scale — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {describe()}. Load average (1 min) {load_before:.1f} before, "
        f"{load_after:.1f} after, on {cores} cores"
        + (": **numbers from a loaded machine**." if loaded else "."),
        "",
        f"Population: {args.patients:,} patients from `benchmarks/make_population.py` (the 60 "
        "Synthea patients replicated, new ids, shifted dates; no image pixels, so cases are "
        f"encoded from text; left out: {args.skip_types or 'nothing'})"
        + (
            f", imported into SQLite: {imported['resources']:,} resources in "
            f"{imported['seconds']:.0f} s ({imported['resources'] / imported['seconds']:.0f}/s)"
            if imported
            else ""
        )
        + ". Each build is a new process and a new index; the stage columns are seconds "
        "(Ray: cases and encoding summed over its workers, worker-seconds).",
        "",
        "| engine | workers | patients/s | wall s | cases s | encode s | add s | FAISS s | "
        "peak RSS (tree) | index |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, r in rows.items():
        t = r["timings"]
        lines.append(
            f"| {ENGINES[engine][0]} | {r['workers']} | {r['patients'] / r['wall']:.1f} | "
            f"{r['wall']:.0f} | {t['cases']:.0f} | {t['encode']:.0f} | {t['add']:.0f} | "
            f"{t['index']:.1f} | {r['peak'] / 2**30:.2f} GiB | {r['factory']}, {r['size']:,} |"
        )
    agree = ", ".join(f"{k} {v:.0%}" for k, v in query["agree"].items())
    lines += [
        "",
        f"Similar-case query on the {query['size']:,}-case index ({query['factory']}), "
        f"{query['queries']} patients: p50 {query['p50_ms']:.1f} ms, p95 {query['p95_ms']:.1f} ms "
        f"(encoding the case, searching, reading rows); peak RSS {query_peak / 2**30:.2f} GiB. "
        f"Same top-5 keys as the local build: {agree or 'no other engine run'}.",
    ]
    lines += _projection(rows, args.patients)
    text = "\n".join(lines) + "\n"
    print(text)
    with args.results.open("a", encoding="utf-8") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
