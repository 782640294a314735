"""Run a study: Ray Tune schedules the trainer, Optuna (TPE) samples, ASHA stops the weak early.

Where a study's files live: search/paths.py. One trial: search/trial.py. The end-of-run report: search/summary.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from data.atomic import atomic_write_text
from data.files import DataError, load_examples, resolve_data_dir
from search import storage as names
from search.adapters import (
    ORPHAN_ERROR,
    TRIAL_NUMBER_KEY,
    RecordingOptunaSearch,
    ResumableASHA,
    fail_running_trials,
)
from search.cluster import ClusterError, check_resources, join_error, prepare_token_auth
from search.lease import DriverLease, LeaseError, current_holder, refuse_if_held
from search.paths import DEFAULT_RESULTS_DIR, EXPERIMENT_NAME, StudyPaths
from search.reaper import reaping
from search.records import STUDY_STOP, OptunaRecorder, StudyStop
from search.spec import OPTUNA_DIRECTION, RAY_MODE, Budget, StudyError, StudySpec
from search.storage import (
    DEFAULT_STORAGE_URL,
    PROJECT_ROOT,
    RESULTS_DIR_ENV,
    StorageError,
    describe_error,
    masked_url,
    open_storage,
    storage_failure,
    study_in_storage,
)
from search.study import load_spec
from search.summary import EXIT_INTERRUPTED, EXIT_NO_SUCCESS, EXIT_REFUSED, Outcome, best_ray_result, summarize
from search.trial import DISK_FULL_ERRNOS, TrialJob, run_trial, trial_dirname

# How long a driver joining a cluster (--address) waits for a node large enough for one trial.
CLUSTER_WAIT_S = 60


@dataclass
class SearchOptions:
    study: str = "sts"
    storage: str = DEFAULT_STORAGE_URL
    results_dir: Path | None = None  # default: $MINBERT_RESULTS, else <project>/results
    data_dir: str | None = None
    address: str | None = None
    num_cpus: int | None = None  # local cluster only; default: all cores
    trials: int | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    resume: bool = False
    fresh: bool = False
    name: str | None = None  # Optuna study and results folder name; default: the study file's name
    early_stopping: bool = True  # False: no ASHA, every trial runs max_epochs (to measure what ASHA saves)
    top: int = 5


def results_root(options: SearchOptions) -> Path:
    return Path(options.results_dir or os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR).resolve()


def run_search(options: SearchOptions) -> Outcome:
    """Start, resume or refuse a study run; see run_search.py for the command line."""
    if options.resume and options.fresh:
        raise StudyError("--resume and --fresh exclude each other")
    study = load_spec(options.study)
    if options.name:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", options.name):
            raise StudyError(f"--name {options.name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        study = dataclasses.replace(study, name=options.name)
    paths = StudyPaths(results_root(options) / study.name)
    url = masked_url(options.storage)
    # Reading never creates a SQLite file: a refused command leaves no empty database behind.
    in_storage = study_in_storage(study.name, options.storage)
    on_disk = paths.has_run()
    holder = (
        current_holder(optuna.load_study(study_name=study.name, storage=open_storage(options.storage))) if in_storage else None
    )

    if options.fresh and (in_storage or on_disk):
        if holder is not None:
            raise LeaseError(f"study {study.name!r} is being run by {holder.describe()}; refusing to delete it (--fresh)")
        check_data(study, options.data_dir)  # before deleting anything
        delete_study_run(study.name, url, paths, in_storage, options.storage)
        in_storage = on_disk = False
    if (in_storage or on_disk) and not options.resume:
        where = f"Optuna study {study.name!r} in {url}" if in_storage else f"results in {paths.root}"
        if paths.finished.is_file():
            print(f"Study {study.name!r} has already finished ({where}); showing its results.")
            print(f"  To start it over: {command_line(options, '--fresh')}  (deletes it first)")
            return summarize(study, options.storage, paths, options.top)
        if holder is not None:
            print(f"Study {study.name!r} is running now ({where}): {holder.describe()}.")
            return Outcome(EXIT_REFUSED)
        print(
            f"Study {study.name!r} already has an unfinished run ({where}).\n"
            f"  To continue it: {command_line(options, '--resume')}\n"
            f"  To delete it and start over: {command_line(options, '--fresh')}"
        )
        return Outcome(EXIT_REFUSED)
    if options.resume and not (in_storage or on_disk):
        print(f"Nothing to resume: no Optuna study {study.name!r} in {url} and no {paths.root}.")
        return Outcome(EXIT_REFUSED)
    if options.resume and paths.finished.is_file():
        print(f"Study {study.name!r} has already finished; nothing to resume.")
        return summarize(study, options.storage, paths, options.top)
    if options.resume and in_storage:
        refuse_if_held(optuna.load_study(study_name=study.name, storage=open_storage(options.storage)), "resume it")

    if options.resume and paths.snapshot.is_file():
        # Trials resume from checkpoints of the original settings; the copy taken at the start is the truth.
        if paths.snapshot.read_bytes() != study.path.read_bytes():
            print(f"Note: {study.path} changed since the run started; resuming with the copy in {paths.snapshot}.")
        study = dataclasses.replace(load_spec(paths.snapshot), name=study.name, path=study.path)
    if options.resume and in_storage:
        # The budget the run started with, command-line overrides included (Ray keeps its own copy of it).
        started = optuna.load_study(study_name=study.name, storage=open_storage(options.storage)).user_attrs.get("budget")
        if started:
            study = dataclasses.replace(study, budget=Budget(**started))
    if options.resume and (options.trials is not None or options.max_concurrent is not None):
        print("Note: --trials and --max-concurrent do not change a resumed run; it keeps the budget it started with.")
    study = study.with_budget(
        trials=None if options.resume else options.trials,
        max_concurrent=None if options.resume else options.max_concurrent,
        cpus_per_trial=options.cpus_per_trial,
        gpus_per_trial=options.gpus_per_trial,
    )
    data_dir = check_data(study, options.data_dir)
    return execute(study, options, paths, data_dir)


def command_line(options: SearchOptions, flag: str) -> str:
    """The run_search.py command for this study with ``flag``, repeating every option that says where
    things are (a resumed run must find the same storage, results, data and cluster). A password in
    the storage URL is masked: give it through ~/.pgpass or $PGPASSWORD instead."""
    words = ["python", "run_search.py", "--study", options.study, flag]
    if options.storage != DEFAULT_STORAGE_URL:
        words += ["--storage", masked_url(options.storage)]
    for option, value in (
        ("--results-dir", options.results_dir),
        ("--data-dir", options.data_dir),
        ("--address", options.address),
        ("--num-cpus", options.num_cpus),
        ("--name", options.name),
    ):
        if value is not None:
            words += [option, str(value)]
    return " ".join(shlex.quote(word) for word in words)


def delete_study_run(name: str, url: str, paths: StudyPaths, in_storage: bool, storage_url: str) -> None:
    if in_storage:
        storage = open_storage(storage_url)
        count = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
        print(f"--fresh: deleting Optuna study {name!r} ({count} trials) from {url}")
        optuna.delete_study(study_name=name, storage=storage)
    if paths.root.exists():
        print(f"--fresh: deleting {paths.root}")
        shutil.rmtree(paths.root)


def prepare_optuna_study(study: StudySpec, url: str, paths: StudyPaths, options: SearchOptions) -> optuna.Study:
    """Create (or load) the Optuna study with its attributes; queue the start points of a new one."""
    storage = open_storage(url)
    existing = study.name in optuna.study.get_all_study_names(storage)
    ot_study = optuna.create_study(study_name=study.name, storage=storage, direction=OPTUNA_DIRECTION, load_if_exists=True)
    attrs = {
        names.STUDY_METRIC: study.metric,
        names.STUDY_TASKS: list(study.tasks),
        names.STUDY_FILE: str(study.path),
        "results_dir": str(paths.root),
        "budget": dict(study.budget.__dict__),
    }
    for key, value in attrs.items():
        ot_study.set_user_attr(key, value)
    if not options.resume:
        ot_study.set_user_attr("early_stopping", options.early_stopping)
    if not existing:
        for point in study.start_points:
            ot_study.enqueue_trial(point)
    return ot_study


def execute(study: StudySpec, options: SearchOptions, paths: StudyPaths, data_dir: Path) -> Outcome:
    """Run (or restore) the Ray Tune experiment of a study to its end, an interruption or a full disk."""
    started = time.monotonic()
    # A local cluster's processes are this driver's: they must not outlive it, even after a SIGKILL.
    with contextlib.nullcontext() if options.address else reaping():
        grid, stop = run_on_ray(study, options, paths, data_dir)
    wall_seconds = time.monotonic() - started

    ot_study = optuna.load_study(study_name=study.name, storage=open_storage(options.storage))
    if stop.is_set():
        # The trials that were running ran on the same full disk: ended, so that a resume does not retry them.
        fail_running_trials(ot_study, message=f"interrupted: the study stopped because {stop.reason}")
        summarize(study, options.storage, paths, options.top)
        print(f"\nStopped: {stop.reason}.\n  Free some space, then continue with: {command_line(options, '--resume')}")
        return Outcome(EXIT_NO_SUCCESS, ot_study)
    if run_interrupted(ot_study, study.budget.trials):
        print(f"\nThe run was interrupted. Continue it with: {command_line(options, '--resume')}")
        return Outcome(EXIT_INTERRUPTED, ot_study)
    failed_in_ray = [r for r in grid if r.error is not None]
    record = {"ray_trials": len(grid), "errored": len(failed_in_ray), "last_session_wall_seconds": round(wall_seconds, 1)}
    atomic_write_text(paths.finished, json.dumps(record, indent=2))
    outcome = summarize(study, options.storage, paths, options.top)
    print(f"Wall time of this session: {wall_seconds / 60:.1f} min (Ray's start included)")
    # Cross-check with Ray's own records, errored trials left out (Ray's get_best_result can pick them).
    best = best_ray_result(grid, study.metric, RAY_MODE)
    best_number = None if best is None else best.config.get(TRIAL_NUMBER_KEY)
    if outcome.ranked and best_number != outcome.ranked[0].number:
        print(f"Note: by Ray's results the best non-errored trial is {best_number}, not {outcome.ranked[0].number}.")
    return outcome


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
            prepare_optuna_study(study, options.storage, paths, options)
            with DriverLease(study.name, open_storage(options.storage)), storage_failures_in_one_line(options):
                grid, stop = fit(study, options, paths, data_dir)
    finally:
        ray.shutdown()
    return grid, stop


def fit(study: StudySpec, options: SearchOptions, paths: StudyPaths, data_dir: Path) -> tuple[Any, StudyStop]:
    """Restore Ray's experiment when it saved one, else start a new Tuner; run it to its end."""
    from ray import tune

    ot_study = optuna.load_study(study_name=study.name, storage=open_storage(options.storage))
    trials = ot_study.get_trials(deepcopy=False)
    ended = frozenset(t.number for t in trials if t.state.is_finished())
    job = TrialJob(study=study, artifacts_root=str(paths.trials), data_dir=str(data_dir), ended_trials=ended)
    resources = {"cpu": study.budget.cpus_per_trial, "gpu": study.budget.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), resources)
    STUDY_STOP.reset()
    if options.resume and ray_experiment_saved(paths.experiment):
        print(f"Resuming {paths.experiment}")
        tuner = tune.Tuner.restore(str(paths.experiment), trainable=trainable, resume_unfinished=True, resume_errored=False)
        return tuner.fit(), STUDY_STOP
    # Nothing of Ray's to continue (a new run, or a driver killed before Ray saved its experiment):
    # the trials left RUNNING in Optuna are adopted by the new Tuner, in order, with their params.
    if paths.experiment.exists():
        shutil.rmtree(paths.experiment)
    adopt = [t.number for t in trials if t.state == TrialState.RUNNING]
    counted = [t for t in trials if t.state.is_finished() and t.user_attrs.get(names.TRIAL_ERROR) != ORPHAN_ERROR]
    remaining = study.budget.trials - len(counted)
    if remaining <= 0:
        fail_running_trials(ot_study)
        return [], STUDY_STOP
    drawn = [t for t in trials if t.state != TrialState.WAITING]  # WAITING: start points not yet run
    tuner = new_tuner(study, options, paths, trainable, adopt=adopt, seed_offset=len(drawn))
    return tuner.fit(), STUDY_STOP


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


