"""Ray's side of a study run: start or join Ray, record the study in Optuna, hold its lease, then
restore Ray's experiment or build a new Tuner (searcher, scheduler, recorder) and run it to its end.

The decisions before this (start, resume, refuse) are search/tune.py's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from data.atomic import atomic_write_text
from search import storage as names
from search.adapters import (
    RAY_TRIALS,
    SEARCH_FINISHED,
    TRIAL_NUMBER_KEY,
    RecordingOptunaSearch,
    ResumableASHA,
    ResumableSearchGenerator,
    ended_trials,
    fail_running_trials,
    ray_checkpoint_whole,
)
from search.cluster import ClusterError, check_resources, join_error, prepare_token_auth
from search.lease import DriverLease, LeaseError
from search.options import SearchOptions, command_line
from search.paths import EXPERIMENT_NAME, StudyPaths
from search.records import STUDY_STOP, OptunaRecorder, StudyStop
from search.spare import SpareCores
from search.spec import OPTUNA_DIRECTION, RAY_MODE, Budget, StudySpec
from search.storage import PROJECT_ROOT, StorageError, describe_error, open_storage, storage_failure
from search.timebudget import TIME_BUDGET
from search.trial import TrialJob, run_trial, trial_dirname

# How long a driver joining a cluster (--address) waits for a node large enough for one trial.
CLUSTER_WAIT_S = 60


def prepare_optuna_study(study: StudySpec, url: str, paths: StudyPaths, options: SearchOptions) -> optuna.Study:
    """Write the Optuna study's attributes; queue the start points of a study without trials. Only under
    the study's lease: two drivers starting it at once would queue them twice."""
    ot_study = optuna.load_study(study_name=study.name, storage=open_storage(url))
    attrs = {
        names.STUDY_METRIC: study.metric,
        names.STUDY_TASKS: list(study.tasks),
        names.STUDY_FILE: str(study.path),
        names.STUDY_MODEL_PATH: study.fixed.get("model_path"),
        "results_dir": str(paths.root),
        "budget": dict(study.budget.__dict__),
    }
    for key, value in attrs.items():
        ot_study.set_user_attr(key, value)
    if not options.resume:
        ot_study.set_user_attr("early_stopping", options.early_stopping)
    if not ot_study.get_trials(deepcopy=False):
        for point in study.start_points:
            ot_study.enqueue_trial(point)
    return ot_study


def run_on_ray(study: StudySpec, options: SearchOptions, paths: StudyPaths, data_dir: Path) -> tuple[Any, StudyStop]:
    """Start or join Ray, check that a trial fits, record the study, hold its lease and run the trials."""
    import ray

    start_ray(options, paths)
    try:
        # After ray.init, which installs its own SIGTERM handler (a stack dump, then exit 15).
        with sigterm_stops_like_ctrl_c():
            # Before any record is written: a trial that no node can hold would wait forever.
            wait_for_resources(study.budget, ray.nodes, CLUSTER_WAIT_S if options.address else 0)
            paths.root.mkdir(parents=True, exist_ok=True)
            if not paths.snapshot.is_file():
                atomic_write_text(paths.snapshot, study.path.read_text(encoding="utf-8"))
            storage = open_storage(options.storage)
            optuna.create_study(study_name=study.name, storage=storage, direction=OPTUNA_DIRECTION, load_if_exists=True)
            with DriverLease(study.name, storage) as lease, storage_failures_in_one_line(options):
                prepare_optuna_study(study, options.storage, paths, options)
                grid, stop = fit(study, options, paths, data_dir)
            if lease.lost:  # its heartbeat stopped fit() as Ctrl-C would: the run is the other driver's now
                raise LeaseError(
                    f"study {study.name!r}: another driver took it over while this one was stalled (see its output); "
                    "this one stopped and leaves the run, and its records, to it"
                )
    finally:
        ray.shutdown()
    return grid, stop


