"""Import integrity and hostile input: duplicate resources are refused, and every broken or hostile
file ends in one ``FhirImportError`` naming the file and the entry or line, storing nothing."""

from __future__ import annotations

import codecs
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from connectors.errors import FhirImportError
from connectors.store import MAX_DEPTH, FhirStore

REALWORLD = Path(__file__).resolve().parents[1] / "fixtures" / "realworld"


def _patient(pid: str = "p1", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, **extra}


def _condition(cid: str, text: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "code": {"text": text},
        "subject": {"reference": "Patient/p1"},
        **extra,
    }


def _observation(oid: str, value: Any = 5.4) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"text": "potassium"},
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": {"value": value, "unit": "mmol/L"},
    }


def _bundle(*entries: dict[str, Any], btype: str = "collection") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": btype, "entry": list(entries)}


def _write(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document))
    return path


def _ndjson(path: Path, resources: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in resources))
    return path


def _rows(store: FhirStore) -> list[tuple[str, str, str]]:
    """Every stored resource with its content: 'nothing changed' means these are equal."""
    from sqlalchemy import select

    from connectors.store import resources_t

    with store.engine.connect() as conn:
        return sorted(
            conn.execute(
                select(
                    resources_t.c.resource_type, resources_t.c.resource_id, resources_t.c.content
                )
            ).all()
        )


@pytest.fixture
def filled(store: FhirStore, tmp_path: Path) -> FhirStore:
    """A store that already holds a patient with one Condition."""
    store.import_path(_write(tmp_path / "first.json", _bundle({"resource": _patient()})))
    store.import_path(_write(tmp_path / "second.json", _condition("c0", "asthma")))
    return store


