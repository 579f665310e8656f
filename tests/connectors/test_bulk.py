"""FHIR Bulk Data Access ($export) into the local store.

Against SEKMET 0.1.1, a real server that implements $export (system, Patient and Group level,
``_type``, ``_since``, 202 with ``X-Progress`` and ``Retry-After``, ``DELETE``, SMART Backend
Services with ``requiresAccessToken``): `chartsight bulk` end to end, a run killed with SIGKILL
mid-download (SEKMET behind a proxy that slows its files down) and resumed, and a later run that
imports only the changes. What SEKMET does not do (gzip, ``Range``, ``deleted`` files, error
files a client can cause, an export that stays in progress) is tested against
``tests.peers.bulk_server``, which follows the IG v2.0.0 for those.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner

from connectors.bulk import BulkError, BulkExport, BulkProgress, ExportRequest, parse_since
from connectors.settings import BulkSettings, FhirServerSettings, SmartBackendSettings
from connectors.store import FhirStore
from surfaces.cli import app
from tests.conftest import LoadedServer, _load, load_bundle
from tests.peers.bulk_server import BulkServer, BulkServerOptions, SlowProxy
from tests.peers.servers import ROOT, Sekmet

runner = CliRunner()
FAST = BulkSettings(poll_initial_s=0.1, poll_max_s=2)


def _store(home: Path) -> FhirStore:
    return FhirStore(f"sqlite:///{home / 'store.db'}")


def _server_counts(base_url: str, types: list[str], **params: str) -> dict[str, int]:
    counts = {}
    for rtype in types:
        answer = httpx.get(f"{base_url}/{rtype}", params={"_summary": "count", **params})
        answer.raise_for_status()
        counts[rtype] = int(answer.json()["total"])
    return {t: n for t, n in counts.items() if n}


def _state(home: Path) -> dict[str, Any]:
    (path,) = (home / "bulk").glob("*.json")
    return dict(json.loads(path.read_text()))


@pytest.fixture(scope="module")
def sekmet_two(bundles: list[Path]) -> Iterator[LoadedServer]:
    """SEKMET with two demo patients, its own (the tests change its data)."""
    with Sekmet() as server:
        yield _load(server, bundles[:2])


# ---------------------------------------------------------------- SEKMET, a real $export


@pytest.mark.integration
def test_bulk_imports_sekmets_export_then_a_later_run_imports_only_the_changes(
    home: Path, sekmet_two: LoadedServer
):
    first = runner.invoke(app, ["bulk", sekmet_two.base_url])
    assert first.exit_code == 0, first.output
    store = _store(home)
    mine = store.counts()
    assert mine == _server_counts(sekmet_two.base_url, sorted(mine)), first.output
    assert mine["Patient"] == 2 and mine["Observation"] > 50
    assert "_since none (everything)" in first.output.replace("\n", " ")
    transaction_time = _state(home)["last_transaction_time"]
    assert transaction_time and _state(home)["job"] is None

    # One Observation changes on the server, one is added.
    base = sekmet_two.base_url
    obs = httpx.get(f"{base}/Observation", params={"_count": 1}).json()["entry"][0]["resource"]
    obs["status"] = "amended"
    httpx.put(f"{base}/Observation/{obs['id']}", json=obs).raise_for_status()
    added = {**obs, "status": "final"}
    del added["id"]
    created = httpx.post(f"{base}/Observation", json=added)
    created.raise_for_status()

    second = runner.invoke(app, ["bulk", base])
    assert second.exit_code == 0, second.output
    text = second.output.replace("\n", " ")
    assert "2 resources from 1 files" in text and f"_since {transaction_time}" in text
    after = store.counts()
    assert after == {**mine, "Observation": mine["Observation"] + 1}
    assert store.read("Observation", obs["id"]).status == "amended"
    assert _state(home)["last_transaction_time"] > transaction_time

    # An explicit --since after everything imports nothing; --full imports all again.
    later = runner.invoke(app, ["bulk", base, "--since", "2999-01-01"])
    assert later.exit_code == 0 and "0 resources from 0 files" in later.output.replace("\n", " ")
    store.close()


@pytest.mark.integration
def test_bulk_group_export_with_types(home: Path, sekmet_two: LoadedServer):
    base = sekmet_two.base_url
    patient = next(iter(sekmet_two.patient_ids.values()))
    group = httpx.post(
        f"{base}/Group",
        json={
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{patient}"}}],
        },
    )
    group.raise_for_status()
    result = runner.invoke(
        app, ["bulk", base, "--group", group.json()["id"], "--type", "Patient,Condition"]
    )
    assert result.exit_code == 0, result.output
    store = _store(home)
    expected = _server_counts(base, ["Condition"], patient=patient)
    assert store.counts() == {"Patient": 1, **expected}
    assert store.read("Patient", patient).id == patient
    store.close()
    # SEKMET writes NDJSON only: it refuses another _outputFormat at the kick-off
    csv = runner.invoke(app, ["bulk", base, "--output-format", "text/csv"])
    assert csv.exit_code == 1 and "refused the $export kick-off" in csv.output
    assert "Unsupported _outputFormat" in csv.output.replace("\n", " ")


@contextlib.contextmanager
def _slow_sekmet(
    bundles: list[Path], *, chunk: int, delay_s: float
) -> Iterator[tuple[Sekmet, SlowProxy]]:
    """SEKMET with ``bundles`` loaded, behind a ``SlowProxy`` that its manifests name."""
    sekmet = Sekmet()
    proxy = SlowProxy(sekmet.port, chunk=chunk, delay_s=delay_s)
    sekmet.public_url = f"{proxy.url}/fhir"
    with sekmet, proxy:
        _load(sekmet, bundles)
        yield sekmet, proxy


def _cli(home: Path, *args: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "CHARTSIGHT_HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "CHARTSIGHT_BULK__CONCURRENCY": "2",
        "CHARTSIGHT_BULK__POLL_INITIAL_S": "0.2",
    }
    env.pop("CHARTSIGHT_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "surfaces.cli", "bulk", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_mid_download(home: Path, proc: subprocess.Popen[str]) -> None:
    """SIGKILL ``proc`` once the manifest is saved and a file is partly downloaded."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list((home / "bulk").glob("*/*.part"))
        if any(p.stat().st_size > 0 for p in parts):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.integration
@pytest.mark.slow
def test_bulk_killed_mid_download_resumes_without_a_new_kick_off(tmp_path: Path, bundles):
    home = tmp_path / "home"
    with _slow_sekmet(bundles[:2], chunk=4096, delay_s=0.05) as (sekmet, proxy):
        url = f"{proxy.url}/fhir"
        _kill_mid_download(home, _cli(home, url))
        job = _state(home)["job"]
        assert job["manifest"] and job["status_url"].startswith(url)
        states = [f["state"] for f in job["files"].values()]
        assert "pending" in states, states  # killed before everything was in
        proxy.delay_s = 0.0
        resumed = _cli(home, url)
        out = resumed.communicate(timeout=120)[0]
        assert resumed.returncode == 0, out
        assert "(resumed)" in out and proxy.kickoffs == 1
        store = _store(home)
        counts = store.counts()
        assert counts == _server_counts(sekmet.base_url, sorted(counts))
        assert counts["Patient"] == 2
        store.close()
        assert _state(home)["job"] is None and not list((home / "bulk").glob("*/*"))


