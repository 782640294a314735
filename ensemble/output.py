"""Writing an ensemble build: per method, the predictor (a per-task manifest plus soup model folders) and
the leaderboard CSVs; the per-task tables and plots. Each file is written atomically, and only after
everything was computed (ensemble.build)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.atomic import atomic_write_text, replace_folder
from data.files import TASKS
from ensemble.estimate import Estimate
from ensemble.members import Member
from ensemble.report import (
    BASELINE_ROW,
    MEMBER_ROW,
    SELECTED_ROW,
    Curve,
    Row,
    plot_score_vs_size,
    plot_sts_scatter,
    write_summary,
)
from ensemble.selection import Choice
from ensemble.soup import write_soup_predictor
from ensemble.taskpool import TaskPool, member_passes
from model.metrics import write_predictions
from model.rundir import TaskOutputs

# 3: STS members carry the "scale" that puts them on the labels' 0-5 scale; an older reader would
# average them unscaled, so ensemble.predict refuses a format newer than it knows.
# 4: SST, CFIMDB and paraphrase members may carry a "scale" too (the slope, 1 / temperature, of their
# log-odds: --calibrate), which a format-3 reader would apply as a line to probabilities. A manifest
# without such a scale is still written as format 3, which older code reads.
# 5: a member may be lent (ensemble.lend): run with its "head" on another task's rows, its score
# standardised by "standardize"; a format-4 reader would run its own head there. Written only then.
# 6: a soup of several members may carry its own "scale" (the soup model's STS line or temperature,
# fitted like a member's); a format-5 reader would leave its outputs unmapped. Written only then.
MANIFEST_FORMAT = 6
LENT_FORMAT = 5
CALIBRATED_FORMAT = 4
SCORE_SCALES_FORMAT = 3
BASELINE = "baseline (usual recipe)"
SEED_AVERAGE = "usual recipe x seeds"  # the uniform average of the baseline's seed runs


@dataclass
class TaskResult:
    """One task's outcome: every predictor chosen on all of dev, and the estimates of their procedures."""

    pool: TaskPool
    choices: dict[str, Choice]  # "best single" and each method built for this task
    refused: dict[str, str]  # method -> why it could not be built for this task
    estimates: dict[str, Estimate]  # out-of-selection, per procedure ("baseline" included when there is one)
    baseline: int | None  # pool index of the baseline member
    test: dict[str, TaskOutputs] = field(default_factory=dict)  # method -> the predictor's test outputs
    fixed: dict[str, Choice] = field(default_factory=dict)  # not selected on dev: SEED_AVERAGE
    baseline_choice: Choice | None = None  # the baseline as a predictor (its epoch and scale fitted on all of dev)

    def references(self) -> dict[str, Choice]:
        """The predictors not selected on dev that every row is compared with: the baseline, its seeds."""
        return ({} if self.baseline_choice is None else {BASELINE: self.baseline_choice}) | self.fixed

    def names(self, choice: Choice) -> list[str]:
        return [self.pool.members[i].name for i in choice.members]

    def members(self, choice: Choice) -> list[Member]:
        return [self.pool.members[i] for i in choice.members]


def history_training(history: list[dict]) -> dict:
    """The training a run's per-epoch records took: epochs run and seconds of training steps (evaluation
    not included)."""
    return {"trial_epochs": len(history), "train_seconds": float(sum(r.get("train_seconds", 0.0) for r in history))}


def training(members: list[Member]) -> dict:
    """The training these members took, summed."""
    return history_training([record for m in members for record in m.history])


def member_values(pool: TaskPool, index: int) -> np.ndarray:
    """One member's dev outputs as its row reports them: its own; a lent member's through its map fitted on
    all of dev (ensemble.lend: before it, its 0.5 is only its score's mean)."""
    if pool.members[index].head is None:
        return pool.values[index]
    return pool.prepared(np.arange(len(pool.labels))).values[index]


def member_row(pool: TaskPool, index: int, name: str, kind: str, **fields) -> Row:
    member = pool.members[index]
    score = pool.score(member_values(pool, index), who=member.name)
    passes = member_passes(member, pool.task)
    return Row(pool.task, name, kind, [member.name], passes, score, training=training([member]), **fields)


def choice_note(choice: Choice) -> str:
    """What the table should say besides the numbers: a soup's left-out members, a weight fit's verdict."""
    if "weight_fit" in choice.details:
        return choice.details["weight_fit"]["reason"]
    refused = choice.details.get("refused", [])
    if refused:
        why = "encoding, head or initialisation differ; summary.json says which"
        return f"{len(refused)} member(s) cannot be averaged with the best one ({why})"
    return ""


