"""``python -m ensemble.build --study sts``: turn a finished study's best trials into one predictor.

Methods:
  logits        the mean of the members' saved dev/test outputs (probabilities, P(duplicate), STS
                values); no model run, except on test for members that saved no test outputs.
                ``--fit-weights`` fits member weights on dev, kept only when they beat uniform
                weights in k-fold cross-validation within dev.
  uniform-soup  one model whose weights are the mean of the members' checkpoints.
  greedy-soup   Wortsman et al. 2022: members sorted by dev score, each added to the soup only if
                the soup's dev objective does not drop.
Soups mix only checkpoints that match the best member (architecture, heads, initial weights);
the others are refused with the reason. Soups are run on dev (and test, for the predictions).

Outputs, under ``<results-dir>/<study>/ensemble/<method>/`` (or ``<output-dir>/<method>/``):
  summary.md, summary.json   dev metrics of each member, the best single trial and the ensemble(s)
  predictor/                 the final predictor: a soup's config.json + model.safetensors (a trainer
                             output dir), or a logit ensemble's manifest.json; ``python -m ensemble.predict``
                             runs either
  predictions/<task>-<split>-out.csv   leaderboard CSVs for dev and test
  objective_vs_size.png, sts_dev_scatter.png (STS studies)
With ``--method all`` each method gets its folder and the parent folder gets a combined summary and plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data.files import DATA_DIR_ENV
from ensemble.logits import Outputs, align_outputs, average_outputs, fit_weights, score_outputs
from ensemble.members import EnsembleError, Member, Selection, select_members
from ensemble.report import Curve, Row, plot_objective_vs_size, plot_sts_scatter, write_summary
from ensemble.soup import GreedyStep, SoupEvaluator, SoupResult, compatible_members, greedy_soup, write_soup_predictor
from model.metrics import atomic_write_text, task_metric, write_predictions
from search.storage import DEFAULT_STORAGE_URL

METHODS = ("logits", "uniform-soup", "greedy-soup")
# The search's results folder (search.tune's defaults; not imported from there because that pulls in Ray).
RESULTS_DIR_ENV = "MINBERT_RESULTS"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


@dataclass
class MethodResult:
    method: str
    rows: list[Row]  # the ensemble rows of the table
    curves: dict[str, Curve]
    dev_outputs: Outputs
    test_outputs: Outputs
    write_predictor: Callable[[Path], None]
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def member_row(member: Member, tasks: Sequence[str], metric: str, kind: str = "member") -> Row:
    metrics, objective = score_outputs(member.outputs["dev"], tasks, metric)
    label = f"{member.name} (rank {member.rank})" if kind == "member" else f"best single: {member.name}"
    note = "early-stopped" if member.early_stopped else ""
    return Row(label, kind, [member.trial_number], metrics, objective, note=note, extra={"study_value": member.value})


def ensemble_row(name: str, members: Sequence[Member], metrics: dict, objective: float, weights=None, note: str = "") -> Row:
    return Row(name, "ensemble", [m.trial_number for m in members], metrics, objective, weights=weights, note=note)


def names_of(members: Sequence[Member]) -> list[str]:
    return [m.name for m in members]


# ------------------------------------------------------------------------------------------ logits


def build_logits(selection: Selection, fit: bool, folds: int, evaluate: SoupEvaluator) -> MethodResult:
    members, tasks, metric = selection.members, selection.tasks, selection.metric
    dev = align_outputs(names_of(members), [m.outputs["dev"] for m in members], "dev")
    curve = [(n, score_outputs(average_outputs(dev[:n]), tasks, metric)[1]) for n in range(1, len(dev) + 1)]
    metrics, objective = score_outputs(average_outputs(dev), tasks, metric)
    uniform = [1.0 / len(members)] * len(members)
    rows = [ensemble_row(f"logits, uniform ({len(members)})", members, metrics, objective, uniform)]
    weights, details, notes, final = uniform, {}, [], rows[0]
    if fit:
        weight_fit = fit_weights(dev, tasks, metric, selection.direction, folds=folds)
        details["weight_fit"] = weight_fit.to_dict()
        notes.append(f"--fit-weights: {weight_fit.reason}")
        if weight_fit.folds:
            fitted_metrics, fitted_objective = score_outputs(average_outputs(dev, weight_fit.fitted_weights), tasks, metric)
            note = f"in-sample (fitted on dev); {weight_fit.folds}-fold CV {metric} {weight_fit.cv_dev:.4f}"
            rows.append(
                ensemble_row(
                    f"logits, fitted weights ({len(members)})",
                    members,
                    fitted_metrics,
                    fitted_objective,
                    weight_fit.fitted_weights,
                    note,
                )
            )
        weights = weight_fit.weights
        final = rows[-1] if weight_fit.kept else final
    final.note = "; ".join(filter(None, [final.note, "final predictor"]))
    final_dev = average_outputs(dev, weights)
    for member in members:
        if not member.has_split("test"):  # e.g. an early-stopped trial: its test outputs were never written
            notes.append(f"{member.name} saved no test outputs: ran its checkpoint on test")
            member.outputs["test"] = evaluate([member], split="test").outputs
    test = average_outputs(align_outputs(names_of(members), [m.outputs["test"] for m in members], "test"), weights)

    def write_predictor(directory: Path) -> None:
        manifest = {
            "method": "logits",
            "study": selection.study_name,
            "metric": selection.metric,
            "tasks": tasks,
            "members": [
                {"trial": m.trial_number, "artifact_dir": str(m.artifact_dir), "weight": float(w)}
                for m, w in zip(members, weights, strict=True)
            ],
            **details,
        }
        atomic_write_text(directory / "manifest.json", json.dumps(manifest, indent=2) + "\n")

    return MethodResult("logits", rows, {"logits (uniform, top-n)": curve}, final_dev, test, write_predictor, details, notes)


# ------------------------------------------------------------------------------------------- soups


def soup_members(selection: Selection) -> tuple[list[Member], list[str]]:
    """The members that can be averaged with the best one; the others' refusals become notes."""
    compatible, refusals = compatible_members(selection.members)
    if len(compatible) < 2 <= len(selection.members):
        raise EnsembleError("no soup: no member can be averaged with the best one:\n  " + "\n  ".join(refusals))
    return compatible, refusals