def ray_experiment_saved(experiment: Path) -> bool:
    """Whether Ray saved an experiment state there: tuner.pkl alone (a driver killed in its first
    seconds) restores an experiment that runs one trial and never finishes."""
    from ray import tune

    if not tune.Tuner.can_restore(str(experiment)):
        return False
    try:
        tune.ExperimentAnalysis(str(experiment))
    except (ValueError, FileNotFoundError):
        return False
    return True


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


def new_tuner(
    study: StudySpec, options: SearchOptions, paths: StudyPaths, trainable: Any, adopt: list[int], seed_offset: int
) -> Any:
    """A Tuner: TPE sampling recorded in Optuna, ASHA (or no early stopping), at most max_concurrent trials.

    ``adopt``: Optuna trials left RUNNING by a driver killed before Ray saved anything; they run first,
    with their own params and folders. ``seed_offset`` (the trials already in the study) reseeds the
    sampler, which would otherwise draw again the params of the trials drawn before the kill."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    searcher = RecordingOptunaSearch(
        space=study.distributions(),
        metric=study.metric,
        mode=RAY_MODE,
        sampler=optuna.samplers.TPESampler(seed=study.budget.seed + seed_offset, n_startup_trials=study.budget.startup_trials),
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
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=study.budget.max_concurrent),
            scheduler=scheduler,
            # The searcher ends the run once the study holds the budget (trials of an earlier driver included).
            num_samples=study.budget.trials,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=str(paths.root),
            callbacks=[OptunaRecorder(options.storage, study.name, study.metric, study.budget.max_epochs)],
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )


def check_data(study: StudySpec, data_dir: str | None) -> Path:
    """The resolved data directory, once every file the trials read parses (else every trial would fail,
    one after the other, and the budget be spent on the same error). DataError names the file and line."""
    resolved = resolve_data_dir(data_dir).resolve()
    splits = ("train", "dev", "test") if study.fixed.get("predict_test", True) else ("train", "dev")
    for task in study.tasks:
        for split in splits:
            load_examples(task, split, resolved)
    return resolved


def run_interrupted(ot_study: optuna.Study, budget_trials: int) -> bool:
    """True while some trial is RUNNING or fewer trials than the budget have ended (orphans do not count)."""
    trials = ot_study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        return True
    ended = [t for t in trials if t.state.is_finished() and t.user_attrs.get(names.TRIAL_ERROR) != ORPHAN_ERROR]
    return len(ended) < budget_trials


def main_exit(options: SearchOptions) -> int:
    try:
        return run_search(options).exit_code
    except (StudyError, DataError, StorageError, ClusterError, LeaseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        # The driver's own files (the study snapshot, Ray's experiment state, finished.json) share the disk.
        where = f" writing {error.filename}" if error.filename else ""
        print(
            f"error: no space left on the device{where}. Free some space, then: {command_line(options, '--resume')}",
            file=sys.stderr,
        )
        return EXIT_NO_SUCCESS
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before Ray Tune ran (it handles them itself while it runs)
        print(f"\nInterrupted. If the study had started, continue it with: {command_line(options, '--resume')}", file=sys.stderr)
        return EXIT_INTERRUPTED
