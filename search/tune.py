"""Run a study: Ray Tune schedules the trainer, Optuna (TPE) samples, ASHA stops the weak early.

Layout under the results folder (``results/<study>/``):
  ray/            Ray Tune's experiment (``storage_path`` = results/<study>, name "ray"); Tuner.restore reads it
  trials/<n>/     output_dir of the trainer for Optuna trial n (config.json, model.safetensors, last.pt, ...)
  ray-tmp/        Ray's temp/session dir for a local cluster (a short /tmp path when this one is too long)
  study.toml      the study file as the run started; a resumed run uses this copy
  finished.json   written when every trial of the budget ended; a rerun without --resume/--fresh then stops
The Optuna study (named after the study) lives in the storage (default: SQLite studies/optuna.db).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from data.files import DATA_DIR_ENV, TASK_FILES, DataError, resolve_data_dir
from model.metrics import atomic_write_text
from model.train import train
from search import storage as names
from search.records import (
    ORPHAN_ERROR,
    TRIAL_NUMBER_KEY,
    OptunaRecorder,
    RecordingOptunaSearch,
    ResumableASHA,
    artifact_dir_for,
    fail_running_trials,
)
from search.storage import DEFAULT_STORAGE_URL, PROJECT_ROOT, open_storage
from search.study import Budget, Study, StudyError, load_study_file

DEFAULT_RESULTS_DIR = PROJECT_ROOT / "results"
RESULTS_DIR_ENV = "MINBERT_RESULTS"
EXPERIMENT_NAME = "ray"
# AF_UNIX socket paths hold 107 bytes; Ray puts "session_<date>_<time>_<pid>/sockets/plasma_store" (~64) under its temp dir.
MAX_RAY_TEMP_DIR_CHARS = 40

EXIT_OK, EXIT_NO_SUCCESS, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


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


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs besides its sampled params (sent to the Ray workers)."""

    study: Study
    artifacts_root: str
    data_dir: str | None = None


def run_trial(config: dict[str, Any], job: TrialJob) -> None:
    """Ray Tune function trainable: train one sampled config, reporting each epoch's dev metrics."""
    from ray import tune

    number = config[TRIAL_NUMBER_KEY]
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER_KEY}
    train_config = job.study.train_config(params, number)
    # One torch thread per reserved CPU, so that concurrent trials do not fight over the cores.
    train_config.setdefault("threads", max(1, int(job.study.budget.cpus_per_trial)))
    output_dir = artifact_dir_for(job.artifacts_root, number)
    # A trial resumed after an interrupted driver first reports again the epochs its checkpoint holds:
    # an epoch checkpointed but not yet reported when the driver died is not lost (repeats are harmless).
    metrics_file = output_dir / "metrics.json"
    if metrics_file.is_file():
        for record in json.loads(metrics_file.read_text(encoding="utf-8")).get("history", []):
            tune.report(dict(record))
    train(train_config, output_dir, report=lambda metrics: tune.report(dict(metrics)), data_dir=job.data_dir)


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.config.get(TRIAL_NUMBER_KEY, trial.trial_id)}"


@dataclass
class StudyPaths:
    root: Path

    @property
    def experiment(self) -> Path:
        return self.root / EXPERIMENT_NAME

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    @property
    def snapshot(self) -> Path:
        return self.root / "study.toml"

    @property
    def finished(self) -> Path:
        return self.root / "finished.json"

    def ray_temp_dir(self) -> Path:
        preferred = self.root / "ray-tmp"
        if len(str(preferred)) <= MAX_RAY_TEMP_DIR_CHARS:
            return preferred
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"ray-{digest}"


@dataclass
class Outcome:
    exit_code: int
    study: optuna.Study | None = None
    ranked: list[FrozenTrial] = field(default_factory=list)


def results_root(options: SearchOptions) -> Path:
    return Path(options.results_dir or os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR).resolve()


def run_search(options: SearchOptions) -> Outcome:
    """Start, resume or refuse a study run; see run_search.py for the command line."""
    if options.resume and options.fresh:
        raise StudyError("--resume and --fresh exclude each other")
    study = load_study_file(options.study)
    if options.name:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", options.name):
            raise StudyError(f"--name {options.name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        study = dataclasses.replace(study, name=options.name)
    paths = StudyPaths(results_root(options) / study.name)
    storage = open_storage(options.storage)
    in_storage = study.name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    on_disk = paths.root.exists()

    if options.fresh and (in_storage or on_disk):
        delete_study_run(study.name, options.storage, storage, paths, in_storage)
        in_storage = on_disk = False
    if (in_storage or on_disk) and not options.resume:
        where = f"Optuna study {study.name!r} in {options.storage}" if in_storage else f"results in {paths.root}"
        if paths.finished.is_file():
            print(f"Study {study.name!r} has already finished ({where}); showing its results.")
            print(f"  To start it over: {command_line(options, '--fresh')}  (deletes it first)")
            return summarize(study, options.storage, paths, options.top)
        print(
            f"Study {study.name!r} already has an unfinished run ({where}).\n"
            f"  To continue it: {command_line(options, '--resume')}\n"
            f"  To delete it and start over: {command_line(options, '--fresh')}"
        )
        return Outcome(EXIT_REFUSED)
    if options.resume and not (in_storage or on_disk):
        print(f"Nothing to resume: no Optuna study {study.name!r} in {options.storage} and no {paths.root}.")
        return Outcome(EXIT_REFUSED)
    if options.resume and paths.finished.is_file():
        print(f"Study {study.name!r} has already finished; nothing to resume.")
        return summarize(study, options.storage, paths, options.top)

    if options.resume and paths.snapshot.is_file():
        # Trials resume from checkpoints of the original settings; the copy taken at the start is the truth.
        if paths.snapshot.read_bytes() != study.path.read_bytes():
            print(f"Note: {study.path} changed since the run started; resuming with the copy in {paths.snapshot}.")
        study = dataclasses.replace(load_study_file(paths.snapshot), name=study.name, path=study.path)
    if options.resume and in_storage:
        # The budget the run started with, command-line overrides included (Ray keeps its own copy of it).
        started = optuna.load_study(study_name=study.name, storage=storage).user_attrs.get("budget")
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
    return execute(study, options, paths)


def command_line(options: SearchOptions, flag: str) -> str:
    """The run_search.py command for this study with ``flag``, keeping non-default locations."""
    words = ["python run_search.py --study", options.study, flag]
    if options.storage != DEFAULT_STORAGE_URL:
        words += ["--storage", options.storage]
    if options.results_dir is not None:
        words += ["--results-dir", str(options.results_dir)]
    if options.name:
        words += ["--name", options.name]
    return " ".join(words)


def delete_study_run(name: str, url: str, storage: optuna.storages.RDBStorage, paths: StudyPaths, in_storage: bool) -> None:
    if in_storage:
        count = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
        print(f"--fresh: deleting Optuna study {name!r} ({count} trials) from {url}")
        optuna.delete_study(study_name=name, storage=storage)
    if paths.root.exists():
        print(f"--fresh: deleting {paths.root}")
        shutil.rmtree(paths.root)


def prepare_optuna_study(study: Study, url: str, paths: StudyPaths) -> optuna.Study:
    """Create (or load) the Optuna study with its attributes; queue the start points of a new one."""
    storage = open_storage(url)
    existing = study.name in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    ot_study = optuna.create_study(study_name=study.name, storage=storage, direction=study.direction, load_if_exists=True)
    attrs = {
        names.STUDY_METRIC: study.metric,
        names.STUDY_DIRECTION: study.direction,
        names.STUDY_TASKS: list(study.tasks),
        names.STUDY_FILE: str(study.path),
        "results_dir": str(paths.root),
        "budget": dict(study.budget.__dict__),
    }
    for key, value in attrs.items():
        ot_study.set_user_attr(key, value)
    if not existing:
        for point in study.start_points:
            ot_study.enqueue_trial(point)
    return ot_study


def execute(study: Study, options: SearchOptions, paths: StudyPaths) -> Outcome:
    """Run (or restore) the Ray Tune experiment of a study to its end or an interruption."""
    import ray
    from ray import tune

    data_dir = check_data(study, options.data_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    if not paths.snapshot.is_file():
        atomic_write_text(paths.snapshot, study.path.read_text(encoding="utf-8"))
    ot_study = prepare_optuna_study(study, options.storage, paths)
    if not options.resume:
        ot_study.set_user_attr("early_stopping", options.early_stopping)
    restoring = options.resume and tune.Tuner.can_restore(str(paths.experiment))
    if not restoring:
        # Nothing of Ray's to continue: whatever is RUNNING in Optuna belongs to a run that cannot resume.
        fail_running_trials(ot_study)

    job = TrialJob(study=study, artifacts_root=str(paths.trials), data_dir=str(data_dir))
    resources = {"cpu": study.budget.cpus_per_trial, "gpu": study.budget.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), resources)

    started = time.monotonic()
    start_ray(options, paths)
    try:
        if restoring:
            print(f"Resuming {paths.experiment}")
            tuner = tune.Tuner.restore(str(paths.experiment), trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = new_tuner(study, options, paths, trainable)
        grid = tuner.fit()
    finally:
        ray.shutdown()
    wall_seconds = time.monotonic() - started

    ot_study = optuna.load_study(study_name=study.name, storage=open_storage(options.storage))
    if run_interrupted(ot_study, study.budget.trials):
        print(f"\nThe run was interrupted. Continue it with: {command_line(options, '--resume')}")
        return Outcome(EXIT_INTERRUPTED, ot_study)
    failed_in_ray = [r for r in grid if r.error is not None]
    record = {"ray_trials": len(grid), "errored": len(failed_in_ray), "last_session_wall_seconds": round(wall_seconds, 1)}
    atomic_write_text(paths.finished, json.dumps(record, indent=2))
    outcome = summarize(study, options.storage, paths, options.top)
    print(f"Wall time of this session: {wall_seconds / 60:.1f} min (Ray's start included)")
    # Cross-check with Ray's own records, errored trials left out (Ray's get_best_result can pick them).
    best = best_ray_result(grid, study.metric, study.mode)
    best_number = None if best is None else best.config.get(TRIAL_NUMBER_KEY)
    if outcome.ranked and best_number != outcome.ranked[0].number:
        print(f"Note: by Ray's results the best non-errored trial is {best_number}, not {outcome.ranked[0].number}.")
    return outcome


def start_ray(options: SearchOptions, paths: StudyPaths) -> None:
    """Connect to the cluster at --address, or start a local one whose files stay under the results folder."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if options.address:
        ray.init(address=options.address)
        return
    # Workers must import this project whether or not it is pip-installed.
    python_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PROJECT_ROOT) not in python_path:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *python_path])
    temp_dir = paths.ray_temp_dir()
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=options.num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=str(temp_dir))


def new_tuner(study: Study, options: SearchOptions, paths: StudyPaths, trainable: Any) -> Any:
    """A Tuner: TPE sampling recorded in Optuna, ASHA (or no early stopping), at most max_concurrent trials."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    searcher = RecordingOptunaSearch(
        space=study.distributions(),
        metric=study.metric,
        mode=study.mode,
        sampler=optuna.samplers.TPESampler(seed=study.budget.seed, n_startup_trials=study.budget.startup_trials),
        study_name=study.name,
        storage=open_storage(options.storage),
        artifacts_root=paths.trials,
    )
    scheduler = (
        ResumableASHA(
            storage_url=options.storage,
            study_name=study.name,
            time_attr="epoch",
            metric=study.metric,
            mode=study.mode,
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


def check_data(study: Study, data_dir: str | None) -> Path:
    """The resolved data directory, once every file the trials read is there (else every trial would fail)."""
    resolved = resolve_data_dir(data_dir).resolve()
    splits = ("train", "dev", "test") if study.fixed.get("predict_test", True) else ("train", "dev")
    missing = [str(TASK_FILES[task].path(split, resolved)) for task in study.tasks for split in splits]
    missing = [path for path in missing if not Path(path).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: file not found (data directory: --data-dir, else ${DATA_DIR_ENV}, else ./datasets)")
    return resolved


def run_interrupted(ot_study: optuna.Study, budget_trials: int) -> bool:
    """True while some trial is RUNNING or fewer trials than the budget have ended (orphans do not count)."""
    trials = ot_study.get_trials(deepcopy=False)
    if any(t.state == TrialState.RUNNING for t in trials):
        return True
    ended = [t for t in trials if t.state.is_finished() and t.user_attrs.get(names.TRIAL_ERROR) != ORPHAN_ERROR]
    return len(ended) < budget_trials


def best_ray_result(grid: Any, metric: str, mode: str) -> Any:
    """The best Ray result by its best epoch, errored trials left out (Ray's get_best_result can pick them)."""
    best, best_value = None, None
    for result in grid:
        if result.error is not None or result.metrics_dataframe is None or metric not in result.metrics_dataframe:
            continue
        values = [v for v in result.metrics_dataframe[metric].tolist() if isinstance(v, (int, float)) and math.isfinite(v)]
        if not values:
            continue
        value = max(values) if mode == "max" else min(values)
        if best_value is None or (value > best_value if mode == "max" else value < best_value):
            best, best_value = result, value
    return best


def ranked_trials(ot_study: optuna.Study) -> list[FrozenTrial]:
    """Trials that trained (COMPLETE, and PRUNED = stopped early), best first by the dev score of their saved epoch."""
    usable = [
        t
        for t in ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.user_attrs.get(names.TRIAL_BEST_VALUE) is not None
    ]
    sign = -1.0 if ot_study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return sorted(usable, key=lambda t: (sign * t.user_attrs[names.TRIAL_BEST_VALUE], t.number))


def summarize(study: Study, url: str, paths: StudyPaths, top: int) -> Outcome:
    """Print the top trials and the counts by state; exit code 1 when no trial succeeded."""
    ot_study = optuna.load_study(study_name=study.name, storage=open_storage(url))
    trials = ot_study.get_trials(deepcopy=False)
    ranked = ranked_trials(ot_study)
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    print(
        f"\nStudy {study.name!r}: {len(trials)} trials: {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} stopped early by ASHA (PRUNED), {counts['FAIL']} failed, {counts['RUNNING']} running"
    )
    if ranked:
        print(f"Top {min(top, len(ranked))} by dev {study.metric} of the saved (best) epoch:")
        for rank, t in enumerate(ranked[:top], 1):
            attrs = t.user_attrs
            params = ", ".join(f"{k}={format_value(v)}" for k, v in sorted(t.params.items()))
            print(
                f"  {rank}. trial {t.number}  {study.metric}={attrs[names.TRIAL_BEST_VALUE]:.4f}"
                f" (epoch {attrs.get(names.TRIAL_BEST_EPOCH)})"
                f"  epochs run {attrs.get(names.TRIAL_EPOCHS_RUN)}  {t.state.name}\n"
                f"     {params}\n     artifacts: {attrs.get(names.TRIAL_ARTIFACT_DIR)}"
            )
    for t in trials:
        if t.state == TrialState.FAIL:
            print(f"  failed: trial {t.number}: {t.user_attrs.get(names.TRIAL_ERROR, '(no message)')}")
    print(f"Dashboard: optuna-dashboard {url}   (then open http://127.0.0.1:8080)")
    return Outcome(EXIT_OK if ranked else EXIT_NO_SUCCESS, ot_study, ranked)


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main_exit(options: SearchOptions) -> int:
    try:
        return run_search(options).exit_code
    except (StudyError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
