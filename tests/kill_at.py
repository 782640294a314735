"""``python tests/kill_at.py POINT run_search.py-args...``: run_search.py whose driver SIGKILLs itself the
first time it reaches POINT, a moment too short to hit by polling the storage from outside.

The points, in the order a trial passes them between being asked and its first recorded report:
  asking-start-point  Optuna's ask made the start point's trial RUNNING, no param written yet
  asking-sampled      the same for a sampled trial (number 1 or later)
  params-recorded     params written, the trial's artifact dir and Ray id not yet
  suggested           the searcher handed the config to Ray, which has not started the trial
  report-unrecorded   the first report reached the driver, Optuna has not recorded it
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import optuna

from search.adapters import RecordingOptunaSearch
from search.records import OptunaRecorder


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before(owner: type, name: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def kill_after_suggest() -> None:
    original = RecordingOptunaSearch.suggest

    def suggest(self: RecordingOptunaSearch, trial_id: str) -> Any:
        config = original(self, trial_id)
        if isinstance(config, dict):
            die()
        return config

    RecordingOptunaSearch.suggest = suggest


def trial_number(storage: optuna.storages.RDBStorage, trial_id: int, *args: Any) -> int:
    return storage.get_trial(trial_id).number


POINTS: dict[str, Callable[[], None]] = {
    "asking-start-point": lambda: kill_before(
        optuna.storages.RDBStorage, "_set_trial_param", lambda *a: trial_number(*a[:2]) == 0
    ),
    "asking-sampled": lambda: kill_before(optuna.storages.RDBStorage, "_set_trial_param", lambda *a: trial_number(*a[:2]) > 0),
    "params-recorded": lambda: kill_before(optuna.trial.Trial, "set_user_attr"),
    "suggested": kill_after_suggest,
    "report-unrecorded": lambda: kill_before(OptunaRecorder, "on_trial_result"),
}

if __name__ == "__main__":
    POINTS[sys.argv[1]]()
    import run_search

    sys.exit(run_search.main(sys.argv[2:]))
