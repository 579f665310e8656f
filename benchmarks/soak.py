"""Soak: ``chartsight serve`` for a long run (default 30 minutes) at a steady mix of requests from
16 clients, with a few faults injected; a benchmark, not a test.

The service runs as its own process (embedded default, no model server; local SQLite store with
the five demo patients; API-key auth; audit log on). Each client sends one request after another,
drawn from a fixed mix:

- ``ask``: ``POST /v1/ask`` (8 structured question kinds, random patient);
- ``stream``: ``POST /v1/ask/stream`` read to its ``answer`` event;
- ``cds``: ``POST /cds-services/chartsight-patient-view`` with the patient's prefetch;
- ``mcp``: MCP ``tools/call`` of ``ask`` or ``patient_facts`` over the streamable HTTP transport
  (one session per client, kept open);
- faults, each expected to be refused or survived without harm: ``bad`` requests (malformed JSON,
  an unknown patient, no credentials, an over-long question: 4xx expected) and ``killed`` client
  connections (a stream closed after its first event, a plain ask abandoned after 50 ms).

Reported: throughput and p50/p99 latency of the answered requests per window (``--window``
minutes, default 5), errors by kind (any status other than the one expected, or a transport
error), the server's resident memory and open file descriptors after the warm-up and at the end,
and the audit check: every answer a client received (by its ``x-request-id``; MCP calls by count
of ``mcp:*`` rows) has its audit row. The report is printed; ``--append`` adds it to
``benchmarks/results.md`` with the machine named (``benchmarks.machine.describe``).

    python benchmarks/soak.py                      # 30 minutes, printed only
    python benchmarks/soak.py --minutes 30 --append
    python benchmarks/soak.py --minutes 2 --window 1   # a quick check that it works
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.serve_load import QUESTIONS, rss_mib, wait_ready  # noqa: E402
from connectors.demo import demo_bundles, import_demo  # noqa: E402
from connectors.store import FhirStore  # noqa: E402
from surfaces.http.security import key_digest  # noqa: E402

KEY = "soak-key"
CDS = "/cds-services/chartsight-patient-view"
# the share of each kind of request in the mix (cumulative draw, in this order)
MIX = [
    ("ask", 0.40),
    ("stream", 0.20),
    ("cds", 0.15),
    ("mcp", 0.15),
    ("bad", 0.06),
    ("killed", 0.04),
]
ANSWERED = ("answered", "abstained")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tally:
    """What the clients saw: (kind, seconds since start, latency ms) of each answered request,
    errors by kind, request ids answered (audited under them) and MCP answers."""

    started: float = field(default_factory=time.monotonic)
    done: list[tuple[str, float, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    answered_ids: set[str] = field(default_factory=set)
    mcp_answers: int = 0

    def ok(self, kind: str, t0: float, rid: str | None = None) -> None:
        now = time.monotonic()
        self.done.append((kind, now - self.started, (now - t0) * 1000))
        if rid is not None:
            self.answered_ids.add(rid)


def _prefetch(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """The CDS Hooks prefetch an EHR would send for the discovery's templates."""

    def of(kind: str) -> list[dict[str, Any]]:
        return [r for r in resources if r["resourceType"] == kind]

    def bundle(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": r} for r in items],
        }

    observations = sorted(of("Observation"), key=lambda r: r.get("effectiveDateTime", ""))
    return {
        "patient": of("Patient")[0],
        "conditions": bundle(of("Condition")),
        "observations": bundle(observations[-100:]),
        "medications": bundle([r for r in of("MedicationRequest") if r.get("status") == "active"]),
        "allergies": bundle(of("AllergyIntolerance")),
    }


async def _stream(
    http: httpx.AsyncClient, body: dict[str, Any], rid: str, close_early: bool
) -> str:
    """The last event kind of ``/v1/ask/stream`` (or the first, when ``close_early``)."""
    event = ""
    async with http.stream("POST", "/v1/ask/stream", json=body, headers={"x-request-id": rid}) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
                if close_early:
                    return event
            elif line.startswith("data:") and event in ("answer", "error"):
                return event
    return event or "no events"


async def _bad(http: httpx.AsyncClient, rng: random.Random, rid: str) -> tuple[str, int]:
    """One malformed or refused request, and the status it should get."""
    which = rng.randrange(4)
    headers = {"x-request-id": rid}
    if which == 0:
        r = await http.post(
            "/v1/ask",
            content=b'{"patient": ',
            headers={**headers, "content-type": "application/json"},
        )
        return "malformed JSON", r.status_code
    if which == 1:
        r = await http.post(
            "/v1/ask", json={"patient": "no-such-patient", "question": "age?"}, headers=headers
        )
        return "unknown patient", r.status_code
    if which == 2:
        r = await http.post(
            "/v1/ask",
            json={"patient": "x", "question": "age?"},
            headers={**headers, "X-API-Key": "wrong"},
        )
        return "bad credentials", r.status_code
    r = await http.post(
        "/v1/ask", json={"patient": "x", "question": "why? " * 2000}, headers=headers
    )
    return "over-long question", r.status_code


