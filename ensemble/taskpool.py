"""One task's view of the member pool: the members that train the task, their dev outputs stacked in
one row order, the gold labels, and the task's own metric on any subset of rows.

Every choice that looks at dev is made on the selection rows only (``TaskPool.prepared``), so that the
out-of-selection estimates (ensemble.estimate) repeat it on each half:
- each single-task member's epoch: the one whose dev outputs score best on the rows (the trainer
  keeps every epoch's dev outputs; on all of dev this is the epoch the trainer itself kept). A
  multitask member keeps the epoch the trainer chose on all of dev (best mean over its tasks): no
  weights exist for a per-task choice, so that small leak stays, as it does for soups;
- for STS, each member's scale: members differ in output scale (5 cos, a regression head, CoSENT,
  which fixes only the order), so each is mapped to the labels' 0-5 scale by a least-squares line
  fitted on the rows before any averaging;
- in a calibrated pool (``--calibrate``) of probabilities (SST, CFIMDB, paraphrase), each member's
  temperature, fitted on the rows (fit_scale);
- each lent member's (``--cross-task``, ensemble.lend) logistic map, offset and slope, fitted on the rows.

Also the inference cost of a predictor: encoder passes per example.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.files import TASKS
from ensemble.members import EnsembleError, Member, Pool
from model.config import reads_both_orders, value_for_task
from model.metrics import task_metric
from model.rundir import TaskOutputs


def encoder_passes(config: dict, task: str) -> int:
    """Encoder passes per example of one model on ``task``: 2 for a bi-encoded pair (each sentence
    alone) or a cross-encoded pair read in both orders, else 1 (a single sentence, or a cross-encoded
    pair read once)."""
    bi = TASKS[task].is_pair and value_for_task(config["train"].get("pair_encoding"), task) == "bi"
    return 2 if bi or reads_both_orders(config["train"], task) else 1


def member_passes(member: Member, task: str) -> int:
    """A member's encoder passes per example in ``task``'s pool (a lent member runs its own head)."""
    return encoder_passes(member.config, member.head or task)


def checked_metric(task: str, values: np.ndarray, labels: np.ndarray, who: str) -> float:
    """The task's metric, refusing non-finite inputs or results (never a silent 0.0 or NaN)."""
    if not np.isfinite(values).all():
        raise EnsembleError(f"{who}: {task} outputs contain NaN or inf")
    score = task_metric(task, values, labels)
    if not math.isfinite(score):
        raise EnsembleError(f"{who}: {task} metric is {score}")
    return float(score)


def align_to(reference: TaskOutputs, outputs: TaskOutputs, where: str, reference_where: str) -> TaskOutputs:
    """``outputs`` in ``reference``'s row order. EnsembleError naming both sources when their id sets
    differ, ids repeat, or the same id carries different gold labels."""
    ref_ids, ids = reference["ids"], outputs["ids"]
    if np.array_equal(ids, ref_ids):
        aligned = outputs
    else:
        position = {i: p for p, i in enumerate(ids)}
        missing = [i for i in ref_ids if i not in position]
        if missing or len(position) != len(ids) or len(ids) != len(ref_ids):
            raise EnsembleError(
                f"{where} and {reference_where} cover different ids: {len(missing)} of the latter's missing "
                f"(e.g. {missing[:3]}), {len(ids)} rows against {len(ref_ids)}; members must be evaluated on "
                "the same rows (same data files and eval_limit)"
            )
        order = np.array([position[i] for i in ref_ids])
        aligned = {k: (None if v is None else v[order]) for k, v in outputs.items()}
    labels, ref_labels = aligned.get("labels"), reference.get("labels")
    if labels is not None and ref_labels is not None and not np.allclose(labels, ref_labels):
        raise EnsembleError(f"{where} and {reference_where} have different gold labels for the same ids")
    return aligned


