"""Time to assemble one patient's full record from SEKMET: ChartSight's client vs a sequential reference.

Runs against a real SEKMET started on 127.0.0.1 (``scripts/setup-peers.sh`` installs it), loaded with
the packaged demo patients. For a small and the largest patient it times, with the median of N runs:
  - chartsight/$everything  - ChartSight's client as configured by default (the server offers $everything)
  - chartsight/per-type     - ChartSight's concurrent per-type searches (servers without $everything)
  - sequential reference    - one search per resource type, one page after another, as a plain client
                              (or fhirpy's fetch_all per type) does.
Results are appended to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
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
        if self.rtt_s:
            await asyncio.sleep(self.rtt_s)
        return await super().handle_async_request(request)


async def sequential_reference(
    base: str, patient_id: str, page_size: int, rtt_s: float, typed: bool = True
) -> int:
    """Plain sequential paging: every type, every page, one request at a time.

    With ``typed`` it builds the same validated ``PatientRecord`` ChartSight does (so both do the
    same work and differ only in how they fetch); without, it stops at raw JSON.
    """
    raws = []
    async with httpx.AsyncClient(
        timeout=60, headers={"Accept": "application/fhir+json"}, transport=RoundTrip(rtt_s)
    ) as client:
        patient = (await client.get(f"{base}/Patient/{patient_id}")).raise_for_status().json()
        for rtype, param in PATIENT_COMPARTMENT_SEARCHES:
            url: str | None = f"{base}/{rtype}?{param}=Patient/{patient_id}&_count={page_size}"
            while url:
                bundle = (await client.get(url)).raise_for_status().json()
                raws.extend(e["resource"] for e in bundle.get("entry") or [])
                url = next(
                    (lk["url"] for lk in bundle.get("link") or [] if lk["relation"] == "next"), None
                )
    if not typed:
        return 1 + len(raws)
    record = PatientRecord(
        patient=validate(patient, base), source=base, fetched_at=datetime.now(UTC)
    )
    for raw in raws:
        checked = validate(raw, base)
        if isinstance(checked, InvalidResource):
            record.invalid.append(checked)
        else:
            record.add(checked)
    assert record.complete
    return sum(1 for _ in record.resources())


async def chartsight(
    base: str, patient_id: str, page_size: int, everything: bool, rtt_s: float
) -> int:
    settings = FhirServerSettings(url=base, page_size=page_size, use_everything=everything)
    async with FhirClient(settings, transport=RoundTrip(rtt_s)) as client:
        record = await assemble_record(client, patient_id)
    assert record.complete, record.problems
    return sum(1 for _ in record.resources())


async def timed(fn, runs: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    times, n = [], 0
    await fn()  # warm-up (connections, server caches)
    for _ in range(runs):
        start = time.perf_counter()
        n = await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), n


async def main(runs: int, page_size: int, rtts_ms: list[float]) -> str:
    bundles = sorted(demo_bundles(), key=lambda p: len(load_bundle(p)["entry"]))
    picks = {"small": bundles[0], "largest": bundles[-1]}
    lines = []
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
            for rtt_ms in rtts_ms:
                rtt = rtt_ms / 1000
                base = server.base_url
                ev, n_ev = await timed(
                    lambda pid=pid, rtt=rtt, base=base: chartsight(base, pid, page_size, True, rtt),
                    runs,
                )
                pt, n_pt = await timed(
                    lambda pid=pid, rtt=rtt, base=base: chartsight(
                        base, pid, page_size, False, rtt
                    ),
                    runs,
                )
                sq, n_sq = await timed(
                    lambda pid=pid, rtt=rtt, base=base: sequential_reference(
                        base, pid, page_size, rtt
                    ),
                    runs,
                )
                raw, _ = await timed(
                    lambda pid=pid, rtt=rtt, base=base: sequential_reference(
                        base, pid, page_size, rtt, typed=False
                    ),
                    runs,
                )
                lines.append(
                    f"| {label} ({name}, {len(bundle['entry'])} resources) | {rtt_ms:g} ms | {ev * 1000:.0f} ms ({n_ev}) "
                    f"| {pt * 1000:.0f} ms ({n_pt}) | {sq * 1000:.0f} ms ({n_sq}) | {raw * 1000:.0f} ms "
                    f"| {sq / ev:.1f}× | {sq / pt:.1f}× |"
                )
    header = (
        f"\n## Record assembly from SEKMET 0.1.1 — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {describe()}. Median of {runs} runs after a warm-up; `_count={page_size}`; "
        "server and client on the same machine. In brackets: resources fetched.\n\n"
        "Added round trip: a fixed delay per request, the same for every client, standing in for the "
        "network between ChartSight and an EHR's FHIR server (0 ms = loopback).\n\n"
        "Every column but *raw JSON* ends in the same validated `PatientRecord`; *raw JSON* is the "
        "sequential reference stopping before validation, shown for scale. Speed-ups are against "
        "the sequential reference building the same record.\n\n"
        "| patient | added round trip | ChartSight ($everything) | ChartSight (concurrent per-type) "
        "| sequential reference | sequential, raw JSON | speed-up ($everything) | speed-up (per-type) |"
        "\n|---|---|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--page-size", type=int, default=200)
    parser.add_argument(
        "--rtt-ms", type=float, nargs="+", default=[0.0, 20.0, 50.0], help="Added round trips."
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    report = asyncio.run(main(args.runs, args.page_size, args.rtt_ms))
    print(report)
    if not args.results.exists():
        args.results.write_text(
            "# ChartSight benchmark results\n\nWritten by the scripts in `benchmarks/`; newest last.\n"
        )
    with args.results.open("a") as fh:
        fh.write(report)
