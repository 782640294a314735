"""Keeping the Optuna study truthful while Ray Tune runs the trials.

Ray's ``OptunaSearch`` alone gets several things wrong: it never reports the result on which a
trial stops (so the last epoch is missing from the intermediate values), it records trials that
ASHA stopped as COMPLETE with their early value, and it marks failed trials FAIL without saying
why. Here the searcher only samples (``ask``), and a Tune callback on the driver writes everything
else, because callbacks see every result (the stopping one too), every completion and every error:

- every per-epoch dev value is an intermediate value at step = epoch;
- a trial that ran all ``max_epochs`` is COMPLETE, with value = its best epoch's dev metric (the
  epoch whose weights the trainer kept); one that ASHA stopped earlier is PRUNED (Optuna then takes
  its last intermediate value as the value) with user attr ``early_stopped`` True;
- a trial that raised (NaN loss included) is FAIL with user attr ``error`` holding the message;
- user attrs ``artifact_dir``, ``epochs_run``, ``best_epoch``, ``best_value``, ``ray_trial_id``, and
  ``stopped_for_time`` for a trial that stopped early because the time budget had no room for its next
  epoch (search.timebudget; PRUNED like one that ASHA stopped).

The searcher and the scheduler that go with it, and everything that touches Ray's or Optuna's
internals, are in search/adapters.py.

A trial that cannot write its files (a full disk) fails with DiskFullError; the recorder then stops
the whole study through STUDY_STOP, since every later trial would fail the same way.
"""

from __future__ import annotations

import _thread
import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any

import optuna
import ray.cloudpickle as cloudpickle
from optuna.trial import TrialState
from ray import tune

from search import storage as names
from search.adapters import TRIAL_NUMBER_KEY, fail_trial, optuna_storage, storage_trial_id
from search.storage import open_storage

logger = logging.getLogger(__name__)


class DiskFullError(RuntimeError):
    """A trial could not write its files: the device is full (or the quota spent)."""


class StudyStop(threading.Event):
    """Set, with a reason, when a trial's failure means that every other trial would fail the same way."""

    reason = ""

    def reset(self) -> None:
        self.reason = ""
        self.clear()

    def stop(self, reason: str) -> None:
        if self.is_set():
            return
        self.reason = reason
        self.set()
        # Ray Tune's own Ctrl-C path: it saves the experiment and ends fit() cleanly, resumable.
        _thread.interrupt_main(signal.SIGINT)


# Process-wide, because Ray restores the callbacks from its saved state: a new object could not reach them.
STUDY_STOP = StudyStop()


class OptunaRecorder(tune.Callback):
    """Writes per-epoch values, final states and errors of Ray trials into the Optuna study."""

    def __init__(self, storage_url: str, study_name: str, metric: str, max_epochs: int) -> None:
        self.storage_url, self.study_name, self.metric, self.max_epochs = storage_url, study_name, metric, max_epochs
        self._study: optuna.Study | None = None

    def __getstate__(self) -> dict:
        # Ray pickles callbacks into its experiment state; the open storage must not go with them.
        return {**self.__dict__, "_study": None}

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage_url))
        return self._study

    def _running_trial_id(self, trial: Any) -> tuple[int, int] | None:
        """(number, storage id) of the Optuna trial behind a Ray trial, or None when it is already finished."""
        number = trial.config.get(TRIAL_NUMBER_KEY)
        if number is None:
            return None
        storage = optuna_storage(self.study)
        trial_id = storage_trial_id(self.study, number)
        if storage.get_trial(trial_id).state != TrialState.RUNNING:
            # A trial that finished after Ray's last experiment checkpoint and was re-run on resume.
            logger.warning("Optuna trial %d is already finished; not recording Ray trial %s again", number, trial.trial_id)
            return None
        return number, trial_id

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        ids = self._running_trial_id(trial)
        if ids is None or "epoch" not in result or self.metric not in result:
            return
        _, trial_id = ids
        storage = optuna_storage(self.study)
        storage.set_trial_intermediate_value(trial_id, int(result["epoch"]), float(result[self.metric]))
        storage.set_trial_user_attr(trial_id, names.TRIAL_EPOCHS_RUN, int(result["epoch"]))
        storage.set_trial_user_attr(trial_id, names.TRIAL_RAY_ID, trial.trial_id)
        if result.get(names.TRIAL_STOPPED_FOR_TIME):
            storage.set_trial_user_attr(trial_id, names.TRIAL_STOPPED_FOR_TIME, True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ids = self._running_trial_id(trial)
        if ids is None:
            return
        number, trial_id = ids
        storage = optuna_storage(self.study)
        reported = storage.get_trial(trial_id).intermediate_values
        finite = {epoch: value for epoch, value in reported.items() if math.isfinite(value)}
        epochs_run = max(reported, default=0)
        storage.set_trial_user_attr(trial_id, names.TRIAL_EPOCHS_RUN, epochs_run)
        if not finite:
            problem = "no dev evaluation was reported" if not reported else f"the dev {self.metric} was never finite"
            fail_trial(self.study, number, f"{problem} (epochs run: {epochs_run})")
            return
        # The first best epoch, as the trainer keeps (it replaces its best only on a strict improvement).
        best_epoch = max(sorted(finite), key=lambda epoch: finite[epoch])
        early_stopped = epochs_run < self.max_epochs
        storage.set_trial_user_attr(trial_id, names.TRIAL_EARLY_STOPPED, early_stopped)
        storage.set_trial_user_attr(trial_id, names.TRIAL_BEST_EPOCH, best_epoch)
        storage.set_trial_user_attr(trial_id, names.TRIAL_BEST_VALUE, finite[best_epoch])
        if early_stopped:
            self.study.tell(number, state=TrialState.PRUNED)
        else:
            self.study.tell(number, finite[best_epoch], state=TrialState.COMPLETE)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ids = self._running_trial_id(trial)
        if ids is None:
            return
        number, trial_id = ids
        optuna_storage(self.study).set_trial_user_attr(trial_id, names.TRIAL_EARLY_STOPPED, False)
        message = error_message(trial)
        fail_trial(self.study, number, message)
        if message.startswith(f"{DiskFullError.__name__}:"):
            STUDY_STOP.stop(f"trial {number} could not write its files ({message}); every other trial would fail the same way")


def error_message(trial: Any) -> str:
    """'ExceptionType: message' of the exception that ended a Ray trial."""
    error = None
    path = trial.pickled_error_file  # written on the driver by Trial.handle_error just before this callback
    if path and Path(path).is_file():
        try:
            with open(path, "rb") as fp:
                error = cloudpickle.load(fp)
        except Exception:  # an unreadable error: fall back to the text trace
            error = None
    cause = getattr(error, "cause", None) or error
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    path = trial.error_file
    text = Path(path).read_text().strip() if path and Path(path).is_file() else ""
    return text.splitlines()[-1] if text else "the trial failed without an error message"