Scale = tuple[float, float]  # (offset, slope): a member's map onto the labels (fit_scale, apply_scale)
# Probabilities are clipped this far from 0 and 1 before their log or logit: float32 outputs can be
# exactly 0 or 1, and the clip (log-odds within +-16) changes no prediction.
PROBABILITY_CLIP = 1e-7
# The slope (1 / temperature) is searched between 1/4 and 4: room for label smoothing's underconfidence
# and over-training's overconfidence (fitted temperatures of trained networks are typically 1-3, Guo et
# al. 2017), while a member right on nearly every selection row, whose likelihood keeps growing as it
# sharpens, cannot be made to outvote the others by more than that.
LOG_SLOPE_BOUNDS = (-math.log(4.0), math.log(4.0))
# A lent member's offset (in log-odds): its standardised score's 0 may sit anywhere in the labels' odds.
OFFSET_BOUNDS = (-8.0, 8.0)


def to_log_odds(values: np.ndarray, task: str) -> np.ndarray:
    """Class probabilities as log-probabilities, P(duplicate) as its logit: the space a temperature scales."""
    p = np.clip(np.asarray(values, dtype=np.float64), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    return np.log(p) if TASKS[task].label_kind == "class" else np.log(p) - np.log1p(-p)


def from_log_odds(z: np.ndarray, task: str) -> np.ndarray:
    if TASKS[task].label_kind == "class":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-z))


def mean_log_likelihood(values: np.ndarray, labels: np.ndarray) -> float:
    """Mean log-probability of the gold labels: class probabilities (N, C), or P(duplicate) (N,)."""
    if values.ndim == 2:
        p = values[np.arange(len(labels)), np.asarray(labels).astype(int)]
    else:
        p = np.where(np.asarray(labels) > 0.5, values, 1.0 - values)
    return float(np.mean(np.log(np.clip(p, 1e-9, 1.0))))


def fit_scale(values: np.ndarray, labels: np.ndarray, task: str, offset: bool = False) -> Scale:
    """One member's map onto the labels, fitted on these rows.

    - STS (scores): the least-squares line from its outputs to the gold scores (a constant output keeps
      slope 1: nothing to fit).
    - SST, CFIMDB, paraphrase (probabilities): temperature scaling (Guo et al. 2017): its log-odds
      times the slope (1 / temperature, within LOG_SLOPE_BOUNDS) that maximises the gold labels'
      likelihood (offset 0); slope 1 when it is right on every row (nothing to fit: the likelihood
      grows without bound). A member's own predictions do not change (the same class is most probable,
      the same side of 0.5); only how confidently it speaks in an average: a label-smoothed member
      is underconfident, one trained longer overconfident.
    - ``offset`` (P(duplicate) of a lent member, ensemble.lend): logistic regression of the labels on its
      log-odds, offset (within OFFSET_BOUNDS) and slope (within LOG_SLOPE_BOUNDS) both fitted: its
      probabilities were made from another head's score, so its 0.5 need not be the labels' boundary."""
    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if TASKS[task].label_kind == "score":
        spread = values.var()
        if spread <= 0:
            return float(labels.mean() - values.mean()), 1.0
        slope = float(((values - values.mean()) * (labels - labels.mean())).mean() / spread)
        return float(labels.mean() - slope * values.mean()), slope
    if offset:
        return fit_logistic(to_log_odds(values, task), labels, task)
    from scipy.optimize import minimize_scalar

    predicted = values.argmax(axis=-1) if values.ndim == 2 else (values >= 0.5).astype(float)
    if np.array_equal(predicted, labels):
        return 0.0, 1.0
    z = to_log_odds(values, task)
    fit = minimize_scalar(
        lambda log_slope: -mean_log_likelihood(from_log_odds(np.exp(log_slope) * z, task), labels),
        bounds=LOG_SLOPE_BOUNDS,
        method="bounded",
    )
    return 0.0, float(np.exp(fit.x))


def fit_logistic(z: np.ndarray, labels: np.ndarray, task: str) -> Scale:
    """(offset, slope) of P(label 1) = sigmoid(offset + slope * z) with the greatest likelihood on these rows."""
    if TASKS[task].label_kind != "binary":
        raise ValueError(f"{task}: a fitted offset needs one probability per row (P(duplicate)), not class probabilities")
    from scipy.optimize import minimize

    def loss(w: np.ndarray) -> float:  # the mean negative log-likelihood, computed without overflow
        s = w[0] + np.exp(w[1]) * z
        return float(np.mean(np.logaddexp(0.0, s) - labels * s))

    fit = minimize(loss, np.zeros(2), method="L-BFGS-B", bounds=[OFFSET_BOUNDS, LOG_SLOPE_BOUNDS])
    return float(fit.x[0]), float(np.exp(fit.x[1]))


