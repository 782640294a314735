"""The study's sampler: Optuna's TPE, whose random numbers for trial n come from the pair (seed, n).

A single random stream would make a trial's params depend on how many draws came before it in this
process. A resumed driver cannot know that count for sure: Ray saves the searcher's state and its
trial list as separate files, uploaded in parallel, so a driver killed mid-upload leaves a searcher
state older than the trials (or none at all, and Ray then silently keeps the searcher it was created
with). Replaying such a state draws an earlier trial's params again. Seeded by trial number, a random
start-up trial draws the same params however many drivers asked before it (a later one also depends
on which trials had ended, as TPE does), and no two numbers share a stream (32-bit seeds mixed by
numpy's SeedSequence; nor do trial n of one seed and trial n + 1 of the next, as seed + n would).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState


def trial_seed(seed: int, number: int) -> int:
    """Trial ``number``'s seed: numpy's SeedSequence mixes the pair, so nearby pairs give unrelated streams."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """``TPESampler(seed=trial_seed(seed, trial.number), n_startup_trials=...)`` for each trial: the first
    ``n_startup_trials`` sample at random, the later ones by TPE over the ended trials, as Optuna's own."""

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self._seed, self._n_startup_trials = seed, n_startup_trials
        self._number: int | None = None  # the trial whose sampler is kept (a trial is asked at once)
        self._tpe: optuna.samplers.TPESampler | None = None

    def _for(self, trial: FrozenTrial) -> optuna.samplers.TPESampler:
        if trial.number != self._number or self._tpe is None:
            self._number = trial.number
            seed = trial_seed(self._seed, trial.number)
            self._tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self._n_startup_trials)
        return self._tpe

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with Ray's searcher checkpoint: the seed alone, no random state to replay.
        return {**self.__dict__, "_number": None, "_tpe": None}

    def reseed_rng(self) -> None:
        """Nothing to reseed: a trial's numbers are fixed by its number (Optuna calls this for n_jobs > 1)."""
