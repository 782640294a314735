"""What a study's time budget buys: the out-of-selection gain of each built predictor over the usual
recipe, against the wall time the search and the build took. A report, not a test:

    python scripts/budget_curve.py --task sts --point 10m=12.1:results/sts-diverse-10m/ensemble/summary.json \\
        --point 20m=18.7:results/sts-diverse/ensemble/summary.json --output docs/results/sts-budget.png

Each ``--point LABEL=MINUTES:SUMMARY`` is one run: a label (e.g. the budget), the wall minutes the user
measured (search plus build), and the ``summary.json`` that ``ensemble.build`` wrote for it. The script
prints a Markdown table (one row per point: the usual recipe's and each method's out-of-selection
score and paired gain, the pool's trial-epochs) and draws the gains with their spread against wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file: the project's packages

from ensemble.report import BASELINE_ROW, format_number, format_spread  # noqa: E402


@dataclass
class Point:
    label: str
    minutes: float
    summary: Path
    rows: dict[str, dict]  # method name -> the build's row for the task


def parse_point(text: str, task: str) -> Point:
    label, sep, rest = text.partition("=")
    minutes, sep2, path = rest.partition(":")
    if not (sep and sep2 and label):
        raise ValueError(f"--point {text!r}: expected LABEL=MINUTES:SUMMARY_JSON")
    try:
        wall = float(minutes)
    except ValueError:
        raise ValueError(f"--point {text!r}: {minutes!r} is not a number of minutes") from None
    summary = Path(path)
    try:
        rows = json.loads(summary.read_text(encoding="utf-8"))["rows"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{summary}: not a summary.json of ensemble.build ({err})") from err
    by_name = {row["name"]: row for row in rows if row["task"] == task}
    if not any(row["kind"] == BASELINE_ROW for row in by_name.values()):
        raise ValueError(f"{summary}: no baseline row for {task}")
    return Point(label, wall, summary, by_name)


def estimate(row: dict) -> dict:
    return row.get("estimate") or {}


def table(points: list[Point], methods: list[str]) -> str:
    lines = [
        "| budget | wall (min) | trial-epochs | usual recipe | " + " | ".join(f"{m}: score, gain" for m in methods) + " |",
        "|---|---|---|---|" + "---|" * len(methods),
    ]
    for p in points:
        base = next(row for row in p.rows.values() if row["kind"] == BASELINE_ROW)
        cells = [p.label, f"{p.minutes:.1f}"]
        pool = max((row.get("training") or {}).get("trial_epochs", 0) for row in p.rows.values())
        cells += [str(pool), format_spread(estimate(base)["mean"], estimate(base)["sd"])]
        for method in methods:
            e = estimate(p.rows.get(method, {}))
            gain = format_spread(e["gain_mean"], e["gain_sd"], signed=True) if "gain_mean" in e else ""
            cells.append(f"{format_number(e['mean'])}, {gain}" if gain else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[Point], methods: list[str], task: str, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        xs, ys, errs = [], [], []
        for p in sorted(points, key=lambda p: p.minutes):
            e = estimate(p.rows.get(method, {}))
            if "gain_mean" in e:
                xs.append(p.minutes)
                ys.append(e["gain_mean"])
                errs.append(e["gain_sd"])
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method)
    for p in points:
        ax.annotate(p.label, (p.minutes, 0), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=8)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("wall time, search + build (min)")
    ax.set_ylabel(f"{task}: out-of-selection gain over the usual recipe")
    ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=("sst", "para", "sts"))
    parser.add_argument("--point", required=True, action="append", metavar="LABEL=MINUTES:SUMMARY")
    parser.add_argument("--methods", nargs="+", default=["caruana", "best single"], help="rows to show (default %(default)s)")
    parser.add_argument("--output", type=Path, help="PNG of the gains against wall time")
    args = parser.parse_args(argv)
    try:
        points = [parse_point(text, args.task) for text in args.point]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table(points, args.methods))
    if args.output:
        plot(points, args.methods, args.task, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
