"""Task metrics, the overall score and leaderboard CSV files.

``values`` are what the model outputs per example (and what ``outputs/<task>-<split>.npz`` holds):
class probabilities (N, C) for sentiment tasks, P(duplicate) (N,) for paraphrase, the predicted
similarity (N,) on the 0-5 scale for STS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.atomic import atomic_write_text
from data.files import TASKS, Task


def task_of(task: str) -> Task:
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known tasks: {list(TASKS)}")
    return TASKS[task]


def predicted_labels(task: str, values: np.ndarray) -> np.ndarray:
    """The hard prediction: a class (argmax of the probabilities), 0/1 (P >= 0.5), or the score itself."""
    values = np.asarray(values)
    kind = task_of(task).label_kind
    if kind == "class":
        if values.ndim != 2:
            raise ValueError(f"{task}: expected class probabilities of shape (N, C), got shape {values.shape}")
        return values.argmax(axis=1)
    if kind == "binary":
        return (values >= 0.5).astype(np.int64)
    return values.astype(np.float64)


class NonFiniteMetricError(ValueError):
    """A metric was asked of NaN or infinite values: the score is undefined, never 0.0."""


def require_finite(task: str, name: str, array: np.ndarray) -> None:
    """Raise NonFiniteMetricError naming the task and the first row of ``array`` holding NaN or inf."""
    rows = np.atleast_1d(np.asarray(array))
    if rows.dtype.kind not in "fc" or rows.size == 0:
        return
    bad = np.flatnonzero(~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1))
    if len(bad):
        raise NonFiniteMetricError(f"{task}: {len(bad)} of {len(rows)} {name} are NaN or infinite (first at row {bad[0]})")


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; 0.0 when either side is constant (r is undefined there, and a constant
    predictor carries no information about the ranking). NaN or infinite values raise
    NonFiniteMetricError: they mean a broken model, which must not score as uninformative."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    require_finite("pearson", "first values", x)
    require_finite("pearson", "second values", y)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def task_metric(task: str, values: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy for sst/cfimdb/para, Pearson r for sts; NonFiniteMetricError on NaN/inf outputs
    (an argmax or a threshold would silently turn them into a class)."""
    labels = np.asarray(labels)
    require_finite(task, "output values", np.asarray(values))
    require_finite(task, "labels", labels)
    predicted = predicted_labels(task, values)
    if len(predicted) != len(labels):
        raise ValueError(f"{task}: {len(predicted)} predictions but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{task}: no examples to score")
    if TASKS[task].label_kind == "score":
        return pearson(predicted, labels)
    return float((predicted == labels.astype(np.int64)).mean())


def normalized_score(task: str, metric: float) -> float:
    """Maps every task metric to 0..1: Pearson r becomes (r + 1) / 2, accuracies stay."""
    return (metric + 1.0) / 2.0 if task_of(task).label_kind == "score" else metric


def overall_score(metrics: dict[str, float], tasks: Sequence[str]) -> float:
    """Mean normalised score over ``tasks``: for all three, (SST acc + para acc + (r + 1) / 2) / 3."""
    if not tasks:
        raise ValueError("overall_score needs at least one task")
    missing = [t for t in tasks if t not in metrics]
    if missing:
        raise KeyError(f"overall_score: no metric for task(s) {missing}")
    return sum(normalized_score(t, metrics[t]) for t in tasks) / len(tasks)


def write_predictions(path: str | Path, task: str, ids: Sequence[str], values: np.ndarray) -> None:
    """Leaderboard CSV: ``id,Predicted_Sentiment`` (class), ``id,Predicted_Is_Paraphrase`` (0/1)
    or ``id,Predicted_Similarity`` (0-5 float)."""
    predicted = predicted_labels(task, values)
    if len(predicted) != len(ids):
        raise ValueError(f"{task}: {len(ids)} ids but {len(predicted)} predictions")
    if TASKS[task].label_kind == "score":
        rows = [f"{i},{float(p):.4f}" for i, p in zip(ids, predicted, strict=True)]
    else:
        rows = [f"{i},{int(p)}" for i, p in zip(ids, predicted, strict=True)]
    atomic_write_text(path, "\n".join([f"id,{TASKS[task].prediction_column}", *rows]) + "\n")
