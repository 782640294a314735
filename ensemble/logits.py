"""Averaging members' saved outputs (class probabilities, P(duplicate), STS values), optionally with
weights fitted on dev, and scoring outputs with the trainer's metrics.

Weight fitting minimises a smooth surrogate of each task's metric (negative log-likelihood for the
classifiers, 1 - Pearson r for STS) over the simplex with SLSQP. Because fitted weights are chosen on
dev and then judged on dev, they are kept only when their k-fold cross-validated dev objective (each
fold scored with weights fitted on the other folds) beats uniform weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from data.files import TASKS
from ensemble.members import EnsembleError
from model.metrics import overall_score, task_metric
from model.rundir import TaskOutputs

Outputs = dict[str, TaskOutputs]  # task -> {"ids", "values", "labels"}
EPS = 1e-7


def align_outputs(names: Sequence[str], outputs: Sequence[Outputs], split: str) -> list[Outputs]:
    """Put every member's rows in the first member's id order. Refuses (EnsembleError naming the
    members) when their id sets differ, ids repeat, or the same id carries different gold labels."""
    reference = outputs[0]
    aligned = [reference]
    for name, member in zip(names[1:], outputs[1:], strict=True):
        member_aligned: Outputs = {}
        for task, ref in reference.items():
            if task not in member:
                raise EnsembleError(f"{name} has no {task}-{split} outputs but {names[0]} has")
            mine = member[task]
            if np.array_equal(mine["ids"], ref["ids"]):
                member_aligned[task] = mine
                continue
            position = {i: p for p, i in enumerate(mine["ids"])}
            missing = [i for i in ref["ids"] if i not in position]
            extra = len(mine["ids"]) - (len(ref["ids"]) - len(missing))
            if missing or extra or len(position) != len(mine["ids"]):
                raise EnsembleError(
                    f"{name} and {names[0]} disagree on the {task}-{split} ids: {len(missing)} of {names[0]}'s ids "
                    f"missing from {name} (e.g. {missing[:3]}), {extra} extra or repeated; "
                    "members must be evaluated on the same rows (same data files and eval_limit)"
                )
            order = np.array([position[i] for i in ref["ids"]])
            member_aligned[task] = {k: (None if v is None else v[order]) for k, v in mine.items()}
        for task, ref in reference.items():
            labels, ref_labels = member_aligned[task]["labels"], ref["labels"]
            if labels is not None and ref_labels is not None and not np.allclose(labels, ref_labels):
                raise EnsembleError(f"{name} and {names[0]} have different gold labels for the same {task}-{split} ids")
        aligned.append(member_aligned)
    return aligned


def average_outputs(outputs: Sequence[Outputs], weights: Sequence[float] | None = None) -> Outputs:
    """Weighted mean of aligned members' values (uniform by default); ids and labels of the first."""
    weights = np.full(len(outputs), 1.0 / len(outputs)) if weights is None else np.asarray(weights, dtype=np.float64)
    averaged: Outputs = {}
    for task, ref in outputs[0].items():
        stacked = np.stack([np.asarray(o[task]["values"], dtype=np.float64) for o in outputs])
        averaged[task] = {"ids": ref["ids"], "values": np.tensordot(weights, stacked, axes=1), "labels": ref["labels"]}
    return averaged


def score_outputs(outputs: Outputs, tasks: Sequence[str], metric: str) -> tuple[dict[str, float], float]:
    """Per-task metrics plus "overall", and the study objective ``metrics[metric]``."""
    metrics = {task: task_metric(task, outputs[task]["values"], outputs[task]["labels"]) for task in tasks}
    metrics["overall"] = overall_score(metrics, list(tasks))
    if metric not in metrics:
        raise EnsembleError(f"the study's metric {metric!r} is not one of the computed metrics {sorted(metrics)}")
    return metrics, metrics[metric]


def objective_tasks(tasks: Sequence[str], metric: str) -> list[str]:
    """The tasks the objective depends on."""
    return [metric] if metric in tasks else list(tasks)


def surrogate_loss(task: str, values: np.ndarray, labels: np.ndarray) -> float:
    """A smooth stand-in for the task metric, lower is better."""
    kind = TASKS[task].label_kind
    if kind == "class":
        return float(-np.log(np.clip(values[np.arange(len(labels)), labels.astype(np.int64)], EPS, 1.0)).mean())
    if kind == "binary":
        p, y = np.clip(values, EPS, 1 - EPS), labels.astype(np.float64)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    x, y = values - values.mean(), labels - labels.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float(1.0 - (x * y).sum() / denom) if denom > 0 else 1.0