@pytest.mark.integration
def test_bulk_cancel_deletes_the_unfinished_export_on_the_server(tmp_path: Path, bundles):
    home = tmp_path / "home"
    with _slow_sekmet(bundles[:1], chunk=1024, delay_s=0.1) as (_sekmet, proxy):
        _kill_mid_download(home, _cli(home, f"{proxy.url}/fhir"))
        status_url = _state(home)["job"]["status_url"]
        assert httpx.get(status_url).status_code == 200
        cancel = _cli(home, f"{proxy.url}/fhir", "--cancel")
        out = cancel.communicate(timeout=60)[0]
        assert cancel.returncode == 0 and "cancelled" in out, out
        assert proxy.deletes == 1 and httpx.get(status_url).status_code == 404
        assert _state(home)["job"] is None


def _keypair(tmp_path: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = tmp_path / "key.pem", tmp_path / "key.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.mark.integration
async def test_bulk_with_smart_backend_services_and_requires_access_token(
    tmp_path: Path, smallest_bundle: Path
):
    private, public = _keypair(tmp_path)
    auth = {
        "types": ["smart", "bearer"],
        "tokens": ["loader"],
        "smart_clients": [
            {"client_id": "chartsight", "public_key_path": str(public), "scopes": "system/*.*"}
        ],
    }
    with Sekmet(server_auth=auth) as sekmet:
        base = sekmet.base_url
        loader = {"Authorization": "Bearer loader"}
        httpx.post(
            base, json=load_bundle(smallest_bundle), headers=loader, timeout=120
        ).raise_for_status()
        assert httpx.get(f"{base}/Patient").status_code == 401
        smart = SmartBackendSettings(client_id="chartsight", private_key_path=private)
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        events: list[BulkProgress] = []
        async with BulkExport(
            FhirServerSettings(url=base, smart=smart), FAST, store, tmp_path / "bulk"
        ) as exporter:
            report = await exporter.run(ExportRequest(level="patient"), progress=events.append)
        assert not report.failed and report.imported["Patient"] == 1
        assert store.counts() == {
            t: n for t, n in report.imported.items()
        }  # every resource of the export
        # SEKMET's manifest says its files need the token, and they do
        kick = httpx.get(
            f"{base}/Patient/$export",
            headers={**loader, "Prefer": "respond-async", "Accept": "application/fhir+json"},
        )
        for _ in range(50):
            status = httpx.get(kick.headers["Content-Location"], headers=loader)
            if status.status_code == 200:
                break
            assert status.headers["X-Progress"] and status.headers["Retry-After"] == "1"
            await asyncio.sleep(0.2)
        manifest = status.json()
        assert manifest["requiresAccessToken"] is True
        assert httpx.get(manifest["output"][0]["url"]).status_code == 401
        assert any(e.phase == "waiting" for e in events)
        store.close()


# ---------------------------------------------------------------- the IG's other parts


def _resources(tommy_json: list[dict[str, Any]], n: int = 80) -> list[dict[str, Any]]:
    """The demo patient, his Conditions and his first ``n`` Observations, each with a
    meta.lastUpdated in 2020."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for r in tommy_json:
        by_type.setdefault(r["resourceType"], []).append(r)
    kept = [*by_type["Patient"], *by_type["Condition"], *by_type["Observation"][:n]]
    # as a server exports them: references Type/id, not the Bundle's urn:uuid fullUrls
    types = {r["id"]: r["resourceType"] for r in tommy_json}
    text = re.sub(
        r"urn:uuid:([0-9a-f-]{36})",
        lambda m: f"{types.get(m.group(1), 'Resource')}/{m.group(1)}",
        json.dumps(kept),
    )
    return [{**r, "meta": {"lastUpdated": "2020-01-01T00:00:00Z"}} for r in json.loads(text)]


async def test_polling_honours_retry_after_and_reports_x_progress(tmp_path, tommy_json):
    options = BulkServerOptions(polls=2, retry_after="1")
    with BulkServer(_resources(tommy_json), options) as server:
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        events: list[BulkProgress] = []
        async with BulkExport(
            FhirServerSettings(url=server.base_url), FAST, store, tmp_path / "bulk"
        ) as exporter:
            report = await exporter.run(
                ExportRequest(types=("Patient", "Condition")), progress=events.append
            )
        assert server.kickoffs[0]["_type"] == "Patient,Condition"
        assert server.kickoffs[0]["_outputFormat"] == "application/fhir+ndjson"
        assert "_since" not in server.kickoffs[0]
        gaps = [b - a for a, b in zip(server.polls, server.polls[1:], strict=False)]
        assert len(server.polls) == 3 and all(g >= 0.95 for g in gaps), gaps  # not poll_initial_s
        assert [e.detail for e in events if e.phase == "waiting"] == [
            "1 of 3 steps",
            "2 of 3 steps",
        ]
        assert set(report.imported) == {"Patient", "Condition"} and not report.failed
        store.close()


async def test_gzip_files_need_the_token_and_deleted_resources_are_removed(tmp_path, tommy_json):
    resources = _resources(tommy_json)
    first, second = [r for r in resources if r["resourceType"] == "Condition"][:2]
    options = BulkServerOptions(polls=0, token="s3cret", gzip=True)
    with BulkServer(resources, options) as server:
        # one relative and one absolute request.url, as servers write either
        options.deleted = [
            f"Condition/{first['id']}",
            f"{server.base_url}/Condition/{second['id']}",
        ]
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        settings = FhirServerSettings(url=server.base_url, token="s3cret")
        events: list[BulkProgress] = []
        async with BulkExport(settings, FAST, store, tmp_path / "bulk") as exporter:
            full = await exporter.run(ExportRequest(), progress=events.append)
            assert store.read("Condition", first["id"]).id == first["id"]
            later = await exporter.run(ExportRequest())
        # files were asked for compressed, and the compressed bytes were what came and was kept
        assert all(
            r["accept-encoding"] and "gzip" in r["accept-encoding"] for r in server.file_requests
        )
        plain = sum(len(json.dumps(r)) + 1 for r in resources)
        assert 0 < max(e.bytes for e in events) < plain / 3
        assert all(r["authorization"] == "Bearer s3cret" for r in server.file_requests)
        assert full.count == len(resources) and not full.failed
        assert server.kickoffs[1]["_since"] == full.transaction_time
        assert later.imported["Condition (deleted)"] == 2 and not later.failed
        left = {r.id for r in store.search("Condition").resources}
        assert first["id"] not in left and second["id"] not in left and left
        store.close()


@pytest.mark.parametrize("token", ["t", None])
async def test_files_on_another_host_need_to_be_listed(tmp_path, tommy_json, token):
    with BulkServer(_resources(tommy_json), BulkServerOptions(polls=0, token=token)) as server:
        # the same server under another host name: the manifest's files are then elsewhere
        settings = FhirServerSettings(
            url=server.base_url.replace("127.0.0.1", "localhost"), token=token
        )
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        async with BulkExport(settings, FAST, store, tmp_path / "bulk") as exporter:
            with pytest.raises(BulkError, match="add '127.0.0.1' to bulk.file_hosts") as refused:
                await exporter.run(ExportRequest())
            assert ("access token is sent there" in str(refused.value)) == bool(token)
            assert server.file_requests == []
        listed = FAST.model_copy(update={"file_hosts": ["127.0.0.1"]})
        async with BulkExport(settings, listed, store, tmp_path / "bulk") as exporter:
            report = await exporter.run(ExportRequest(), restart=True)
        assert report.count == len(server.resources) and not report.failed
        assert {r["authorization"] for r in server.file_requests} == {
            f"Bearer {token}" if token else None
        }
        store.close()


@pytest.mark.integration
async def test_bulk_streams_into_postgresql(postgres, tmp_path, tommy_json):
    resources = _resources(tommy_json)
    with BulkServer(resources, BulkServerOptions(polls=0, gzip=True)) as server:
        store = FhirStore(postgres.create_database("bulk"))
        async with BulkExport(
            FhirServerSettings(url=server.base_url), FAST, store, tmp_path / "bulk"
        ) as exporter:
            first = await exporter.run(ExportRequest())
            later = await exporter.run(ExportRequest())
        assert first.count == len(resources) and sum(store.counts().values()) == len(resources)
        assert later.since == first.transaction_time and later.count == 0
        store.close()


async def test_error_files_are_reported_and_a_bad_file_keeps_the_run_open(tmp_path, tommy_json):
    resources = _resources(tommy_json)
    broken = {"resourceType": "Observation", "id": "broken", "status": {"not": "a code"}}
    options = BulkServerOptions(polls=0, errors=["Observation/x could not be read", "timeout"])
    with BulkServer([*resources, broken], options) as server:
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        async with BulkExport(
            FhirServerSettings(url=server.base_url), FAST, store, tmp_path / "bulk"
        ) as exporter:
            report = await exporter.run(ExportRequest())
            assert report.server_errors == [
                "error processing: Observation/x could not be read",
                "error processing: timeout",
            ]
            (failure,) = report.failed
            assert "Observation" in str(failure) and "line" in str(failure)
            assert store.counts().get("Observation") is None  # that file: nothing stored
            assert store.counts()["Patient"] == 1
            state = exporter.state(ExportRequest())
            assert state.data["last_transaction_time"] is None and state.job is not None
            # the next run continues the same export and tries only the failed file again
            asked = len(server.file_requests)
            again = await exporter.run(ExportRequest())
        assert again.resumed and len(server.kickoffs) == 1 and len(again.failed) == 1
        # the failed file was complete: imported again from disk, nothing downloaded again
        assert server.file_requests[asked:] == [] and again.count == 0
        store.close()


def test_killed_download_continues_with_a_range_request(tmp_path: Path, tommy_json):
    home = tmp_path / "home"
    resources = _resources(tommy_json, n=400)
    options = BulkServerOptions(polls=0, chunk=2048, delay_s=0.05)
    with BulkServer(resources, options) as server:
        _kill_mid_download(home, _cli(home, server.base_url))
        server.options.delay_s = 0.0
        resumed = _cli(home, server.base_url)
        out = resumed.communicate(timeout=120)[0]
        assert resumed.returncode == 0, out
        assert "(resumed)" in out and len(server.kickoffs) == 1
        ranges = [r["range"] for r in server.file_requests if r["range"]]
        assert ranges and all(int(r.removeprefix("bytes=").rstrip("-")) > 0 for r in ranges)
        store = _store(home)
        assert sum(store.counts().values()) == len(resources)
        store.close()


async def test_an_export_never_complete_is_given_up_then_cancelled(tmp_path, tommy_json):
    options = BulkServerOptions(polls=0, complete=False, retry_after="1")
    with BulkServer(_resources(tommy_json), options) as server:
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        patient = BulkSettings(poll_initial_s=0.1, poll_max_s=1, max_wait_s=2.5)
        async with BulkExport(
            FhirServerSettings(url=server.base_url), patient, store, tmp_path / "bulk"
        ) as exporter:
            with pytest.raises(BulkError, match="not complete after 2.5 s"):
                await exporter.run(ExportRequest(level="group", group="g1"))
            assert server.kickoffs[0]["path"] == "/fhir/Group/g1/$export"
            status_url = await exporter.cancel(ExportRequest(level="group", group="g1"))
        assert status_url and server.deletes == [status_url.rsplit("/", 1)[1]]
        store.close()


# ---------------------------------------------------------------- hostile servers


async def test_a_status_url_off_the_servers_origin_is_refused_before_any_request(
    tmp_path, tommy_json
):
    resources = _resources(tommy_json)
    with BulkServer(resources, BulkServerOptions(polls=0, token="s3cret")) as server:
        # the same server under another name: a request there would show in server.polls
        hostile = server.base_url.replace("127.0.0.1", "localhost") + "/status/x"
        server.options.status_location = hostile
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        settings = FhirServerSettings(url=server.base_url, token="s3cret")
        async with BulkExport(settings, FAST, store, tmp_path / "bulk") as exporter:
            with pytest.raises(BulkError, match="not on the FHIR server's origin") as refused:
                await exporter.run(ExportRequest())
            assert "localhost" in str(refused.value) and exporter.state(ExportRequest()).job is None
            assert server.polls == [] and server.deletes == []
            # a state file naming such a status URL (written before this check): not polled, and
            # --cancel sends no DELETE there either
            state = exporter.state(ExportRequest())
            state.data["job"] = {
                "status_url": hostile,
                "since": None,
                "manifest": None,
                "files": {},
            }
            state.save()
            with pytest.raises(BulkError, match="not on the FHIR server's origin"):
                await exporter.run(ExportRequest())
            with pytest.raises(BulkError, match="nothing was sent there"):
                await exporter.cancel(ExportRequest())
            assert exporter.state(ExportRequest()).job is None
        assert server.polls == [] and server.deletes == []
        store.close()


async def test_a_file_redirect_is_checked_like_a_manifest_url(tmp_path, tommy_json):
    resources = _resources(tommy_json)
    with BulkServer(resources, BulkServerOptions(polls=0)) as server:
        other = server.base_url.replace("127.0.0.1", "localhost")
        server.options.redirect_to = other + "/files/elsewhere/{name}?hop=1"
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        settings = FhirServerSettings(url=server.base_url)
        async with BulkExport(settings, FAST, store, tmp_path / "bulk") as exporter:
            report = await exporter.run(ExportRequest())
        assert report.count == 0 and report.failed
        assert all("redirected to a refused address" in str(f) for f in report.failed)
        assert all("add 'localhost' to bulk.file_hosts" in str(f) for f in report.failed)
        assert [r for r in server.file_requests if r["hop"]] == []  # the hop was never asked
        assert store.counts() == {}
        # a redirect on the FHIR server's origin is followed; a loop stops after 5 hops
        job = next(iter(server.jobs))
        server.options.redirect_to = server.base_url + f"/files/{job}/{{name}}?hop=1"
        async with BulkExport(settings, FAST, store, tmp_path / "bulk") as exporter:
            again = await exporter.run(ExportRequest())
        assert again.resumed and not again.failed and again.count == len(resources)
        server.options.redirect_to = server.base_url + f"/files/{job}/{{name}}"
        async with BulkExport(settings, FAST, store, tmp_path / "bulk") as exporter:
            looped = await exporter.run(ExportRequest(), full=True)
        assert looped.failed and all("more than 5 redirects" in str(f) for f in looped.failed)
        store.close()


async def test_a_gzip_bomb_of_blank_lines_is_refused_and_nothing_is_stored(tmp_path, tommy_json):
    options = BulkServerOptions(polls=0, gzip=True, blank_lines=200_000)
    with BulkServer(_resources(tommy_json), options) as server:
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        events: list[BulkProgress] = []
        async with BulkExport(
            FhirServerSettings(url=server.base_url), FAST, store, tmp_path / "bulk"
        ) as exporter:
            report = await exporter.run(ExportRequest(), progress=events.append)
            assert max(e.bytes for e in events) < 100_000  # small on the wire
            assert len(report.failed) == 3 and report.count == 0 and store.counts() == {}
            assert all("more than 1000 blank lines" in str(f) for f in report.failed)
            assert all(re.search(r"\d{5}-output-\w+\.ndjson\.gz", str(f)) for f in report.failed)
            assert exporter.state(ExportRequest()).job is not None  # resumable
        store.close()


async def test_files_over_max_file_bytes_are_refused(tmp_path, tommy_json):
    resources = _resources(tommy_json)
    with BulkServer(resources, BulkServerOptions(polls=0, gzip=True)) as server:
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        small = FAST.model_copy(update={"max_file_bytes": 3000})
        async with BulkExport(
            FhirServerSettings(url=server.base_url), small, store, tmp_path / "bulk"
        ) as exporter:
            report = await exporter.run(ExportRequest())
        messages = [str(f) for f in report.failed]
        assert len(messages) == 3 and store.counts() == {}, messages
        assert all("bulk.max_file_bytes" in m and "3000" in m for m in messages)
        # the Patient file is under 3000 bytes compressed, not once decompressed
        assert any("once decompressed" in m and "Patient" in m for m in messages)
        assert any("Content-Length" in m for m in messages)
        store.close()


@pytest.mark.parametrize("bad", ["a/../../x", "Pati\x00ent", "patient", "X"])
async def test_a_manifest_type_that_is_no_resource_type_name_is_refused(tmp_path, tommy_json, bad):
    resources = _resources(tommy_json)
    with BulkServer(resources, BulkServerOptions(polls=0, bad_type=bad)) as server:
        store = FhirStore(f"sqlite:///{tmp_path / 'store.db'}")
        async with BulkExport(
            FhirServerSettings(url=server.base_url), FAST, store, tmp_path / "bulk"
        ) as exporter:
            report = await exporter.run(ExportRequest())
        (line,) = report.server_errors
        assert "bad.ndjson" in line and "not a FHIR resource type name" in line
        assert not report.failed and report.count == len(resources)
        assert "bad.ndjson" not in {r["name"] for r in server.file_requests}
        # nothing was written outside the state folder
        assert {p.name for p in tmp_path.iterdir()} <= {
            "store.db",
            "store.db-wal",
            "store.db-shm",
            "bulk",
        }
        store.close()


def test_markup_in_x_progress_is_shown_as_text(home: Path, tommy_json, monkeypatch):
    from rich.console import Console

    from surfaces import cli

    # a terminal, so that the progress display is drawn (to a buffer) as a user sees it
    screen = Console(file=io.StringIO(), force_terminal=True, width=200)
    monkeypatch.setattr(cli, "console", screen)
    options = BulkServerOptions(polls=2, retry_after="1", x_progress="[/bold] step [link=x]")
    with BulkServer(_resources(tommy_json), options) as server:
        result = runner.invoke(app, ["bulk", server.base_url])
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.file.getvalue())  # type: ignore[attr-defined]
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(server.polls) == 3 and "resources from 3 files" in shown
    assert "[/bold] step [link=x]" in shown


def test_since_is_an_instant():
    assert parse_since("2024-05-01") == "2024-05-01T00:00:00Z"
    assert parse_since("2024-05-01T10:00:00+02:00") == "2024-05-01T10:00:00+02:00"
    with pytest.raises(BulkError, match="time zone"):
        parse_since("2024-05-01T10:00:00")
    with pytest.raises(BulkError, match="not a date"):
        parse_since("last week")
    with pytest.raises(BulkError, match="not a FHIR R4 resource type"):
        ExportRequest(types=("Observations",))
