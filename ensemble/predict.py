"""``python -m ensemble.predict --ensemble DIR (--input FILE.csv | --splits dev test)``: run a built ensemble.

DIR is a method folder written by ``python -m ensemble.build`` (``results/<studies>/ensemble/<method>``),
its ``predictor/`` folder, or any trainer output dir. The predictor holds, per task, either a soup (one
model folder: config.json + model.safetensors, one model run) or a logit ensemble (each member model
is run and their outputs averaged with the manifest's weights). It covers the tasks its manifest
lists (a trainer output dir: the tasks it trained).

``--splits dev test`` writes every covered task's leaderboard CSVs for those splits of the CS224N
files in ``--data-dir`` (default: $MINBERT_DATA, else ./datasets) to ``--output-dir`` (default
``<DIR>/predict/<task>-<split>-out.csv``), and prints each dev metric.

FILE.csv is in the CS224N format (tab-separated, header with ``id`` and the text columns; a label
column is optional and, when present, the metric is printed on the rows whose label is not empty; every
row is predicted). The task comes from the columns (``sentence`` vs ``sentence1``/``sentence2``;
``similarity`` / ``is_duplicate``), then from the file name (sst, cfimdb, quora/para, sts), then from the
ensemble's tasks; ``--task`` overrides.

With ``--input`` the leaderboard CSV goes to ``--output``, by default to
``<DIR>/predict/<input name>-<task>-out.csv`` (next to the ensemble, since the input's folder, e.g. the
shared data, may be read-only).

``--compare`` (a labelled ``--input``, e.g. rows held out of training with ``python -m data.holdout``)
also runs the predictors the build compared this one with, which no selection chose: the usual recipe
and its seeds averaged. It prints each one's metric on the file and the predictor's paired difference
with it, ± the standard error of a paired bootstrap over the file's rows, and writes them to
``<output stem>-compare.json``. That is the check of a dev-selected predictor on data it never saw.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.atomic import atomic_write_text
from data.files import TASKS, DataError, Example, check_header, load_examples, read_file
from ensemble.estimate import DEFAULT_RESAMPLES, paired_bootstrap
from ensemble.lend import lent_probabilities
from ensemble.logits import Outputs, align_outputs, average_outputs
from ensemble.members import EnsembleError, check_checkpoint
from ensemble.output import MANIFEST_FORMAT
from ensemble.soup import as_numpy_outputs
from ensemble.taskpool import Scale, apply_scale
from model.metrics import task_metric, write_predictions
from model.rundir import TaskOutputs

# Words in a file name that point to a task.
NAME_HINTS = {"sst": "sst", "cfimdb": "cfimdb", "quora": "para", "para": "para", "paraphrase": "para", "sts": "sts"}


@dataclass
class TaskPlan:
    """How the predictor does one task: the model folders to run and the weights of their outputs."""

    kind: str  # "soup" (one model) or "logits"
    model_dirs: list[Path]
    weights: list[float]
    names: list[str]
    scales: list[Scale | None] | None = None  # each model's map fitted by the build (STS scale, temperature)
    # Per model: None, or (head, standardize) for a member lent from another task (ensemble.lend).
    loans: list[tuple[str, tuple[float, float]] | None] | None = None


def find_predictor(directory: Path) -> Path:
    """The folder holding manifest.json (a built predictor) or config.json + model.safetensors (one model)."""
    for candidate in (directory, directory / "predictor"):
        if (candidate / "manifest.json").is_file() or (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(
        f"{directory}: no ensemble here; expected manifest.json, or config.json and model.safetensors, "
        f"in it or in {directory / 'predictor'}"
    )


def member_plan(members: list[dict]) -> TaskPlan:
    names = [m.get("name") or f"{m.get('study', '')}/trial {m['trial']}".lstrip("/") for m in members]
    scales = [tuple(map(float, m["scale"])) if "scale" in m else None for m in members]
    weights = [float(m["weight"]) for m in members]
    loans = [(str(m["head"]), tuple(map(float, m["standardize"]))) if "head" in m else None for m in members]
    return TaskPlan("logits", [Path(m["artifact_dir"]) for m in members], weights, names, scales, loans)


def load_plans(predictor: Path) -> dict[str, TaskPlan]:
    """{task: plan} from a manifest (per task; or an older one for all its tasks), or a single model."""
    manifest_file = predictor / "manifest.json"
    try:
        if not manifest_file.is_file():
            tasks = json.loads((predictor / "config.json").read_text())["train"]["tasks"]
            return {t: TaskPlan("soup", [predictor], [1.0], [predictor.name]) for t in tasks}
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format", 1) > MANIFEST_FORMAT:
            raise EnsembleError(
                f"{manifest_file}: format {manifest['format']} is newer than this code reads ({MANIFEST_FORMAT}); update it"
            )
        if "format" not in manifest:  # one logit average for every task (built before per-task selection)
            return {t: member_plan(manifest["members"]) for t in manifest["tasks"]}
        plans = {}
        for task, entry in manifest["tasks"].items():
            plan = member_plan(entry["members"])
            if entry["kind"] == "soup":
                # The soup model's map: its own (a soup of several, format 6), or its one member's.
                own = [tuple(map(float, entry["scale"]))] if "scale" in entry else None
                alone = plan.scales if len(plan.scales) == 1 else None
                plan = TaskPlan("soup", [predictor / entry["soup_dir"]], [1.0], [" + ".join(plan.names)], own or alone)
            plans[task] = plan
        return plans
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EnsembleError(f"{predictor}: unreadable ensemble description ({type(err).__name__}: {err})") from err


def load_references(predictor: Path, task: str) -> dict[str, TaskPlan]:
    """The predictors the build compared ``predictor``'s ``task`` with ({name: plan}: the usual recipe, its
    seeds averaged); EnsembleError when its manifest records none."""
    manifest_file = predictor / "manifest.json"
    try:
        tasks = json.loads(manifest_file.read_text())["tasks"] if manifest_file.is_file() else {}
        entry = tasks.get(task, {}) if isinstance(tasks, dict) else {}  # a list: a manifest older than per-task ones
        references = {name: member_plan(members) for name, members in entry.get("references", {}).items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EnsembleError(f"{manifest_file}: unreadable references ({type(err).__name__}: {err})") from err
    if not references:
        raise EnsembleError(
            f"{predictor}: no baseline recorded for {task} (a single model, a build without a baseline, or one made "
            "before ensemble.build recorded them): --compare needs a predictor from python -m ensemble.build"
        )
    try:
        check_plans(references)
    except EnsembleError as err:
        raise EnsembleError(f"--compare: {err} (a reference of {predictor}; without --compare it is not run)") from None
    return references


def check_plans(plans: dict[str, TaskPlan]) -> None:
    """Every model a plan runs still has a valid checkpoint with finite weights: a member may have been
    overwritten or have diverged since the build. EnsembleError names the member and the file."""
    for plan in plans.values():
        for name, model_dir in zip(plan.names, plan.model_dirs, strict=True):
            try:
                check_checkpoint(model_dir)
            except EnsembleError as err:
                raise EnsembleError(f"member {name}: {err}") from None


def read_header(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as fp:  # as read_file reads it
        header = next(csv.reader(fp, delimiter="\t"), [])
    check_header(path, header, ())  # a comma-separated file is told so, not given a list of tasks
    return header


def infer_task(path: Path, header: list[str], available: list[str]) -> str:
    """The task of a CS224N-format file; an error lists what remains ambiguous."""
    candidates = [t for t, spec in TASKS.items() if all(c in header for c in spec.text_columns)]
    if "sentence2" in header:  # a pair file also has no "sentence" column, but be explicit
        candidates = [t for t in candidates if len(TASKS[t].text_columns) == 2]
    if not candidates:
        raise DataError(f"{path}:1: no task has the columns {header}; expected 'sentence' or 'sentence1' and 'sentence2'")
    labelled = [t for t in candidates if TASKS[t].label_column in header]
    if len({TASKS[t].label_column for t in labelled}) == 1 and len(labelled) < len(candidates):
        candidates = labelled
    words = set(re.split(r"[^a-z0-9]+", path.name.lower()))
    named = [t for t in candidates if any(NAME_HINTS.get(w) == t for w in words)]
    if named:
        candidates = named
    if len(candidates) > 1:
        candidates = [t for t in candidates if t in available] or candidates
    if len(candidates) != 1:
        raise DataError(f"{path}: cannot tell the task from the columns and name (could be {candidates}); pass --task")
    return candidates[0]


class Runner:
    """Runs model folders on examples, loading each model once. With ``reuse`` it also keeps each run's
    outputs, so that a model run again on the same examples (a member of the predictor that is also one
    of the baselines it is compared with) is not run twice."""

    def __init__(self, device: str | None, reuse: bool = False):
        self.device, self.models = device, {}
        self._runs: dict[tuple, tuple[list[Example], Outputs]] | None = {} if reuse else None

    def __call__(self, model_dir: Path, task: str, examples: list[Example]) -> Outputs:
        key = (model_dir, task, id(examples))
        if self._runs is None:
            return self.run(model_dir, task, examples)
        if key not in self._runs:
            self._runs[key] = (examples, self.run(model_dir, task, examples))  # the examples kept: id() stays theirs
        return {t: dict(out) for t, out in self._runs[key][1].items()}  # callers replace "values" with rescaled ones

    def run(self, model_dir: Path, task: str, examples: list[Example]) -> Outputs:
        from model.build import load_trained
        from model.evaluation import evaluate_model

        if model_dir not in self.models:
            self.models[model_dir] = load_trained(model_dir, device=self.device)
        model, cfg = self.models[model_dir]
        # The labels stay here: some rows may have none, and the metric is computed on the labelled ones only.
        unlabelled = [Example(e.id, e.texts, None) for e in examples]
        _, outputs = evaluate_model(model, cfg, "test", examples={task: unlabelled})
        return as_numpy_outputs(outputs)

    def member(
        self, model_dir: Path, task: str, examples: list[Example], loan: tuple[str, tuple[float, float]] | None
    ) -> Outputs:
        """One member's outputs on ``task``'s examples; a lent one runs its own head and its scores are made
        probabilities as the build made them (ensemble.lend)."""
        if loan is None:
            return self(model_dir, task, examples)
        head, standardize = loan
        out = self(model_dir, head, examples)[head]
        return {task: {**out, "values": lent_probabilities(out["values"], standardize, task)}}

    def predict(self, plan: TaskPlan, task: str, examples: list[Example]) -> TaskOutputs:
        """The plan's outputs on ``examples``: its members' outputs, weighted; EnsembleError when a member's
        are NaN or infinite (finite weights can still overflow)."""
        loans = plan.loans or [None] * len(plan.model_dirs)
        outputs = [self.member(model_dir, task, examples, loan) for model_dir, loan in zip(plan.model_dirs, loans, strict=True)]
        scales = plan.scales or [None] * len(outputs)
        for out, scale, name, model_dir in zip(outputs, scales, plan.names, plan.model_dirs, strict=True):
            if not np.isfinite(out[task]["values"]).all():  # one bad member would silently spoil the average
                raise EnsembleError(f"member {name} ({model_dir / 'model.safetensors'}): NaN or infinite outputs on {task}")
            out[task]["values"] = apply_scale(out[task]["values"], scale, task)
        return average_outputs(align_outputs(plan.names, outputs, "input"), plan.weights)[task]


def default_output(ensemble_dir: Path, input_path: Path, task: str) -> Path:
    return ensemble_dir / "predict" / f"{input_path.stem}-{task}-out.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ensemble", type=Path, required=True, help="method folder of ensemble.build, or its predictor/")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="CS224N-format file (tab-separated)")
    source.add_argument("--splits", nargs="+", choices=("dev", "test"), help="every covered task's files of these splits")
    parser.add_argument(
        "--output", type=Path, help="--input: leaderboard CSV to write (default: <ENSEMBLE>/predict/<input>-<task>-out.csv)"
    )
    parser.add_argument("--task", choices=sorted(TASKS), help="--input: task of the file (default: inferred)")
    parser.add_argument("--data-dir", help="--splits: CS224N data directory (default: $MINBERT_DATA, else ./datasets)")
    parser.add_argument("--output-dir", type=Path, help="--splits: where the CSVs go (default: <ENSEMBLE>/predict)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="--input with labels: also run the usual recipe and its seeds averaged, as the build compared them, "
        "and print the paired differences ± a bootstrap standard error",
    )
    return parser


# What one prediction wrote: the file, the task, the metric on the examples with a label (None: none has
# one), how many those are, and how many examples were predicted.
Written = tuple[Path, str, float | None, int, int]
# One prediction to make: the task, its examples and the file its CSV goes to.
Job = tuple[str, list[Example], Path]
PREDICTOR = "predictor"


@dataclass
class Comparison:
    """``--compare``: a labelled file's metric for the predictor and for each predictor the build compared
    it with, and the predictor's paired difference with each, ± its bootstrap standard error."""

    source: Path  # the labelled file
    path: Path  # the JSON written beside the predictions
    predictor: Path
    task: str
    rows: int  # labelled rows, those scored
    total: int  # rows in the file, all predicted
    scores: dict[str, float]  # PREDICTOR first, then the references
    differences: dict[str, tuple[float, float]]  # reference -> (predictor minus it, standard error)
    members: dict[str, list[str]]  # the models each one runs

    def lines(self) -> list[str]:
        metric = TASKS[self.task].metric_name
        width = max(map(len, self.scores))
        draws = f"paired bootstrap, {DEFAULT_RESAMPLES} draws"
        lines = [f"{self.source}: {self.task}, {self.rows} labelled rows of {self.total}, {metric} ({draws}):"]
        for name, score in self.scores.items():
            line = f"  {name:<{width}}  {score:.4f}  ({len(self.members[name])} model(s))"
            if name in self.differences:
                difference, error = self.differences[name]
                line += f"; predictor minus it {difference:+.4f} ± {error:.4f}"
            lines.append(line)
        return lines

    def to_dict(self) -> dict:
        differences = {name: {"mean": d, "standard_error": e} for name, (d, e) in self.differences.items()}
        return {"input": str(self.source), "predictor": str(self.predictor), "task": self.task, "rows": self.rows,
                "rows_in_file": self.total, "metric": TASKS[self.task].metric_name, "scores": self.scores,
                "members": self.members, "differences": differences, "bootstrap_draws": DEFAULT_RESAMPLES}  # fmt: skip