def soup_result(
    method: str, soup: SoupResult, evaluate: SoupEvaluator, rows: list[Row], curves: dict, details: dict
) -> MethodResult:
    """The soup's dev results plus its run on test, and how to write it as the final predictor."""
    rows[-1].note = "; ".join(filter(None, [rows[-1].note, "final predictor"]))
    test = evaluate(soup.members, split="test").outputs
    return MethodResult(
        method,
        rows,
        curves,
        soup.outputs,
        test,
        lambda directory: write_soup_predictor(directory, soup.members, None, method),
        details,
        [f"refused: {refusal}" for refusal in details["refused"]],
    )


def build_uniform_soup(selection: Selection, evaluate: SoupEvaluator) -> MethodResult:
    members, refusals = soup_members(selection)
    curve = [(n, evaluate(members[:n]).objective) for n in range(1, len(members))]
    soup = evaluate(members)
    curve.append((len(members), soup.objective))
    row = ensemble_row(f"uniform soup ({len(members)})", members, soup.metrics, soup.objective)
    return soup_result("uniform-soup", soup, evaluate, [row], {"uniform soup (top-n)": curve}, {"refused": refusals})


def build_greedy_soup(selection: Selection, evaluate: SoupEvaluator) -> MethodResult:
    members, refusals = soup_members(selection)
    sign = -1.0 if selection.direction == "maximize" else 1.0
    # Wortsman et al. order the ingredients by their own held-out (here: dev) score.
    ranked = sorted(members, key=lambda m: (sign * score_outputs(m.outputs["dev"], selection.tasks, selection.metric)[1], m.rank))
    soup, steps = greedy_soup(ranked, evaluate, selection.direction)
    kept = [s.member for s in steps if s.kept]
    row = ensemble_row(
        f"greedy soup ({len(soup.members)} of {len(members)})",
        soup.members,
        soup.metrics,
        soup.objective,
        note=f"kept {', '.join(kept)}",
    )
    curves = {
        "greedy soup: candidate": [(i + 1, s.objective) for i, s in enumerate(steps)],
        "greedy soup: kept": [(i + 1, value) for i, value in enumerate(running_best(steps))],
    }
    details = {"refused": refusals, "steps": [s.__dict__ for s in steps], "order": names_of(ranked)}
    return soup_result("greedy-soup", soup, evaluate, [row], curves, details)


def running_best(steps: Sequence[GreedyStep]) -> list[float]:
    """The soup's objective after each greedy step (it changes only when a member is kept)."""
    values, current = [], None
    for step in steps:
        if step.kept:
            current = step.objective
        values.append(current)
    return values


# ------------------------------------------------------------------------------------------ output


def write_method_outputs(directory: Path, selection: Selection, base_rows: list[Row], result: MethodResult) -> str:
    """Table, predictor, prediction CSVs and plots of one method; returns the markdown table."""
    directory.mkdir(parents=True, exist_ok=True)
    result.write_predictor(directory / "predictor")
    for split, outputs in (("dev", result.dev_outputs), ("test", result.test_outputs)):
        for task, out in outputs.items():
            write_predictions(directory / "predictions" / f"{task}-{split}-out.csv", task, out["ids"], out["values"])
    best_single = base_rows[-1].objective
    title = f"{selection.study_name}: {result.method}"
    plot_objective_vs_size(directory / "objective_vs_size.png", result.curves, selection.metric, best_single, title)
    if "sts" in result.dev_outputs:
        sts = result.dev_outputs["sts"]
        r = task_metric("sts", sts["values"], sts["labels"])
        plot_sts_scatter(
            directory / "sts_dev_scatter.png", sts["values"], sts["labels"], f"{title}: STS dev, Pearson r = {r:.3f}"
        )
    header = summary_header(selection, {result.method: result})
    return write_summary(
        directory,
        f"Ensemble of study {selection.study_name!r}: {result.method}",
        header,
        base_rows + result.rows,
        selection.tasks,
        selection.metric,
    )


