"""Ray Tune's Optuna searcher and ASHA scheduler, adapted to keep the Optuna study truthful: the one
module of the project that reaches into library internals.

Written against ray 2.60.0 and optuna 5.0.0 (pyproject.toml pins both). It uses:
  optuna   Study._storage, Study._study_id       (no public way to address a trial by number)
           RDBStorage.engine, table study_user_attributes (study_id, key, value_json)   (no compare-and-set)
  ray      OptunaSearch._ot_study, ._ot_trials, ._completed_trials   (the searcher's trial table)
           SearchGenerator._finished, ._counter                      (reset on restore)
           ConcurrencyLimiter.live_trials, .num_unfinished_live_trials   (set from Ray's trial list on restore)
           Searcher.CKPT_FILE_TMPL, SearchGenerator.CKPT_FILE_TMPL   (the searcher checkpoint's files)
           ray.tune.impl.tuner_internal._TUNER_PKL                   (the Tuner's file)
           ASHAScheduler._brackets, bracket._rungs, ._metric_op      (the rung records ASHA ranks by)
tests/test_adapters.py fails loudly when an upgrade removes or renames any of them.

RecordingOptunaSearch only samples; search.records.OptunaRecorder records results, stops and
errors. Resuming: Ray uploads its trial list and the searcher's checkpoint as separate files, in
parallel, so a driver killed mid-upload can leave either one the newer (or no searcher checkpoint
at all: search.tuner then starts a new Tuner instead of restoring). What Ray will continue is read
from its trial list (RAY_TRIALS). Any other trial still RUNNING in the storage was started after
that list was saved, or ended after it without Optuna hearing how; Ray will never continue it. Such
orphans are adopted: the searcher's next suggestions hand them out again (same number, params and
folder, so the trainer resumes from its checkpoint) before it asks Optuna for new trials. The trial
count and the concurrency limit are also taken from Ray's list, not from the saved search generator.
The sampler draws trial n from a stream seeded by (seed, n) (search.sampler), so no restored state
draws an earlier trial's params again. No trial is lost or duplicated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickletools
import threading
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState
from ray.tune.impl.tuner_internal import _TUNER_PKL
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from search import storage as names
from search.sampler import TrialSeededTPE
from search.storage import open_storage
from search.timebudget import TIME_BUDGET

logger = logging.getLogger(__name__)

# Config key through which the searcher tells the trainable its Optuna trial number.
TRIAL_NUMBER_KEY = "optuna_trial_number"
# Set once no more trials will start in this run (the budget spent, or no trial fits the time budget
# any more: that only gets truer as time passes); search.spare then shares out the idle
# cores. Process-wide, because Ray restores the searcher and the callbacks from its saved experiment.
SEARCH_FINISHED = threading.Event()


@dataclasses.dataclass
class RayTrialList:
    """Ray's saved trial list, read by search.tuner before Tuner.restore: the searcher's checkpoint (the
    searcher, the concurrency limiter, the search generator) may be older or newer than it, so the
    restore takes from it which trials Ray continues and how many Ray holds."""

    count: int = 0  # Ray trials in the list, ended or not
    resumed: dict[str, int] = dataclasses.field(default_factory=dict)  # Ray trial id -> Optuna number, those Ray continues

    def update(self, count: int, resumed: dict[str, int]) -> None:
        self.count, self.resumed = count, dict(resumed)


# Process-wide, because Ray unpickles the searcher and the search generator inside Tuner.fit.
RAY_TRIALS = RayTrialList()
ORPHAN_ERROR = "interrupted: the driver stopped before Ray's experiment checkpoint recorded this trial, so Ray does not resume it"


def artifact_dir_for(artifacts_root: str | Path, number: int) -> Path:
    return Path(artifacts_root) / str(number)


def optuna_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage behind ``study``: Optuna has no public accessor (a Study keeps it as ``_storage``)."""
    return study._storage


def storage_trial_id(study: optuna.Study, number: int) -> int:
    """The storage's id of trial ``number`` (Optuna has no public lookup; ``_study_id`` is private)."""
    return optuna_storage(study).get_trial_id_from_study_id_trial_number(study._study_id, number)


# Optuna's table of study user attributes (optuna/storages/_rdb/models.py), for a compare-and-set.
STUDY_USER_ATTRS = sqlalchemy.table(
    "study_user_attributes", sqlalchemy.column("study_id"), sqlalchemy.column("key"), sqlalchemy.column("value_json")
)


