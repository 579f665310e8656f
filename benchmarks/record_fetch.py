"""Time to assemble one patient's full record from SEKMET: ChartSight's client vs a sequential
reference and fhirpy, each ending in a typed ``PatientRecord``.

Runs against a real SEKMET started on 127.0.0.1 (``scripts/setup-peers.sh`` installs it), loaded with
the packaged demo patients. For a small and the largest patient it times, with the median of N runs:
  - chartsight/$everything  - ChartSight's client as configured by default (the server offers
                              $everything), with its fast validation (``connectors.fast_validation``)
  - chartsight/per-type     - ChartSight's concurrent per-type searches (servers without $everything)
  - chartsight, strict      - $everything again, validated by fhir.resources' own code
  - sequential reference    - one search per resource type, one page after another, as a plain client
                              does, validated by fhir.resources' own code
  - fhirpy + fhir.resources - fhirpy 2 (``pip install -e .[bench]``), the same per-type searches
                              run concurrently (``asyncio.gather`` of ``fetch_all``), each
                              resource built as its fhir.resources model by fhirpy (fhir.resources'
                              own code)
  - raw JSON columns        - the sequential reference and fhirpy stopping before validation.
Results are appended to ``benchmarks/results.md`` (``--results -`` prints them only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

try:
    from fhirpy import AsyncFHIRClient
except ImportError as exc:  # pragma: no cover - an install without the bench extra
    raise SystemExit("benchmarks/record_fetch.py needs fhirpy: pip install -e '.[bench]'") from exc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhir.resources.R4B.patient import Patient  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from connectors import fast_validation  # noqa: E402
from connectors.demo import demo_bundles  # noqa: E402
from connectors.fhir_client import FhirClient  # noqa: E402
from connectors.record import PatientRecord, assemble_record  # noqa: E402
from connectors.resources import InvalidResource, validate  # noqa: E402
from connectors.settings import FhirServerSettings  # noqa: E402
from connectors.source import PATIENT_COMPARTMENT_SEARCHES  # noqa: E402
from tests.conftest import load_bundle  # noqa: E402
from tests.peers.servers import Sekmet  # noqa: E402


class RoundTrip(httpx.AsyncHTTPTransport):
    """Adds a fixed network round trip to every request (both clients get the same one)."""

    def __init__(self, rtt_s: float) -> None:
        super().__init__()
        self.rtt_s = rtt_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """httpx's response to ``request``, sent after ``rtt_s`` seconds."""
        if self.rtt_s:
            await asyncio.sleep(self.rtt_s)
        return await super().handle_async_request(request)


def typed_record(patient: dict[str, Any], raws: list[dict[str, Any]], base: str) -> int:
    """Validate a Patient's JSON and the JSON of its resources (``connectors.resources.validate``)
    into a ``PatientRecord``, filed as ChartSight files them; the resources it holds. Raises
    ``AssertionError`` when one is invalid (the demo patients have none)."""
    checked = validate(patient, base)
    assert isinstance(checked, Patient), checked
    record = PatientRecord(patient=checked, source=base, fetched_at=datetime.now(UTC))
    for raw in raws:
        one = validate(raw, base)
        assert not isinstance(one, InvalidResource), one
        record.add(one)
    return sum(1 for _ in record.resources())


class RoundTripFhirpy(AsyncFHIRClient):
    """fhirpy's async client with the same fixed round trip added to every request (fhirpy opens
    an aiohttp session, so a connection, per request; that is left as fhirpy does it)."""

    def __init__(self, url: str, rtt_s: float) -> None:
        super().__init__(url, extra_headers={"Accept": "application/fhir+json"})
        self.rtt_s = rtt_s

    async def _do_request(self, *args: Any, **kwargs: Any) -> Any:
        if self.rtt_s:
            await asyncio.sleep(self.rtt_s)
        return await super()._do_request(*args, **kwargs)


