"""``chartsight index build --ndjson``: the similar-case index built straight from a FHIR Bulk Data
export's NDJSON files, without ChartSight's store, is the index a build from the imported store
gives (same cases, fingerprints and similar-case hits); the temporary store is gone afterwards,
also when a file is refused; what cannot work is refused with a message naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.index_build import ndjson_files, ndjson_source, open_index
from agent.settings import Settings
from connectors.demo import TOMMY_FRIESEN, import_demo
from connectors.errors import ConfigurationError, FhirImportError
from connectors.store import FhirStore
from retrieval.encoders import EncoderRegistry
from surfaces.cli import app
from tests.agent.index_builds import build, cases, export_ndjson, same_hits, similar

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The demo patients in a store (its URL) and exported from it as NDJSON (the folder)."""
    root = tmp_path_factory.mktemp("demo-export")
    store = FhirStore(f"sqlite:///{root / 'store.db'}")
    import_demo(store)
    export_ndjson(store, root / "export")
    url = str(store.engine.url)
    store.close()
    return url, root / "export"


def test_a_build_from_ndjson_is_the_build_from_the_imported_store(
    demo_export: tuple[str, Path], tmp_path: Path
):
    url, export = demo_export
    from_store = Settings(home=tmp_path / "store", store={"url": url})
    direct = Settings(home=tmp_path / "ndjson")
    encoders = EncoderRegistry(from_store.retrieval.encoders)
    seen: list[str] = []

    first, index_store = build(from_store, encoders)
    with ndjson_source([export], direct, lambda n, total, path: seen.append(path.name)) as using:
        assert using.store.url != direct.store.url and using.fhir.url is None
        assert direct.store.url is None  # the caller's settings are left as they were
        made, index_ndjson = build(using, encoders)
    # Patients first, then every file, the gzipped one in the sub-folder too
    assert seen[0] == "Patient.000.ndjson" and "Observation.000.ndjson.gz" in seen
    assert (made.patients, made.cases, made.added) == (first.patients, first.cases, first.added)
    assert made.patients >= 5 and not made.failed
    assert index_ndjson.fingerprints() == index_store.fingerprints()
    read = cases(from_store)
    same_hits(similar(index_ndjson, read), similar(index_store, read))
    # the temporary store is gone; the index stays and reopens without it
    assert not list((tmp_path / "ndjson").glob(".ndjson-build-*"))
    assert len(open_index(direct, encoders)) == first.cases


def test_a_file_that_cannot_be_imported_stops_the_build_and_leaves_nothing(
    demo_export: tuple[str, Path], tmp_path: Path
):
    _, export = demo_export
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in export.rglob("*.ndjson*"):
        (bad / path.name).write_bytes(path.read_bytes())
    with (bad / "Condition.000.ndjson").open("a") as fh:
        fh.write('{"resourceType": "Condition", "id": "x", "clinicalStatus": 7}\n')
    settings = Settings(home=tmp_path / "home")
    with pytest.raises(FhirImportError) as err, ndjson_source([bad], settings):
        pytest.fail("the block must not run")
    assert "Condition.000.ndjson" in str(err.value)
    assert not list((tmp_path / "home").glob(".ndjson-build-*"))


def test_what_cannot_be_built_from_is_named(tmp_path: Path):
    with pytest.raises(FhirImportError, match="no such file or folder"):
        ndjson_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not NDJSON")
    with pytest.raises(FhirImportError, match="no NDJSON files"):
        ndjson_files([tmp_path / "empty"])
    on_cluster = Settings(
        home=tmp_path / "home", index_build={"engine": "ray", "address": "ray://head:10001"}
    )
    with (
        pytest.raises(ConfigurationError, match="cannot reach"),
        ndjson_source([tmp_path / "empty"], on_cluster),
    ):
        pytest.fail("the block must not run")
    assert not (tmp_path / "home").exists()  # refused before anything was made


def test_cli_index_build_from_ndjson(
    home: Path, demo_export: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
):
    url, export = demo_export
    result = runner.invoke(app, ["index", "build", "--ndjson", str(export)])
    assert result.exit_code == 0, result.output
    assert "5 patients, 5 cases" in result.output and "5 added" in result.output
    assert not (home / "store.db").exists()  # no store of ChartSight's was made
    assert not list(home.glob(".ndjson-build-*"))
    # `similar` reads the patient's own record where records are kept (here: no store, so none)
    alone = runner.invoke(app, ["similar", TOMMY_FRIESEN, "--k", "2", "--json"])
    assert alone.exit_code == 1 and "no patient with this id" in " ".join(alone.output.split())
    # ... and with the hospital's records (the store the export came from), the index answers
    monkeypatch.setenv("CHARTSIGHT_STORE__URL", url)
    hits = runner.invoke(app, ["similar", TOMMY_FRIESEN, "--k", "2", "--json"])
    assert hits.exit_code == 0, hits.output
    found = json.loads(hits.output)
    assert len(found) == 2 and TOMMY_FRIESEN not in {h["patient_id"] for h in found}
    both = runner.invoke(app, ["index", "build", "--ndjson", str(export), "--source", "local"])
    assert both.exit_code == 1 and "--ndjson is the source" in both.output
    missing = runner.invoke(app, ["index", "build", "--ndjson", str(home / "nowhere")])
    assert missing.exit_code == 1 and "no such file or folder" in " ".join(missing.output.split())
    assert "Traceback" not in missing.output


def test_an_export_without_patients_builds_nothing_and_a_rebuild_keeps_the_live_index(
    home: Path, demo_export: tuple[str, Path], tmp_path: Path
):
    """A Patient-less export (the Patient type left out of `_type`) is refused by name; with
    --rebuild, no empty index ever replaces the live one (an empty source, any source)."""
    _, export = demo_export
    assert runner.invoke(app, ["index", "build", "--ndjson", str(export)]).exit_code == 0
    partial = tmp_path / "no-patients"
    partial.mkdir()
    for path in export.rglob("*.ndjson*"):
        if not path.name.startswith("Patient."):
            (partial / path.name).write_bytes(path.read_bytes())
    with (
        pytest.raises(FhirImportError, match="no Patient resources"),
        ndjson_source([partial], Settings(home=tmp_path / "direct")),
    ):
        pytest.fail("the block must not run")
    rebuilt = runner.invoke(app, ["index", "build", "--ndjson", str(partial), "--rebuild"])
    said = " ".join(rebuilt.output.split())
    assert rebuilt.exit_code == 1 and "no Patient resources" in said and "Traceback" not in said
    empty = tmp_path / "empty-store"
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("CHARTSIGHT_STORE__URL", f"sqlite:///{empty / 'store.db'}")
    empty.mkdir()
    try:
        again = runner.invoke(app, ["index", "build", "--rebuild"])  # an empty store
    finally:
        monkeypatch.undo()
    said = " ".join(again.output.split())
    assert again.exit_code == 1 and "the rebuilt index was not installed" in said, said
    kept = runner.invoke(app, ["index", "build", "--ndjson", str(export)])
    assert "5 unchanged" in kept.output and "5 cases in" in " ".join(kept.output.split())


def test_a_killed_builds_temporary_store_is_removed_by_the_next(
    demo_export: tuple[str, Path], tmp_path: Path
):
    _, export = demo_export
    settings = Settings(home=tmp_path / "home")
    settings.home.mkdir()
    dead = settings.home / ".ndjson-build-999999999-abc"  # no such process
    dead.mkdir()
    (dead / "store.db").write_bytes(b"left by a kill -9")
    mine = settings.home / f".ndjson-build-{os.getpid()}-live"  # a build still running
    mine.mkdir()
    with ndjson_source([export], settings) as using:
        assert using.store.url
    assert not dead.exists() and mine.exists()


def test_an_unwritable_index_folder_is_one_error_line(home: Path, demo_export: tuple[str, Path]):
    _, export = demo_export
    home.mkdir(parents=True, exist_ok=True)
    blocker = home / "not-a-folder"
    blocker.write_text("a file where the index's folder should be")
    with (
        pytest.raises(ConfigurationError, match="cannot make the temporary store"),
        ndjson_source([export], Settings(home=blocker)),
    ):
        pytest.fail("the block must not run")
    result = runner.invoke(
        app, ["index", "build", "--ndjson", str(export)],
        env={"CHARTSIGHT_HOME": str(blocker)},
    )  # fmt: skip
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "cannot" in said and "Traceback" not in said, said
