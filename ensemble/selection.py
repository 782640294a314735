"""Per-task selection procedures: each turns the rows of a selection set (all of dev, or half of it for
ensemble.estimate) into a chosen predictor for one task, judged by that task's own metric. Each sees
the pool as TaskPool.prepared makes it for those rows (members' epochs, STS scales and, when calibrated,
temperatures fitted on them).

- best single: the member with the best score;
- top-k: the k best members, outputs averaged with uniform weights;
- fitted: the k best members with weights fitted on the rows (ensemble.logits.fit_weights), kept only
  when they beat uniform weights in k-fold cross-validation within the rows;
- caruana: ensemble selection with replacement (ensemble.caruana);
- caruana-bagged: the same, over random halves of the pool, weights averaged (ensemble.caruana);
- uniform soup: one model, the mean of the weights of the members that can be averaged with the best;
- greedy soup: those members by score, each kept only if the soup's score strictly improves.
Soups are run on all of dev once per member set (SoupEvaluator caches them), so a procedure that
selects on some rows only scores those rows of the cached outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ensemble.caruana import (
    DEFAULT_BAGS,
    DEFAULT_INIT_SIZE,
    DEFAULT_ROUNDS,
    bagged_caruana_select,
    caruana_select,
)
from ensemble.logits import fit_weights
from ensemble.members import EnsembleError, Member
from ensemble.soup import SoupEvaluator, compatible_members, greedy_soup
from ensemble.taskpool import Scale, TaskPool, apply_scale, fit_scale, member_passes

LOGIT_METHODS = ("caruana", "caruana-bagged", "top-k", "fitted")
SOUP_METHODS = ("uniform-soup", "greedy-soup")
METHODS = (*LOGIT_METHODS, *SOUP_METHODS)


@dataclass
class Choice:
    """A predictor for one task: pool members with weights (logit average) or a soup of members."""

    method: str
    kind: str  # "logits" or "soup"
    members: list[int]  # indexes into the task pool, selection order
    weights: list[float]  # same length; a soup's are uniform
    values: np.ndarray  # its dev outputs on all rows
    details: dict = field(default_factory=dict)
    # A logit average's members' maps (STS scale, temperature), same order; a soup's: [the one model's map].
    scales: list[Scale | None] | None = None

    def cost(self, pool: TaskPool) -> int:
        """Encoder passes per example: a soup is one model; a logit average runs each distinct member
        with nonzero weight."""
        used = [pool.members[i] for i, w in zip(self.members, self.weights, strict=True) if w > 0]
        if self.kind == "soup":
            used = used[:1]
        return sum(member_passes(m, pool.task) for m in used)


Procedure = Callable[[np.ndarray], Choice]  # selection rows -> chosen predictor


@dataclass
class Settings:
    top_k: int = 5
    caruana_init: int = DEFAULT_INIT_SIZE
    caruana_rounds: int = DEFAULT_ROUNDS
    folds: int = 5
    caruana_criterion: str = "likelihood"  # or "metric" (TaskPool.selection_scorer)
    caruana_bags: int = DEFAULT_BAGS


class Selector:
    """The procedures for one task pool."""

    def __init__(self, pool: TaskPool, evaluate: SoupEvaluator | None, settings: Settings):
        self.pool, self.evaluate, self.settings = pool, evaluate, settings
        self.soups: dict[tuple[int, ...], np.ndarray] = {}
        self.compatible: dict[int, tuple[list[int], list[str]]] = {}

    def procedures(self, methods: tuple[str, ...]) -> dict[str, Procedure]:
        """The named procedures: "best single" and each of ``methods``."""
        table = {
            "best single": Selector.best_single,
            "top-k": Selector.top_k,
            "fitted": Selector.fitted,
            "caruana": Selector.caruana,
            "caruana-bagged": Selector.caruana_bagged,
            "uniform-soup": Selector.uniform_soup,
            "greedy-soup": Selector.greedy_soup,
        }
        return {name: self.on_rows(table[name]) for name in ("best single", *methods)}

    def on_rows(self, method: Callable[[Selector, np.ndarray], Choice]) -> Procedure:
        """``method`` run by a selector over the pool prepared for the selection rows (shared soup caches)."""

        def procedure(rows: np.ndarray) -> Choice:
            view = copy.copy(self)
            view.pool = self.pool.prepared(rows)
            return method(view, rows)

        return procedure

    def logits(self, method: str, members: list[int], weights: list[float], **details) -> Choice:
        full = np.zeros(len(self.pool.members))
        np.add.at(full, members, weights)
        scales = None if self.pool.scales is None else [self.pool.scales[i] for i in members]
        return Choice(method, "logits", members, weights, self.pool.mix(full), details, scales)

    def fixed(self, indexes: list[int], method: str = "fixed") -> Procedure:
        """Members averaged uniformly, chosen without looking at dev (the baseline, its seeds); their epochs
        and scales are still fitted on the selection rows, as the usual recipe keeps its best dev epoch."""
        return self.on_rows(lambda view, rows: view.logits(method, list(indexes), [1.0 / len(indexes)] * len(indexes)))

    def best_single(self, rows: np.ndarray) -> Choice:
        return self.logits("best single", self.pool.ranking(rows)[:1], [1.0])

    def top_k(self, rows: np.ndarray) -> Choice:
        top = self.pool.ranking(rows)[: self.settings.top_k]
        return self.logits("top-k", top, [1.0 / len(top)] * len(top))

    def fitted(self, rows: np.ndarray) -> Choice:
        top = self.pool.ranking(rows)[: self.settings.top_k]
        task, ids, labels = self.pool.task, self.pool.ids[rows], self.pool.labels[rows]
        outputs = [{task: {"ids": ids, "values": self.pool.values[i][rows], "labels": labels}} for i in top]
        fit = fit_weights(outputs, [task], task, folds=self.settings.folds)
        return self.logits("fitted", top, list(fit.weights), weight_fit=fit.to_dict())

    def selected(self, method: str, weights: list[float], **details) -> Choice:
        """A logit average of the pool members that a selection gave a positive weight."""
        chosen = [i for i, w in enumerate(weights) if w > 0]
        return self.logits(method, chosen, [weights[i] for i in chosen], **details)

    def caruana(self, rows: np.ndarray) -> Choice:
        s = self.settings
        scorer = self.pool.selection_scorer(s.caruana_criterion, "caruana")
        result = caruana_select(self.pool.values, scorer, rows, s.caruana_init, s.caruana_rounds)
        return self.selected("caruana", result.weights, counts=result.counts, history=result.history)

    def caruana_bagged(self, rows: np.ndarray) -> Choice:
        s = self.settings
        scorer = self.pool.selection_scorer(s.caruana_criterion, "caruana-bagged")
        result = bagged_caruana_select(
            self.pool.values, scorer, rows, s.caruana_bags, init_size=s.caruana_init, rounds=s.caruana_rounds
        )
        bags = [[self.pool.members[i].name for i in bag] for bag in result.bags]
        return self.selected("caruana-bagged", result.weights, bags=bags)

    # ------------------------------------------------------------------------------------- soups

    def soup_values(self, indexes: list[int]) -> np.ndarray:
        """Dev outputs of the soup of these pool members (a member alone: its outputs as the pool was prepared,
        epoch and scale fitted on the selection rows). A soup of several is run with the saved weights,
        whose epochs were chosen on all of dev, unmapped (Selector.soup maps it): a small leak into the
        soups' estimates, which the build's summary notes. It runs with the first member's config
        (max_length, precision, ...), as on test and in the saved predictor: the first is the reference."""
        key = (indexes[0], *sorted(indexes[1:]))
        if len(key) == 1:  # not cached: a member's outputs depend on the rows the pool was prepared for
            return self.pool.values[key[0]]
        if key not in self.soups:
            if self.evaluate is None:
                raise EnsembleError("soups need a SoupEvaluator")
            members = [self.pool.members[i] for i in key]
            outputs = self.evaluate(members, "dev")[self.pool.task]
            names = ", ".join(m.name for m in members)
            aligned = self.pool.align(outputs, f"the soup of {names}")
            self.soups[key] = np.asarray(aligned["values"], dtype=np.float64)
        return self.soups[key]

    def soup_pool(self, rows: np.ndarray) -> tuple[list[int], list[str]]:
        """The best member on ``rows`` and the members that can be averaged with it, by score on rows.
        Lent members (ensemble.lend) are left out: their weights serve another task's head."""
        members: list[Member] = self.pool.members
        ranking = [i for i in self.pool.ranking(rows) if members[i].head is None]
        reference = ranking[0]
        if reference not in self.compatible:
            own = [m for m in members if m.head is None]
            found, refusals = compatible_members(members[reference], own)
            self.compatible[reference] = ([self.pool.index(m) for m in found], refusals)
        indexes, refusals = self.compatible[reference]
        return sorted(indexes, key=ranking.index), refusals

    def soup(self, method: str, indexes: list[int], rows: np.ndarray, **details) -> Choice:
        """A soup of one member is that member, mapped like any (STS scale, temperature); a soup of several
        is one more model, mapped the same way: its own map fitted on the selection rows (``scales``: the
        one model's map, not its members')."""
        values, scales = self.soup_values(indexes), None
        if len(indexes) == 1:
            scales = None if self.pool.scales is None else [self.pool.scales[indexes[0]]]
        elif self.pool.mapped(self.pool.members[indexes[0]]):
            scale = fit_scale(values[rows], self.pool.labels[rows], self.pool.task)
            values, scales = apply_scale(values, scale, self.pool.task), [scale]
        return Choice(method, "soup", indexes, [1.0 / len(indexes)] * len(indexes), values, details, scales)

    def uniform_soup(self, rows: np.ndarray) -> Choice:
        indexes, refusals = self.soup_pool(rows)
        return self.soup("uniform-soup", indexes, rows, refused=refusals)

    def greedy_soup(self, rows: np.ndarray) -> Choice:
        indexes, refusals = self.soup_pool(rows)
        members = [self.pool.members[i] for i in indexes]

        def score(soup: list[Member]) -> float:
            return self.pool.score(self.soup_values([self.pool.index(m) for m in soup]), rows, "greedy soup")

        kept, steps = greedy_soup(members, score)
        kept_indexes = [self.pool.index(m) for m in kept]
        return self.soup("greedy-soup", kept_indexes, rows, refused=refusals, steps=[s.__dict__ for s in steps])
