"""Small, self-contained SVG plots for the surfaces: a result's trend, bars, a histogram.

Each function returns the text of one ``<svg>`` element (no XML prolog, no DOCTYPE), about 480×200
CSS pixels, that a page inlines as it is: text is kept as ``<text>`` in the page's own sans-serif
(``svg.fonttype = 'none'``: no embedded or downloaded fonts), and the only URLs in it are the
``xmlns`` namespace names and the links we give the points. Text that comes from a record (titles,
units) is cleaned of control characters, shortened, never read as mathtext, and XML-escaped by
matplotlib's SVG writer. matplotlib is imported inside the functions (its import costs about half
a second) and drawn with its SVG canvas on a ``Figure`` of our own, without pyplot's global state.
"""

from __future__ import annotations

import io
import math
import re
import threading
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime
from typing import Any

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
WIDTH_PX, HEIGHT_PX = 480, 200
_DPI = 96  # CSS pixels per inch: a figure of 5 × 2.08 in is 480 × 200 px
REFERENCE = re.compile(r"^[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}$")  # a FHIR literal reference
# matplotlib reads the SVG settings from its global rcParams while it writes: one writer at a time,
# so that a server rendering in threads never writes one plot under another's settings
_WRITING = threading.Lock()
_INK, _MUTED, _ACCENT, _BAND = (
    "#1b2430",
    "#5b6675",
    "#0b5cad",
    "#2e8b57",
)  # the SMART page's colours

Point = tuple[datetime, float, str]  # when, value (in ``unit``), the resource it comes from


def clean_text(text: str, limit: int = 80) -> str:
    """``text`` from a record made safe to draw: control and format characters (C0/C1, bidi
    overrides, zero-width) dropped, whitespace runs made one space, at most ``limit`` characters
    (an ellipsis marks a cut). XML escaping is left to the SVG writer."""
    kept = "".join(" " if c.isspace() else c for c in text if unicodedata.category(c)[0] != "C")
    kept = " ".join(kept.split())
    return kept if len(kept) <= limit else kept[: limit - 1].rstrip() + "…"


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_PX / _DPI, HEIGHT_PX / _DPI), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(_MUTED)
    ax.tick_params(colors=_MUTED, labelsize=8, labelcolor=_INK)
    return fig, ax


def _title(ax: Any, title: str) -> None:
    ax.set_title(clean_text(title), fontsize=10, color=_INK, loc="left", parse_math=False)


def _svg(fig: Any, titles: Sequence[str] = ()) -> str:
    """The figure as one ``<svg>`` element; ``titles[i]`` becomes the tooltip (``<title>``) of the
    ``i``-th link, in drawing order."""
    import matplotlib

    buf = io.StringIO()
    # text as <text>, fixed ids and no date: the same plot is the same text (cacheable, testable)
    with (
        _WRITING,
        matplotlib.rc_context(
            {
                "svg.fonttype": "none",
                "svg.hashsalt": "chartsight",
                "font.sans-serif": ["DejaVu Sans"],
            }
        ),
    ):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Type": None})
    ET.register_namespace("", SVG_NS)
    ET.register_namespace("xlink", XLINK_NS)
    root = ET.fromstring(buf.getvalue())  # also drops the prolog and the DOCTYPE (an external URL)
    for meta in root.findall(f"{{{SVG_NS}}}metadata"):
        root.remove(meta)  # Dublin Core RDF: namespace URLs and nothing a reader needs
    root.set("role", "img")
    links = root.iter(f"{{{SVG_NS}}}a")
    for n, link in enumerate(links):
        link.attrib.pop("target", None)  # matplotlib opens links in a new tab; ours stay
        if n >= len(titles):
            continue
        tip = ET.Element(f"{{{SVG_NS}}}title")
        tip.text = titles[n]
        link.insert(0, tip)
    return ET.tostring(root, encoding="unicode")


def _finite(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"no {what} to plot")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} must be finite numbers")
    return out


