"""The model card: every ONC HTI-1 source attribute of a predictive decision support intervention
is present and says something, and every number it states is the one benchmarks/results.md
records, so that the card cannot go stale silently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import prompts
from agent import Settings
from surfaces.cli import app
from surfaces.model_card import card_data, card_html, card_text, model_card

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results.md"

# 45 CFR 170.315(b)(11)(iv)(B)(1)-(9): the 31 source attributes of a predictive DSI, by paragraph
HTI1_PREDICTIVE = {
    "(B)(1)(i)": "developer",
    "(B)(1)(ii)": "funding",
    "(B)(1)(iii)": "output",
    "(B)(1)(iv)": "prediction, classification, recommendation",
    "(B)(2)(i)": "intended use",
    "(B)(2)(ii)": "patient population",
    "(B)(2)(iii)": "intended user",
    "(B)(2)(iv)": "decision-making role",
    "(B)(3)(i)": "cautioned",
    "(B)(3)(ii)": "known risks",
    "(B)(4)(i)": "exclusion and inclusion criteria",
    "(B)(4)(ii)": "race, ethnicity, language",
    "(B)(4)(iii)": "demographic representativeness",
    "(B)(4)(iv)": "relevance of training data",
    "(B)(5)(i)": "fair",
    "(B)(5)(ii)": "bias",
    "(B)(6)(i)": "other than the source of training and testing data",
    "(B)(6)(ii)": "party that conducted the external testing",
    "(B)(6)(iii)": "demographic representativeness of external data",
    "(B)(6)(iv)": "external validation process",
    "(B)(7)(i)": "validity of intervention in test data",
    "(B)(7)(ii)": "fairness of intervention in test data",
    "(B)(7)(iii)": "validity of intervention in data external",
    "(B)(7)(iv)": "fairness of intervention in data external",
    "(B)(7)(v)": "outcomes",
    "(B)(8)(i)": "validity is monitored",
    "(B)(8)(ii)": "validity of intervention in local data",
    "(B)(8)(iii)": "fairness is monitored",
    "(B)(8)(iv)": "fairness of intervention in local data",
    "(B)(9)(i)": "updated",
    "(B)(9)(ii)": "corrected",
}


def test_every_hti1_predictive_source_attribute_is_present_and_said():
    attributes = card_data()["attributes"]
    by_cfr = {a["cfr"]: a for a in attributes}
    assert len(attributes) == len(by_cfr) == 31
    assert set(by_cfr) == set(HTI1_PREDICTIVE)
    for cfr, words in HTI1_PREDICTIVE.items():
        attribute = by_cfr[cfr]
        assert words.lower() in attribute["title"].lower(), cfr
        assert len(attribute["text"].split()) >= 2, f"{cfr} says nothing"
        assert attribute["id"] and attribute["group"]
    assert len({a["id"] for a in attributes}) == 31


def _section(heading: str) -> str:
    """The text of results.md under ``## heading`` up to the next ``## ``."""
    text = RESULTS.read_text(encoding="utf-8")
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 3)
    return text[start : end if end > 0 else len(text)]


def _counts(quote: str) -> tuple[int, int]:
    """(right, of) as a quoted results.md line states them: ``**225 of 225 right …**`` or a
    model-path table row ``| mode | questions | right or rightly abstained | …``."""
    m = re.search(r"\*\*(\d+) of (\d+) right or rightly abstained", quote)
    if m:
        return int(m.group(1)), int(m.group(2))
    cells = [c.strip() for c in quote.strip().strip("|").split("|")]
    return int(cells[2]), int(cells[1])


def test_every_measure_is_quoted_from_benchmarks_results_and_adds_up():
    measures = card_data()["measures"]
    assert {m["right"] for m in measures} >= {225, 2537, 16, 21}
    for measure in measures:
        section = _section(measure["section"])
        right = of = 0
        for quote in measure["quotes"]:
            assert quote in section.splitlines(), f"not a line of {measure['section']!r}: {quote}"
            r, n = _counts(quote)
            right, of = right + r, of + n
        assert (right, of) == (measure["right"], measure["of"]), measure["name"]


def test_a_changed_number_is_caught():
    """The check above fails when the card and the results file disagree."""
    measure = card_data()["measures"][2]  # the model path: two table rows summed
    rows = [_counts(q) for q in measure["quotes"]]
    assert (sum(r for r, _ in rows), sum(n for _, n in rows)) == (16, 21)
    assert (sum(r for r, _ in rows) + 1, 21) != (measure["right"], measure["of"])
    with pytest.raises(ValueError):
        _section("a section results.md does not have")


def test_the_card_names_the_running_model_and_prompt_version():
    settings = Settings()
    settings.model.name, settings.model.model = "openai", "google/medgemma-4b-it"
    card = model_card(settings)
    assert card["deployment"] == {
        "backend": "openai",
        "model": "google/medgemma-4b-it",
        "prompt_version": prompts.DEFAULT_VERSION,
    }
    assert model_card(Settings())["deployment"]["model"].startswith("none")
    html = card_html(card)
    assert "google/medgemma-4b-it" in html and "2,537 of 2,537 (100.0%)" in html
    assert "16 of 21 (76.2%)" in html
    # no external assets: no scripts, no stylesheet or image links, no absolute URLs
    assert "<script" not in html and "<img" not in html and "://" not in html
    text = card_text(card)
    assert "Intended use of the intervention" in text and "225 of 225" in text


def test_cli_prints_the_card():
    runner = CliRunner()
    result = runner.invoke(app, ["model-card", "--json", "--model", "evidence"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.output)
    assert len(card["attributes"]) == 31 and card["deployment"]["backend"] == "evidence"
    result = runner.invoke(app, ["model-card"])
    assert result.exit_code == 0 and "Known risks" in result.output