def apply_scale(values: np.ndarray, scale: Scale | None, task: str) -> np.ndarray:
    """``values`` of ``task`` through a map of fit_scale (None: unchanged)."""
    values = np.asarray(values, dtype=np.float64)
    if scale is None:
        return values
    if TASKS[task].label_kind == "score":
        return scale[0] + scale[1] * values
    return from_log_odds(scale[0] + scale[1] * to_log_odds(values, task), task)


@dataclass
class TaskPool:
    task: str
    members: list[Member]
    ids: np.ndarray  # (N,) the dev rows, in the first member's order
    labels: np.ndarray  # (N,)
    values: np.ndarray  # (M, N) or (M, N, C): each member's dev outputs (the saved epoch's, unscaled)
    # Per member: (E, N[, C]) its dev outputs after each epoch it kept, or None (a run that kept none).
    epoch_values: list[np.ndarray | None] = field(default_factory=list)
    # Set by prepared(): each member's map to the labels (STS; calibrated pools; lent members), None: none.
    scales: list[Scale | None] | None = None
    calibrate: bool = False  # SST, paraphrase: temperature-scale each member on the selection rows (fit_scale)
    _prepared: dict = field(default_factory=dict, repr=False, compare=False)

    def prepared(self, rows: np.ndarray) -> TaskPool:
        """The pool as a procedure that selects on ``rows`` must see it. On part of dev, each member's
        epoch is the one best on ``rows`` (first of equals, as the trainer chooses); on all of dev it is
        the saved epoch, the trainer's own choice on all of dev, whose weights exist. Then each member
        gets its map fitted on ``rows`` (``mapped``)."""
        key = np.asarray(rows).tobytes()
        if key not in self._prepared:  # only the last rows are kept: the estimates prepare each half once
            values = self.values
            if len(rows) < len(self.labels):
                values = np.stack([self._best_epoch_values(i, rows) for i in range(len(self.members))])
            scales = None
            if any(self.mapped(m) for m in self.members):
                scales = [
                    fit_scale(v[rows], self.labels[rows], self.task, offset=m.head is not None) if self.mapped(m) else None
                    for m, v in zip(self.members, values, strict=True)
                ]
                values = np.stack([apply_scale(v, scale, self.task) for v, scale in zip(values, scales, strict=True)])
            self._prepared = {key: dataclasses.replace(self, values=values, scales=scales, _prepared={})}
        return self._prepared[key]

    def mapped(self, member: Member) -> bool:
        """Whether ``member`` is mapped onto the labels before any averaging: every STS member (onto the 0-5
        scale), every member of a calibrated pool of probabilities (SST, paraphrase: its temperature),
        and every lent member (its offset and slope)."""
        return TASKS[self.task].label_kind == "score" or self.calibrate or member.head is not None

    def _best_epoch_values(self, index: int, rows: np.ndarray) -> np.ndarray:
        stack = self.epoch_values[index] if self.epoch_values else None
        if stack is None:
            return self.values[index]
        scores = [self.score(v, rows, self.members[index].name) for v in stack]
        return stack[int(np.argmax(scores))]

    def score(self, values: np.ndarray, rows: np.ndarray | None = None, who: str = "ensemble") -> float:
        """The task's metric of ``values`` (all N rows) on ``rows`` (default: all)."""
        if rows is None:
            return checked_metric(self.task, values, self.labels, who)
        return checked_metric(self.task, values[rows], self.labels[rows], who)

    def scorer(self, who: str):
        """score(values, rows) for selection code that knows nothing of tasks."""
        return lambda values, rows: self.score(values, rows, who)

    def log_likelihood(self, values: np.ndarray, rows: np.ndarray) -> float:
        """Mean log-probability of the gold labels on ``rows`` (sentiment: class probabilities;
        paraphrase: P(duplicate)); probabilities are clipped at 1e-9 (log 0 is no score)."""
        if TASKS[self.task].label_kind == "score":
            raise ValueError(f"{self.task} outputs are scores, not probabilities: no likelihood")
        return mean_log_likelihood(values[rows], self.labels[rows])

    def selection_scorer(self, criterion: str, who: str):
        """What a greedy selection maximises: the task's metric, or (``likelihood``, classification
        tasks) the gold labels' log-likelihood, a smooth proper score that a few hundred rows of 0/1
        accuracy cannot be overfitted by as easily; STS has no likelihood and keeps its metric."""
        if criterion == "likelihood" and TASKS[self.task].label_kind != "score":
            return self.log_likelihood
        return self.scorer(who)

    def member_scores(self, rows: np.ndarray | None = None) -> list[float]:
        return [self.score(v, rows, m.name) for m, v in zip(self.members, self.values, strict=True)]

    def ranking(self, rows: np.ndarray | None = None) -> list[int]:
        """Member indexes, best on ``rows`` first; pool order breaks ties."""
        scores = self.member_scores(rows)
        return sorted(range(len(self.members)), key=lambda i: (-scores[i], i))

    def mix(self, weights: Sequence[float]) -> np.ndarray:
        """The weighted mean of the members' outputs."""
        return np.tensordot(np.asarray(weights, dtype=np.float64), self.values, axes=1)

    def index(self, member: Member) -> int:
        return next(i for i, m in enumerate(self.members) if m is member)

    def align(self, outputs: TaskOutputs, where: str) -> TaskOutputs:
        """Other outputs of this task (a soup's run) in this pool's row order."""
        reference = {"ids": self.ids, "labels": self.labels}
        return align_to(reference, outputs, where, f"{self.members[0].outputs_file(self.task, 'dev')}")