def summary_header(selection: Selection, results: dict[str, MethodResult], refused: dict[str, str] | None = None) -> dict:
    return {
        "study": selection.study_name,
        "metric": selection.metric,
        "direction": selection.direction,
        "tasks": selection.tasks,
        "members": [
            {
                "trial": m.trial_number,
                "rank": m.rank,
                "value": m.value,
                "artifact_dir": str(m.artifact_dir),
                "early_stopped": m.early_stopped,
                "params": m.params,
            }
            for m in selection.members
        ],
        "skipped": selection.skipped,
        "notes": selection.notes + [n for r in results.values() for n in r.notes],
        "methods": {name: r.details for name, r in results.items()},
        "refused_methods": refused or {},
    }


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", required=True, help="Optuna study name (the studies/<name> file of the search)")
    parser.add_argument("--top-k", type=int, default=5, help="number of best usable trials to combine (default 5)")
    parser.add_argument("--method", choices=[*METHODS, "all"], default="all", help="what to build (default all)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE_URL, help="Optuna storage URL (default: %(default)s)")
    parser.add_argument(
        "--results-dir",
        type=Path,
        help=f"outputs go to RESULTS_DIR/<study>/ensemble/<method>/ (default: ${RESULTS_DIR_ENV}, else ./results)",
    )
    parser.add_argument("--output-dir", type=Path, help="outputs go to OUTPUT_DIR/<method>/ instead")
    parser.add_argument("--include-early-stopped", action="store_true", help="also use trials that ASHA stopped early")
    parser.add_argument(
        "--fit-weights", action="store_true", help="logits: fit member weights on dev (kept only if they win cross-validation)"
    )
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds for --fit-weights (default 5)")
    parser.add_argument(
        "--data-dir",
        help="CS224N data directory for running soups (default: $MINBERT_DATA, else the best member's data_dir, else ./datasets)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N for running soups (default: cuda when available)")
    parser.add_argument("--no-cache", action="store_true", help="do not cache soup evaluations (default cache: OUTPUT/.cache)")
    return parser


def build(args: argparse.Namespace) -> dict[str, MethodResult]:
    selection = select_members(args.study, args.storage, args.top_k, args.include_early_stopped)
    for note in selection.notes:
        print(f"note: {note}", file=sys.stderr)
    results_dir = Path(args.results_dir or os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR)
    root = args.output_dir or results_dir / args.study / "ensemble"
    base_rows = [member_row(m, selection.tasks, selection.metric) for m in selection.members]
    base_rows.append(member_row(selection.members[0], selection.tasks, selection.metric, kind="best single"))
    # Where the members were trained is the best guess when neither --data-dir nor $MINBERT_DATA says.
    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV) or selection.members[0].config["train"].get("data_dir")
    cache_dir = None if args.no_cache else root / ".cache"
    evaluate = SoupEvaluator(selection.tasks, selection.metric, data_dir, args.device, cache_dir)
    builders = {
        "logits": lambda: build_logits(selection, args.fit_weights, args.folds, evaluate),
        "uniform-soup": lambda: build_uniform_soup(selection, evaluate),
        "greedy-soup": lambda: build_greedy_soup(selection, evaluate),
    }
    methods = METHODS if args.method == "all" else (args.method,)
    results: dict[str, MethodResult] = {}
    refused: dict[str, str] = {}
    for method in methods:
        try:
            results[method] = builders[method]()
        except EnsembleError as err:
            if len(methods) == 1:
                raise
            refused[method] = str(err)
            print(f"{method}: not built: {err}", file=sys.stderr)
            continue
        markdown = write_method_outputs(root / method, selection, base_rows, results[method])
        for note in results[method].notes:
            print(f"{method}: {note}", file=sys.stderr)
        if len(methods) == 1:
            print(markdown)
        print(f"{method}: wrote {root / method} (final predictor in {root / method / 'predictor'})", file=sys.stderr)
    if len(methods) > 1:
        if not results:
            raise EnsembleError("no method could be built:\n  " + "\n  ".join(f"{k}: {v}" for k, v in refused.items()))
        rows = base_rows + [row for r in results.values() for row in r.rows]
        header = summary_header(selection, results, refused)
        print(
            write_summary(root, f"Ensembles of study {selection.study_name!r}", header, rows, selection.tasks, selection.metric)
        )
        curves = {label: points for r in results.values() for label, points in r.curves.items()}
        plot_objective_vs_size(
            root / "objective_vs_size.png", curves, selection.metric, base_rows[-1].objective, selection.study_name
        )
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        build(args)
    except (EnsembleError, KeyError, ValueError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