def short_reason(why: str) -> str:
    """A refusal for the table: its first clause and how many members it lists (summary.json has all)."""
    head, _, details = why.partition(": ")
    count = details.count("cannot average")
    return f"{head} ({count} member(s) differ; summary.json says how)" if count else why


def rows_of(result: TaskResult) -> list[Row]:
    """The task's table: the baseline, the dev-selected predictors, refusals, then every member."""
    pool, rows = result.pool, []
    if result.baseline is not None:
        estimate = result.estimates["baseline"].to_dict() | {"gain_mean": None, "gain_sd": None}
        rows.append(member_row(pool, result.baseline, BASELINE, BASELINE_ROW, estimate=estimate, note="not selected"))
    for name, choice in result.fixed.items():
        dev = pool.score(choice.values, who=f"{pool.task} {name}")
        members = result.members(choice)
        note = f"{len(members)} seeds averaged uniformly; not selected"
        rows.append(
            Row(pool.task, name, BASELINE_ROW, result.names(choice), choice.cost(pool), dev, result.estimates[name].to_dict(),
                choice.weights, note, training=training(members))
        )  # fmt: skip
    everything = training(pool.members)  # a dev-selected predictor needed the whole pool trained
    for name, choice in result.choices.items():
        dev = pool.score(choice.values, who=f"{pool.task} {name}")
        estimate = result.estimates[name].to_dict()
        note = choice_note(choice)
        rows.append(
            Row(pool.task, name, SELECTED_ROW, result.names(choice), choice.cost(pool), dev, estimate, choice.weights,
                note, {"details": choice.details}, training=everything)
        )  # fmt: skip
    rows += [Row(pool.task, name, "refused", [], 0, float("nan"), note=short_reason(why)) for name, why in result.refused.items()]
    members = []
    for index, member in enumerate(pool.members):
        note = "early-stopped" if member.early_stopped else ""
        if member.head is not None:
            note = f"lent: its {member.head} score, mapped on the selection rows" + (f"; {note}" if note else "")
        members.append(member_row(pool, index, member.name, MEMBER_ROW, note=note))
    rows += sorted(members, key=lambda row: -row.dev)  # best first; pool order breaks ties
    return rows


def curves_of(result: TaskResult) -> dict[str, Curve]:
    """Dev score against ensemble size: top-n uniform, Caruana's additions, greedy soup candidates."""
    pool = result.pool.prepared(np.arange(len(result.pool.labels)))  # as the predictors see it (STS on one scale)
    ranking = pool.ranking()
    curves: dict[str, Curve] = {}
    for n in range(1, len(ranking) + 1):
        weights = np.zeros(len(ranking))
        weights[ranking[:n]] = 1.0 / n
        curves.setdefault("top-n uniform", []).append((n, pool.score(pool.mix(weights))))
    if "caruana" in result.choices:
        curves["Caruana"] = list(enumerate(result.choices["caruana"].details["history"], start=1))
    if "greedy-soup" in result.choices:
        steps = result.choices["greedy-soup"].details["steps"]
        curves["greedy soup: candidate"] = [(i, step["score"]) for i, step in enumerate(steps, start=1)]
    return curves


def described(result: TaskResult, choice: Choice) -> list[dict]:
    """The manifest's members: where each is and its weight, its map if any (STS scale, temperature,
    a lent member's logistic map), and a lent member's head and the standardisation of its score."""
    own_maps = choice.kind != "soup" or len(choice.members) == 1  # a soup of several: one map, the entry's
    scales = (choice.scales if own_maps else None) or [None] * len(choice.members)
    return [
        {"name": m.name, "study": m.study, "trial": m.trial_number, "artifact_dir": str(m.artifact_dir), "weight": float(w)}
        | ({} if scale is None else {"scale": list(scale)})
        | ({} if m.head is None else {"head": m.head, "standardize": list(m.standardize)})
        for m, w, scale in zip(result.members(choice), choice.weights, scales, strict=True)
        if w > 0  # a fitted weight of 0 would only cost a model run
    ]