def fit_simplex_weights(stacked: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> np.ndarray:
    """Weights (>= 0, sum 1) minimising the sum over tasks of the surrogate loss, each task's loss
    divided by its value under uniform weights so that no task dominates by scale."""
    count = len(next(iter(stacked.values())))
    uniform = np.full(count, 1.0 / count)

    def task_losses(w: np.ndarray) -> list[float]:
        return [surrogate_loss(t, np.tensordot(w, stacked[t], axes=1), labels[t]) for t in stacked]

    scale = [max(loss, EPS) for loss in task_losses(uniform)]

    def total(w: np.ndarray) -> float:
        return sum(loss / s for loss, s in zip(task_losses(w), scale, strict=True))

    result = minimize(
        total,
        uniform,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * count,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
        options={"maxiter": 200, "ftol": 1e-9},
    )
    weights = np.clip(result.x if np.all(np.isfinite(result.x)) else uniform, 0.0, None)
    return weights / weights.sum() if weights.sum() > 0 else uniform


@dataclass
class WeightFit:
    weights: list[float]  # the weights to use: fitted if they won cross-validation, else uniform
    fitted_weights: list[float]  # fitted on the whole dev set
    kept: bool
    folds: int
    uniform_dev: float  # objective of uniform weights on dev
    cv_dev: float  # objective of out-of-fold predictions, each fold weighted by a fit on the other folds
    fitted_dev_in_sample: float  # objective of the full-dev fit on dev (optimistic: fitted there)
    reason: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """A fold number per row, balanced, in a seeded random order."""
    return np.random.default_rng(seed).permutation(np.arange(n) % folds)


def fit_weights(outputs: Sequence[Outputs], tasks: Sequence[str], metric: str, folds: int = 5, seed: int = 0) -> WeightFit:
    """Fit member weights on dev, guarded by k-fold cross-validation within dev."""
    count = len(outputs)
    uniform = [1.0 / count] * count
    _, uniform_dev = score_outputs(average_outputs(outputs), tasks, metric)
    fit_tasks = objective_tasks(tasks, metric)
    stacked = {t: np.stack([np.asarray(o[t]["values"], dtype=np.float64) for o in outputs]) for t in fit_tasks}
    labels = {t: np.asarray(outputs[0][t]["labels"]) for t in fit_tasks}
    smallest = min(len(v) for v in labels.values())
    folds = min(folds, smallest // 2)
    if count < 2 or folds < 2:
        why = "a single member" if count < 2 else f"too few dev rows ({smallest}) for cross-validation"
        return WeightFit(uniform, uniform, False, 0, uniform_dev, float("nan"), uniform_dev, f"not fitted: {why}")

    assignment = {t: fold_ids(len(labels[t]), folds, seed) for t in fit_tasks}
    out_of_fold = {t: np.zeros_like(stacked[t][0]) for t in fit_tasks}
    for fold in range(folds):
        train = {t: assignment[t] != fold for t in fit_tasks}
        w = fit_simplex_weights({t: stacked[t][:, train[t]] for t in fit_tasks}, {t: labels[t][train[t]] for t in fit_tasks})
        for t in fit_tasks:
            out_of_fold[t][~train[t]] = np.tensordot(w, stacked[t][:, ~train[t]], axes=1)
    oof_outputs = {t: {"ids": outputs[0][t]["ids"], "values": out_of_fold[t], "labels": labels[t]} for t in fit_tasks}
    # metrics[metric] depends on fit_tasks only, so this is comparable with uniform_dev.
    _, cv_dev = score_outputs(oof_outputs, fit_tasks, metric)

    fitted = fit_simplex_weights(stacked, labels)
    _, fitted_dev = score_outputs(average_outputs(outputs, fitted), tasks, metric)
    kept = cv_dev > uniform_dev  # every metric is higher-is-better
    reason = f"{folds}-fold cross-validated dev {metric} {cv_dev:.4f} vs uniform {uniform_dev:.4f}: " + (
        "fitted weights kept" if kept else "uniform weights kept (fitting did not beat them out of fold)"
    )
    return WeightFit(
        [float(w) for w in fitted] if kept else uniform,
        [float(w) for w in fitted],
        kept,
        folds,
        uniform_dev,
        cv_dev,
        fitted_dev,
        reason,
    )
