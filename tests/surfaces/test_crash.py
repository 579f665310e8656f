"""Crashes mid-write: real ``chartsight`` processes killed with SIGKILL while they import, rebuild
the similar-case index and answer audited questions, then started again.

What must hold after each kill: every imported file is in the store whole or not at all (and the
store passes SQLite's integrity check); the index's previous generation is still the live one and
answers ``similar`` as before; every answer a client received has its audit row. A kill lands at
a point the test watches for (rows in the import log, the rebuild's staging folder, answers
received), so each test checks the real process at a real moment rather than a simulated state.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.index_build import open_index, recover_index_folder
from agent.settings import Settings
from connectors.demo import TOMMY_FRIESEN, demo_bundles, import_demo
from connectors.store import FhirStore
from retrieval.cases import Case
from retrieval.encoders import EncoderRegistry
from retrieval.index import manifest
from tests.peers.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
LARGE = ROOT / "tests" / "fixtures" / "realworld" / "19-large-bundle-10k-observations.json.gz"

pytestmark = pytest.mark.slow


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CHARTSIGHT_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


def _chartsight(home: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from surfaces.cli import main; main()", *args],
        env=_env(home, **env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_when(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 120
) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; True if it was killed while still running,
    False if it ended first (its output is then in ``proc.stdout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
            return proc.returncode == -signal.SIGKILL
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        raise AssertionError("the process never reached the point to kill it at")
    return False


def _query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read through a new connection (what another process would see now)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # the table is not made yet
        return []
    finally:
        conn.close()


def _keys(path: Path) -> set[tuple[str, str]]:
    """(type, id) of every resource of a Bundle file (ids as the importer gives them)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        bundle = json.load(fh)
    keys = set()
    for entry in bundle["entry"]:
        resource = entry["resource"]
        rid = resource.get("id") or entry["fullUrl"].removeprefix("urn:uuid:")
        keys.add((resource["resourceType"], rid))
    return keys


# --- import ---------------------------------------------------------------------------------


@pytest.fixture
def import_folder(tmp_path: Path) -> Path:
    """The five demo bundles, and a large collection Bundle (the repo's 10k-Observation fixture,
    whole: since the importer got faster, 4,000 entries were sometimes all written before the
    kill came) whose name sorts last, so it is imported last."""
    folder = tmp_path / "bundles"
    folder.mkdir()
    for bundle in demo_bundles():
        shutil.copy(bundle, folder / bundle.name)
    with gzip.open(LARGE, "rt", encoding="utf-8") as fh:
        large = json.load(fh)
    (folder / "zz-large.json").write_text(json.dumps(large))
    return folder


def test_import_killed_mid_file_keeps_each_file_whole_or_absent(
    import_folder: Path, tmp_path: Path
):
    home = tmp_path / "home"
    db = home / "store.db"
    small = sorted(p for p in import_folder.iterdir() if p.name != "zz-large.json")
    large = import_folder / "zz-large.json"
    logged = "SELECT count(*) FROM fhir_import"

    proc = _chartsight(home, "import", str(import_folder))
    seen: list[float] = []

    def mid_large_file() -> bool:
        # every small file committed: the large one is being read, validated and written now
        if _query(db, logged) == [(len(small),)]:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 0.5

    assert _kill_when(proc, mid_large_file), proc.stdout.read().decode() if proc.stdout else ""

    assert _query(db, "PRAGMA integrity_check") == [("ok",)]
    stored = set(_query(db, "SELECT resource_type, resource_id FROM fhir_resource"))
    logged_paths = {Path(p).name for (p,) in _query(db, "SELECT path FROM fhir_import")}
    for path in small:
        assert path.name in logged_paths
        assert _keys(path) <= stored, f"{path.name} only partly stored"
    assert "zz-large.json" not in logged_paths
    assert not (_keys(large) & stored), "the killed file's resources were kept"

    again = _chartsight(home, "import", str(import_folder))
    out = again.communicate(timeout=240)[0].decode()
    assert again.returncode == 0, out
    assert "5 unchanged files skipped; 0 files failed" in " ".join(out.split())
    stored = set(_query(db, "SELECT resource_type, resource_id FROM fhir_resource"))
    assert _keys(large) <= stored
    assert _query(db, logged) == [(len(small) + 1,)]


# --- the similar-case index -------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with the demo patients in its store and an index built from them by
    ``chartsight index build`` (generation 1); each test copies it."""
    home = tmp_path_factory.mktemp("indexed") / "home"
    store = FhirStore(f"sqlite:///{home / 'store.db'}")
    import_demo(store)
    store.close()
    built = _chartsight(home, "index", "build")
    out = built.communicate(timeout=240)[0].decode()
    assert built.returncode == 0, out
    return home


@pytest.fixture
def indexed_home(
    indexed_template: Path, tmp_path: Path
) -> tuple[Settings, EncoderRegistry, list[str]]:
    """A copy of ``indexed_template``, its settings and encoders, and the keys ``similar`` gives
    there for the first case's summary."""
    home = tmp_path / "home"
    shutil.copytree(indexed_template, home)
    settings = Settings(home=home)
    encoders = EncoderRegistry(settings.retrieval.encoders)
    return settings, encoders, _similar(settings, encoders)


def _similar(settings: Settings, encoders: EncoderRegistry) -> list[str]:
    """The keys of the cases most like Tommy Friesen's first case, from the index as a new
    process opens it."""
    index = open_index(settings, encoders)
    try:
        rows = _query(settings.index_path / "cases.db", "SELECT summary FROM cases ORDER BY key")
        probe = Case(key="probe", patient_id="probe", kind="patient", images=[], summary=rows[0][0])
        return [hit.key for hit in index.similar(probe, k=5)]
    finally:
        index.engine.dispose()


