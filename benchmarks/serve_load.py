"""Load on the HTTP service: N concurrent clients for T seconds against ``POST /v1/ask`` with the
embedded default (no model), on the demo patients in a local store, for a baseline commit and the
current code in the same run.

Each configuration runs ``chartsight serve`` as its own process tree, as deployed: the baseline
commit (``--baseline``, default dba6530, checked out with ``git worktree`` into a temporary folder
and run from there with the same Python environment) with one process, then the current code
with each ``--workers`` count. Each gets the same store (a copy), settings and load: a warm-up,
then ``--seconds`` of measurement. Each client sends one question after another (a mix of
structured questions over the five demo patients) and waits for the answer. Reported per
configuration: answers, answers/s, latency p50/p99, errors (any non-200 or transport error), CPU
seconds of the server's processes per answer, memory (RSS summed over the server's processes,
from /proc) after the warm-up and at the end, and answers/s relative to the baseline. The table
is printed and, unless ``--no-append``, appended to ``benchmarks/results.md`` with the machine
named (``benchmarks/machine.py``) and ``--label`` (say "loaded machine" when it was).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
BASELINE = "dba6530"  # the service before the issue-14 work (25 answers/s, p99 2 s)
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


@dataclass
class Outcome:
    """One configuration's measurement: ``answers`` 200s in ``elapsed_s``; latencies in ms;
    ``cpu_s`` the server processes' user+system CPU seconds over the measurement; RSS in MiB
    summed over the server's processes."""

    name: str
    workers: int
    latencies: list[float]
    errors: list[str]
    elapsed_s: float
    cpu_s: float
    rss_start: float
    rss_end: float

    @property
    def rate(self) -> float:
        """Answers (200s) per second of the measurement."""
        return len(self.latencies) / self.elapsed_s

    def percentile(self, q: float) -> float:
        """The latency in ms at quantile ``q`` (0.99: p99; the nearest rank below); NaN without
        answers."""
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * q))] if lat else float("nan")


def wait_ready(url: str, timeout: float = 120, name: str = "the service") -> None:
    """Return once the service at ``url`` answers ``/readyz`` with 200; exit after ``timeout``
    seconds, saying ``name`` did not start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{name} did not start")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn's worker processes), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss_mib(pids: list[int]) -> float:
    """Resident memory of the processes, summed, in MiB (``VmRSS`` of /proc/<pid>/status)."""
    total = 0.0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def cpu_s(pids: list[int]) -> float:
    """User plus system CPU seconds of the processes, summed (/proc/<pid>/stat)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def client(
    url: str, patients: list[str], until: float, latencies: list[float], errors: list[str]
) -> None:
    """One client: a random question about a random patient, one after another until
    ``until`` (``time.monotonic``); appends each 200's latency in ms to ``latencies`` and anything
    else (``HTTP <status>`` or the transport error's class) to ``errors``."""
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
    """``clients`` concurrent ``client`` loops for ``seconds``: (latencies in ms, errors, the
    elapsed seconds)."""
    latencies: list[float] = []
    errors: list[str] = []
    start = time.monotonic()
    until = start + seconds
    await asyncio.gather(*(client(url, patients, until, latencies, errors) for _ in range(clients)))
    return latencies, errors, time.monotonic() - start


async def warm(url: str, patients: list[str], workers: int) -> None:
    """Every question about every patient, ``2 × workers`` times, 8 at a time, each on a new
    connection (spread over the workers by the kernel): records fetched and their lines embedded
    before the timed warm-up, so that a short run measures warm answers, not cold starts."""
    limit = asyncio.Semaphore(8)

    async def one(http: httpx.AsyncClient, patient: str, question: str) -> None:
        async with limit:
            await http.post(
                "/v1/ask",
                json={"patient": patient, "question": question},
                headers={"Connection": "close"},
            )

    pairs = [(p, q) for _ in range(2 * workers) for p in patients for q in QUESTIONS]
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": KEY}, timeout=300) as http:
        await asyncio.gather(*(one(http, p, q) for p, q in pairs))


