"""Members lent across tasks (``python -m ensemble.build --cross-task``): a model trained for one task
joins another task's pool and speaks there with its own head.

One loan is offered: STS members in the paraphrase pool. An STS model's similarity score of two
questions says how alike they are; a logistic map turns it into P(duplicate). Members that encode and
learn differently make errors that cancel, so a pool gains from them even when each is weaker alone.
The reverse loan (paraphrase members in the STS pool) measured nothing (README, "Ensembles").

A lent member's outputs on the borrowing task, made the same way here and in ensemble.predict
(``lent_probabilities``): its head's score on each row, standardised by the score's mean and sd over
the dev rows (no label is used), through the logistic function. That is a probability the pool can
hold like any member's. TaskPool.prepared then fits the member's offset and slope (fit_scale with an
offset) on the selection rows: the map is chosen inside the out-of-selection procedure, as every
other choice that looks at dev.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ensemble.members import EnsembleError, Member, Pool
from ensemble.soup import SoupEvaluator
from ensemble.taskpool import from_log_odds
from model.rundir import TaskOutputs

# The borrowing task -> the task whose members it borrows.
LENDERS: dict[str, str] = {"para": "sts"}


def lent_probabilities(scores: np.ndarray, standardize: tuple[float, float], task: str) -> np.ndarray:
    """A lent member's head scores as the probabilities ``task``'s pool holds: the standardised score
    read as log-odds."""
    mean, sd = standardize
    return from_log_odds((np.asarray(scores, dtype=np.float64) - mean) / sd, task)


def lenders(pool: Pool, task: str) -> list[Member]:
    """The members of ``pool`` that ``task``'s pool may borrow: they train the lending task, not ``task``
    (a member that trains ``task`` is already in its pool, with its own head)."""
    head = LENDERS.get(task)
    return [m for m in pool.members if head in m.tasks and task not in m.tasks] if head else []


def head_outputs(member: Member, task: str, split: str, evaluate: SoupEvaluator) -> TaskOutputs:
    """A lent member's head run on ``task``'s ``split`` rows (cached like a soup): its raw scores."""
    out = evaluate([member], split, lent_to=task)[task]
    if not np.isfinite(out["values"]).all():
        raise EnsembleError(f"{member.name} ({member.run.weights_file}): NaN or infinite {member.head} scores on {task} {split}")
    return out


def lend(member: Member, task: str, evaluate: SoupEvaluator) -> Member:
    """``member`` as a member of ``task``'s pool: its head run on ``task``'s dev rows."""
    lent = dataclasses.replace(member, head=LENDERS[task], outputs={"dev": {}, "test": {}}, epoch_outputs={})
    out = head_outputs(lent, task, "dev", evaluate)
    scores = out["values"]
    if not scores.std() > 0:
        raise EnsembleError(f"{lent.name}: the same {lent.head} score on every {task} dev row; nothing to lend")
    lent.standardize = (float(scores.mean()), float(scores.std()))
    lent.outputs["dev"][task] = {**out, "values": lent_probabilities(scores, lent.standardize, task)}
    return lent


def lent_test_outputs(member: Member, task: str, evaluate: SoupEvaluator) -> TaskOutputs:
    """A lent member's outputs on ``task``'s test rows, standardised as on dev."""
    if member.head is None or member.standardize is None:
        raise ValueError(f"{member.name} is not a lent member")
    out = head_outputs(member, task, "test", evaluate)
    return {**out, "values": lent_probabilities(out["values"], member.standardize, task)}


def lent_members(pool: Pool, evaluate: SoupEvaluator) -> dict[str, list[Member]]:
    """``--cross-task``: {borrowing task: its lent members}, each run once on the task's dev rows; an
    EnsembleError saying which side is missing when there is nothing to lend."""
    lent = {task: [lend(m, task, evaluate) for m in lenders(pool, task)] for task in LENDERS if task in pool.tasks}
    if not any(lent.values()):
        why = [
            f"{head} members to the {task} pool, but "
            + (f"no member of {pool.studies} trains {task}" if task not in pool.tasks else
               f"every member of {pool.studies} that trains {head} trains {task} too (it is in that pool already)")
            for task, head in LENDERS.items()
        ]  # fmt: skip
        raise EnsembleError(f"--cross-task lends {'; '.join(why)}; add a study that trains {' or '.join(LENDERS.values())} alone")
    return lent
