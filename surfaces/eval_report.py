"""The report of a ``chartsight eval`` run: Markdown (the per-family table, the misses) and an HTML
page with plots (accuracy by family, latency distribution), self-contained (inline SVG, no
network assets), plus every item's result as JSON Lines."""

from __future__ import annotations

import html
import json
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from agent.evaluation import EvalError, FamilyScore, ItemResult, summarise
from surfaces.plots import clean_text

MAX_MISSES = 40  # misses listed in the report (all are in results.jsonl)
MD_TEXT_LIMIT = 300  # characters of a suite's or an answer's text quoted in report.md


def _md(text: str, limit: int = MD_TEXT_LIMIT) -> str:
    """``text`` from a suite or an answer made inert in Markdown: control and format characters
    (bidi overrides, zero-width) dropped and whitespace runs (newlines) made one space (``surfaces.plots.clean_text``), at most
    ``limit`` characters, ``<``, ``>`` and ``&`` HTML-escaped (a viewer that passes raw HTML
    through shows them as text), ``|`` escaped (a table cell stays one cell) and backticks made
    apostrophes (a code span stays closed)."""
    kept = html.escape(clean_text(" ".join(text.split()), limit), quote=False)
    return kept.replace("|", "\\|").replace("`", "'")


def prepare_out(out: Path) -> None:
    """Create the report folder ``out`` (and its parents) and check that files can be written in
    it, before a run spends its time. Raises ``EvalError`` naming ``out`` when it is a file, or
    cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise EvalError(
            f"--out {out} is a file, not a folder: give a folder for the report"
        ) from exc
    except OSError as exc:
        raise EvalError(f"cannot create the report folder {out}: {exc.strerror or exc}") from exc
    probe = out / ".chartsight-eval-probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EvalError(f"cannot write in the report folder {out}: {exc.strerror or exc}") from exc


def _pct(x: float) -> str:
    return f"{x:.1%}"


def overall(results: Sequence[ItemResult]) -> dict[str, float]:
    """Totals: items, right (incl. rightly abstained) and its rate, wrong, wrongly abstained,
    latency p50 and p95 in ms."""
    lat = sorted(r.latency_ms for r in results) or [0.0]
    n = len(results)
    right = sum(r.right for r in results)
    return {
        "items": n,
        "right": right,
        "rate": right / n if n else 0.0,
        "wrong": sum(r.outcome == "wrong" for r in results),
        "abstained": sum(r.outcome == "abstained" for r in results),
        "p50_ms": statistics.median(lat),
        "p95_ms": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "supported": statistics.fmean(r.supported_fraction for r in results) if n else 0.0,
        "rejected": sum(r.rejected for r in results),
        "fallbacks": sum(r.fallback for r in results),
    }


def markdown(results: Sequence[ItemResult], title: str, setup: str, model: str = "evidence") -> str:
    """The report as Markdown: totals, one row per family (right-or-rightly-abstained, the value,
    citation and abstention rates, wrong and wrongly-abstained counts, latency p50/p95, whether
    the family's wording was tuned on), then the first ``MAX_MISSES`` misses; with a ``model``
    other than the evidence backend, the verifier's figures."""
    t = overall(results)
    lines = [
        f"# {_md(title)}",
        "",
        _md(setup, 2000),
        "",
        f"**{t['right']:.0f} of {t['items']:.0f} right or rightly abstained "
        f"({_pct(t['rate'])})**; {t['wrong']:.0f} wrong, {t['abstained']:.0f} abstained where the "
        f"record had the answer; latency p50 {t['p50_ms']:.0f} ms, p95 {t['p95_ms']:.0f} ms.",
        "",
        *(
            [
                f"Model path ({model}): mean supported-sentence fraction {t['supported']:.3f}; "
                f"{t['rejected']:.0f} sentences removed by the verifier; "
                f"{t['fallbacks']:.0f} answers fell back to the evidence answer.",
                "",
            ]
            if model != "evidence"
            else []
        ),
        "*tuned*: the family's question wording was in view while ChartSight's rules were "
        "written (the suite's own `tuned` flag); the others' data were not.",
        "",
        "| family | items | right | value | citations | abstention | wrong | abstained | p50 ms | p95 ms | tuned |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in summarise(results):
        lines.append(
            f"| {_md(f.family, 80)} | {f.items} | {_pct(f.right / f.items)} | {_pct(f.value)} | "
            f"{_pct(f.citations)} | {_pct(f.abstention)} | {f.wrong} | {f.abstained} | "
            f"{f.p50_ms:.0f} | {f.p95_ms:.0f} | {'yes' if f.tuned else 'no'} |"
        )
    misses = [r for r in results if not r.right]
    if misses:
        lines += ["", f"## Misses ({len(misses)}; the first {min(len(misses), MAX_MISSES)})", ""]
        for r in misses[:MAX_MISSES]:
            why = ", ".join(
                k for k, ok in (("value", r.value), ("citations", r.citations),
                                ("abstention", r.abstention)) if not ok
            )  # fmt: skip
            said = _md(r.error or r.text)
            lines.append(
                f"- `{_md(r.item.id, 80)}` {_md(r.item.question)} ({r.outcome}; {why}): {said}"
            )
    return "\n".join(lines) + "\n"


def html_page(results: Sequence[ItemResult], title: str, setup: str) -> str:
    """The report as one self-contained HTML page: totals, the accuracy-by-family bar chart, the
    latency histogram (inline SVG from ``surfaces.plots``), the per-family table, and a plot of
    each series an answer cited (``ItemResult.series``: the values over time, the range shaded)."""
    from surfaces.plots import bar_svg, histogram_svg, trend_svg

    t = overall(results)
    families: list[FamilyScore] = summarise(results)
    bars = bar_svg(
        [f.family for f in families],
        [100 * f.right / f.items for f in families],
        title="Right or rightly abstained, by family",
        unit="%",
    )
    hist = histogram_svg([r.latency_ms for r in results], title="Latency of ask (ms)", unit="ms")
    trends = []
    for r in results:
        if r.series is None:
            continue
        svg = trend_svg(
            r.series.points,
            title=r.series.name,
            unit=r.series.unit or "",
            low=r.series.low,
            high=r.series.high,
            range_label={"ref": "reference range"}.get(r.series.range_label or "", "usual range"),
        )
        trends.append(
            f"<figure>{svg}<figcaption>{html.escape(r.item.id)}: "
            f"{html.escape(r.item.question)} ({html.escape(r.outcome)})</figcaption></figure>"
        )
    trend_part = "<h2>Series the answers cite</h2>\n" + "\n".join(trends) if trends else ""
    rows = "\n".join(
        f"<tr><td>{html.escape(f.family)}</td><td>{f.items}</td><td>{_pct(f.right / f.items)}</td>"
        f"<td>{_pct(f.value)}</td><td>{_pct(f.citations)}</td><td>{_pct(f.abstention)}</td>"
        f"<td>{f.wrong}</td><td>{f.abstained}</td><td>{f.p50_ms:.0f}</td><td>{f.p95_ms:.0f}</td>"
        f"<td>{'yes' if f.tuned else 'no'}</td></tr>"
        for f in families
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}}
td:first-child,th:first-child{{text-align:left}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(setup)}</p>
<p><strong>{t["right"]:.0f} of {t["items"]:.0f} right or rightly abstained ({_pct(t["rate"])})</strong>;
{t["wrong"]:.0f} wrong, {t["abstained"]:.0f} abstained where the record had the answer; latency p50
{t["p50_ms"]:.0f} ms, p95 {t["p95_ms"]:.0f} ms.</p>
<figure>{bars}</figure>
<figure>{hist}</figure>
<table><thead><tr><th>family</th><th>items</th><th>right</th><th>value</th><th>citations</th>
<th>abstention</th><th>wrong</th><th>abstained</th><th>p50 ms</th><th>p95 ms</th><th>tuned</th></tr>
</thead><tbody>
{rows}
</tbody></table>
{trend_part}
</body></html>
"""


def write_report(
    results: Sequence[ItemResult], out: Path, *, title: str, setup: str, model: str = "evidence"
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``results.jsonl`` (one line per item: id, family,
    question, outcome, the parts, latency, the answer's text and citations, any error, the model
    path's supported fraction, removed sentences (count, and each one's text and problems) and
    fallback) into ``out`` (created), and return their paths by kind. Raises ``EvalError`` naming the path
    that cannot be written (``prepare_out``; a disk that fills)."""
    prepare_out(out)
    try:
        return _write(results, out, title=title, setup=setup, model=model)
    except (OSError, UnicodeError) as exc:
        raise EvalError(f"cannot write the report in {out}: {exc}") from exc


def _write(
    results: Sequence[ItemResult], out: Path, *, title: str, setup: str, model: str
) -> dict[str, Path]:
    stamp = f"{title} — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    paths = {
        "markdown": out / "report.md",
        "html": out / "report.html",
        "results": out / "results.jsonl",
    }
    paths["markdown"].write_text(markdown(results, stamp, setup, model), encoding="utf-8")
    paths["html"].write_text(html_page(results, stamp, setup), encoding="utf-8")
    with paths["results"].open("w", encoding="utf-8") as fh:
        for r in results:
            fh.write(
                json.dumps(
                    {
                        "id": r.item.id,
                        "family": r.item.family,
                        "patient": r.item.patient,
                        "question": r.item.question,
                        "outcome": r.outcome,
                        "value": r.value,
                        "citations": r.citations,
                        "abstention": r.abstention,
                        "latency_ms": round(r.latency_ms, 1),
                        "text": r.text,
                        "cited": r.cited,
                        "error": r.error,
                        "supported_fraction": r.supported_fraction,
                        "rejected": r.rejected,
                        "fallback": r.fallback,
                        "rejected_sentences": r.rejected_sentences,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    return paths