def _study_attr_row(storage: optuna.storages.RDBStorage, study_name: str, key: str) -> Any:
    study_id = storage.get_study_id_from_name(study_name)
    return (STUDY_USER_ATTRS.c.study_id == study_id) & (STUDY_USER_ATTRS.c.key == key)


def read_study_user_attr(storage: optuna.storages.RDBStorage, study_name: str, key: str) -> str | None:
    """The stored JSON text of a study user attribute (None when absent), as ``swap_study_user_attr`` compares it."""
    where = _study_attr_row(storage, study_name, key)
    with storage.engine.connect() as connection:
        return connection.execute(sqlalchemy.select(STUDY_USER_ATTRS.c.value_json).where(where)).scalar_one_or_none()


def swap_study_user_attr(
    storage: optuna.storages.RDBStorage, study_name: str, key: str, expected: str | None, value: Any
) -> str | None:
    """Set a study user attribute to ``value`` only if its stored JSON text is still ``expected`` (None:
    absent), in one transaction of the database; the new text, or None when another writer came first."""
    text, where = json.dumps(value), _study_attr_row(storage, study_name, key)
    try:
        with storage.engine.begin() as connection:
            if expected is None:  # the unique (study_id, key) makes a second insert fail
                study_id = storage.get_study_id_from_name(study_name)
                connection.execute(sqlalchemy.insert(STUDY_USER_ATTRS).values(study_id=study_id, key=key, value_json=text))
                return text
            update = sqlalchemy.update(STUDY_USER_ATTRS).where(where & (STUDY_USER_ATTRS.c.value_json == expected))
            return text if connection.execute(update.values(value_json=text)).rowcount == 1 else None
    except sqlalchemy.exc.IntegrityError:
        return None


# The searcher checkpoint's files in Ray's experiment folder (glob patterns): the search generator's
# state and the searcher's pickle, one of each per driver session.
SEARCHER_CHECKPOINT_FILES = tuple(template.format("*") for template in (SearchGenerator.CKPT_FILE_TMPL, Searcher.CKPT_FILE_TMPL))


def ray_checkpoint_whole(experiment: Path) -> bool:
    """Whether Ray's experiment folder holds its Tuner and a whole checkpoint of the searcher: both of
    the searcher's files (the search generator's state and the searcher's), the newest of each, and
    tuner.pkl complete. Without the searcher's files Ray's restore silently keeps the searcher it was
    created with; with a file cut short (a driver killed while Ray copied it in place), it fails, and
    would at every resume."""
    newest = [Path(experiment) / _TUNER_PKL]
    for pattern in SEARCHER_CHECKPOINT_FILES:
        saved = sorted(Path(experiment).glob(pattern))
        if not saved:
            return False
        newest.append(saved[-1])  # the newest by name, as Ray picks it
    return all(complete_pickle(path) for path in newest)


def complete_pickle(path: Path) -> bool:
    """Whether the file is a whole pickle, read opcode by opcode up to its STOP without building anything."""
    try:
        for _ in pickletools.genops(path.read_bytes()):
            pass
    except (ValueError, OSError):
        return False
    return True


def suggest(trial: optuna.trial.Trial, name: str, distribution: optuna.distributions.BaseDistribution) -> Any:
    """``trial.suggest_*`` for a distribution object (Optuna's public API takes its fields)."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    if isinstance(distribution, optuna.distributions.FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    raise TypeError(f"{name}: unsupported distribution {distribution!r}")


def ended_trials(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that ended and count toward the budget: not those failed only because an interrupted
    driver left them RUNNING (ORPHAN_ERROR)."""
    return [t for t in trials if t.state.is_finished() and not is_orphan_failure(t)]