def epoch_chosen_on_rows(member: Member, task: str) -> bool:
    """Whether a selection on part of dev may choose this member's epoch: only when its saved epoch is
    among its kept ones (else a half could never pick it), and only for a single-task member. A
    multitask trial kept the epoch best on all its tasks together, and no weights exist for a per-task
    choice, so it keeps its saved epoch in the halves too."""
    return member.best_epoch in member.epoch_outputs.get(task, {}) and len(member.tasks) == 1


def task_pool(pool: Pool, task: str, calibrate: bool = False, lent: Sequence[Member] = ()) -> TaskPool:
    """The members of ``pool`` that train ``task``, then the ``lent`` ones (ensemble.lend), their dev outputs
    aligned to the first one's ids; ``calibrate``: see TaskPool.calibrate (STS members are always put on
    the labels' scale)."""
    members = [m for m in pool.members if task in m.tasks] + list(lent)
    if not members:
        raise EnsembleError(f"no member of {pool.studies} trains {task!r}")
    first = members[0]
    reference = first.outputs["dev"][task]
    reference_where = f"{first.name} ({first.outputs_file(task, 'dev')})"

    def aligned(member: Member, outputs: TaskOutputs, where: Path | str) -> np.ndarray:
        return np.asarray(align_to(reference, outputs, f"{member.name} ({where})", reference_where)["values"], dtype=np.float64)

    stacked, epochs = [], []
    for member in members:
        where = member.outputs_file(task, "dev") if member.head is None else f"its {member.head} head run on {task} dev"
        stacked.append(aligned(member, member.outputs["dev"][task], where))
        kept = member.epoch_outputs.get(task, {})
        epochs.append(
            np.stack([aligned(member, out, member.run.epoch_outputs_file(task, e)) for e, out in sorted(kept.items())])
            if epoch_chosen_on_rows(member, task)
            else None
        )
    shapes = {v.shape for v in stacked} | {v.shape[1:] for v in epochs if v is not None}
    if len(shapes) != 1:
        raise EnsembleError(f"{task}: members' dev outputs have different shapes {sorted(shapes)}")
    labels = np.asarray(reference["labels"])
    return TaskPool(task, members, reference["ids"], labels, np.stack(stacked), epochs, calibrate=calibrate)


def task_pools(
    pool: Pool, tasks: Sequence[str] | None = None, calibrate: bool = False, lent: dict[str, list[Member]] | None = None
) -> dict[str, TaskPool]:
    """Every task's pool; ``lent``: {task: its lent members} (ensemble.lend)."""
    return {task: task_pool(pool, task, calibrate, (lent or {}).get(task, ())) for task in (tasks or pool.tasks)}
