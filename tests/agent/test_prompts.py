"""The prompt loader (``prompts``): templates by name and version, filled strictly, as plain text;
a missing or malformed template is a clear error."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

import jinja2
import pytest

import prompts


@pytest.fixture
def shipped() -> Iterator[None]:
    prompts.template_text.cache_clear()
    yield
    prompts.template_text.cache_clear()


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty prompts folder the loader reads instead of the shipped one."""
    monkeypatch.setattr(prompts, "files", lambda package: tmp_path)
    prompts.template_text.cache_clear()
    yield tmp_path
    prompts.template_text.cache_clear()


def _write(root: Path, version: str, name: str, text: str) -> None:
    (root / version).mkdir(exist_ok=True)
    (root / version / f"{name}.jinja").write_text(text, encoding="utf-8")


def test_the_default_version_is_shipped_with_every_prompt_the_agent_uses(shipped: None):
    assert prompts.DEFAULT_VERSION in prompts.versions()
    folder = files("prompts").joinpath(prompts.DEFAULT_VERSION)
    for name in ("system", "answer", "retry", "planner", "plan"):
        assert prompts.template_text(name) == folder.joinpath(f"{name}.jinja").read_text("utf-8")


def test_system_prompt_takes_the_sentence_limit(shipped: None):
    text = prompts.render("system", max_sentences=4)
    assert text.startswith("You are ChartSight")
    assert "Answer in at most 4 short sentences." in text
    assert text == text.strip()


def test_a_value_a_template_needs_is_required(shipped: None):
    with pytest.raises(jinja2.UndefinedError, match="max_sentences"):
        prompts.render("system")


def test_the_answer_prompt_lists_facts_and_evidence(shipped: None):
    text = prompts.render(
        "answer",
        patient_line="Tommy Friesen, male, born 1960-01-01",
        question="What was his last HbA1c?",
        facts=["Latest HbA1c: 6.3 % on 2020-01-01 [Observation/a1]"],
        evidence=[
            "2020-01-01 HbA1c 6.3 % [Observation/a1]",
            "2019-06-01 HbA1c 6.1 % [Observation/a0]",
        ],
        similar=[],
        images=[],
    )
    assert [line for line in text.splitlines() if line] == [
        "Patient: Tommy Friesen, male, born 1960-01-01",
        "Question: What was his last HbA1c?",
        "Facts computed from the record:",
        "- Latest HbA1c: 6.3 % on 2020-01-01 [Observation/a1]",
        "Evidence from the record (most relevant first):",
        "- 2020-01-01 HbA1c 6.3 % [Observation/a1]",
        "- 2019-06-01 HbA1c 6.1 % [Observation/a0]",
        "Answer the question, citing the evidence ids.",
    ]


def test_the_answer_prompt_says_none_and_adds_cases_and_images_only_when_given(shipped: None):
    bare = prompts.render(
        "answer", patient_line="p", question="q", facts=[], evidence=[], similar=[], images=[]
    )
    assert bare.count("- (none)") == 2
    assert "Similar past cases" not in bare and "Images attached" not in bare
    full = prompts.render(
        "answer",
        patient_line="p",
        question="q",
        facts=[],
        evidence=[],
        similar=["62 y male, heart failure [Case/c1]"],
        images=["CT [Media/m1]", "image [Media/m2]"],
    )
    assert "- 62 y male, heart failure [Case/c1]" in full
    assert "Images attached: CT [Media/m1]; image [Media/m2]" in full


def test_record_text_is_not_escaped(shipped: None):
    question = 'Is K+ <3.5 & "low"? {{ not a template }} {% raw %}'
    text = prompts.render(
        "answer", patient_line="p", question=question, facts=[], evidence=[], similar=[], images=[]
    )
    assert f"Question: {question}" in text


def test_the_retry_prompt_lists_each_rejected_sentence_and_its_problems(shipped: None):
    text = prompts.render(
        "retry",
        rejected=[
            {"text": "His A1c is 7.", "problems": ["number 7 not in the cited evidence", "no id"]},
            {"text": "He is fine.", "problems": ["no citation"]},
        ],
    )
    assert '- "His A1c is 7.": number 7 not in the cited evidence; no id' in text
    assert '- "He is fine.": no citation' in text
    assert text.endswith("copy numbers and dates exactly.")


def test_the_plan_prompt_lists_what_is_planned(shipped: None):
    none = prompts.render("plan", patient_line="p", question="q", planned=[])
    assert "Nothing is planned yet." in none and "Already planned" not in none
    some = prompts.render(
        "plan", patient_line="p", question="q", planned=['latest_observation({"query": "a1c"})']
    )
    assert 'Already planned:\n- latest_observation({"query": "a1c"})' in some
    assert "Nothing is planned yet." not in some
    assert "reply with the single word: done" in prompts.render("planner")


def test_a_missing_prompt_names_itself_its_version_and_the_versions_there_are(shipped: None):
    with pytest.raises(KeyError, match=r"no prompt 'nonesuch' in version 'v1' \(have: v1"):
        prompts.render("nonesuch", "v1")
    with pytest.raises(KeyError, match=r"no prompt 'system' in version 'v999'"):
        prompts.render("system", "v999", max_sentences=6)


def test_versions_are_the_v_folders(tree: Path):
    _write(tree, "v2", "system", "two")
    _write(tree, "v1", "system", "one")
    (tree / "notes").mkdir()
    (tree / "v3.jinja").write_text("a file, not a version", encoding="utf-8")
    assert prompts.versions() == ["v1", "v2"]
    assert prompts.render("system", "v1") == "one" and prompts.render("system", "v2") == "two"
    with pytest.raises(KeyError, match=r"\(have: v1, v2\)"):
        prompts.render("answer", "v2")


def test_a_malformed_prompt_is_a_syntax_error_naming_the_line(tree: Path):
    _write(tree, "v1", "broken", "line one\n{% for x in items %}\n- {{ x }}\n")
    with pytest.raises(jinja2.TemplateSyntaxError) as raised:
        prompts.render("broken", "v1", items=[1])
    assert raised.value.lineno == 3 and "'endfor'" in str(raised.value.message)


def test_a_prompt_is_read_as_utf8_and_trimmed(tree: Path):
    _write(tree, "v1", "units", "\n  Glucose in µmol/L — {{ n }} values  \n\n")
    assert prompts.render("units", "v1", n=3) == "Glucose in µmol/L — 3 values"
