"""``chartsight serve --workers 2`` for real: two worker processes answer ``POST /v1/ask`` and
write to one audit log; ``--workers`` above 1 with the SMART app page on is refused."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from connectors.demo import TOMMY_FRIESEN, import_demo
from connectors.store import FhirStore
from surfaces.http.audit import AuditLog
from surfaces.http.security import key_digest

ROOT = Path(__file__).resolve().parents[3]
KEY = "workers-key"
QUESTIONS = ["What was the last HbA1c?", "How old is the patient?", "Any allergies?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(home: Path, port: int, extra: str = "") -> Path:
    path = home / "chartsight.toml"
    path.write_text(
        f'home = "{home}"\n[store]\nurl = "sqlite:///{home / "store.db"}"\n'
        f"[serve]\nport = {port}\nrate_per_minute = 100000\nrate_burst = 100000\n"
        f'[[serve.auth.api_keys]]\nclient_id = "workers-test"\nkey_sha256 = "{key_digest(KEY)}"\n'
        f'scopes = "system/*.read"\n{extra}'
    )
    return path


def _serve(config: Path, *options: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "surfaces.cli", "serve", "--config", str(config), *options],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _workers(parent: int) -> list[int]:
    """The uvicorn worker processes of ``parent`` (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    """``chartsight serve --workers 2`` on the demo patients: (its URL, its home, its pid)."""
    home = tmp_path_factory.mktemp("workers-home")
    store = FhirStore(f"sqlite:///{home / 'store.db'}")
    import_demo(store)
    store.close()
    port = _free_port()
    server = _serve(_config(home, port), "--workers", "2")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # two processes loading the model stack, on 2 cores
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(1)
        yield url, home, server.pid
    finally:
        children = _workers(server.pid)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        for pid in children:  # a worker still starting when its parent went away
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def _asks(url: str, n: int) -> list[httpx.Response]:
    """``n`` questions, 8 at a time, each on a new connection (the kernel gives each accepted
    connection to one of the workers listening on the shared socket)."""
    limit = asyncio.Semaphore(8)

    async def one(i: int) -> httpx.Response:
        async with limit, httpx.AsyncClient(timeout=120) as http:
            return await http.post(
                f"{url}/v1/ask",
                json={"patient": TOMMY_FRIESEN, "question": QUESTIONS[i % len(QUESTIONS)]},
                headers={"X-API-Key": KEY, "Connection": "close"},
            )

    return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.slow
def test_two_worker_processes_answer_and_share_one_audit_log(two_workers: tuple[str, Path, int]):
    url, home, pid = two_workers
    workers = _workers(pid)
    assert len(workers) == 2
    before = {w: _cpu_s(w) for w in workers}
    replies: list[httpx.Response] = []
    # until each worker has done the work of several answers (≈20 ms of CPU each), at most 240
    for _ in range(6):
        replies += asyncio.run(_asks(url, 40))
        grown = {w: _cpu_s(w) - before[w] for w in workers}
        if min(grown.values()) > 0.3:
            break
    assert all(r.status_code == 200 for r in replies), {r.status_code for r in replies}
    assert min(grown.values()) > 0.3, grown  # both processes answered questions
    assert _workers(pid) == workers  # neither worker died and was replaced
    # every answer has its row, in the one audit log both processes write
    rows = AuditLog(f"sqlite:///{home / 'audit.db'}").rows(10_000)
    asked = {r["request_id"] for r in rows if r["endpoint"] == "ask" and r["outcome"] == "answered"}
    assert {r.headers["x-request-id"] for r in replies} <= asked
    assert len([r for r in rows if r["endpoint"] == "ask"]) == len(replies)


def test_workers_above_one_are_refused_with_the_smart_page_on(tmp_path: Path):
    extra = '[serve.smart]\nissuers = ["https://ehr.example.org/fhir"]\n'
    server = _serve(_config(tmp_path, _free_port(), extra), "--workers", "2")
    out, _ = server.communicate(timeout=120)
    assert server.returncode == 1
    text = " ".join(out.decode().split())
    assert "--workers above 1 needs the SMART app page off" in text
