"""Load on the HTTP service: N concurrent clients for T seconds against ``POST /v1/ask`` with the
embedded default (no model), on the demo patients in a local store.

The service runs as its own process (``chartsight serve``), as deployed; its memory (RSS) is read
from /proc after a warm-up and at the end. Each client sends one question after another (a mix of
structured questions over the five demo patients) and waits for the answer. Reports throughput,
latency p50/p99, errors (any non-200) and memory, and appends them to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from connectors.demo import import_demo  # noqa: E402
from connectors.store import FhirStore  # noqa: E402
from surfaces.http.security import key_digest  # noqa: E402

KEY = "bench-key"
QUESTIONS = [
    "What was the last HbA1c?",
    "How old is the patient?",
    "What medications is the patient currently taking?",
    "What are the active problems?",
    "Any allergies?",
    "What was the average systolic blood pressure over the last 3 years?",
    "What was the last creatinine and when?",
    "What was the last body weight?",
]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url: str, timeout: float = 120) -> None:
    """Return once the service at ``url`` answers ``/readyz`` with 200; exit after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the service did not start")


def child_rss_mib(pid: int) -> float:
    """RSS of the server process (the console script may exec python directly, or wrap it)."""
    return rss_mib(pid)


async def client(
    url: str, patients: list[str], until: float, latencies: list[float], errors: list[str]
) -> None:
    rng = random.Random()
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": KEY}, timeout=60) as http:
        while time.monotonic() < until:
            body = {"patient": rng.choice(patients), "question": rng.choice(QUESTIONS)}
            start = time.perf_counter()
            try:
                reply = await http.post("/v1/ask", json=body)
                if reply.status_code != 200:
                    errors.append(f"HTTP {reply.status_code}")
                    continue
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
                continue
            latencies.append((time.perf_counter() - start) * 1000)


async def load(url: str, patients: list[str], clients: int, seconds: float) -> tuple[list[float], list[str], float]:  # fmt: skip
    latencies: list[float] = []
    errors: list[str] = []
    start = time.monotonic()
    until = start + seconds
    await asyncio.gather(*(client(url, patients, until, latencies, errors) for _ in range(clients)))
    return latencies, errors, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=15)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chartsight-load-") as tmp:
        home = Path(tmp)
        store = FhirStore(f"sqlite:///{home / 'store.db'}")
        import_demo(store)
        patients = [p.id for p in store.patients()]
        store.close()
        port = 18080 + os.getpid() % 1000
        (home / "chartsight.toml").write_text(
            f'home = "{home}"\n[store]\nurl = "sqlite:///{home / "store.db"}"\n'
            f"[serve]\nport = {port}\nrate_per_minute = 1000000\nrate_burst = 1000000\n"
            f'[[serve.auth.api_keys]]\nclient_id = "bench"\nkey_sha256 = "{key_digest(KEY)}"\n'
            'scopes = "system/*.read"\n'
        )
        exe = Path(sys.executable).parent / "chartsight"
        server = subprocess.Popen(
            [str(exe), "serve", "--config", str(home / "chartsight.toml")],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            asyncio.run(load(url, patients, args.clients, args.warmup))
            rss_start = child_rss_mib(server.pid)
            latencies, errors, elapsed = asyncio.run(
                load(url, patients, args.clients, args.seconds)
            )
            rss_end = child_rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(30)

    lat = sorted(latencies)
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    report = (
        f"\n## HTTP service under load — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Machine: {describe()}. `chartsight serve` (one uvicorn process, embedded default, local "
        f"SQLite store with the 5 demo patients) with {args.clients} concurrent clients for "
        f"{args.seconds:.0f} s after a {args.warmup:.0f} s warm-up; each client asks one question "
        "after another (8 structured question kinds, random patient), API-key auth, audit log on.\n\n"
        "| answers | throughput | p50 | p99 | errors | RSS after warm-up | RSS at end |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {len(lat)} | {len(lat) / elapsed:.1f} /s | {p50:.0f} ms | {p99:.0f} ms | "
        f"{len(errors)} | {rss_start:.0f} MiB | {rss_end:.0f} MiB |\n"
    )
    if errors:
        report += f"\nErrors: {sorted(set(errors))}\n"
    print(report)
    with args.results.open("a") as fh:
        fh.write(report)


if __name__ == "__main__":
    main()
