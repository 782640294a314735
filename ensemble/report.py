"""Tables (markdown and JSON) and plots (PNG) of an ensemble build; every file is written atomically."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from data.atomic import atomic_write, atomic_write_text  # noqa: E402

# What a row of a task's table is (Row.kind).
BASELINE_ROW, MEMBER_ROW, SELECTED_ROW, STUDENT_ROW = "baseline", "member", "selected", "student"


@dataclass
class Row:
    """One line of a task's table: the baseline, a member, or a predictor chosen on dev."""

    task: str
    name: str
    kind: str  # BASELINE_ROW, MEMBER_ROW, SELECTED_ROW or STUDENT_ROW (ensemble.distill)
    members: list[str]  # member names ("<study>/trial <n>")
    cost: int  # encoder passes per example
    dev: float  # in-sample dev score (the task's metric on all of dev)
    estimate: dict | None = None  # out-of-selection: mean, sd, gain_mean, gain_sd, ... (ensemble.estimate)
    weights: list[float] | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)
    training: dict | None = None  # {"trial_epochs", "train_seconds"} this row's predictor took to train


METRIC_NAMES = {"sts": "Pearson r"}
SEED_GAIN_COLUMN = "gain over the baseline's seeds averaged (mean ± sd)"


def format_number(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def format_spread(mean: float | None, sd: float | None, signed: bool = False) -> str:
    return "" if mean is None else f"{format_number(mean, signed)} ± {format_number(sd)}"


def format_training(training: dict | None) -> str:
    return "" if not training else f"{training['trial_epochs']}, {training['train_seconds'] / 60:.1f}"


def markdown_table(rows: Sequence[Row], task: str) -> str:
    metric = METRIC_NAMES.get(task, "accuracy")

    def members_cell(row: Row) -> str:
        weights = row.weights or [None] * len(row.members)
        pairs = zip(row.members, weights, strict=True)
        return ", ".join(n if w is None or len(row.members) == 1 else f"{n} ({w:.2f})" for n, w in pairs)

    def spread_cell(mean: str, sd: str, signed: bool = False):
        return lambda row: format_spread((row.estimate or {}).get(mean), (row.estimate or {}).get(sd), signed)

    columns = [
        ("predictor", lambda row: row.name),
        ("members (weight)", members_cell),
        ("passes/example", lambda row: str(row.cost)),
        (f"dev {metric}, in-sample", lambda row: format_number(row.dev)),
        ("out-of-selection (mean ± sd)", spread_cell("mean", "sd")),
        ("gain over baseline (mean ± sd)", spread_cell("gain_mean", "gain_sd", signed=True)),
        (SEED_GAIN_COLUMN, spread_cell("reference_gain_mean", "reference_gain_sd", signed=True)),
        ("training (trial-epochs, min)", lambda row: format_training(row.training)),
        ("note", lambda row: row.note),
    ]
    # The seed-average column only where there is a seed average (a build whose baseline has seed runs;
    # a distillation summary has none).
    if all((row.estimate or {}).get("reference_gain_mean") is None for row in rows):
        columns = [c for c in columns if c[0] != SEED_GAIN_COLUMN]
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def json_ready(value: object) -> object:
    """NaN and inf become None: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_summary(directory: Path, title: str, header: dict, rows: Sequence[Row], preamble: str = "") -> str:
    """summary.json and summary.md in ``directory`` (one table per task); returns the markdown."""
    notes = "".join(f"- {note}\n" for note in header.get("notes", []) + [f"skipped {s}" for s in header.get("skipped", [])])
    tables = "".join(
        f"## {task}\n\n" + markdown_table([r for r in rows if r.task == task], task) + "\n"
        for task in dict.fromkeys(r.task for r in rows)
    )
    markdown = f"# {title}\n\n" + preamble + (notes + "\n" if notes else "") + tables
    atomic_write_text(directory / "summary.md", markdown)
    payload = json_ready({**header, "rows": [asdict(r) for r in rows]})
    atomic_write_text(directory / "summary.json", json.dumps(payload, indent=2) + "\n")
    return markdown


def save_figure(figure: plt.Figure, path: Path) -> None:
    try:
        atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(figure)


# A curve: (ensemble size or members considered, dev objective) points, with a label.
Curve = list[tuple[int, float]]


def plot_score_vs_size(path: Path, curves: dict[str, Curve], metric: str, best_single: float, title: str) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", label=label)
    axes.axhline(best_single, color="grey", linestyle="--", label="best single trial")
    axes.set_xlabel("ensemble size (top-n; Caruana: selections; greedy soup: members considered)")
    axes.set_ylabel(f"dev {metric}")
    axes.set_title(title)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    save_figure(figure, path)


def plot_sts_scatter(path: Path, predicted: Sequence[float], gold: Sequence[float], title: str) -> None:
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.scatter(gold, predicted, s=8, alpha=0.5)
    axes.plot([0, 5], [0, 5], color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("gold similarity")
    axes.set_ylabel("predicted similarity")
    axes.set_xlim(-0.2, 5.2)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    save_figure(figure, path)