# Fewer labelled rows than this give a bootstrap whose draws often hold one label only.
MIN_COMPARE_ROWS = 20


def compare(
    predictor: Path, plans: dict[str, TaskPlan], runner: Runner, job: Job, outputs: TaskOutputs, source: Path
) -> Comparison:
    """The predictor's ``outputs`` on a job's examples against its references (``plans`` besides PREDICTOR)
    run on the same rows, scored on the rows with a label."""
    task, examples, output = job
    scored, labels = labelled(examples)
    references = {name: runner.predict(plan, task, examples)["values"] for name, plan in plans.items() if name != PREDICTOR}
    values = {name: v[scored] for name, v in ({PREDICTOR: outputs["values"]} | references).items()}
    scores = {name: task_metric(task, v, labels) for name, v in values.items()}
    differences = {name: paired_bootstrap(task, values[PREDICTOR], values[name], labels) for name in references}
    members = {name: plan.names for name, plan in plans.items()}
    path = output.with_name(f"{output.stem}-compare.json")
    return Comparison(source, path, predictor, task, len(labels), len(examples), scores, differences, members)


def labelled(examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
    """Which examples have a label (a mask), and those labels."""
    scored = np.array([e.label is not None for e in examples], dtype=bool)
    return scored, np.asarray([e.label for e in examples if e.label is not None], dtype=float)


def scored_metric(task: str, examples: list[Example], values: np.ndarray) -> tuple[float | None, int, int]:
    """The metric of ``values`` on the examples with a label (None when none has one), their count, and all."""
    scored, labels = labelled(examples)
    return (task_metric(task, values[scored], labels) if len(labels) else None), len(labels), len(examples)


def predict(args: argparse.Namespace) -> tuple[list[Written], list[Comparison]]:
    """Write the predictions of ``--input`` or of every covered task's ``--splits``, and with ``--compare``
    the comparison: every member is checked and every output computed before the first file is written,
    so an error leaves none."""
    predictor = find_predictor(args.ensemble)
    plans = load_plans(predictor)
    jobs = prediction_jobs(args, predictor, plans)
    check_plans({task: plans[task] for task, _, _ in jobs})
    # --compare: the references are read and checked before anything runs.
    compared = {task: {PREDICTOR: plans[task]} | load_references(predictor, task) for task, _, _ in jobs if args.compare}
    runner = Runner(args.device, reuse=args.compare)
    computed = [(job, runner.predict(plans[job[0]], job[0], job[1])) for job in jobs]
    comparisons = [compare(predictor, compared[job[0]], runner, job, out, args.input) for job, out in computed if args.compare]
    written = []
    for (task, examples, output), outputs in computed:
        write_predictions(output, task, outputs["ids"], outputs["values"])
        written.append((output, task, *scored_metric(task, examples, outputs["values"])))
    for comparison in comparisons:
        atomic_write_text(comparison.path, json.dumps(comparison.to_dict(), indent=2) + "\n")
    return written, comparisons


def prediction_jobs(args: argparse.Namespace, predictor: Path, plans: dict[str, TaskPlan]) -> list[Job]:
    """The predictions that ``--input`` or ``--splits`` asks for."""
    if args.splits:
        output_dir = args.output_dir or args.ensemble / "predict"
        return [
            (task, load_examples(task, split, args.data_dir), output_dir / f"{task}-{split}-out.csv")
            for task in plans
            for split in args.splits
        ]
    header = read_header(args.input)
    task = args.task or infer_task(args.input, header, list(plans))
    if task not in plans:
        raise EnsembleError(f"the ensemble in {predictor} predicts {sorted(plans)}, not {task!r} (the task of {args.input})")
    spec = TASKS[task]
    if args.compare and spec.label_column not in header:
        raise DataError(f"{args.input}:1: --compare needs labels, and the header has no {spec.label_column!r} column")
    # Every row gets a prediction; a row with an empty label is only left out of the metric.
    examples = read_file(args.input, spec, labelled=spec.label_column in header, keep_unlabelled=True)
    count = len(labelled(examples)[1])
    if args.compare and count < MIN_COMPARE_ROWS:
        raise DataError(f"{args.input}: {count} labelled rows; --compare needs at least {MIN_COMPARE_ROWS}")
    return [(task, examples, args.output or default_output(args.ensemble, args.input, task))]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare and args.input is None:
        parser.error("--compare needs --input (a labelled file; on dev, ensemble.build already compares them)")
    try:
        written, comparisons = predict(args)
    except (EnsembleError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for output, task, score, scored, rows in written:
        metric = f"{TASKS[task].metric_name} on the {scored} of them with a label: {score:.4f}" if scored else "none has a label"
        print(f"wrote {output} ({rows} rows; {metric})")
    for comparison in comparisons:
        print("\n".join(comparison.lines()))
        print(f"wrote {comparison.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
