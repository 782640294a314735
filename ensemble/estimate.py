"""Honest estimates: how a dev-selected predictor scores on rows its selection did not see.

A predictor chosen on dev (the best single trial, top-k, Caruana, fitted weights, a greedy soup) and
then scored on the same dev looks better than it is. The out-of-selection estimate repeats, for
``splits`` seeded random halves (A, B) of dev:

    choice_s = procedure(A_s)            the same selection procedure, run on half A only
    score_s  = metric(choice_s, B_s)     its score on the other half

and reports mean_s score_s and their standard deviation. The baseline (the usual recipe, a fixed
trial, no selection) is scored on the same B halves, so each procedure's gain over it is paired:
gain_s = score_s - metric(baseline, B_s), reported as mean and sd. With a ``reference`` (the usual recipe
averaged over its seeds, a user's other cheap alternative) every other procedure's gain over it is
paired the same way.

What the ± is: the standard deviation over the ``splits`` halves. The halves overlap (each is half
of one dev set), so it is close to the standard error of a score on the full dev set, not the wider
spread of a score on an independent half-size set. The paired gain's ± is the same spread of the
paired differences, so a gain of about twice its ± stands out of the dev set's noise.

On rows that no selection saw (a held-out file: ``ensemble.predict --compare``) there is nothing to
split: ``paired_bootstrap`` gives the difference of two fixed predictors' metrics and its standard
error, the spread of that difference over rows resampled with replacement, the same rows for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ensemble.selection import Procedure
from ensemble.taskpool import TaskPool
from model.metrics import task_metric

DEFAULT_SPLITS = 20
DEFAULT_SEED = 0
DEFAULT_RESAMPLES = 2000


def halves(rows: int, splits: int = DEFAULT_SPLITS, seed: int = DEFAULT_SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """``splits`` random (A, B) partitions of range(rows) into halves (A gets the smaller one when odd)."""
    if rows < 4:
        raise ValueError(f"{rows} dev rows are too few to split into halves")
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(splits):
        order = rng.permutation(rows)
        pairs.append((np.sort(order[: rows // 2]), np.sort(order[rows // 2 :])))
    return pairs


@dataclass
class Estimate:
    """Out-of-selection scores of one procedure over the splits (and gains over the baseline)."""

    scores: list[float]
    gains: list[float] | None  # None without a baseline
    reference_gains: list[float] | None = None  # paired with the reference procedure; None without one, or for it

    @staticmethod
    def spread(values: list[float] | None) -> tuple[float | None, float | None]:
        """Mean and sd (ddof 1; NaN for one value) of ``values``; (None, None) for None."""
        if values is None:
            return None, None
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def sd(self) -> float:
        return self.spread(self.scores)[1]

    @property
    def gain_mean(self) -> float | None:
        return self.spread(self.gains)[0]

    @property
    def gain_sd(self) -> float | None:
        return self.spread(self.gains)[1]

    def to_dict(self) -> dict:
        reference_mean, reference_sd = self.spread(self.reference_gains)
        return {
            "mean": self.mean,
            "sd": self.sd,
            "gain_mean": self.gain_mean,
            "gain_sd": self.gain_sd,
            "reference_gain_mean": reference_mean,
            "reference_gain_sd": reference_sd,
            "splits": len(self.scores),
            "scores": self.scores,
            "gains": self.gains,
            "reference_gains": self.reference_gains,
        }


def out_of_selection(
    pool: TaskPool,
    procedures: Mapping[str, Procedure],
    baseline: Procedure | None = None,
    splits: int = DEFAULT_SPLITS,
    seed: int = DEFAULT_SEED,
    reference: str | None = None,
) -> dict[str, Estimate]:
    """Select with each procedure on half A of each split and score on half B; the baseline (when
    given) is scored on the same B halves and appears under "baseline". ``reference``: the name of one
    of ``procedures`` that every other procedure (the baseline included) is also paired with."""
    if reference is not None and reference not in procedures:
        raise ValueError(f"reference {reference!r} is not one of the procedures {sorted(procedures)}")
    named = dict(procedures) | ({"baseline": baseline} if baseline is not None else {})
    scores: dict[str, list[float]] = {name: [] for name in named}
    for a, b in halves(len(pool.labels), splits, seed):
        for name, procedure in named.items():
            scores[name].append(pool.score(procedure(a).values, b, f"{pool.task} {name}"))

    def paired(values: list[float], other: list[float] | None) -> list[float] | None:
        return None if other is None else [s - s0 for s, s0 in zip(values, other, strict=True)]

    base, ref = scores.get("baseline"), scores.get(reference) if reference else None
    return {
        name: Estimate(values, paired(values, base), None if name == reference else paired(values, ref))
        for name, values in scores.items()
    }


def paired_bootstrap(
    task: str,
    values: np.ndarray,
    other: np.ndarray,
    labels: np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """metric(values) - metric(other) on all rows, and its standard error: the sd of that difference over
    ``resamples`` draws of the rows with replacement, each draw scoring both predictors on the same rows."""
    values, other, labels = np.asarray(values), np.asarray(other), np.asarray(labels)
    if not len(values) == len(other) == len(labels):
        raise ValueError(f"{task}: {len(values)} and {len(other)} outputs for {len(labels)} labels")
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(resamples):  # one draw at a time: resamples x rows indexes at once can be gigabytes
        d = rng.integers(0, len(labels), len(labels))
        differences.append(task_metric(task, values[d], labels[d]) - task_metric(task, other[d], labels[d]))
    return task_metric(task, values, labels) - task_metric(task, other, labels), float(np.std(differences, ddof=1))
