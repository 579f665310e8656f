"""surfaces.plots: the SVG text parsed back with xml.etree and read for what a page relies on."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from surfaces.plots import SVG_NS, XLINK_NS, bar_svg, clean_text, histogram_svg, trend_svg

S = f"{{{SVG_NS}}}"
HREF = f"{{{XLINK_NS}}}href"
HOSTILE = "</text><script>alert(1)</script> $x^2$ & <b>\u202e\x00\x1b[31m"
URL = re.compile(r"https?://[^\s\"'<>]+")
NAMESPACES = {SVG_NS, XLINK_NS}


def _points(n: int = 5) -> list[tuple[datetime, float, str]]:
    start = datetime(2021, 3, 1, tzinfo=UTC)
    # given newest first: the plot orders them by date
    return [
        (start + timedelta(days=120 * i), 6.0 + 0.2 * i, f"Observation/a1c-{i}")
        for i in reversed(range(n))
    ]


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{S}svg"
    return root


def _external_urls(svg: str) -> set[str]:
    return set(URL.findall(svg)) - NAMESPACES


def _texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{S}text")]


def test_trend_has_one_linked_point_per_value_in_date_order_and_the_band():
    svg = trend_svg(_points(), title="Hemoglobin A1c", unit="%", low=4.0, high=5.6)
    root = _parse(svg)
    links = list(root.iter(f"{S}a"))
    assert [a.get(HREF) for a in links] == [f"#Observation/a1c-{i}" for i in range(5)]
    assert all(a.get("target") is None for a in links)  # the page handles the click in place
    tips = [a.findtext(f"{S}title") for a in links]
    assert tips[0] == "2021-03-01: 6 %" and tips[-1] == "2022-06-24: 6.8 %"
    assert all(len(list(a.iter(f"{S}use"))) == 1 for a in links)  # one marker each
    band = [g for g in root.iter(f"{S}g") if g.get("id") == "reference-range"]
    assert len(band) == 1 and band[0].find(f"{S}path") is not None
    assert "Hemoglobin A1c" in _texts(root) and "reference range 4–5.6 %" in _texts(root)
    assert root.get("width") == "360pt" and root.get("height") == "150pt"  # 480 × 200 px
    assert not _external_urls(svg) and "<?xml" not in svg and "DOCTYPE" not in svg


def test_trend_without_a_range_has_no_band_and_a_range_open_on_one_side_has_one():
    root = _parse(trend_svg(_points(3), title="Weight", unit="kg"))
    assert not [g for g in root.iter(f"{S}g") if g.get("id") == "reference-range"]
    assert len(list(root.iter(f"{S}a"))) == 3
    root = _parse(
        trend_svg(_points(3), title="LDL", unit="mg/dL", high=100.0, range_label="usual range")
    )
    assert [g for g in root.iter(f"{S}g") if g.get("id") == "reference-range"]
    assert "usual range < 100 mg/dL" in _texts(root)
    root = _parse(trend_svg(_points(3), title="eGFR", unit="mL/min", low=60.0))
    assert "reference range > 60 mL/min" in _texts(root)


def test_one_point_on_one_day_still_plots():
    when = datetime(2024, 1, 2, tzinfo=UTC)
    root = _parse(trend_svg([(when, 7.1, "Observation/x")], title="A1c", unit="%"))
    assert [a.get(HREF) for a in root.iter(f"{S}a")] == ["#Observation/x"]


def test_hostile_record_text_is_escaped_and_drawn_as_it_stands():
    svg = trend_svg(_points(3), title=HOSTILE, unit="<i>%</i>", low=1.0)
    root = _parse(svg)  # still well-formed XML
    assert not list(root.iter(f"{S}script")) and not list(root.iter("script"))
    assert "<script>" not in svg and "</text><script>" not in svg
    texts = _texts(root)
    assert "</text><script>alert(1)</script> $x^2$ & <b>[31m" in texts  # not mathtext, no controls
    assert "<i>%</i>" in texts
    tips = [a.findtext(f"{S}title") or "" for a in root.iter(f"{S}a")]
    assert all(t.endswith(" <i>%</i>") for t in tips)


def test_trend_refuses_what_it_cannot_draw_or_link():
    with pytest.raises(ValueError, match="no points"):
        trend_svg([], title="x", unit="%")
    with pytest.raises(ValueError, match="finite"):
        trend_svg([(datetime(2024, 1, 1), float("nan"), "Observation/a")], title="x", unit="%")
    for ref in ("javascript:alert(1)", "Observation/a b", "https://evil.example/Observation/1"):
        with pytest.raises(ValueError, match="not a FHIR reference"):
            trend_svg([(datetime(2024, 1, 1), 1.0, ref)], title="x", unit="%")


def test_bars_one_per_label_with_values_written():
    labels = ["latest labs", "diagnosis yes/no", HOSTILE]
    svg = bar_svg(labels, [100.0, 97.5, 12.25], title="Accuracy by family")
    root = _parse(svg)
    texts = _texts(root)
    assert "latest labs" in texts and "diagnosis yes/no" in texts
    assert clean_text(HOSTILE, 40) in texts
    assert {"100 %", "97.5 %", "12.25 %"} <= set(texts)
    assert not _external_urls(svg) and "<script>" not in svg
    with pytest.raises(ValueError, match="2 labels for 1 values"):
        bar_svg(["a", "b"], [1.0], title="x")
    with pytest.raises(ValueError, match="no values"):
        bar_svg([], [], title="x")


def test_many_bars_make_a_taller_plot():
    short = _parse(bar_svg(["a"], [1.0], title="x"))
    tall = _parse(bar_svg([f"family {i}" for i in range(12)], [50.0] * 12, title="x"))
    assert float(tall.get("height", "0")[:-2]) > float(short.get("height", "0")[:-2])


def test_histogram_marks_the_median():
    values = [12.0, 20.0, 22.0, 30.0, 31.0, 50.0, 120.0]
    svg = histogram_svg(values, title="Latency", unit="ms")
    root = _parse(svg)
    assert [g for g in root.iter(f"{S}g") if g.get("id") == "median"]
    assert "ms (median 30)" in _texts(root)
    assert not _external_urls(svg)
    with pytest.raises(ValueError, match="finite"):
        histogram_svg([1.0, float("inf")], title="x")


def test_same_input_same_text():
    assert trend_svg(_points(), title="a", unit="%") == trend_svg(_points(), title="a", unit="%")


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, surfaces.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