def test_index_rebuild_killed_leaves_the_previous_generation_live(
    indexed_home: tuple[Settings, EncoderRegistry, list[str]],
):
    settings, encoders, before = indexed_home
    path = settings.index_path
    staging = path.with_name(f".{path.name}.rebuild")
    live = manifest.current_generation(path)
    assert live is not None and before

    def staged_cases() -> bool:  # the rebuild has opened its own index and started writing
        return bool(_query(staging / "cases.db", "SELECT count(*) FROM index_meta"))

    killed = []
    for ready in (staging.exists, staged_cases):
        proc = _chartsight(settings.home, "index", "build", "--rebuild")
        killed.append(_kill_when(proc, ready))
        assert manifest.current_generation(path) == live  # no half-written generation picked
        assert _similar(settings, encoders) == before
    assert any(killed), "every rebuild finished before it could be killed"


def test_an_interrupted_swap_or_generation_write_is_recovered(
    indexed_home: tuple[Settings, EncoderRegistry, list[str]],
):
    """The two states a kill inside ``install_rebuilt`` or ``write_generation`` leaves, which are
    too brief to hit by timing: the live folder moved aside with the rebuilt one not yet in
    place; and a generation renamed into place that ``CURRENT`` does not name yet."""
    settings, encoders, before = indexed_home
    path = settings.index_path
    path.rename(path.with_name(f".{path.name}.old"))  # the first rename done, not the second
    recover_index_folder(path)
    assert _similar(settings, encoders) == before

    live = manifest.current_generation(path)
    assert live is not None
    orphan = path / f"gen-{int(live.name.split('-')[1]) + 1:06d}"
    shutil.copytree(live, orphan)  # renamed into place, CURRENT not switched yet
    index = open_index(settings, encoders)
    try:
        assert index.save() == orphan  # written again over the orphan, not refused
    finally:
        index.engine.dispose()
    assert manifest.current_generation(path) == orphan
    assert _similar(settings, encoders) == before


# --- audited answers --------------------------------------------------------------------------


class Serve:
    """``chartsight serve`` as a process on a free port, answering anonymous loopback callers."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = _chartsight(
            home,
            "serve",
            "--port",
            str(self.port),
            CHARTSIGHT_SERVE__AUTH__ANONYMOUS="true",
            CHARTSIGHT_SERVE__RATE_PER_MINUTE="1000000",
            CHARTSIGHT_SERVE__RATE_BURST="100000",
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise AssertionError("chartsight serve did not become ready")

    def output(self) -> str:
        return self.proc.stdout.read().decode() if self.proc.stdout else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


QUESTIONS = ["latest labs", "what is the latest blood pressure?", "active medications?"]


def _asker(url: str, name: str, answered: list[str], stop: threading.Event) -> None:
    """Ask questions about Tommy Friesen until ``stop``: plain requests and SSE streams in turn,
    noting the request id of every answer received in full."""
    n = 0
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            rid = f"{name}-{n}"
            body = {"patient": TOMMY_FRIESEN, "question": QUESTIONS[n % len(QUESTIONS)]}
            n += 1
            try:
                if n % 2:
                    r = client.post(f"{url}/v1/ask", json=body, headers={"x-request-id": rid})
                    if r.status_code == 200 and r.json()["text"]:
                        answered.append(rid)
                    continue
                with client.stream(
                    "POST", f"{url}/v1/ask/stream", json=body, headers={"x-request-id": rid}
                ) as r:
                    event = None
                    for line in r.iter_lines():
                        if line.startswith("event:"):
                            event = line.split(":", 1)[1].strip()
                        elif line.startswith("data:") and event == "answer":
                            json.loads(line.split(":", 1)[1])  # received whole
                            answered.append(rid)
            except (httpx.HTTPError, json.JSONDecodeError):
                return  # the server was killed


@pytest.fixture
def demo_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    store = FhirStore(f"sqlite:///{home / 'store.db'}")
    import_demo(store)
    store.close()
    yield home


def test_serve_killed_while_answering_has_an_audit_row_for_every_answer_returned(
    demo_home: Path,
):
    audit = demo_home / "audit.db"
    server = Serve(demo_home)
    answered: list[str] = []
    stop = threading.Event()
    clients = [
        threading.Thread(target=_asker, args=(server.url, f"c{i}", answered, stop))
        for i in range(4)
    ]
    try:
        for client in clients:
            client.start()
        assert _kill_when(server.proc, lambda: len(answered) >= 6, timeout=180)
    finally:
        stop.set()
        server.kill()
        for client in clients:
            client.join(60)
    received = set(answered)
    rows = _query(
        audit, "SELECT request_id, outcome FROM audit_log WHERE endpoint IN ('ask', 'ask_stream')"
    )
    audited = {rid for rid, outcome in rows if outcome in ("answered", "abstained")}
    assert received and received <= audited, f"answers without an audit row: {received - audited}"
    assert _query(audit, "PRAGMA integrity_check") == [("ok",)]

    restarted = Serve(demo_home)  # the audit log opens again and keeps being written
    try:
        r = httpx.post(
            f"{restarted.url}/v1/ask",
            json={"patient": TOMMY_FRIESEN, "question": "latest labs"},
            headers={"x-request-id": "after-restart"},
            timeout=60,
        )
        assert r.status_code == 200
    finally:
        restarted.kill()
    assert _query(audit, "SELECT outcome FROM audit_log WHERE request_id = 'after-restart'") == [
        ("answered",)
    ]