def fit(study: StudySpec, options: SearchOptions, paths: StudyPaths, data_dir: Path) -> tuple[Any, StudyStop]:
    """Restore Ray's experiment when it saved one, else start a new Tuner; run it to its end."""
    from ray import tune

    ot_study = optuna.load_study(study_name=study.name, storage=open_storage(options.storage))
    trials = ot_study.get_trials(deepcopy=False)
    ended = frozenset(t.number for t in trials if t.state.is_finished())
    job = TrialJob(
        study=study,
        artifacts_root=str(paths.trials),
        data_dir=str(data_dir),
        ended_trials=ended,
        deadline=TIME_BUDGET.deadline,
        threads_file=str(paths.threads) if shares_spare_cores(study.budget, options) else None,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), trial_resources(study.budget))
    STUDY_STOP.reset()
    SEARCH_FINISHED.clear()
    saved = saved_ray_trials(paths.experiment) if options.resume else None
    if saved is not None:
        print(f"Resuming {paths.experiment}")
        RAY_TRIALS.update(*saved)
        tuner = tune.Tuner.restore(str(paths.experiment), trainable=trainable, resume_unfinished=True, resume_errored=False)
        return tuner.fit(), STUDY_STOP
    # Nothing of Ray's to continue (a new run, or a driver killed before Ray saved its experiment whole):
    # the trials left RUNNING in Optuna are adopted by the new Tuner, in order, with their params.
    if paths.experiment.exists():
        shutil.rmtree(paths.experiment)
    adopt = [t.number for t in trials if t.state == TrialState.RUNNING]
    remaining = study.budget.trials - len(ended_trials(trials))
    if remaining <= 0:
        fail_running_trials(ot_study)
        return [], STUDY_STOP
    tuner = new_tuner(study, options, paths, trainable, adopt=adopt)
    return tuner.fit(), STUDY_STOP


def shares_spare_cores(budget: Budget, options: SearchOptions) -> bool:
    """Whether idle cores go to running trials (search.spare): CPU trials on a local Ray only (on a
    cluster the driver does not see the other nodes' free cores)."""
    return not options.address and budget.gpus_per_trial == 0


def trial_resources(budget: Budget) -> dict[str, float]:
    """What Ray reserves for one trial. A fraction of a GPU is a share: trials with 0.25 each run
    four to a GPU (multitask-gpu, whose 22M-parameter trials leave a GPU mostly idle alone)."""
    return {"cpu": budget.cpus_per_trial, "gpu": budget.gpus_per_trial}


def wait_for_resources(budget: Budget, nodes: Any, seconds: float) -> None:
    """Return once a node of the cluster can hold one trial; ClusterError after ``seconds`` (nodes of
    a cluster may still be joining, or starting on demand; a local cluster is what it is: 0)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            check_resources(budget.cpus_per_trial, budget.gpus_per_trial, nodes())
            return
        except ClusterError as error:
            if time.monotonic() >= deadline:
                raise ClusterError(f"{error}{f' (waited {seconds:.0f} s for one to join)' if seconds else ''}") from None
        time.sleep(2)


def saved_ray_trials(experiment: Path) -> tuple[int, dict[str, int]] | None:
    """How many trials Ray's saved experiment holds, and the Ray id and Optuna number of each it would
    continue; None when it saved none that can be restored whole:
    - tuner.pkl alone (a driver killed in its first seconds) restores an experiment that runs one trial
      and never finishes;
    - a state without trials (a time budget that let none start) fails Ray's restore (IndexError in
      _restore_trials), after which it restarts the experiment with the searcher's finished state;
    - a trial list without the searcher's checkpoint, or with a file cut short (a driver killed while
      Ray copied them), makes Ray keep the searcher it was created with (its table of trials empty) or
      fail at every resume (adapters.ray_checkpoint_whole)."""
    from ray import tune
    from ray.tune.experiment import Trial

    if not ray_checkpoint_whole(experiment):  # tuner.pkl among them: what Tuner.can_restore looks for
        return None
    try:
        trials = tune.ExperimentAnalysis(str(experiment)).trials
    except (ValueError, FileNotFoundError):
        return None
    if not trials:
        return None
    unfinished = [t for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]
    return len(trials), {t.trial_id: t.config[TRIAL_NUMBER_KEY] for t in unfinished if TRIAL_NUMBER_KEY in t.config}


@contextlib.contextmanager
def storage_failures_in_one_line(options: SearchOptions) -> Any:
    """A database that fails mid-run (Ray Tune wraps the error in a TuneError) becomes one StorageError
    line, password masked, with the command that resumes the study once the database is back."""
    try:
        yield
    except Exception as error:
        lost = storage_failure(error)
        if lost is None:
            raise
        raise StorageError(
            f"the Optuna storage failed during the run: {describe_error(options.storage, lost)}. "
            f"Once it works again: {command_line(options, '--resume')}"
        ) from None


@contextlib.contextmanager
def sigterm_stops_like_ctrl_c() -> Any:
    """SIGTERM (what job schedulers and `kill` send) stops the run as gracefully as Ctrl-C: while Tune
    runs, its handler saves the experiment; before, a KeyboardInterrupt still shuts Ray down."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: not set from Python