async def fhirpy_record(
    base: str, patient_id: str, page_size: int, rtt_s: float, typed: bool = True
) -> int:
    """The record by fhirpy: the Patient, then every per-type search at once (``asyncio.gather``
    of ``fetch_all``, which follows next links page by page).

    With ``typed``, each resource fhirpy returns is validated into its ``fhir.resources`` model
    (``connectors.resources.validate`` of its ``serialize()``: fhirpy's typed resources want a
    ``resourceType`` class attribute, which fhir.resources models do not have) and filed into a
    ``PatientRecord`` as ChartSight files them; without, it stops at fhirpy's dict-like resources.
    """
    client = RoundTripFhirpy(base, rtt_s)
    patient, *found = await asyncio.gather(
        client.get("Patient", patient_id),
        *(
            client.resources(rtype)
            .search(**{param: f"Patient/{patient_id}"})
            .limit(page_size)
            .fetch_all()
            for rtype, param in PATIENT_COMPARTMENT_SEARCHES
        ),
    )
    if not typed:
        return 1 + sum(len(f) for f in found)
    return typed_record(dict(patient), [r.serialize() for rs in found for r in rs], base)


async def sequential_reference(
    base: str, patient_id: str, page_size: int, rtt_s: float, typed: bool = True
) -> int:
    """Plain sequential paging: every type, every page, one request at a time.

    With ``typed`` it builds the same validated ``PatientRecord`` ChartSight does, by
    ``connectors.resources.validate`` (run it under ``fast_validation.strict()`` for the library's
    own validation); without, it stops at raw JSON.
    """
    raws: list[dict[str, Any]] = []
    async with httpx.AsyncClient(
        timeout=60, headers={"Accept": "application/fhir+json"}, transport=RoundTrip(rtt_s)
    ) as client:
        patient = (await client.get(f"{base}/Patient/{patient_id}")).raise_for_status().json()
        for rtype, param in PATIENT_COMPARTMENT_SEARCHES:
            url: str | None = f"{base}/{rtype}?{param}=Patient/{patient_id}&_count={page_size}"
            while url:
                bundle = (await client.get(url)).raise_for_status().json()
                # an OperationOutcome about the search (search.mode "outcome") is not the patient's
                raws.extend(
                    e["resource"]
                    for e in bundle.get("entry") or []
                    if (e.get("search") or {}).get("mode") != "outcome"
                )
                url = next(
                    (lk["url"] for lk in bundle.get("link") or [] if lk["relation"] == "next"), None
                )
    if not typed:
        return 1 + len(raws)
    return typed_record(patient, raws, base)


async def chartsight(
    base: str, patient_id: str, page_size: int, everything: bool, rtt_s: float
) -> int:
    """The record by ChartSight's ``assemble_record`` (``$everything`` or per-type searches, and
    the referenced resources); the resources it holds. Asserts it is complete."""
    settings = FhirServerSettings(url=base, page_size=page_size, use_everything=everything)
    async with FhirClient(settings, transport=RoundTrip(rtt_s)) as client:
        record = await assemble_record(client, patient_id)
    assert record.complete, record.problems
    return sum(1 for _ in record.resources())


async def timed(fn, runs: int, strict: bool = False) -> tuple[float, int]:
    """Median wall time of ``runs`` calls of ``fn`` after one warm-up (connections, server caches)
    and the resources it assembled; with ``strict``, validated by fhir.resources' own code."""
    times, n = [], 0
    with fast_validation.strict() if strict else contextlib.nullcontext():
        await fn()
        for _ in range(runs):
            start = time.perf_counter()
            n = await fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), n


def validation_cost(raws: list[dict], rounds: int = 5) -> tuple[float, float]:
    """CPU ms per resource to validate ``raws`` (fhir.resources' own code, then the fast path),
    the best of ``rounds``."""
    costs = []
    for strict in (True, False):
        best = float("inf")
        with fast_validation.strict() if strict else contextlib.nullcontext():
            for _ in range(rounds):
                start = time.process_time()
                for raw in raws:
                    validate(raw, "benchmark")
                best = min(best, time.process_time() - start)
        costs.append(best * 1000 / len(raws))
    return costs[0], costs[1]


