"""``chartsight eval``: suite files, scoring, the report, and the shipped suites."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.answer import Answer, Citation
from agent.evaluation import EvalError, Expect, SuiteItem, load_suite, score, summarise
from surfaces.cli import SUITES_DIR, app


def _item(**expect: object) -> SuiteItem:
    return SuiteItem(
        id="x-1",
        family="f",
        patient="p",
        question="q?",
        expect=Expect.model_validate(expect),
    )


def _answer(text: str, refs: list[str], abstained: bool = False) -> Answer:
    return Answer(
        question="q?",
        patient_id="p",
        text=text,
        citations=[Citation(reference=r, text=r) for r in refs],
        abstained=abstained,
    )


def test_scores_value_citations_and_abstention() -> None:
    item = _item(
        contains=["5.9 %", "2020-12-13"],
        one_of=["Observation/a", "Observation/b"],
        cite_types=["Observation"],
    )
    right = score(item, _answer("Latest HbA1c: 2020-12-13 … 5.9  %.", ["Observation/b"]), 10)
    assert right.right and right.outcome == "right"
    extra = score(item, _answer("5.9 % on 2020-12-13", ["Observation/b", "Observation/c"]), 10)
    assert extra.value and not extra.citations and extra.outcome == "wrong"
    wrong = score(item, _answer("Latest hemoglobin: 13.7 g/dL", ["Observation/h"]), 10)
    assert not wrong.value and wrong.outcome == "wrong"
    gave_up = score(item, _answer("The record does not answer this question.", [], True), 10)
    assert gave_up.outcome == "abstained"
    absent = _item(contains=["No troponin result"], cites=["Patient/p"], abstain=True)
    honest = score(
        absent, _answer("No troponin result in the record. [Patient/p]", ["Patient/p"]), 10
    )
    assert honest.right and honest.outcome == "rightly abstained"
    invented = score(absent, _answer("Troponin 0.01 ng/mL [Observation/t]", ["Observation/t"]), 10)
    assert invented.outcome == "wrong"
    (fam,) = summarise([right, extra, wrong, gave_up])
    assert (fam.items, fam.right, fam.wrong, fam.abstained) == (4, 1, 2, 1)


def test_a_bad_suite_line_is_named(tmp_path: Path) -> None:
    good = json.dumps({"id": "a", "family": "f", "patient": "p", "question": "q", "expect": {}})
    path = tmp_path / "suite.jsonl"
    path.write_text(f"# comment\n{good}\n{{not json\n")
    with pytest.raises(EvalError, match=r"suite.jsonl:3: not a suite item"):
        load_suite([path])
    path.write_text(f"{good}\n{good}\n")
    with pytest.raises(EvalError, match="used twice"):
        load_suite([path])
    path.write_text(good.replace('"expect": {}', '"expect": {"contain": ["x"]}') + "\n")
    with pytest.raises(EvalError, match=r"suite.jsonl:1: not a suite item: expect.contain: Extra"):
        load_suite([path])
    # a bad date as today was found only when the run began, with no file or line
    path.write_text(f"{good}\n" + good.replace('"id": "a"', '"id": "b", "now": "yesterday"') + "\n")
    with pytest.raises(EvalError, match=r"suite.jsonl:2: not a suite item: now: .*'yesterday'"):
        load_suite([path])


def test_the_shipped_suites_cover_30_families_and_400_questions() -> None:
    demo = load_suite([SUITES_DIR / "demo.jsonl"])
    synthea = load_suite([SUITES_DIR / "synthea-r4-smart.jsonl"])
    families = {i.family for i in demo + synthea}
    assert len(demo) + len(synthea) >= 400 and len(families) >= 30
    # questions whose right answer is that the record does not hold it are part of it
    assert sum(i.expect.abstain for i in demo + synthea) >= 100


def test_the_demo_suite_is_what_the_generator_writes_from_the_bundles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import make_eval_suite
    from connectors.demo import demo_bundles

    monkeypatch.setattr(make_eval_suite, "OUT", tmp_path)
    make_eval_suite.write_suite("demo", demo_bundles(), tuned=True)
    assert (tmp_path / "demo.jsonl").read_text() == (SUITES_DIR / "demo.jsonl").read_text()


def test_chartsight_eval_writes_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARTSIGHT_HOME", str(tmp_path / "home"))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        ["eval", "--limit", "30", "--out", str(out), "--fail-under", "95"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "30/30 right or rightly abstained" in result.output
    md = (out / "report.md").read_text()
    assert "| family | items | right |" in md and "| age | 1 | 100.0% |" in md
    page = (out / "report.html").read_text()
    assert page.count("<svg") >= 2 and "http://" not in page.replace("http://www.w3.org", "")
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 30 and all(
        json.loads(line)["outcome"] in ("right", "rightly abstained") for line in lines
    )
    # nothing of the user's own store was touched: the demo patients went to a throwaway one
    assert not (tmp_path / "home" / "store.db").exists()


def test_chartsight_eval_fails_under_a_threshold_and_on_a_bad_suite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARTSIGHT_HOME", str(tmp_path / "home"))
    suite = tmp_path / "s.jsonl"
    suite.write_text(
        json.dumps(
            {
                "id": "impossible",
                "family": "f",
                "patient": "6234b038-fa0d-476f-b373-6c22de018cf7",
                "question": "How old is he?",
                "now": "2021-01-01",
                "expect": {"contains": ["999 years"]},
            }
        )
        + "\n"
    )
    from connectors.demo import demo_bundles

    args = ["eval", str(suite), "--out", str(tmp_path / "r"), "--fail-under", "50"]
    args += [x for b in demo_bundles()[-1:] for x in ("--bundles", str(b))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "0/1 right" in result.output
    suite.write_text("{oops\n")
    result = CliRunner().invoke(app, ["eval", str(suite)])
    assert result.exit_code == 1 and "not a suite item" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_the_report_plots_the_series_an_answer_cites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARTSIGHT_HOME", str(tmp_path / "home"))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["eval", "--family", "kidney function trend", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    # the creatinine series each trend answer cites: its points linked to their Observations
    assert "Series the answers cite" in page and page.count("<svg") >= 3
    cited = {
        c for line in (out / "results.jsonl").read_text().splitlines()
        for c in json.loads(line)["cited"] if c.startswith("Observation/")
    }  # fmt: skip
    linked = set(re.findall(r'xlink:href="#(Observation/[^"]+)"', page))
    assert linked and linked <= cited


def _line(**fields: object) -> str:
    item = {"id": "a", "family": "f", "patient": "p", "question": "q", "expect": {}}
    return json.dumps({**item, **fields}) + "\n"


def test_a_hostile_suite_file_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "suite.jsonl"
    # JSON nested past Python's recursion limit was a RecursionError traceback
    path.write_text(_line() + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(EvalError, match=r"suite.jsonl:2: not a suite item: JSON nested too deep"):
        load_suite([path])
    path.write_bytes(b"\x00\xff\xfe\x89PNG\r\n")
    with pytest.raises(EvalError, match="cannot read suite .*suite.jsonl"):
        load_suite([path])
    path.write_text(_line(id=5, family=[], patient=None))
    with pytest.raises(EvalError, match=r"suite.jsonl:1: not a suite item"):
        load_suite([path])


def test_a_repeated_id_in_a_long_suite_is_found_at_once_and_named(tmp_path: Path) -> None:
    import time

    path = tmp_path / "suite.jsonl"
    path.write_text("".join(_line(id=f"i{n}") for n in range(20_000)) + _line(id="i19999"))
    start = time.perf_counter()
    with pytest.raises(EvalError, match=r"suite.jsonl:20001: .*'i19999' is used twice .*:20000"):
        load_suite([path])
    # a scan of ids.count per id took minutes at 100,000 items
    assert time.perf_counter() - start < 10


def test_the_markdown_report_quotes_suite_text_inertly() -> None:
    from surfaces.eval_report import markdown

    item = SuiteItem.model_validate(
        json.loads(
            _line(
                id="<script>alert(1)</script>`",
                family="a | b\n## heading",
                question="<img src=x onerror=alert(3)> \u202e\u0007how old?",
            )
        )
    )
    result = score(item, _answer("</table><b>13</b>", []), 1)
    result.value = False
    md = markdown([result], "t", "suite <x>.jsonl")
    assert "<" not in md and "\u202e" not in md and "\u0007" not in md
    assert "&lt;img src=x onerror=alert(3)&gt; how old?" in md
    assert "| a \\| b ## heading | 1 |" in md and "`&lt;script&gt;alert(1)&lt;/script&gt;'`" in md
    assert "&lt;/table&gt;&lt;b&gt;13&lt;/b&gt;" in md and "suite &lt;x&gt;.jsonl" in md


def test_an_out_that_cannot_hold_the_report_fails_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from surfaces.eval_report import prepare_out

    monkeypatch.setenv("CHARTSIGHT_HOME", str(tmp_path / "home"))
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for out, said in ((taken, "is a file, not a folder"), (taken / "r", "cannot create")):
        result = CliRunner().invoke(app, ["eval", "--limit", "1", "--out", str(out)])
        text = " ".join(result.output.split())
        assert result.exit_code == 1 and said in text and "Traceback" not in text, text
        assert "right or rightly abstained" not in text  # nothing was asked
    assert taken.read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(
        Path,
        "write_bytes",
        lambda *_: (_ for _ in ()).throw(PermissionError(13, "Permission denied")),
    )
    with pytest.raises(EvalError, match="cannot write in the report folder .*locked: Permission"):
        prepare_out(locked)


def test_a_lone_surrogate_in_a_suite_is_named_before_the_run(tmp_path: Path) -> None:
    # a "\ud800" escape loaded, was asked, and the run ended in a UnicodeEncodeError traceback
    # while report.html was written
    path = tmp_path / "suite.jsonl"
    lone = _line(id="b", question="Who is her doctor ?").replace(" ?", " \\ud800?")
    path.write_text(_line() + lone)
    with pytest.raises(EvalError, match=r"suite.jsonl:2: .*lone UTF-16 surrogate \('\\ud800'\)"):
        load_suite([path])


def test_the_care_families_hold_through_the_whole_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the tools' statements pass the verifier as a whole answer (a second sentence without its
    # own citation was removed, leaving "The last of each … follows" as the answer)
    monkeypatch.setenv("CHARTSIGHT_HOME", str(tmp_path / "home"))
    families = ["vaccines due", "last visit", "primary care provider", "code status",
                "clinical notes", "eGFR", "two questions in one", "kidney function trend"]  # fmt: skip
    args = ["eval", "--out", str(tmp_path / "r"), "--fail-under", "100"]
    result = CliRunner().invoke(app, args + [x for f in families for x in ("--family", f)])
    assert result.exit_code == 0, result.output


def test_results_list_each_sentence_the_verifier_removed(tmp_path: Path) -> None:
    from agent.answer import SentenceCheck
    from surfaces.eval_report import write_report

    removed = SentenceCheck(text=".", supported=False, problems=("cites no evidence",))
    answer = _answer("He is 83 years old. [Patient/p]", ["Patient/p"]).model_copy(
        update={"rejected": [removed], "supported_fraction": 0.5, "fallback_used": True}
    )
    result = score(_item(contains=["83"]), answer, 10)
    paths = write_report([result], tmp_path, title="t", setup="s")
    (line,) = paths["results"].read_text(encoding="utf-8").splitlines()
    got = json.loads(line)
    assert got["rejected"] == 1 and got["fallback"] and got["supported_fraction"] == 0.5
    assert got["rejected_sentences"] == [{"text": ".", "problems": ["cites no evidence"]}]