def start_ray(options: SearchOptions, paths: StudyPaths) -> None:
    """Connect to the cluster at --address, or start a local one whose files stay under the results folder."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A failed trial's traceback stays in its Ray folder (error.txt); the driver prints the one-line
    # error that Optuna records, in the summary, instead of a screen of traceback per trial.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    prepare_token_auth(options.address)  # effective only when Ray was not imported yet (run_search.py sees to it)
    import ray

    if options.address:
        try:
            ray.init(address=options.address)
        except Exception as error:  # Ray raises ConnectionError, RuntimeError or AuthenticationError
            raise join_error(options.address, error) from None
        return
    # Workers must import this project whether or not it is pip-installed.
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PROJECT_ROOT) not in python_path:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *python_path])
    temp_dir = paths.ray_temp_dir()
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=options.num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=str(temp_dir))


def new_tuner(study: StudySpec, options: SearchOptions, paths: StudyPaths, trainable: Any, adopt: list[int]) -> Any:
    """A Tuner: TPE sampling recorded in Optuna, ASHA (or no early stopping), at most max_concurrent trials.

    ``adopt``: Optuna trials left RUNNING by a driver killed before Ray saved its experiment whole; they
    run first, with their own params and folders."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    searcher = RecordingOptunaSearch(
        space=study.distributions(),
        metric=study.metric,
        mode=RAY_MODE,
        study_name=study.name,
        storage=open_storage(options.storage),
        artifacts_root=paths.trials,
        adopt=adopt,
        sampler_seed=study.budget.seed,
        startup_trials=study.budget.startup_trials,
        max_trials=study.budget.trials,
    )
    scheduler = (
        ResumableASHA(
            storage_url=options.storage,
            study_name=study.name,
            protected_trials=len(study.start_points),
            time_attr="epoch",
            metric=study.metric,
            mode=RAY_MODE,
            max_t=study.budget.max_epochs,
            grace_period=study.budget.grace_period,
            reduction_factor=study.budget.reduction_factor,
        )
        if options.early_stopping
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ResumableSearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=study.budget.max_concurrent)),
            scheduler=scheduler,
            # The searcher ends the run once the study holds the budget (trials of an earlier driver included).
            num_samples=study.budget.trials,
            # A new process per trial. Reusing one makes Ray wait 2 s (TUNE_FUNCTION_THREAD_TIMEOUT_S) for
            # the last trial's thread to end, then mark the new trial ERROR without telling the searcher
            # or the callbacks: Optuna keeps it RUNNING and the study waits forever (a trial stopped by
            # ASHA, or any trial on a loaded machine, ends slower; tests/test_search_trial_handover.py).
            # A fresh process costs its imports, a few seconds a trial, and returns all its memory.
            reuse_actors=False,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=str(paths.root),
            callbacks=[OptunaRecorder(options.storage, study.name, study.metric, study.budget.max_epochs)]
            + ([SpareCores(paths.threads, study.budget)] if shares_spare_cores(study.budget, options) else []),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )
