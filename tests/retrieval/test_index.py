"""The case index: fusion, filters inside the search, manifest checks, generations, recovery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from connectors.demo import MARTINA_MURAZIK, TOMMY_FRIESEN
from connectors.images import ImageSet
from connectors.record import PatientRecord
from retrieval import index as index_mod
from retrieval.cases import Case, age_band, cases_from_record
from retrieval.encoders import EncoderRegistry
from retrieval.index import (
    CaseFilter,
    CaseIndex,
    CaseIndexError,
    Fusion,
    IndexMismatch,
    auto_factory,
)
from retrieval.settings import FusionSettings, IndexSettings

SEXES = ("female", "male")


def _open(path: Path, encoders: EncoderRegistry, **index_settings: object) -> CaseIndex:
    return CaseIndex(
        path,
        IndexSettings(**index_settings),  # type: ignore[arg-type]
        FusionSettings(),
        encoders.text(),
        encoders.image(),
    )


def _synthetic(n: int, dim: int, seed: int = 0) -> tuple[list[Case], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cases = [
        Case(
            key=f"Patient/p{i // 2}#{i % 2}",
            patient_id=f"p{i // 2}",
            summary=f"synthetic case {i}",
            sex=SEXES[i % 2],
            age_band=age_band(20 + i % 60),
            modalities=("CT",) if i % 3 == 0 else ("MR",),
        )
        for i in range(n)
    ]
    return cases, vectors


def _brute_force(index: CaseIndex, query: np.ndarray, allowed: list[int], k: int) -> list[int]:
    vecs = index._vectors(allowed)
    order = np.argsort(-(vecs @ query))[:k]
    return [allowed[i] for i in order]


def test_auto_factory_by_size_and_memory():
    assert auto_factory(10_000, 512, 4096) == "Flat"
    assert auto_factory(100_000, 512, 4096) == "IVF1024,SQ8"
    assert auto_factory(1_000_000, 1280, 4096) == "IVF4096,SQ8"
    assert auto_factory(1_000_000, 1280, 1024) == "IVF4096,PQ64"


def test_concat_fusion_is_the_weighted_mean_of_cosines(encoders: EncoderRegistry):
    fusion = Fusion(
        FusionSettings(image_weight=0.6, text_weight=0.8),
        encoders.text().info,
        encoders.image().info,
    )
    assert fusion.mode == "concat" and fusion.dim == 384 + 1280
    rng = np.random.default_rng(1)
    t = rng.standard_normal((2, 384)).astype(np.float32)
    i = rng.standard_normal((2, 1280)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    a, b = fusion.fuse(t, i)
    expected = (0.36 * (i[0] @ i[1]) + 0.64 * (t[0] @ t[1])) / 1.0
    assert float(a @ b) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(CaseIndexError, match="one space"):
        Fusion(FusionSettings(mode="sum"), encoders.text().info, encoders.image().info)


def test_demo_patients_index_and_search_with_filters(
    tmp_path: Path,
    encoders: EncoderRegistry,
    demo_charts: dict[str, tuple[PatientRecord, ImageSet]],
):
    index = _open(tmp_path / "idx", encoders)
    cases = [c for rec, imgs in demo_charts.values() for c in cases_from_record(rec, imgs)]
    stats = index.upsert(cases)
    assert (stats.added, stats.unchanged) == (5, 0) and len(index) == 5
    assert index.upsert(cases).unchanged == 5  # nothing encoded again

    tommy = next(c for c in cases if c.patient_id == TOMMY_FRIESEN)
    assert tommy.images and tommy.modalities == ("CT",) and tommy.sex == "male"
    hits = index.similar(tommy, k=10, flt=CaseFilter(exclude_patient=TOMMY_FRIESEN))
    assert len(hits) == 4 and TOMMY_FRIESEN not in {h.patient_id for h in hits}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    own = index.similar(tommy, k=1)
    assert own[0].patient_id == TOMMY_FRIESEN and own[0].score == pytest.approx(1.0, abs=1e-4)

    only_mr = index.similar(tommy, k=5, flt=CaseFilter(modality="mr"))
    assert [h.patient_id for h in only_mr] == [MARTINA_MURAZIK]
    women = index.similar(tommy, k=5, flt=CaseFilter(sex="female"))
    assert women and all(h.sex == "female" for h in women)
    assert index.similar(tommy, k=5, flt=CaseFilter(age_band="0-9")) == []


def test_filters_run_inside_the_search_not_by_over_fetching(
    tmp_path: Path, encoders: EncoderRegistry
):
    index = _open(tmp_path / "idx", encoders)
    cases, vectors = _synthetic(200, index.fusion.dim)
    index.upsert(cases, vectors)
    query = vectors[0]
    # the 2 best among the allowed, even though the global best are all excluded
    flt = CaseFilter(exclude_patient="p0", sex="male", modality="CT")
    found = index.search_vectors(query[None, :], k=2, flt=flt)[0]
    with index.engine.connect() as conn:
        allowed = [
            r.id
            for r in conn.execute(index_mod.select(index_mod.cases_t))
            if r.sex == "male" and ",CT," in r.modalities and r.patient_id != "p0"
        ]
    assert [i for i, _ in found] == _brute_force(index, query, allowed, 2)
    excluded = index.search_vectors(query[None, :], k=3, flt=CaseFilter(exclude_patient="p0"))[0]
    assert all(index.hits([h])[0].patient_id != "p0" for h in excluded) and len(excluded) == 3


def test_update_and_remove_by_key(tmp_path: Path, encoders: EncoderRegistry):
    index = _open(tmp_path / "idx", encoders)
    cases, vectors = _synthetic(10, index.fusion.dim)
    index.upsert(cases, vectors)
    changed = Case(**{**cases[3].__dict__, "summary": "changed summary"})
    stats = index.upsert([changed], vectors[5:6])
    assert (stats.added, stats.updated) == (0, 1) and len(index) == 10
    best = index.hits(index.search_vectors(vectors[5:6], k=2)[0])
    assert {h.key for h in best} == {cases[3].key, cases[5].key}
    assert index.remove([cases[3].key, "Patient/unknown"]) == 1
    assert len(index) == 9
    assert cases[3].key not in index.fingerprints()


def test_saved_index_reopens_and_refuses_other_encoders_or_fusion(
    tmp_path: Path, encoders: EncoderRegistry
):
    path = tmp_path / "idx"
    index = _open(path, encoders)
    cases, vectors = _synthetic(20, index.fusion.dim)
    index.upsert(cases, vectors)
    gen = index.save()
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["count"] == 20 and manifest["factory"] == "Flat"
    assert manifest["space"]["text_encoder"]["name"] == "minilm"
    assert manifest["space"]["image_encoder"]["dim"] == 1280

    again = _open(path, encoders)
    assert len(again) == 20
    assert (
        again.search_vectors(vectors[7:8], k=1)[0][0][0]
        == index.search_vectors(vectors[7:8], k=1)[0][0][0]
    )

    with pytest.raises(IndexMismatch, match="fusion"):
        CaseIndex(
            path,
            IndexSettings(),
            FusionSettings(image_weight=0.9),
            encoders.text(),
            encoders.image(),
        )
    with pytest.raises(IndexMismatch, match="image encoder"):
        CaseIndex(path, IndexSettings(), FusionSettings(), encoders.text(), _OtherImage(encoders))


class _OtherImage:
    """The same network under another name: an index must not mix their vectors."""

    def __init__(self, encoders: EncoderRegistry) -> None:
        from retrieval.encoders import EncoderInfo

        real = encoders.image()
        self.info = EncoderInfo("timm:tf_efficientnet_lite0", "other", real.info.dim, "other")
        self.encode_images = real.encode_images


def test_crash_before_a_new_generation_keeps_the_old_one_and_catches_up(
    tmp_path: Path, encoders: EncoderRegistry, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "idx"
    index = _open(path, encoders)
    cases, vectors = _synthetic(30, index.fusion.dim)
    index.upsert(cases[:20], vectors[:20])
    first = index.save()
    index.upsert(cases[20:], vectors[20:])  # committed to SQL ...

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(index_mod.faiss, "write_index", crash)
    with pytest.raises(OSError):
        index.save()  # ... but the new generation is never written
    monkeypatch.undo()
    assert (path / "CURRENT").read_text() == first.name
    assert not list(path.glob("gen-000002"))

    reopened = _open(path, encoders)  # the previous generation loads, then catches up from SQL
    assert len(reopened) == 30
    assert (path / "CURRENT").read_text() == "gen-000002"
    top = reopened.search_vectors(vectors[25:26], k=1)[0][0][0]
    assert reopened.hits([(top, 1.0)])[0].key == cases[25].key


def test_a_reader_switches_to_a_generation_another_process_made_live(
    tmp_path: Path, encoders: EncoderRegistry
):
    """A service (the reader) answers from a new build without a restart; a generation that
    cannot be read leaves it on the one it holds."""
    path = tmp_path / "idx"
    builder = _open(path, encoders)
    cases, vectors = _synthetic(30, builder.fusion.dim)
    builder.upsert(cases[:10], vectors[:10])
    builder.save()
    reader = _open(path, encoders)
    assert len(reader) == 10 and reader.generation == "gen-000001"

    builder.upsert(cases[10:], vectors[10:])
    builder.save()
    top = reader.search_vectors(vectors[25:26], k=1)[0][0][0]
    assert reader.generation == "gen-000002" and len(reader) == 30
    assert reader.hits([(top, 1.0)])[0].key == cases[25].key
    assert not reader.refresh()  # nothing newer

    (path / "gen-000003").mkdir()  # named live but unreadable (no manifest)
    (path / "CURRENT").write_text("gen-000003")
    assert not reader.refresh()
    assert reader.generation == "gen-000002" and len(reader) == 30


def test_a_reader_switches_to_a_rebuilt_folder_whose_numbering_starts_again(
    tmp_path: Path, encoders: EncoderRegistry
):
    """``chartsight index build --rebuild`` builds a new folder (its first generation is again
    gen-000001, its cases.db new) and swaps it in by renames: a reader notices, and reads the new
    rows for the new vectors."""
    path = tmp_path / "idx"
    old = _open(path, encoders)
    cases, vectors = _synthetic(20, old.fusion.dim)
    old.upsert(cases[:10], vectors[:10])
    old.save()
    reader = _open(path, encoders)
    assert reader.generation == "gen-000001" and len(reader) == 10

    staged = _open(tmp_path / ".idx.rebuild", encoders)
    staged.upsert(cases[10:], vectors[10:])  # other cases, other ids' rows
    assert staged.save().name == "gen-000001"
    staged.engine.dispose()
    path.rename(tmp_path / ".idx.retired")
    (tmp_path / ".idx.rebuild").rename(path)

    top = reader.search_vectors(vectors[15:16], k=1)[0][0][0]
    assert reader.hits([(top, 1.0)])[0].key == cases[15].key
    assert len(reader) == 10 and reader.generation == "gen-000001"


def test_damaged_index_file_is_reported(tmp_path: Path, encoders: EncoderRegistry):
    path = tmp_path / "idx"
    index = _open(path, encoders)
    cases, vectors = _synthetic(5, index.fusion.dim)
    index.upsert(cases, vectors)
    gen = index.save()
    with (gen / "index.faiss").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xff\xff\xff")
    with pytest.raises(CaseIndexError, match="checksum"):
        _open(path, encoders)


def test_ivf_index_trains_when_big_enough_and_supports_removal(
    tmp_path: Path, encoders: EncoderRegistry
):
    index = _open(tmp_path / "idx", encoders, factory="IVF4,Flat", nprobe=4)
    cases, vectors = _synthetic(300, index.fusion.dim)
    index.upsert(cases[:50], vectors[:50])
    assert index.factory == "Flat"  # 50 < 39 × 4: exact until it can train
    index.upsert(cases[50:], vectors[50:])
    assert index.factory == "IVF4,Flat" and index.index.is_trained and len(index) == 300
    found = index.search_vectors(vectors[10:11], k=1, flt=CaseFilter(sex="female"))[0]
    assert index.hits(found)[0].key == cases[10].key
    index.remove([cases[10].key])
    assert len(index) == 299
    index.save()
    assert len(_open(tmp_path / "idx", encoders, factory="IVF4,Flat")) == 299


def test_hnsw_removal_rebuilds_from_sql(tmp_path: Path, encoders: EncoderRegistry):
    index = _open(tmp_path / "idx", encoders, factory="HNSW16")
    cases, vectors = _synthetic(40, index.fusion.dim)
    index.upsert(cases, vectors)
    index.remove([cases[0].key, cases[1].key])
    assert len(index) == 38
    found = index.search_vectors(vectors[2:3], k=1, flt=CaseFilter(exclude_patient="p9"))[0]
    assert index.hits(found)[0].key == cases[2].key


def test_bad_factory_string_is_a_clear_error(tmp_path: Path, encoders: EncoderRegistry):
    with pytest.raises(CaseIndexError, match="factory string 'IVF,Nonsense'"):
        _open(tmp_path / "idx", encoders, factory="IVF,Nonsense")
    with pytest.raises(CaseIndexError, match="refinement stages are not supported"):
        _open(tmp_path / "idx2", encoders, factory="IVF16,PQ8x4fs,RFlat")


def test_the_same_person_from_another_source_is_left_out_by_identifier(
    tmp_path: Path, encoders: EncoderRegistry
):
    index = _open(tmp_path / "idx", encoders)
    cases, vectors = _synthetic(20, index.fusion.dim)
    ssn = "http://hl7.org/fhir/sid/us-ssn|999-12-3456"
    cases = [
        Case(**{**c.__dict__, "identifiers": (ssn,) if c.patient_id == "p0" else ()}) for c in cases
    ]
    index.upsert(cases, vectors)
    query = vectors[0][None, :]
    # the query patient has another id here (another source) but the same SSN
    for flt in (
        CaseFilter(exclude_patient="other-id", exclude_identifiers=(ssn,)),
        CaseFilter(exclude_patient="other-id", exclude_identifiers=(ssn,), sex="male"),
    ):
        found = index.hits(index.search_vectors(query, k=5, flt=flt)[0])
        assert found and all(h.patient_id != "p0" for h in found)
    plain = index.hits(index.search_vectors(query, k=1, flt=CaseFilter(exclude_patient="x"))[0])
    assert plain[0].patient_id == "p0"  # without the identifier it would be found
    index.remove([c.key for c in cases if c.patient_id == "p0"])
    with index.engine.connect() as conn:
        assert not list(conn.execute(index_mod.select(index_mod.idents_t)))


def _shards_of_three(index: object, ids: list[int], vectors: object) -> object:
    """A ``kinds.Filler`` as a distributed build's: three shards filled apart, then merged."""
    from retrieval.index import kinds

    assert kinds.mergeable(index)
    empty = kinds.empty_shard(index)
    size = -(-len(ids) // 3)
    shards = [
        kinds.fill_shard(empty, np.asarray(ids[s : s + size]), vectors(ids[s : s + size]))  # type: ignore[operator]
        for s in range(0, len(ids), size)
    ]
    return kinds.merge_shards(index, shards)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,SQ8"])
def test_rows_stored_then_synced_in_merged_shards_search_like_upserts(
    tmp_path: Path, encoders: EncoderRegistry, factory: str
):
    upserted = _open(tmp_path / "a", encoders, factory=factory, nprobe=4)
    stored = _open(tmp_path / "b", encoders, factory=factory, nprobe=4)
    cases, vectors = _synthetic(300, upserted.fusion.dim)
    upserted.upsert(cases, vectors)
    for start in range(0, 300, 100):
        stats = stored.store(cases[start : start + 100], vectors[start : start + 100])
        assert stats.added == 100
    assert len(stored) == 0  # SQL only, until sync
    assert stored.sync(_shards_of_three).added == 300  # type: ignore[arg-type]
    assert stored.factory == upserted.factory == factory and len(stored) == 300
    queries = vectors[:20]
    assert stored.search_vectors(queries, k=10) == upserted.search_vectors(queries, k=10)
    # the merged index still removes by id, and a second sync only applies the change
    stored.remove([cases[0].key])
    assert stored.store(cases[:2], vectors[:2]).added == 1
    assert stored.sync(_shards_of_three).added == 1  # type: ignore[arg-type]
    assert len(stored) == 300
    stored.save()
    assert len(_open(tmp_path / "b", encoders, factory=factory)) == 300


def test_planted_files_in_the_index_folder_are_neither_followed_nor_written_through(
    tmp_path: Path, encoders: EncoderRegistry
):
    """Whoever can write the index folder cannot make ChartSight read outside it (CURRENT naming
    ``../elsewhere`` or a symlinked generation) or overwrite a file (a planted ``.CURRENT.tmp``
    link); an unreadable manifest or a vector file of another dimension is a clear error, and a
    running reader keeps the generation it holds."""
    from retrieval.index import manifest

    path = tmp_path / "idx"
    index = _open(path, encoders)
    cases, vectors = _synthetic(8, index.fusion.dim)
    index.upsert(cases, vectors)
    live = index.save()
    reader = _open(path, encoders)

    outside = tmp_path / "outside"
    shutil.copytree(live, outside / "gen-000009")
    for planted in ("../outside/gen-000009", "/etc"):
        (path / "CURRENT").write_text(planted)
        assert manifest.current_generation(path) is None
    (path / "gen-000009").symlink_to(outside / "gen-000009")
    (path / "CURRENT").write_text("gen-000009")
    assert manifest.current_generation(path) is None
    (path / "gen-000009").unlink()
    (path / "CURRENT").write_text(live.name)

    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    (path / ".CURRENT.tmp").symlink_to(victim)
    index.save()
    assert victim.read_text() == "precious data"

    gen = manifest.current_generation(path)
    assert gen is not None
    good = (gen / "manifest.json").read_text()
    (gen / "manifest.json").write_text("{}")
    assert not reader.refresh() and len(reader) == 8  # the reader keeps what it holds
    with pytest.raises(CaseIndexError, match="manifest.json cannot be read"):
        manifest.read_generation(gen, index.space())
    # a vector file of another dimension, its checksum put in the manifest to match
    other = index_mod.faiss.IndexFlatIP(index.fusion.dim + 1)
    index_mod.faiss.write_index(other, str(gen / "index.faiss"))
    fixed = json.loads(good)
    fixed["index_sha256"] = manifest.sha256_file(gen / "index.faiss")
    (gen / "manifest.json").write_text(json.dumps(fixed))
    with pytest.raises(CaseIndexError, match="dimension"):
        manifest.read_generation(gen, index.space())