def is_orphan_failure(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.user_attrs.get(names.TRIAL_ERROR) == ORPHAN_ERROR


def fail_trial(study: optuna.Study, number: int, message: str) -> None:
    """Mark a RUNNING trial FAIL with its error message as user attr."""
    optuna_storage(study).set_trial_user_attr(storage_trial_id(study, number), names.TRIAL_ERROR, message)
    study.tell(number, state=TrialState.FAIL)


def fail_running_trials(study: optuna.Study, keep: set[int] = frozenset(), message: str = ORPHAN_ERROR) -> list[int]:
    """Mark FAIL every RUNNING trial whose number is not in ``keep``; returns their numbers."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.number not in keep:
            fail_trial(study, trial.number, message)
            failed.append(trial.number)
    if failed:
        logger.warning("marked FAIL the Optuna trials %s left RUNNING by an interrupted run", failed)
    return failed


class RecordingOptunaSearch(OptunaSearch):
    """OptunaSearch that only samples; ``OptunaRecorder`` records results, stops and errors.

    ``suggest`` adds the Optuna trial number to the config and writes the artifact location and
    Ray trial id as user attrs at once, so that the dashboard shows where a running trial writes.
    """

    # Defaults for a searcher that Ray pickled before these attributes existed (an older run resumed).
    _adoptable: list[int] = []  # empty, so never popped: __init__ and restore assign their own lists
    _sampler_seed, _startup_trials, _max_trials = 0, 10, None
    _distributions: dict = {}

    def __init__(
        self,
        *args: Any,
        artifacts_root: str | Path,
        adopt: list[int] = (),
        sampler_seed: int = 0,
        startup_trials: int = 10,
        max_trials: int | None = None,
        **kwargs: Any,
    ) -> None:
        self._artifacts_root = str(artifacts_root)
        self._adoptable = list(adopt)  # Optuna numbers of RUNNING trials to hand out before asking new ones
        self._sampler_seed, self._startup_trials = sampler_seed, startup_trials  # the sampler a restore installs
        # The budget, counted in Optuna: Ray's own count restarts from its last experiment checkpoint,
        # which may predate trials that ran (and ended) before a driver was killed.
        self._max_trials = max_trials
        self._distributions = dict(kwargs.get("space") or {})  # to complete the params of an adopted trial
        super().__init__(*args, sampler=TrialSeededTPE(sampler_seed, startup_trials), **kwargs)

    def suggest(self, trial_id: str) -> dict | str | None:
        if not TIME_BUDGET.may_start_trial():
            # No trial can get far enough in time (the start rule): wait for the running ones to end, then
            # end the run (Ray would otherwise block for 10 minutes asking for a trial). A restored run may
            # start trials again.
            SEARCH_FINISHED.set()
            return None if TIME_BUDGET.running else Searcher.FINISHED
        if self._adoptable:
            params = self._adopt(trial_id, self._adoptable.pop(0))
        elif trial_id not in self._ot_trials and self._budget_spent():
            return Searcher.FINISHED
        else:
            params = super().suggest(trial_id)
        if params is None:
            return None
        TIME_BUDGET.started(trial_id)
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr(names.TRIAL_ARTIFACT_DIR, str(artifact_dir_for(self._artifacts_root, ot_trial.number)))
        ot_trial.set_user_attr(names.TRIAL_RAY_ID, trial_id)
        return {**params, TRIAL_NUMBER_KEY: ot_trial.number}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # OptunaRecorder.on_trial_result records every epoch; here only the time budget's bookkeeping
        # (a trial Ray restored reports without having been suggested by this driver).
        TIME_BUDGET.started(trial_id)
        TIME_BUDGET.observe(result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._completed_trials.add(trial_id)  # OptunaRecorder tells Optuna the outcome
        TIME_BUDGET.ended(trial_id)

    def _budget_spent(self) -> bool:
        if self._max_trials is None:
            return False
        trials = self._ot_study.get_trials(deepcopy=False)
        counted = [t for t in trials if t.state != TrialState.WAITING and not is_orphan_failure(t)]  # RUNNING too
        return len(counted) >= self._max_trials

    def _adopt(self, trial_id: str, number: int) -> dict:
        """Hand out the RUNNING Optuna trial ``number`` again, under the Ray trial ``trial_id``."""
        # Optuna's cached storage writes a param only for a trial it has read: a new driver's has read none.
        self._ot_study.get_trials(deepcopy=False)
        ot_trial = optuna.trial.Trial(self._ot_study, storage_trial_id(self._ot_study, number))
        # A driver killed in the middle of Optuna's ask left some (or all) params unset: re-ask them now,
        # sampled or taken from the queued start point's fixed params.
        for name, distribution in self._distributions.items():
            if name not in ot_trial.params:
                suggest(ot_trial, name, distribution)
        self._ot_trials[trial_id] = ot_trial
        logger.warning(
            "Optuna trial %d was left running by an interrupted driver; it continues as Ray trial %s", number, trial_id
        )
        return dict(ot_trial.params)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        # Every RUNNING trial that Ray will not continue is adopted: those asked after Ray saved its trial
        # list, and those that the list says ended although Optuna never heard how (the driver died
        # between the two). Their folders hold their checkpoints, so the trainer resumes them (a trial
        # whose epochs were all done only writes what is missing) and the recorder then tells Optuna the truth.
        trials = self._ot_study.get_trials(deepcopy=False)
        resumed = set(RAY_TRIALS.resumed.values())
        self._adoptable = [t.number for t in trials if t.state == TrialState.RUNNING and t.number not in resumed]
        # A searcher Ray pickled before the sampler was seeded per trial number kept one random stream.
        self._ot_study.sampler = TrialSeededTPE(self._sampler_seed, self._startup_trials)


class ResumableASHA(ASHAScheduler):
    """ASHA whose rung records survive an interrupted driver.

    Ray checkpoints the searcher but not the scheduler, so after Tuner.restore a plain ASHA has
    forgotten every value it ranked trials by. This one, before its first trial is added, refills
    its rungs from the Optuna study: a trial's value at a rung is the metric at the first epoch at
    or past the rung's milestone, exactly what ASHA itself records, keyed by the Ray trial id.
    """

    def __init__(self, *, storage_url: str, study_name: str, protected_trials: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._storage_url, self._study_name, self._seeded = storage_url, study_name, False
        # Trials 0 .. protected_trials - 1 (the study's start points: the usual recipe, the baseline of
        # every ensemble) always train to the end; their values still rank the others at each rung.
        self._protected_trials = protected_trials

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        number = trial.config.get(TRIAL_NUMBER_KEY)
        unfinished = result.get(self._time_attr, 0) < self._max_t
        if action == self.STOP and unfinished and number is not None and number < self._protected_trials:
            self._num_stopped -= 1
            return self.CONTINUE
        return action

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if not self._seeded:
            self._seeded = True
            self.seed_rungs(optuna.load_study(study_name=self._study_name, storage=open_storage(self._storage_url)))
        super().on_trial_add(tune_controller, trial)

    def seed_rungs(self, study: optuna.Study) -> None:
        for trial in study.get_trials(deepcopy=False):
            ray_id, values = trial.user_attrs.get(names.TRIAL_RAY_ID), trial.intermediate_values
            if ray_id is None or not values:
                continue
            for bracket in self._brackets:
                for milestone, recorded in bracket._rungs:
                    reached = [epoch for epoch in values if epoch >= milestone]
                    if reached and math.isfinite(values[min(reached)]):
                        recorded[ray_id] = self._metric_op * values[min(reached)]


class ResumableSearchGenerator(SearchGenerator):
    """Ray's SearchGenerator, but a restored one may hand out trials again.

    Ray saves the generator's ``_finished`` flag, set once the searcher said FINISHED: a run that its
    time budget ended would then resume with no trial left to start. Our searcher says FINISHED again
    at once when the study already holds its trial budget, so forgetting the flag loses nothing. The
    saved trial count and the concurrency limiter's live trials are replaced by Ray's trial list's
    (RAY_TRIALS): saved newer than the list, they count a trial that Ray lost (the limiter would then
    wait for it forever, and the count could end the search before it is adopted); saved older, the
    limiter never tells the searcher that a trial Ray continued has ended."""

    def set_state(self, state: dict) -> None:
        # Ray calls this after the wrappers' set_state and the searcher's restore.
        super().set_state(state)
        self._finished = False
        self._counter = RAY_TRIALS.count
        if isinstance(self.searcher, ConcurrencyLimiter):
            self.searcher.live_trials = set(RAY_TRIALS.resumed)
            self.searcher.num_unfinished_live_trials = len(RAY_TRIALS.resumed)

    def is_finished(self) -> bool:
        # Asked by Ray's loop before each next_trial; a restored run whose count already reached
        # num_samples never calls next_trial again, so this is where the end of the search is seen.
        finished = super().is_finished()  # the searcher said FINISHED, or Ray's count reached num_samples
        if finished:
            SEARCH_FINISHED.set()
        return finished
