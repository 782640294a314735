"""Ensemble selection (Caruana, Niculescu-Mizil, Crew and Ksikes, ICML 2004) on saved member outputs.

Greedy forward selection with replacement: the ensemble is a multiset of members whose outputs are
averaged; weight of a member = its selection count / ensemble size.

1. Sorted initialisation: the members sorted by their own score; the ensemble starts with the best
   one, and each of the next ``init_size - 1`` is added when it strictly improves the score (so a
   duplicate of the best member, which only ties, does not buy a second slot).
2. ``rounds`` times, add the member (any, including one already in) whose addition gives the best
   score; ties go to a member already in the ensemble (no extra inference cost), then to the better
   ranked member.
3. Return the best ensemble seen along the way; ties go to the earlier, smaller one.

Bagged ensemble selection (the paper's third addition against overfitting): with many members, some
fit the selection rows' noise and greedy selection overfits them. ``bagged_caruana_select`` runs the
selection above on ``bags`` random samples of a ``fraction`` of the pool and averages the bags'
weights, so that no single member's lucky fit on these rows decides the ensemble. Measured here it
gained nothing measurable on STS and lost on SST and paraphrase (README, "Ensembles"): an option,
not the default.

Everything is on the rows ``rows`` of the selection set, so that the same code selects on all of dev
or on half of it (ensemble.estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# score(values, rows) -> the task's metric of predictions ``values`` (all rows) on the rows ``rows``.
Scorer = Callable[[np.ndarray, np.ndarray], float]

DEFAULT_INIT_SIZE = 3
DEFAULT_ROUNDS = 30
# Bagged selection: bags, each a random half of the pool.
DEFAULT_BAGS = 20
DEFAULT_BAG_FRACTION = 0.5
# Improvements below this are rounding (a mean of k equal outputs is not bit-equal to one of them).
TOLERANCE = 1e-12


@dataclass
class CaruanaResult:
    counts: list[int]  # selections of each pool member in the returned ensemble
    score: float  # its score on the selection rows
    history: list[float]  # the score after each addition (initialisation included)

    @property
    def weights(self) -> list[float]:
        total = sum(self.counts)
        return [c / total for c in self.counts]


def caruana_select(
    values: np.ndarray,
    score: Scorer,
    rows: np.ndarray,
    init_size: int = DEFAULT_INIT_SIZE,
    rounds: int = DEFAULT_ROUNDS,
) -> CaruanaResult:
    """Select from ``values`` (members first: (M, N) or (M, N, C)) by ``score`` on ``rows``."""
    count = len(values)
    if count == 0:
        raise ValueError("caruana_select: empty pool")
    if init_size < 1 or rounds < 0:
        raise ValueError(f"caruana_select: init_size must be >= 1 and rounds >= 0, not {init_size} and {rounds}")
    values = np.asarray(values, dtype=np.float64)
    singles = [score(values[m], rows) for m in range(count)]
    ranked = sorted(range(count), key=lambda m: (-singles[m], m))  # pool order breaks ties
    position = {m: i for i, m in enumerate(ranked)}

    counts = np.zeros(count, dtype=np.int64)
    total = np.zeros_like(values[0])  # sum of the selected members' outputs
    history: list[float] = []
    for member in ranked[:init_size]:
        size = int(counts.sum()) + 1
        candidate = score((total + values[member]) / size, rows)
        if history and candidate <= history[-1] + TOLERANCE:  # a tie does not buy a slot
            continue
        counts[member] += 1
        total += values[member]
        history.append(candidate)
    best_counts, best_score = counts.copy(), history[-1]
    for _ in range(rounds):
        size = int(counts.sum()) + 1
        # Already-selected members first, then by rank: max() keeps the first of equal scores.
        order = sorted(range(count), key=lambda m: (counts[m] == 0, position[m]))
        scores = {m: score((total + values[m]) / size, rows) for m in order}
        member = max(order, key=lambda m: scores[m])
        counts[member] += 1
        total += values[member]
        history.append(scores[member])
        if scores[member] > best_score + TOLERANCE:
            best_counts, best_score = counts.copy(), scores[member]
    return CaruanaResult([int(c) for c in best_counts], float(best_score), history)


@dataclass
class BaggedResult:
    weights: list[float]  # of each pool member: the mean of its weights over the bags
    bags: list[list[int]]  # the members drawn into each bag


def bagged_caruana_select(
    values: np.ndarray,
    score: Scorer,
    rows: np.ndarray,
    bags: int = DEFAULT_BAGS,
    fraction: float = DEFAULT_BAG_FRACTION,
    seed: int = 0,
    init_size: int = DEFAULT_INIT_SIZE,
    rounds: int = DEFAULT_ROUNDS,
) -> BaggedResult:
    """``caruana_select`` on ``bags`` random samples (without replacement, seeded by ``seed``) of
    ``fraction`` of the members, rounded up; the weights are averaged over the bags."""
    if bags < 1 or not 0.0 < fraction <= 1.0:
        raise ValueError(f"bagged_caruana_select: bags must be >= 1 and fraction in (0, 1], not {bags} and {fraction}")
    values = np.asarray(values, dtype=np.float64)
    count = len(values)
    if count == 0:
        raise ValueError("bagged_caruana_select: empty pool")
    size = math.ceil(fraction * count)
    rng = np.random.default_rng(seed)
    weights = np.zeros(count)
    drawn: list[list[int]] = []
    for _ in range(bags):
        bag = np.sort(rng.choice(count, size=size, replace=False))
        result = caruana_select(values[bag], score, rows, init_size, rounds)
        weights[bag] += result.weights
        drawn.append([int(m) for m in bag])
    return BaggedResult([float(w) for w in weights / bags], drawn)