def _refused(store: FhirStore, path: Path, *needles: str) -> FhirImportError:
    before = _rows(store)
    with pytest.raises(FhirImportError) as info:
        store.import_path(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    for needle in needles:
        assert needle in message, message
    assert _rows(store) == before
    return info.value


# ---------------------------------------------------------------- duplicates


def test_realworld_duplicate_observation_ids_are_refused_naming_both_entries(
    filled: FhirStore, tmp_path: Path
):
    path = REALWORLD / "13-duplicate-resource-ids.json"
    error = _refused(filled, path, "both are Observation/bug13-obs1", "bdl-7")
    assert error.entry == "entry 1 and entry 2"
    assert filled.counts() == {"Patient": 1, "Condition": 1}  # not even the file's Patient


def test_two_conditions_with_one_id_name_both_fullurls(filled: FhirStore, tmp_path: Path):
    bundle = _bundle(
        {"fullUrl": "urn:uuid:a", "resource": _condition("c1", "hypertension")},
        {"fullUrl": "urn:uuid:b", "resource": _condition("c2", "gout")},
        {"fullUrl": "urn:uuid:c", "resource": _condition("c1", "diabetes")},
        btype="transaction",
    )
    error = _refused(
        filled,
        _write(tmp_path / "conditions.json", bundle),
        "both are Condition/c1",
        "entry 0 (fullUrl urn:uuid:a)",
        "entry 2 (fullUrl urn:uuid:c)",
    )
    assert error.entry == "entry 0 and entry 2"


def test_one_fullurl_for_two_resources_is_refused(filled: FhirStore, tmp_path: Path):
    bundle = _bundle(
        {"fullUrl": "urn:uuid:same", "resource": _condition("c1", "hypertension")},
        {"fullUrl": "urn:uuid:same", "resource": _condition("c2", "gout")},
    )
    error = _refused(
        filled,
        _write(tmp_path / "fullurl.json", bundle),
        "one fullUrl 'urn:uuid:same' names two resources, Condition/c1 and Condition/c2",
    )
    assert error.entry == "entry 0 and entry 1"


def test_one_fullurl_without_ids_is_one_resource_twice(filled: FhirStore, tmp_path: Path):
    # Without ids, both entries take their id from the fullUrl: the same resource named twice.
    entry = {"fullUrl": "urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427", "resource": _patient("")}
    del entry["resource"]["id"]
    _refused(
        filled,
        _write(tmp_path / "no-ids.json", _bundle(entry, entry)),
        "both are Patient/1b4e28ba-2fa1-11d2-883f-0016d3cca427",
    )


def test_ndjson_lines_with_one_id_are_refused(filled: FhirStore, tmp_path: Path):
    path = _ndjson(
        tmp_path / "Condition.ndjson",
        [_condition("c1", "hypertension"), _condition("c2", "gout"), _condition("c1", "gout")],
    )
    error = _refused(filled, path, "both are Condition/c1: line 1 and line 3")
    assert error.entry == "line 1 and line 3"


def test_delete_and_write_of_one_resource_in_a_transaction_are_refused(
    filled: FhirStore, tmp_path: Path
):
    bundle = _bundle(
        {"resource": _condition("c0", "asthma, resolved")},
        {"request": {"method": "DELETE", "url": "Condition/c0"}},
        btype="transaction",
    )
    _refused(filled, _write(tmp_path / "delete.json", bundle), "both are Condition/c0")


def test_versions_told_apart_by_version_id_keep_the_newest_and_count_once(
    store: FhirStore, tmp_path: Path
):
    def version(v: str, updated: str, text: str) -> dict[str, Any]:
        return _condition("c1", text, meta={"versionId": v, "lastUpdated": updated})

    newest_first = _bundle(
        {"resource": _patient()},
        {"resource": version("2", "2026-03-02T10:00:00+01:00", "type 2 diabetes")},
        {"resource": version("1", "2026-03-01T10:00:00Z", "prediabetes")},
    )
    report = store.import_path(_write(tmp_path / "versions.json", newest_first))
    assert report.count == 2 and dict(report.imported) == {"Patient": 1, "Condition": 1}
    assert store.counts() == {"Patient": 1, "Condition": 1}
    assert store.read("Condition", "c1").code.text == "type 2 diabetes"
    assert report.skipped == ["entry 2: Condition/c1 version 1 is older than version 2 (entry 1)"]

    lines = [
        version("3", "2026-04-01T00:00:00Z", "type 2 diabetes, on insulin"),
        version("4", "2026-05-01T00:00:00Z", "type 2 diabetes, diet only"),
    ]
    report = store.import_path(_ndjson(tmp_path / "versions.ndjson", lines))
    assert report.count == 1 and report.skipped[0].startswith("line 1: Condition/c1 version 3")
    assert store.read("Condition", "c1").code.text == "type 2 diabetes, diet only"
    assert store.counts() == {"Patient": 1, "Condition": 1}


def test_same_version_id_twice_is_still_a_duplicate(filled: FhirStore, tmp_path: Path):
    meta = {"versionId": "7"}
    bundle = _bundle(
        {"resource": _condition("c1", "gout", meta=meta)},
        {"resource": _condition("c1", "pseudogout", meta=meta)},
    )
    _refused(filled, _write(tmp_path / "v7.json", bundle), "both are Condition/c1 version 7")
    between = _bundle(
        {"resource": _condition("c1", "gout", meta=meta)},
        {"resource": _condition("c1", "gout, resolved", meta={"versionId": "8"})},
        {"resource": _condition("c1", "pseudogout", meta=meta)},
    )
    error = _refused(filled, _write(tmp_path / "v787.json", between), "version 7")
    assert error.entry == "entry 0 and entry 2"
    unversioned = _bundle(
        {"resource": _condition("c1", "gout", meta=meta)},
        {"resource": _condition("c1", "pseudogout")},
    )
    _refused(filled, _write(tmp_path / "v7-none.json", unversioned), "not told apart")


def test_a_patient_reference_longer_than_an_id_is_refused(filled: FhirStore, tmp_path: Path):
    # Accepted by the models; PostgreSQL would refuse the row with a bare database error.
    condition = {**_condition("c1", "gout"), "subject": {"reference": "Patient/" + "x" * 65}}
    bundle = _bundle({"resource": _patient("p2")}, {"resource": condition})
    error = _refused(filled, _write(tmp_path / "long.json", bundle), "longer than 64 characters")
    assert error.entry == "entry 1 (Condition/c1)"


def test_abstract_resource_types_are_refused(filled: FhirStore, tmp_path: Path):
    for rtype in ("Resource", "DomainResource"):
        path = _write(tmp_path / f"{rtype}.json", {"resourceType": rtype, "id": "x"})
        _refused(filled, path, f"unknown resourceType '{rtype}'")


def test_import_summary_counts_what_was_stored(store: FhirStore, tmp_path: Path):
    bundle = _bundle(
        {"resource": _patient()}, *({"resource": _observation(f"o{i}")} for i in range(3))
    )
    report = store.import_path(_write(tmp_path / "ok.json", bundle))
    assert report.count == sum(store.counts().values()) == 4


# ---------------------------------------------------------------- hostile input


def _deep(levels: int) -> dict[str, Any]:
    """An Observation whose extension nests ``levels`` JSON levels below the resource."""
    node: dict[str, Any] = {"url": "http://example.org/leaf", "valueString": "x"}
    depth = 2  # the resource's object and the leaf's object
    while depth + 2 <= levels:
        node = {"url": "http://example.org/nest", "extension": [node]}
        depth += 2
    return {**_observation("deep"), "extension": [node]}


def test_json_nested_100k_levels_is_refused(filled: FhirStore, tmp_path: Path):
    path = tmp_path / "nested.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    _refused(filled, path, "nested too deeply")
    bundle = tmp_path / "nested-bundle.json"
    inner = '{"resourceType": "Patient", "id": "p", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    bundle.write_text('{"resourceType": "Bundle", "type": "collection", "entry": [')
    with bundle.open("a") as fh:
        fh.write('{"resource": ' + inner + "}]}")
    _refused(filled, bundle, "nested too deeply")


def test_resources_nested_past_the_limit_name_their_entry_and_line(
    filled: FhirStore, tmp_path: Path
):
    fine = _deep(MAX_DEPTH - 1)
    too_deep = _deep(MAX_DEPTH + 50)  # parseable, but past what the importer recurses through
    report = filled.import_path(_write(tmp_path / "fine.json", _bundle({"resource": fine})))
    assert report.count == 1
    error = _refused(
        filled,
        _write(tmp_path / "deep.json", _bundle({"resource": _patient()}, {"resource": too_deep})),
        f"nested deeper than {MAX_DEPTH} levels",
    )
    assert error.entry == "entry 1"
    path = _ndjson(tmp_path / "deep.ndjson", [_patient(), too_deep])
    assert _refused(filled, path, "nested deeper").entry == "line 2"


@pytest.mark.parametrize(
    ("number", "needle"),
    [
        ("1e999999", "out of range"),
        ("-1E+400", "out of range"),
        ("1e-999999", "out of range"),
        ("9" * 100_000, "has 100000 digits"),
        ("0." + "1" * 5000, "has 5001 digits"),
        ("NaN", "NaN is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
    ],
)
def test_numbers_no_double_can_hold_are_refused(
    filled: FhirStore, tmp_path: Path, number: str, needle: str
):
    text = json.dumps(_observation("big", value=0)).replace('"value": 0', f'"value": {number}')
    _refused(filled, _write_text(tmp_path / "big.json", text), needle)
    entry = json.dumps(_bundle({"resource": _patient()}, {"resource": _observation("o", 0)}))
    entry = entry.replace('"value": 0', f'"value": {number}')
    _refused(filled, _write_text(tmp_path / "big-bundle.json", entry), needle)
    lines = json.dumps(_patient()) + "\n" + text + "\n"
    assert _refused(filled, _write_text(tmp_path / "big.ndjson", lines), needle).entry == "line 2"


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _encoded(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("encoding", "needle"),
    [
        ("utf-16", "the file is UTF-16 (it starts with a UTF-16 byte order mark)"),
        ("utf-16-le", "looks UTF-16 or UTF-32"),
        ("utf-16-be", "looks UTF-16 or UTF-32"),
        ("utf-32", "the file is UTF-32"),
    ],
)
def test_utf16_and_utf32_files_are_refused_with_the_conversion(
    filled: FhirStore, tmp_path: Path, encoding: str, needle: str
):
    text = json.dumps(_bundle({"resource": _patient("p2", name=[{"family": "Müller"}])}))
    _refused(filled, _encoded(tmp_path / "wide.json", text.encode(encoding)), needle, "iconv")
    lines = json.dumps(_patient("p2")) + "\n"
    _refused(filled, _encoded(tmp_path / "wide.ndjson", lines.encode(encoding)), needle)


def test_latin1_bytes_name_their_line(filled: FhirStore, tmp_path: Path):
    resource = _patient("p2", name=[{"family": "Müller"}])
    text = json.dumps(_bundle({"resource": resource}), indent=1, ensure_ascii=False)
    line = next(n for n, t in enumerate(text.splitlines(), start=1) if "Müller" in t)
    path = _encoded(tmp_path / "latin1.json", text.encode("latin-1"))
    _refused(filled, path, f"not UTF-8: byte 0xFC at line {line} byte", "WINDOWS-1252")
    lines = [json.dumps(_patient()), json.dumps(resource, ensure_ascii=False)]
    data = "\n".join(lines).encode("latin-1")
    assert _refused(filled, _encoded(tmp_path / "latin1.ndjson", data), "0xFC").entry == "line 2"


def test_a_utf8_byte_order_mark_is_accepted(store: FhirStore, tmp_path: Path):
    text = json.dumps(_bundle({"resource": _patient(name=[{"family": "Müller"}])}))
    path = _encoded(tmp_path / "bom.json", codecs.BOM_UTF8 + text.encode())
    assert store.import_path(path).count == 1
    lines = codecs.BOM_UTF8 + (json.dumps(_patient("p2")) + "\n").encode()
    assert store.import_path(_encoded(tmp_path / "bom.ndjson", lines)).count == 1
    assert store.read("Patient", "p1").name[0].family == "Müller"


def test_truncated_and_corrupt_gzip_are_refused(filled: FhirStore, tmp_path: Path):
    bundle = _bundle(
        {"resource": _patient("p2")}, *({"resource": _observation(f"o{i}")} for i in range(200))
    )
    whole = gzip.compress(json.dumps(bundle).encode())
    _refused(
        filled, _encoded(tmp_path / "cut.json.gz", whole[: len(whole) // 2]), "gzip data ends early"
    )
    lines = "".join(json.dumps(_observation(f"o{i}")) + "\n" for i in range(2000)).encode()
    packed = gzip.compress(lines)
    error = _refused(
        filled,
        _encoded(tmp_path / "cut.ndjson.gz", packed[: len(packed) // 2]),
        "gzip data ends early",
    )
    assert error.entry is not None and error.entry.startswith("line ")
    _refused(
        filled,
        _encoded(tmp_path / "plain.json.gz", json.dumps(bundle).encode()),
        "corrupt gzip data",
    )
    damaged = bytearray(whole)
    damaged[len(damaged) // 2] ^= 0xFF
    _refused(filled, _encoded(tmp_path / "damaged.json.gz", bytes(damaged)))


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ([_patient()], "the file holds a JSON array"),
        ("Patient", "the file holds a JSON string"),
        (None, "the file holds a JSON null"),
        (42, "the file holds a JSON number"),
        ({"id": "p1"}, "no resourceType"),
    ],
)
def test_json_that_is_not_a_resource_is_refused(
    filled: FhirStore, tmp_path: Path, document: Any, needle: str
):
    _refused(
        filled, _write(tmp_path / "odd.json", document), "not a FHIR resource or Bundle", needle
    )


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"resource": {"id": "x", "gender": "male"}}, "not a FHIR resource (no resourceType)"),
        ({"resource": ["Patient"]}, "a JSON array, not a FHIR resource"),
        ({"resource": {"resourceType": {"nested": 1}, "id": "x"}}, "unknown resourceType"),
        ({"resource": _patient("p2"), "request": "PUT"}, "entry.request is not a JSON object"),
        ({"resource": _patient("p2"), "fullUrl": 7}, "entry.fullUrl is not a string"),
        ({"request": {"method": "DELETE", "url": ["Patient", "p1"]}}, "is not Type/id"),
        (
            {"resource": _patient("p2", contained=[{"resourceType": "Foo", "id": "f"}])},
            "invalid Patient: a nested resource has an unknown resourceType",
        ),
        (
            {"resource": _patient("p2", contained=[{"resourceType": 5, "id": "f"}])},
            "invalid Patient: a nested resource has an unknown resourceType",
        ),
    ],
)
def test_odd_entries_name_their_index(
    filled: FhirStore, tmp_path: Path, entry: dict[str, Any], needle: str
):
    bundle = _bundle({"resource": _patient("p3")}, entry)
    error = _refused(filled, _write(tmp_path / "entry.json", bundle), needle)
    assert error.entry in ("entry 1", "entry 1 (Patient/p2)")


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ({"id": "x"}, "no resourceType"),
        ([1, 2], "a JSON array"),
        ("Patient", "a JSON string"),
    ],
)
def test_odd_ndjson_lines_name_their_line(
    filled: FhirStore, tmp_path: Path, line: Any, needle: str
):
    path = _ndjson(tmp_path / "odd.ndjson", [_patient("p3"), line])
    assert _refused(filled, path, needle).entry == "line 2"


def test_size_limits_refuse_huge_lines_and_documents_before_reading_them_whole(tmp_path: Path):
    store = FhirStore(
        f"sqlite:///{tmp_path / 's.db'}", max_line_bytes=4096, max_document_bytes=64 * 1024
    )
    try:
        huge = _patient("p2", name=[{"text": "x" * 10_000}])
        path = _ndjson(tmp_path / "huge.ndjson", [_patient(), huge, _patient("p3")])
        error = _refused(store, path, "longer than 4096 bytes, the limit for one NDJSON line")
        assert error.entry == "line 2"
        bundle = _bundle(*({"resource": _observation(f"o{i}")} for i in range(500)))
        _refused(store, _write(tmp_path / "big.json", bundle), "larger than 65536 bytes", "NDJSON")
        packed = tmp_path / "big.json.gz"  # the limit counts decompressed bytes (a gzip bomb)
        packed.write_bytes(gzip.compress(json.dumps(bundle).encode()))
        assert packed.stat().st_size < 64 * 1024
        _refused(store, packed, "larger than 65536 bytes")
    finally:
        store.close()


def test_import_json_refuses_what_json_cannot_hold(store: FhirStore):
    with pytest.raises(FhirImportError, match="not a JSON document"):
        store.import_json({**_observation("o"), "valueQuantity": {"value": float("nan")}}, "mem")
    nested: dict[str, Any] = {}
    node = nested
    for _ in range(100_000):
        node["x"] = {}
        node = node["x"]
    with pytest.raises(FhirImportError, match="not a JSON document"):
        store.import_json({**_patient(), "extension": nested}, "mem")
    assert store.counts() == {}


MEMORY_BOUND_IMPORT = """
import resource, sys
from pathlib import Path
from connectors.errors import FhirImportError
from connectors.store import FhirStore
folder = Path(sys.argv[1])
store = FhirStore(f"sqlite:///{folder / 'store.db'}")
status = Path("/proc/self/status").read_text().splitlines()
size = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 200 * 2**20, resource.RLIM_INFINITY))
try:
    store.import_path(folder / "balloon.json")
except FhirImportError as exc:
    print(exc)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_running_out_of_memory_is_a_clear_error(tmp_path: Path):
    # 15 MB of JSON that parses into 5 million dicts (~700 MB): more than the 200 MB the child
    # process may add. Whatever is left of the memory, the import ends in FhirImportError.
    (tmp_path / "balloon.json").write_text("[" + "{}," * 5_000_000 + "{}]")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_BOUND_IMPORT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr
    assert "balloon.json: not enough memory to import this file" in done.stdout, done.stdout
