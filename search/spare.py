"""Cores that no trial can claim go to the trials still running.

A study on a local machine reserves ``cpus_per_trial`` cores per trial and runs ``max_concurrent`` at
once. At its end, once the searcher will start no more trials, the last trial runs alone and the
other trial's cores sit idle (on 2 cores: the last trial of sts-diverse, about two minutes on one
thread). ``SpareCores``, a Ray Tune callback on the driver, writes how many torch threads each running
trial may use to the study's ``threads.json`` (search.paths owns the name); each trial's trainer reads
it every few seconds (``threads_for``) and changes its thread count in place.

Cores are spare when the study can never use them for a new trial: once the searcher has finished
(its budget spent, or no trial fits the time budget), every core beyond the running trials'
reservations; before that, the cores beyond ``max_concurrent`` trials' reservations (a study run
with fewer trials at once than the machine holds). Only for a local Ray cluster: on a cluster the
trials run on other nodes, whose free cores the driver does not see.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray import tune

from data.atomic import atomic_write_text
from search.adapters import SEARCH_FINISHED, TRIAL_NUMBER_KEY
from search.spec import Budget

logger = logging.getLogger(__name__)


def trial_threads(budget: Budget) -> int:
    """The torch threads of a trial with no share: one per CPU it reserves (at least one), so that
    concurrent trials do not fight over the cores."""
    return max(1, int(budget.cpus_per_trial))


def share_cores(
    total: int, per_trial: int, max_concurrent: int, running: list[int], finished: bool, pending: int = 0
) -> dict[int, int]:
    """Threads per running trial (by Optuna number), spare cores spread evenly; {} when none is spare.
    ``pending`` trials (created, their actor not started yet) keep their reservation."""
    started = len(running) + pending
    reserved = per_trial * (started if finished else max(max_concurrent, started))
    spare = total - reserved
    if spare <= 0 or not running:
        return {}
    each, extra = divmod(spare, len(running))
    return {number: per_trial + each + (1 if i < extra else 0) for i, number in enumerate(sorted(running))}


def threads_for(path: str | Path, number: int, default: int) -> int:
    """The threads trial ``number`` may use now: its share in ``path``, else ``default``."""
    try:
        shares = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default  # no file yet (no spare cores so far), or one from an older layout
    share = shares.get(str(number)) if isinstance(shares, dict) else None
    return share if isinstance(share, int) and share >= default else default


class SpareCores(tune.Callback):
    """Writes ``threads.json`` whenever the share of spare cores among the running trials changes."""

    def __init__(self, path: str | Path, budget: Budget) -> None:
        self.path, self.per_trial, self.max_concurrent = Path(path), trial_threads(budget), budget.max_concurrent
        self.total = 0
        self._written: dict[int, int] | None = None

    def setup(self, **info: Any) -> None:
        # Also on a restored run, whose Ray may have other cores than the first run's (--num-cpus).
        import ray

        self.total = int(ray.cluster_resources().get("CPU", 0))
        self._written = None
        self._write({})  # a share left by an earlier run of the study does not hold for this one

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        running = [t.config[TRIAL_NUMBER_KEY] for t in trials if t.status == "RUNNING" and TRIAL_NUMBER_KEY in t.config]
        pending = sum(t.status == "PENDING" for t in trials)
        shares = share_cores(self.total, self.per_trial, self.max_concurrent, running, SEARCH_FINISHED.is_set(), pending)
        self._write(shares)

    def _write(self, shares: dict[int, int]) -> None:
        if shares == self._written:
            return
        try:
            atomic_write_text(self.path, json.dumps({str(k): v for k, v in shares.items()}) + "\n")
        except OSError as error:  # only a speed-up: the trials keep their own threads
            logger.warning("cannot write %s (%s); the running trials keep their threads", self.path, error)
        self._written = shares