async def main(runs: int, page_size: int, rtts_ms: list[float], note: str = "") -> str:
    """The results section: timings of every column per patient and added round trip."""
    bundles = sorted(demo_bundles(), key=lambda p: len(load_bundle(p)["entry"]))
    picks = {"small": bundles[0], "largest": bundles[-1]}
    lines: list[str] = []
    costs: list[str] = []
    with Sekmet() as server:
        for label, path in picks.items():
            bundle = load_bundle(path)
            reply = (
                httpx.post(  # noqa: ASYNC210 - loading the server before timing
                    server.base_url,
                    json=bundle,
                    timeout=120,
                    headers={"Content-Type": "application/fhir+json"},
                )
                .raise_for_status()
                .json()
            )
            pid = reply["entry"][0]["response"]["location"].split("Patient/")[1].split("/")[0]
            name = path.name.split("_")[0] + " " + path.name.split("_")[1]
            strict_ms, fast_ms = validation_cost([e["resource"] for e in bundle["entry"]])
            costs.append(
                f"{label} ({name}): {strict_ms:.3f} ms per resource strict, {fast_ms:.3f} ms fast "
                f"({strict_ms / fast_ms:.2f}×)"
            )
            base = server.base_url
            for rtt_ms in rtts_ms:
                rtt = rtt_ms / 1000

                def col(fn, *args, strict=False, base=base, pid=pid):
                    return timed(lambda: fn(base, pid, page_size, *args), runs, strict)

                ev, n_ev = await col(chartsight, True, rtt)
                pt, n_pt = await col(chartsight, False, rtt)
                ev_strict, _ = await col(chartsight, True, rtt, strict=True)
                sq, n_sq = await col(sequential_reference, rtt, strict=True)
                raw, _ = await col(sequential_reference, rtt, False)
                fp, n_fp = await col(fhirpy_record, rtt, strict=True)
                fp_raw, _ = await col(fhirpy_record, rtt, False)
                lines.append(
                    f"| {label} ({name}, {len(bundle['entry'])} resources) | {rtt_ms:g} ms "
                    f"| {ev * 1000:.0f} ms ({n_ev}) | {pt * 1000:.0f} ms ({n_pt}) "
                    f"| {ev_strict * 1000:.0f} ms | {sq * 1000:.0f} ms ({n_sq}) "
                    f"| {fp * 1000:.0f} ms ({n_fp}) | {raw * 1000:.0f} ms | {fp_raw * 1000:.0f} ms "
                    f"| {sq / ev:.1f}× / {sq / pt:.1f}× | {fp / ev:.1f}× / {fp / pt:.1f}× |"
                )
    header = (
        f"\n## Record assembly from SEKMET 0.1.1 — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {describe()}{note}. Median of {runs} runs after a warm-up; `_count={page_size}`; "
        "server and clients on the same machine. In brackets: resources in the record.\n\n"
        "Added round trip: a fixed delay per request, the same for every client, standing in for the "
        "network between ChartSight and an EHR's FHIR server (0 ms = loopback).\n\n"
        "Every column but the *raw* ones ends in a typed `PatientRecord` of fhir.resources models. "
        "ChartSight validates with `connectors.fast_validation` (same models and errors, less CPU); "
        "*strict* columns, the sequential reference and fhirpy with fhir.resources' own code. "
        "*fhirpy*: fhirpy 2 runs the per-type searches concurrently (`asyncio.gather` of "
        "`fetch_all`) and builds each resource as its fhir.resources model; it opens a connection "
        "per request, as it does by default. The sequential reference and fhirpy read the per-type "
        "searches (no `_include`, no referenced resources), ChartSight `$everything` also the "
        "Claim and ExplanationOfBenefit resources and referenced Practitioners and Organizations. "
        "Speed-ups: against ChartSight `$everything` / per-type.\n\n"
        "Validation CPU per resource, best of 5: " + "; ".join(costs) + ".\n\n"
        "| patient | added round trip | ChartSight ($everything) | ChartSight (per-type) "
        "| ChartSight ($everything), strict | sequential reference | fhirpy + fhir.resources "
        "| sequential, raw JSON | fhirpy, raw | speed-up vs sequential | speed-up vs fhirpy |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--page-size", type=int, default=200)
    parser.add_argument(
        "--rtt-ms", type=float, nargs="+", default=[0.0, 20.0, 50.0], help="Added round trips."
    )
    parser.add_argument(
        "--note", default="", help="Said after the machine, e.g. '; loaded: other jobs running'."
    )
    parser.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "results.md"),
        help="File the section is appended to; '-' to print it only.",
    )
    args = parser.parse_args()
    report = asyncio.run(main(args.runs, args.page_size, args.rtt_ms, args.note))
    print(report)
    if args.results != "-":
        results = Path(args.results)
        if not results.exists():
            results.write_text(
                "# ChartSight benchmark results\n\nWritten by the scripts in `benchmarks/`; newest last.\n"
            )
        with results.open("a") as fh:
            fh.write(report)
