"""Replicas: two ``chartsight serve`` processes share one PostgreSQL (store, threads, audit) and
one index location, behind a round-robin client, as ``deploy/compose.yaml`` runs them. A thread
started on one continues on the other, every answer has its audit row, and an index generation
built while both run is used by both without a restart."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from connectors.demo import TOMMY_FRIESEN, demo_bundles
from connectors.store import FhirStore
from surfaces.http.security import key_digest
from tests.conftest import load_bundle
from tests.peers.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
KEY = "replica-test-key"
HEADERS = {"X-API-Key": KEY}
SERVE = [sys.executable, "-m", "surfaces.cli", "serve"]


class Replica:
    """One ``chartsight serve`` process on a free port, stopped on exit."""

    def __init__(self, config: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [*SERVE, "--config", str(config), "--port", str(self.port)],
            env=env,
            cwd=ROOT,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"replica exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"replica not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def replicas(tmp_path: Path, postgres: Any) -> Iterator[tuple[list[Replica], dict[str, Any]]]:
    name = f"r{os.getpid()}_{tmp_path.name[-12:].lower().replace('-', '_')}"
    urls = {part: postgres.create_database(f"{name}_{part}") for part in ("store", "threads")}
    urls["audit"] = postgres.create_database(f"{name}_audit")
    store = FhirStore(urls["store"])
    bundles = list(demo_bundles())
    # one patient (not Tommy Friesen, who is asked about) arrives later, before a second build
    late = next(p for p in bundles if load_bundle(p)["entry"][0]["resource"]["id"] != TOMMY_FRIESEN)
    for path in bundles:
        if path != late:
            store.import_path(path)
    store.engine.dispose()
    home = tmp_path / "home"  # shared: the index location (and the model cache) of both
    config = tmp_path / "chartsight.toml"
    config.write_text(
        f'home = "{home}"\n'
        f'threads = "{urls["threads"]}"\n'
        f'[store]\nurl = "{urls["store"]}"\n'
        f'[serve]\naudit_url = "{urls["audit"]}"\n'
        "[[serve.auth.api_keys]]\n"
        f'client_id = "ehr"\nkey_sha256 = "{key_digest(KEY)}"\nscopes = "system/*.read"\n'
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "CHARTSIGHT_CONFIG": str(config),
    }
    running = [Replica(config, env, tmp_path / f"replica-{i}.log") for i in range(2)]
    try:
        for replica in running:
            replica.wait_ready()
        yield running, {"urls": urls, "config": config, "env": env, "late": late}
    finally:
        for replica in running:
            replica.stop()


def _similar(replica: Replica, patient: str) -> httpx.Response:
    return httpx.get(
        f"{replica.url}/v1/patients/{patient}/similar", headers=HEADERS, params={"k": 10}
    )


def test_two_replicas_share_threads_audit_and_index_generations(
    replicas: tuple[list[Replica], dict[str, Any]], tommy_json: list[dict[str, Any]]
):
    running, ctx = replicas
    turn = itertools.cycle(running)  # the round-robin client

    # a thread begun on one replica continues on the other (the checkpoints are in PostgreSQL)
    a1cs = sorted(
        (
            r
            for r in tommy_json
            if r["resourceType"] == "Observation"
            and any(c.get("code") == "4548-4" for c in r["code"]["coding"])
        ),
        key=lambda r: r["effectiveDateTime"],
        reverse=True,
    )
    questions = ["What was his last A1c?", "and before that?", "and before that?"]
    answers = []
    for question in questions:
        replica = next(turn)
        reply = httpx.post(
            f"{replica.url}/v1/ask",
            headers=HEADERS,
            json={"patient": TOMMY_FRIESEN, "question": question, "thread": "rounds"},
            timeout=120,
        )
        assert reply.status_code == 200, reply.text
        answers.append(reply.json())
    assert all(a["citations"] for a in answers), answers
    cited = [a["citations"][0]["reference"] for a in answers]
    assert cited == [f"Observation/{a['id']}" for a in a1cs[:3]]

    # no index yet: both say so; a build while they run is then used by both
    for replica in running:
        assert _similar(replica, TOMMY_FRIESEN).status_code in (404, 409, 503)
    build = [sys.executable, "-m", "surfaces.cli", "index", "build"]
    done = subprocess.run(build, env=ctx["env"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    first = [_similar(r, TOMMY_FRIESEN) for r in running]
    assert all(r.status_code == 200 for r in first), [r.text for r in first]
    keys = [{h["key"] for h in r.json()} for r in first]
    assert keys[0] == keys[1] and keys[0]

    # a patient imported later and a second build (a new generation): both replicas see it
    store = FhirStore(ctx["urls"]["store"])
    store.import_path(ctx["late"])
    store.engine.dispose()
    late_patient = load_bundle(ctx["late"])["entry"][0]["resource"]["id"]
    done = subprocess.run(build, env=ctx["env"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    second = [_similar(r, TOMMY_FRIESEN) for r in running]
    assert all(r.status_code == 200 for r in second)
    after = [{h["key"] for h in r.json()} for r in second]
    assert after[0] == after[1] and len(after[0]) > len(keys[0])
    assert f"Patient/{late_patient}" in {h["patient_id"] for r in second for h in r.json()} | {
        k.split("#")[0] for k in after[0]
    }

    # every answer and similar-case read is in the one audit log, whichever replica served it
    engine = sa.create_engine(ctx["urls"]["audit"])
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT endpoint, outcome FROM audit_log")).all()
    engine.dispose()
    asks = [r for r in rows if "ask" in r[0]]
    assert len(asks) == len(questions), rows
    assert len([r for r in rows if "similar" in r[0]]) == 6