def write_method(directory: Path, method: str, results: dict[str, TaskResult], header: dict) -> None:
    """One method's predictor, leaderboard CSVs, summary and STS scatter plot. ``predictor/`` and
    ``predictions/`` are each written whole beside the old ones and then put in their place: a rebuild
    that dies half-way leaves the old predictor (or, between two renames, none), never a manifest
    naming another build's soup, and a task this build no longer covers leaves no CSV behind."""
    tasks, soups, predictions = {}, {}, []
    for task, result in results.items():
        if method not in result.choices:
            continue
        choice = result.choices[method]
        entry = {"method": method, "kind": choice.kind, "members": described(result, choice)}
        entry |= {"inference_cost": choice.cost(result.pool), "dev": result.pool.score(choice.values, who=method)}
        # What the build compared this predictor with, runnable on new rows (ensemble.predict --compare);
        # readers that predate it ignore the key.
        entry["references"] = {name: described(result, ref) for name, ref in result.references().items()}
        if choice.kind == "soup":  # one model folder per distinct member set, shared by the tasks choosing it
            key = tuple(result.names(choice))
            if key not in soups:
                soups[key] = (f"soup-{len(soups) + 1}", result.members(choice))
            entry["soup_dir"] = soups[key][0]
            if len(choice.members) > 1 and choice.scales:
                entry["scale"] = list(choice.scales[0])
        tasks[task] = entry
        for split, out in (("dev", {"ids": result.pool.ids, "values": choice.values}), ("test", result.test[method])):
            predictions.append((f"{task}-{split}-out.csv", task, out["ids"], out["values"]))
        if TASKS[task].label_kind == "score":
            r = entry["dev"]
            title = f"{method}: STS dev, Pearson r = {r:.3f}"
            plot_sts_scatter(directory / "sts_dev_scatter.png", choice.values, result.pool.labels, title)
    calibrated = any(
        "scale" in member for task, entry in tasks.items() if TASKS[task].label_kind != "score" for member in entry["members"]
    )
    lent = any("head" in member for entry in tasks.values() for member in entry["members"])
    soup_maps = any("scale" in entry for entry in tasks.values())
    needed = [MANIFEST_FORMAT if soup_maps else 0, LENT_FORMAT if lent else 0, CALIBRATED_FORMAT if calibrated else 0]
    manifest = {
        "format": max(SCORE_SCALES_FORMAT, *needed),
        "method": method,
        "studies": header["studies"],
        "tasks": tasks,
    }

    def write_predictor(folder: Path) -> None:
        for name, members in soups.values():
            write_soup_predictor(folder / name, members, None, method)
        atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")

    def write_csvs(folder: Path) -> None:
        for name, task, ids, values in predictions:
            write_predictions(folder / name, task, ids, values)

    replace_folder(directory / "predictor", write_predictor)
    replace_folder(directory / "predictions", write_csvs)
    rows = [r for result in results.values() for r in rows_of(result) if r.name in (method, BASELINE, SEED_AVERAGE)]
    write_summary(directory, f"Ensemble {method} of {' + '.join(header['studies'])}", header, rows)


def write_build(root: Path, methods: tuple[str, ...], results: dict[str, TaskResult], header: dict) -> str:
    """Every method's folder, then the combined summary and per-task plots; returns the markdown."""
    for method in methods:
        if any(method in r.choices for r in results.values()):
            write_method(root / method, method, results, header)
    for task, result in results.items():
        best = result.pool.score(result.choices["best single"].values)
        metric = TASKS[task].metric_name
        title = f"{' + '.join(header['studies'])}: {task}"
        plot_score_vs_size(root / f"{task}_dev_vs_size.png", curves_of(result), metric, best, title)
    rows = [row for result in results.values() for row in rows_of(result)]
    preamble = (
        "In-sample: chosen and scored on all of dev (optimistic). Out-of-selection: the same procedure (members' "
        "epochs, STS scales and temperatures included) run on one half of dev and scored on the other, over "
        f"{header['settings']['splits']} random halves: mean ± the standard deviation over those overlapping halves, "
        "which is close to the full dev set's standard error (not a half-size set's). Gain: paired with the baseline "
        "on the same halves, its ± the same spread of the paired differences; the same with the baseline's seeds "
        "averaged, where it has seed runs (one seed's luck is in the first gain, not in its ±). "
        "Passes: encoder passes per example. "
        "Training: trial-epochs and minutes of training steps (a dev-selected row needed the whole pool). "
        "Left inside the halves: a soup of several members and a multitask member keep the epoch chosen on all "
        "of dev (no weights exist for another), a small leak.\n\n"
    )
    return write_summary(root, f"Ensembles of {' + '.join(header['studies'])}", header, rows, preamble)