def measure(
    name: str, code: Path, workers: int, home: Path, store: Path, args: argparse.Namespace
) -> Outcome:
    """Serve from ``code`` (a checkout) with ``workers`` processes in ``home`` (a copy of the
    demo ``store``), load it, stop it; the measurement. Raises SystemExit when the service does
    not become ready within 5 minutes."""
    home.mkdir(parents=True)
    shutil.copy(store, home / "store.db")
    port = 18080 + (os.getpid() + workers * 7 + len(name)) % 1000
    config = home / "chartsight.toml"
    config.write_text(
        f'home = "{home}"\n[store]\nurl = "sqlite:///{home / "store.db"}"\n'
        f"[serve]\nport = {port}\nrate_per_minute = 1000000\nrate_burst = 1000000\n"
        f'[[serve.auth.api_keys]]\nclient_id = "bench"\nkey_sha256 = "{key_digest(KEY)}"\n'
        'scopes = "system/*.read"\n'
    )
    command = [sys.executable, "-m", "surfaces.cli", "serve", "--config", str(config)]
    if workers > 1:
        command += ["--workers", str(workers)]
    server = subprocess.Popen(
        command,
        cwd=code,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    patients = args.patients
    try:
        wait_ready(url, 300, name)
        asyncio.run(warm(url, patients, workers))
        asyncio.run(load(url, patients, args.clients, args.warmup))
        pids = _tree(server.pid)
        rss_start, cpu_start = rss_mib(pids), cpu_s(pids)
        latencies, errors, elapsed = asyncio.run(load(url, patients, args.clients, args.seconds))
        pids = _tree(server.pid)
        rss_end, cpu_end = rss_mib(pids), cpu_s(pids)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
    return Outcome(
        name, workers, latencies, errors, elapsed, cpu_end - cpu_start, rss_start, rss_end
    )


def report(outcomes: list[Outcome], args: argparse.Namespace, baseline: str) -> str:
    """The results section: a Markdown table, one row per configuration."""
    base = outcomes[0].rate if outcomes else float("nan")
    label = f" ({args.label})" if args.label else ""
    lines = [
        f"\n## HTTP service under load{label} — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {describe()}. `chartsight serve` (embedded default, local SQLite store with "
        f"the 5 demo patients), {args.clients} concurrent clients for {args.seconds:.0f} s after "
        f"a {args.warmup:.0f} s warm-up per configuration (after every question about every "
        "patient was asked 2 × workers times), one configuration after another in "
        f"one run (`benchmarks/serve_load.py`); each client asks one question after another (8 "
        "structured question kinds, random patient), API-key auth, audit log on. Baseline: "
        f"commit {baseline}, run from a `git worktree` with the same environment. CPU per answer: "
        "the server processes' CPU time over the measurement / answers; RSS summed over them.\n",
        "| code | workers | answers | answers/s | vs baseline | p50 | p99 | errors | CPU per "
        "answer | RSS after warm-up | RSS at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        cpu = o.cpu_s / len(o.latencies) * 1000 if o.latencies else float("nan")
        lines.append(
            f"| {o.name} | {o.workers} | {len(o.latencies)} | {o.rate:.1f} | "
            f"{o.rate / base:.2f}× | {statistics.median(o.latencies or [float('nan')]):.0f} ms | "
            f"{o.percentile(0.99):.0f} ms | {len(o.errors)} | {cpu:.1f} ms | "
            f"{o.rss_start:.0f} MiB | {o.rss_end:.0f} MiB |"
        )
    errors = sorted({e for o in outcomes for e in o.errors})
    if errors:
        lines.append(f"\nErrors: {errors}")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse the options, run each configuration, print the table and append it (unless
    ``--no-append``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=15)
    parser.add_argument(
        "--baseline", default=BASELINE, help="Commit to measure first (empty: none)."
    )
    parser.add_argument(
        "--workers", default="1,2", help="Worker counts for the current code, comma-separated."
    )
    parser.add_argument("--label", default="", help='Added to the heading ("loaded machine").')
    parser.add_argument("--no-append", action="store_true", help="Print only.")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",") if w.strip()]

    with tempfile.TemporaryDirectory(prefix="chartsight-load-") as tmp:
        folder = Path(tmp)
        store = folder / "store.db"
        demo = FhirStore(f"sqlite:///{store}")
        import_demo(demo)
        args.patients = [p.id for p in demo.patients()]
        demo.close()
        outcomes: list[Outcome] = []
        baseline = ""
        if args.baseline:
            baseline = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            checkout = folder / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(checkout), baseline],
                check=True, capture_output=True,
            )  # fmt: skip
            try:
                outcomes.append(
                    measure(f"baseline {baseline}", checkout, 1, folder / "h-base", store, args)
                )
            finally:
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(checkout)],
                    check=False, capture_output=True,
                )  # fmt: skip
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        for n in counts:
            outcomes.append(measure(f"current {head}", ROOT, n, folder / f"h-{n}", store, args))
            print(report(outcomes, args, baseline), flush=True)

    text = report(outcomes, args, baseline)
    print(text)
    if not args.no_append:
        with args.results.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
