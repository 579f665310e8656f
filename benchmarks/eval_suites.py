"""The shipped `chartsight eval` suites with the embedded default (or a model server), appended to
``benchmarks/results.md`` with the machine named: the per-family table of each suite.

    python benchmarks/eval_suites.py [--data ../shared/data] [--model-url URL --model-name NAME]
        [--family F ...] [--limit N]

The demo suite runs on the packaged demo patients; the synthea-r4-smart suite on the bundles of
``--data`` when they are there. Reports (Markdown, HTML, every answer) go to ``--out``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "test-artifacts" / "eval")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.md")
    parser.add_argument("--model-url")
    parser.add_argument("--model-name")
    parser.add_argument("--family", action="append", default=[])
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    from connectors.demo import demo_bundles

    demo = [x for b in demo_bundles() for x in ("--bundles", str(b))]
    runs = [("demo", demo, ROOT / "agent" / "suites" / "demo.jsonl")]
    bundles = args.data / "synthea-r4-smart" / "bundles"
    if bundles.is_dir():
        runs.append(
            (
                "synthea-r4-smart",
                ["--bundles", str(bundles)],
                ROOT / "agent" / "suites" / "synthea-r4-smart.jsonl",
            )
        )
    extra = [x for f in args.family for x in ("--family", f)]
    if args.limit:
        extra += ["--limit", str(args.limit)]
    if args.model_url:
        extra += ["--model-url", args.model_url]
    if args.model_name:
        extra += ["--model-name", args.model_name]
    sections = []
    for name, more, suite in runs:
        out = args.out / name
        cmd = [
            sys.executable,
            "-m",
            "surfaces.cli",
            "eval",
            str(suite),
            *more,
            "--out",
            str(out),
            *extra,
        ]
        subprocess.run(cmd, check=True, cwd=ROOT)
        report = (out / "report.md").read_text().split("\n", 1)[1]  # its own title left out
        sections.append(f"\n## `chartsight eval`, suite {name}\n\nMachine: {describe()}.\n{report}")
    text = "".join(sections)
    print(text)
    with args.results.open("a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