EXPECTED = {
    "malformed JSON": 422,
    "unknown patient": 404,
    "bad credentials": 401,
    "over-long question": (413, 422),
}


async def client(
    n: int, url: str, patients: list[str], prefetch: dict[str, Any], until: float, tally: Tally
) -> None:
    """One client: requests one after another from ``MIX`` until ``until`` (monotonic)."""
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    rng = random.Random(n)
    mcp_client: Any = None
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": KEY}, timeout=120) as http:
        try:
            while time.monotonic() < until:
                draw, kind = rng.random(), MIX[-1][0]
                for name, share in MIX:
                    draw -= share
                    if draw < 0:
                        kind = name
                        break
                patient = rng.choice(patients)
                body = {"patient": patient, "question": rng.choice(QUESTIONS)}
                rid = f"{kind}-{n}-{uuid.uuid4().hex[:12]}"
                t0 = time.monotonic()
                try:
                    if kind == "ask":
                        r = await http.post("/v1/ask", json=body, headers={"x-request-id": rid})
                        if r.status_code == 200:
                            tally.ok(kind, t0, rid)
                        else:
                            tally.errors[f"ask: HTTP {r.status_code}"] += 1
                    elif kind == "stream":
                        last = await _stream(http, body, rid, close_early=False)
                        if last == "answer":
                            tally.ok(kind, t0, rid)
                        else:
                            tally.errors[f"stream: {last}"] += 1
                    elif kind == "cds":
                        hook = {
                            "hook": "patient-view",
                            "hookInstance": str(uuid.uuid4()),
                            "context": {"userId": "Practitioner/soak", "patientId": patient},
                            "prefetch": prefetch[patient],
                        }
                        r = await http.post(CDS, json=hook, headers={"x-request-id": rid})
                        if r.status_code == 200 and "cards" in r.json():
                            tally.ok(kind, t0)  # audited, but a card is not an answer row
                        else:
                            tally.errors[f"cds: HTTP {r.status_code}"] += 1
                    elif kind == "mcp":
                        if mcp_client is None:
                            mcp_client = Client(
                                streamable_http_client(
                                    f"{url}/mcp/",
                                    http_client=create_mcp_http_client({"X-API-Key": KEY}),
                                )
                            )
                            await mcp_client.__aenter__()
                            t0 = time.monotonic()
                        if rng.random() < 0.5:
                            result = await mcp_client.call_tool("ask", body)
                        else:
                            result = await mcp_client.call_tool(
                                "patient_facts",
                                {
                                    "patient": patient,
                                    "tool": "latest_observation",
                                    "arguments": {"query": "weight"},
                                },
                            )
                        if result.is_error:
                            tally.errors["mcp: tool error"] += 1
                        else:
                            tally.ok(kind, t0)
                            tally.mcp_answers += 1
                    elif kind == "bad":
                        what, status = await _bad(http, rng, rid)
                        expected = EXPECTED[what]
                        if status in (expected if isinstance(expected, tuple) else (expected,)):
                            tally.faults[what] += 1
                        else:
                            tally.errors[f"bad ({what}): HTTP {status}"] += 1
                    else:  # a client that goes away mid-request
                        if rng.random() < 0.5:
                            await _stream(http, body, rid, close_early=True)
                            tally.faults["stream closed after its first event"] += 1
                        else:
                            try:
                                await asyncio.wait_for(
                                    http.post("/v1/ask", json=body, headers={"x-request-id": rid}),
                                    0.05,
                                )
                                tally.faults["ask answered within 50 ms"] += 1
                            except TimeoutError:
                                tally.faults["ask abandoned after 50 ms"] += 1
                except (httpx.HTTPError, OSError) as exc:
                    tally.errors[f"{kind}: {type(exc).__name__}"] += 1
                except Exception as exc:  # an MCP session that broke: start a new one
                    tally.errors[f"{kind}: {type(exc).__name__}"] += 1
                    mcp_client = None
        finally:
            if mcp_client is not None:
                with contextlib.suppress(Exception):  # the server may be gone already
                    await mcp_client.__aexit__(None, None, None)


