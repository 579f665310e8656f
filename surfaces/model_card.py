"""ChartSight's model card: the source attributes of a predictive decision support intervention
(ONC HTI-1, 45 CFR 170.315(b)(11)(iv)(B)), kept as data in ``surfaces/model_card.toml`` and
filled in with the running model and prompt version when served (``GET /model-card``,
``GET /model-card.json``, ``chartsight model-card``)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from importlib.resources import files
from typing import Any

from jinja2 import Environment, select_autoescape

import prompts
from agent import Settings

CARD_FILE = "model_card.toml"

_HTML = Environment(autoescape=select_autoescape(default=True, default_for_string=True))


def card_data() -> dict[str, Any]:
    """The card file as shipped, parsed: ``name``, ``summary``, ``regulation``, ``card_revised``
    (YYYY-MM-DD), ``attributes`` (31 dicts: ``id``, ``group``, ``cfr`` such as ``"(B)(7)(i)"``,
    ``title``, ``text``) and ``measures`` (dicts: ``name``, ``section`` of
    benchmarks/results.md, ``right`` and ``of`` (counts of questions), ``quotes``: the lines of
    that section they come from). Raises ``tomllib.TOMLDecodeError`` for a broken file."""
    text = files("surfaces").joinpath(CARD_FILE).read_text(encoding="utf-8")
    return tomllib.loads(text)


def _package_version() -> str:
    try:
        return metadata.version("chartsight")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def model_card(settings: Settings) -> dict[str, Any]:
    """The card for the deployment ``settings`` describe (those the service or command runs
    with): ``card_data()`` plus ``version`` (the chartsight package's), ``deployment``
    (``backend``: ``model.name``, ``model``: ``model.model`` or ``"none (evidence answer …)"``,
    ``prompt_version``, e.g. ``"v2"``), and each measure's ``result`` (``"225 of 225
    (100.0%)"``). The model server's URL is left out (an internal address)."""
    card = card_data()
    backend = settings.model.name
    model = settings.model.model if backend != "evidence" else ""
    card["version"] = _package_version()
    card["deployment"] = {
        "backend": backend,
        "model": model or "none (evidence answer: no language model)",
        "prompt_version": prompts.DEFAULT_VERSION,
    }
    for measure in card["measures"]:
        share = 100 * measure["right"] / measure["of"]
        measure["result"] = f"{measure['right']:,} of {measure['of']:,} ({share:.1f}%)"
    return card


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ card.name }} model card</title>
<style>
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #1b1b1b; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ccc; }
dt { font-weight: 600; margin-top: .8rem; } dd { margin-left: 0; }
.cfr { color: #555; font-weight: normal; font-size: .85em; }
table { border-collapse: collapse; width: 100%; } td, th { border: 1px solid #ccc; padding: .3rem .5rem;
       text-align: left; vertical-align: top; }
code, .quote { font-family: ui-monospace, monospace; font-size: .85em; }
</style></head><body>
<h1>{{ card.name }} model card</h1>
<p>{{ card.regulation }}. Card revised {{ card.card_revised }}; chartsight {{ card.version }}.</p>
<p>{{ card.summary }}</p>
<h2>This deployment</h2>
<dl>
<dt>Model backend</dt><dd><code>{{ card.deployment.backend }}</code></dd>
<dt>Model</dt><dd><code>{{ card.deployment.model }}</code></dd>
<dt>Prompt version</dt><dd><code>{{ card.deployment.prompt_version }}</code></dd>
</dl>
{% for group, attributes in groups %}
<h2>{{ group }}</h2>
<dl>
{% for a in attributes %}<dt id="{{ a.id }}">{{ a.title }} <span class="cfr">{{ a.cfr }}</span></dt>
<dd>{{ a.text }}</dd>
{% endfor %}</dl>
{% if group == measures_after %}
<h3 id="measures">Measures (from <code>benchmarks/results.md</code>)</h3>
<table><tr><th>measure</th><th>right or rightly abstained</th><th>source lines</th></tr>
{% for m in card.measures %}<tr><td>{{ m.name }}</td><td>{{ m.result }}</td>
<td>section “{{ m.section }}”:{% for q in m.quotes %}<div class="quote">{{ q }}</div>{% endfor %}</td></tr>
{% endfor %}</table>
{% endif %}
{% endfor %}
<p><a href="model-card.json">This card as JSON</a></p>
</body></html>
"""


def _groups(card: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for attribute in card["attributes"]:
        groups.setdefault(attribute["group"], []).append(attribute)
    return list(groups.items())


def card_html(card: dict[str, Any]) -> str:
    """The card (``model_card``'s dict) as one self-contained HTML page: no scripts, no external
    styles, fonts or images; the measures follow the "Quantitative measures of performance"
    group."""
    return _HTML.from_string(_PAGE).render(
        card=card, groups=_groups(card), measures_after="Quantitative measures of performance"
    )


def card_text(card: dict[str, Any]) -> str:
    """The card as plain text for a terminal (``chartsight model-card``): headings, then each
    attribute's title with its CFR paragraph and text, and the measures with their sources."""
    lines = [
        f"{card['name']} model card (chartsight {card['version']}, revised {card['card_revised']})",
        card["regulation"],
        "",
        card["summary"],
        "",
        f"Model backend: {card['deployment']['backend']}",
        f"Model: {card['deployment']['model']}",
        f"Prompt version: {card['deployment']['prompt_version']}",
    ]
    for group, attributes in _groups(card):
        lines += ["", f"## {group}"]
        for a in attributes:
            lines += ["", f"{a['title']} {a['cfr']}", f"  {a['text']}"]
    lines += ["", "## Measures (benchmarks/results.md)"]
    for m in card["measures"]:
        lines += ["", f"{m['name']}: {m['result']} right or rightly abstained"]
        lines += [f"  section {m['section']!r}: {q}" for q in m["quotes"]]
    return "\n".join(lines)