def trend_svg(
    points: Sequence[Point],
    *,
    title: str,
    unit: str,
    low: float | None = None,
    high: float | None = None,
    range_label: str = "reference range",
) -> str:
    """A result over time: ``points`` as ``(datetime, value in unit, 'Type/id')`` (any order; drawn
    by date, joined by a line), the range ``low``–``high`` (either may be None: open on that side)
    shaded as a band (``<g id="reference-range">``) and named in the top right corner
    (``"<range_label> 4–5.6 %"``, ``"< 100"``, ``"> 60"``), each point a marker wrapped in
    ``<a xlink:href="#Type/id">`` with the tooltip ``"YYYY-MM-DD: value unit"``, so that a page
    can show the resource a point comes from. Returns the ``<svg>`` element's text (480×200 px).
    Raises ValueError for no points, a value that is not finite, or a reference that is not a FHIR
    literal reference (``Type/id``, id of 1–64 of ``[A-Za-z0-9-.]``)."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    if not points:
        raise ValueError("no points to plot")
    rows = sorted(points, key=lambda p: p[0])
    values = _finite([p[1] for p in rows], "values")
    for _, _, ref in rows:
        if not REFERENCE.match(ref):
            raise ValueError(f"not a FHIR reference: {ref!r}")
    unit = clean_text(unit, 20)
    fig, ax = _figure()
    when = [p[0] for p in rows]
    ax.plot(when, values, color=_ACCENT, linewidth=1, alpha=0.5, zorder=2)
    dots = ax.scatter(when, values, s=22, color=_ACCENT, zorder=3)
    dots.set_gid("points")
    dots.set_urls([f"#{ref}" for _, _, ref in rows])
    if low is not None or high is not None:
        extent = [v for v in (*values, low, high) if v is not None]
        pad = (max(extent) - min(extent)) * 0.1 or abs(extent[0]) * 0.1 or 1.0
        bottom, top = min(extent) - pad, max(extent) + pad
        ax.set_ylim(bottom, top)
        band = ax.axhspan(
            bottom if low is None else low,
            top if high is None else high,
            color=_BAND,
            alpha=0.12,
            linewidth=0,
            zorder=1,
        )
        band.set_gid("reference-range")
        named = clean_text(f"{range_label} {_span(low, high)} {unit}", 60)
        ax.text(1.0, 1.02, named, transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
        ax.texts[-1].set(color=_BAND, parse_math=False)
    locator = AutoDateLocator(minticks=3, maxticks=6)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    ax.set_ylabel(unit, fontsize=8, color=_MUTED, parse_math=False)
    if len(set(when)) == 1:  # one instant: give the axis a width so the point is not on an edge
        from datetime import timedelta

        ax.set_xlim(when[0] - timedelta(days=30), when[0] + timedelta(days=30))
    _title(ax, title)
    tips = [
        f"{w.date().isoformat()}: {_number(v)} {unit}".rstrip()
        for w, v in zip(when, values, strict=True)
    ]
    return _svg(fig, tips)


def _number(value: float) -> str:
    return f"{value:.4g}"


def _span(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{_number(low)}–{_number(high)}"
    if high is not None:
        return f"< {_number(high)}"
    return f"> {_number(low)}" if low is not None else ""


def bar_svg(labels: Sequence[str], values: Sequence[float], *, title: str, unit: str = "%") -> str:
    """Horizontal bars, one per label (top to bottom in the given order), each with its value
    written at its end; for ``unit='%'`` the axis runs from 0 to at least 100. The height grows
    with the number of bars past 8 (18 px each). Returns the ``<svg>`` element's text. Raises
    ValueError when there are no bars, ``labels`` and ``values`` differ in length, or a value is
    not finite."""
    if len(labels) != len(values):
        raise ValueError(f"{len(labels)} labels for {len(values)} values")
    numbers = _finite(values, "values")
    unit = clean_text(unit, 20)
    fig, ax = _figure()
    if len(numbers) > 8:
        fig.set_figheight((HEIGHT_PX + 18 * (len(numbers) - 8)) / _DPI)
    rows = list(range(len(numbers)))[::-1]
    bars = ax.barh(rows, numbers, color=_ACCENT, height=0.6)
    ax.set_yticks(rows, [clean_text(str(label), 40) for label in labels])
    for label in ax.get_yticklabels():
        label.set_parse_math(False)
    ax.bar_label(bars, [f"{_number(v)} {unit}".rstrip() for v in numbers], fontsize=7, padding=2)
    right = max([*numbers, 0.0])
    ax.set_xlim(min([*numbers, 0.0]), max(100.0, right) * 1.08 if unit == "%" else right * 1.15)
    ax.set_xlabel(unit, fontsize=8, color=_MUTED, parse_math=False)
    _title(ax, title)
    return _svg(fig)


def histogram_svg(values: Sequence[float], *, title: str, unit: str = "ms") -> str:
    """The distribution of ``values`` (in ``unit``) as a histogram (numpy's ``'auto'`` bins, at
    most 40), with the median marked by a dashed line (``<g id="median">``). Returns the
    ``<svg>`` element's text. Raises ValueError for no values or a value that is not finite."""
    import numpy as np

    numbers = _finite(values, "values")
    unit = clean_text(unit, 20)
    fig, ax = _figure()
    edges = np.histogram_bin_edges(numbers, bins="auto")
    if len(edges) > 41:
        edges = np.histogram_bin_edges(numbers, bins=40)
    ax.hist(numbers, bins=edges, color=_ACCENT, edgecolor="white", linewidth=0.5)
    median = float(np.median(numbers))
    line = ax.axvline(median, color=_INK, linestyle="--", linewidth=1)
    line.set_gid("median")
    ax.set_xlabel(f"{unit} (median {_number(median)})", fontsize=8, color=_MUTED, parse_math=False)
    ax.set_ylabel("count", fontsize=8, color=_MUTED)
    _title(ax, title)
    return _svg(fig)