def open_fds(pid: int) -> int:
    """How many file descriptors the process holds (from /proc/<pid>/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def run_clients(
    url: str, patients: list[str], prefetch: dict[str, Any], clients: int, seconds: float
) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    await asyncio.gather(
        *(client(n, url, patients, prefetch, until, tally) for n in range(clients))
    )
    return tally


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def audit_check(db: Path, tally: Tally) -> tuple[int, int, int, int]:
    """(answers received by request id, those with an answered/abstained audit row, MCP answers
    received, MCP answered rows) from the audit database as the run left it."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT request_id, endpoint, outcome FROM audit_log").fetchall()
    finally:
        conn.close()
    by_id = {rid: outcome for rid, _, outcome in rows if rid}
    audited = sum(1 for rid in tally.answered_ids if by_id.get(rid) in ANSWERED)
    mcp_rows = sum(
        1 for _, endpoint, outcome in rows if endpoint.startswith("mcp:") and outcome in ANSWERED
    )
    return len(tally.answered_ids), audited, tally.mcp_answers, mcp_rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--window", type=float, default=5, help="Minutes per reported window.")
    parser.add_argument("--warmup", type=float, default=20, help="Seconds before the run.")
    parser.add_argument("--append", action="store_true", help="Append to benchmarks/results.md.")
    parser.add_argument(
        "--note", default="", help="A line added to the report (e.g. 'loaded machine')."
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chartsight-soak-") as tmp:
        home = Path(tmp)
        store = FhirStore(f"sqlite:///{home / 'store.db'}")
        import_demo(store)
        patients = [p.id for p in store.patients()]
        store.close()
        prefetch = {}
        for path in demo_bundles():
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                resources = [e["resource"] for e in json.load(fh)["entry"]]
            prefetch[resources[0]["id"]] = _prefetch(resources)
        port = free_port()
        (home / "chartsight.toml").write_text(
            f'home = "{home}"\n[store]\nurl = "sqlite:///{home / "store.db"}"\n'
            f"[serve]\nport = {port}\nrate_per_minute = 1000000\nrate_burst = 1000000\n"
            "cds_budget_s = 30.0\n"
            f'[[serve.auth.api_keys]]\nclient_id = "soak"\nkey_sha256 = "{key_digest(KEY)}"\n'
            'scopes = "system/*.read"\n'
        )
        log = (home / "serve.log").open("wb")
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from surfaces.cli import main; main()",
                "serve",
                "--config",
                str(home / "chartsight.toml"),
            ],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, 180)
            warm = asyncio.run(run_clients(url, patients, prefetch, args.clients, args.warmup))
            start = (rss_mib([server.pid]), open_fds(server.pid))
            tally = asyncio.run(
                run_clients(url, patients, prefetch, args.clients, args.minutes * 60)
            )
            time.sleep(2)  # connections closed by the clients are closed by the server too
            end = (rss_mib([server.pid]), open_fds(server.pid))
            tally.mcp_answers += warm.mcp_answers  # the audit log holds the warm-up's too
            received, audited, mcp_received, mcp_rows = audit_check(home / "audit.db", tally)
            crashed = server.poll()
        finally:
            server.terminate()
            server.wait(30)
            log.close()
        server_errors = sum(
            1
            for line in (home / "serve.log").read_text(errors="replace").splitlines()
            if "Traceback" in line
        )

    elapsed = args.minutes * 60
    window_s = args.window * 60
    windows: dict[int, list[float]] = defaultdict(list)
    for _, at, ms in tally.done:
        windows[int(at // window_s)].append(ms)
    lines = [
        f"\n## Soak — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {describe()}. `chartsight serve` (one uvicorn process, embedded default, local "
        f"SQLite store with the 5 demo patients, API-key auth, audit log on) for {args.minutes:g} "
        f"min after a {args.warmup:g} s warm-up, {args.clients} clients each sending one request "
        "after another: "
        + ", ".join(f"{k} {s:.0%}" for k, s in MIX)
        + " (`benchmarks/soak.py`)."
        + (f" **{args.note}**" if args.note else "")
        + "\n",
        "| window | answered | throughput | p50 | p99 |",
        "|---|---|---|---|---|",
    ]
    for w in sorted(windows):
        ms = windows[w]
        lines.append(
            f"| {w * args.window:g}–{(w + 1) * args.window:g} min | {len(ms)} | "
            f"{len(ms) / window_s:.1f} /s | {statistics.median(ms):.0f} ms | {_pct(ms, 0.99):.0f} ms |"
        )
    by_kind = Counter(kind for kind, _, _ in tally.done)
    lines += [
        "",
        f"- Answered: {len(tally.done)} ({len(tally.done) / elapsed:.1f} /s): "
        + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items()))
        + ".",
        f"- Faults injected and handled as expected: {sum(tally.faults.values())} ("
        + ", ".join(f"{k} {n}" for k, n in sorted(tally.faults.items()))
        + ").",
        f"- Errors: {sum(tally.errors.values())}"
        + (
            " (" + ", ".join(f"{k} {n}" for k, n in tally.errors.most_common()) + ")"
            if tally.errors
            else ""
        )
        + f"; tracebacks in the service's log: {server_errors}; service "
        + ("still running" if crashed is None else f"exited ({crashed})")
        + ".",
        f"- Resident memory {start[0]:.0f} → {end[0]:.0f} MiB; open file descriptors {start[1]} → {end[1]}.",
        f"- Audit: {audited} of {received} answers received (ask, stream) have their audit row; "
        f"MCP: {mcp_rows} `mcp:*` answered rows for {mcp_received} tool results received.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.append:
        with args.results.open("a") as fh:
            fh.write(report)


if __name__ == "__main__":
    main()
