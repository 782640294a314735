"""Run a study: Ray Tune schedules the trainer, Optuna (TPE) samples, ASHA stops the weak early.

This module decides whether a run starts, resumes or is refused, and reports its end. Ray's side
of the run: search/tuner.py. Where a study's files live: search/paths.py. One trial:
search/trial.py. The end-of-run report: search/summary.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from data.atomic import DISK_FULL_ERRNOS, atomic_write_text
from data.files import DataError, load_examples, resolve_data_dir
from model.bert import check_model_dir, default_model_path
from model.runtime import cpu_has_bf16_matmul
from search.adapters import ended_trials, fail_running_trials
from search.cluster import ClusterError
from search.lease import LeaseError, current_holder, refuse_if_held
from search.options import SearchOptions, command_line, results_root
from search.paths import StudyPaths
from search.reaper import reaping
from search.spec import RAY_MODE, Budget, StudyError, StudySpec
from search.storage import STUDY_MODEL_PATH, StorageError, check_storage, masked_url, open_storage, study_in_storage
from search.study import load_spec
from search.summary import EXIT_INTERRUPTED, EXIT_NO_SUCCESS, EXIT_REFUSED, Outcome, ray_disagreement, summarize
from search.timebudget import TIME_BUDGET, format_duration
from search.tuner import run_on_ray

__all__ = ["SearchOptions", "main_exit", "run_search"]


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

    ready = None  # the new run's study and data directory, once checked
    if options.fresh and (in_storage or on_disk):
        if holder is not None:
            raise LeaseError(f"study {study.name!r} is being run by {holder.describe()}; refusing to delete it (--fresh)")
        ready = checked(with_model_path(study, options), options)  # before deleting anything: a typo must not cost the run
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
    if options.resume and not in_storage and (paths.trials.exists() or paths.experiment.exists()):
        # The Optuna study is created before any trial or Ray experiment: its records are elsewhere (or lost),
        # and a new empty study would train again the trials that had ended.
        print(
            f"Study {study.name!r} has trials in {paths.root} but no Optuna study in {url}: resume it with the "
            f"--storage it ran with, or start it over with --fresh (deletes {paths.root})."
        )
        return Outcome(EXIT_REFUSED)
    if options.resume and in_storage:
        refuse_if_held(optuna.load_study(study_name=study.name, storage=open_storage(options.storage)), "resume it")

    if options.resume and paths.snapshot.is_file():
        # Trials resume from checkpoints of the original settings; the copy taken at the start is the truth.
        if paths.snapshot.read_bytes() != study.path.read_bytes():
            print(f"Note: {study.path} changed since the run started; resuming with the copy in {paths.snapshot}.")
        study = dataclasses.replace(load_spec(paths.snapshot), name=study.name, path=study.path)
    if options.resume and in_storage:
        study, options = as_started(study, options)
    elif not options.resume:
        study = with_model_path(study, options)
    if options.resume and (options.trials is not None or options.max_concurrent is not None):
        print("Note: --trials and --max-concurrent do not change a resumed run; it keeps the budget it started with.")
    study, data_dir = ready or checked(study, options)
    if not options.early_stopping and study.budget.time_s and study.budget.start_rule == "first_rung":
        print(
            "Note: with --no-early-stopping there is no first rung to reach: under start_rule first_rung every "
            "trial started in the budget's tail runs until the deadline cuts it."
        )
    return execute(study, options, paths, data_dir)


def with_model_path(study: StudySpec, options: SearchOptions) -> StudySpec:
    """A new run's study with --model-path, when given, as its fixed model_path."""
    return study if options.model_path is None else study.with_fixed(model_path=options.model_path)


def checked(study: StudySpec, options: SearchOptions) -> tuple[StudySpec, Path]:
    """The study with the command line's budget overrides, and the data directory, once the budget, the
    model, the data and the storage have passed their checks: before Ray starts or anything is written
    or deleted, so that a refusal leaves everything as it was."""
    study = study.with_budget(
        trials=None if options.resume else options.trials,
        max_concurrent=None if options.resume else options.max_concurrent,
        cpus_per_trial=options.cpus_per_trial,
        gpus_per_trial=options.gpus_per_trial,
        time_s=options.time_budget,  # a resumed run may take a new time budget
        start_rule=options.start_rule,
    )
    study = check_model(study)
    data_dir = check_data(study, options.data_dir)
    check_storage(options.storage)
    return study, data_dir


def as_started(study: StudySpec, options: SearchOptions) -> tuple[StudySpec, SearchOptions]:
    """A resumed run as it started, from its Optuna study's attributes (the study file's snapshot lacks the
    command line): the budget, command-line overrides included (Ray keeps its own copy of it); the BERT
    directory (trials resume from checkpoints of that model, so another one given now is refused); and
    whether ASHA stops trials. A Budget field added since the run started takes its default (a run
    stored before ``start_rule`` existed resumes under "finish"); one this version does not know is refused."""
    attrs = optuna.load_study(study_name=study.name, storage=open_storage(options.storage)).user_attrs
    budget = attrs.get("budget")
    if budget:
        unknown = sorted(set(budget) - {f.name for f in dataclasses.fields(Budget)})
        if unknown:
            raise StudyError(
                f"study {study.name!r} in {masked_url(options.storage)} was started with budget fields this version does "
                f"not know ({', '.join(unknown)}): resume it with the version that started it, or start it over with --fresh"
            )
        study = dataclasses.replace(study, budget=Budget(**budget))
        if study.budget.time_s and options.time_budget is None:
            print(
                f"Note: resuming under the time budget the run started with ({format_duration(study.budget.time_s)}), "
                "counted from now; --time-budget gives another (e.g. 10h for the rest)."
            )
    # A run recorded before the attribute existed: its model is the study file's (the snapshot's).
    model = attrs.get(STUDY_MODEL_PATH) or study.fixed.get("model_path")
    given = options.model_path
    if given is not None and Path(given).expanduser().resolve() != Path(model or default_model_path()).expanduser().resolve():
        raise StudyError(
            f"study {study.name!r} was started with the model in {model or 'the embedded all-MiniLM-L6-v2'}, not {given}: "
            "resume it without --model-path, or run the other model under another --name"
        )
    if model:
        study = study.with_fixed(model_path=model)
    early_stopping = attrs.get("early_stopping")
    if early_stopping is not None and early_stopping != options.early_stopping:
        print(f"Note: this run started {'with' if early_stopping else 'without'} early stopping (ASHA), and resumes so.")
        options = dataclasses.replace(options, early_stopping=early_stopping)
    return study, options


def check_model(study: StudySpec) -> StudySpec:
    """The study with its fixed model_path made absolute (a trial runs in its own folder), once the
    directory holds what a trial reads (else every trial would fail on it); StudyError naming it."""
    given = study.fixed.get("model_path")
    if given is None:
        return study
    try:
        return study.with_fixed(model_path=str(check_model_dir(given)))
    except FileNotFoundError as error:
        raise StudyError(f"{study.path}: model_path (fixed, or --model-path): {error}") from None


def delete_study_run(name: str, url: str, paths: StudyPaths, in_storage: bool, storage_url: str) -> None:
    if in_storage:
        storage = open_storage(storage_url)
        count = len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
        print(f"--fresh: deleting Optuna study {name!r} ({count} trials) from {url}")
        optuna.delete_study(study_name=name, storage=storage)
    if paths.root.exists():
        print(f"--fresh: deleting {paths.root}")
        shutil.rmtree(paths.root)


def fp32_note(study: StudySpec, options: SearchOptions) -> str | None:
    """Why a local CPU study will take longer than README's figures, when it will: precision "auto" on a
    CPU without bf16 matrix hardware trains in fp32 (model.runtime.use_bf16)."""
    on_this_cpu = not options.address and study.budget.gpus_per_trial == 0
    searched = "precision" in study.space or any("precision" in v for vs in study.variants.values() for v in vs.values())
    if not on_this_cpu or searched or study.fixed.get("precision", "auto") != "auto" or cpu_has_bf16_matmul():
        return None
    return (
        "Note: this CPU multiplies no bf16 matrices in hardware (no AMX, no AVX512_BF16), so the trials train in fp32, "
        "2-3x the wall time of the bf16 CPUs that README's figures come from (README, 'Speed, per CPU kind')."
    )


def execute(study: StudySpec, options: SearchOptions, paths: StudyPaths, data_dir: Path) -> Outcome:
    """Run (or restore) the Ray Tune experiment of a study to its end, an interruption or a full disk."""
    started = time.monotonic()
    TIME_BUDGET.start(study.budget.time_s, study.budget.max_epochs, study.budget.grace_period, study.budget.start_rule)
    note = fp32_note(study, options)
    if note:
        print(note)
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
    if TIME_BUDGET.spent and run_interrupted(ot_study, study.budget.trials):
        outcome = summarize(study, options.storage, paths, options.top)
        ended = len(ended_trials(ot_study.get_trials(deepcopy=False)))
        print(
            f"\nThe time budget ({format_duration(study.budget.time_s)}) is spent after {wall_seconds / 60:.1f} min: "
            f"{ended} of {study.budget.trials} trials have ended, "
            f"and no other could {TIME_BUDGET.goal} in time{TIME_BUDGET.sizing()}.\n"
            f"  To continue with a new budget: {command_line(options, '--resume')} --time-budget DURATION"
        )
        return outcome
    if run_interrupted(ot_study, study.budget.trials):
        print(f"\nThe run was interrupted. Continue it with: {command_line(options, '--resume')}")
        return Outcome(EXIT_INTERRUPTED, ot_study)
    failed_in_ray = [r for r in grid if r.error is not None]
    record = {"ray_trials": len(grid), "errored": len(failed_in_ray), "last_session_wall_seconds": round(wall_seconds, 1)}
    atomic_write_text(paths.finished, json.dumps(record, indent=2))
    outcome = summarize(study, options.storage, paths, options.top)
    print(f"Wall time of this session: {wall_seconds / 60:.1f} min (Ray's start included)")
    note = ray_disagreement(grid, study.metric, RAY_MODE, outcome.ranked)  # a cross-check with Ray's own records
    if note:
        print(note)
    return outcome


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
    return len(ended_trials(trials)) < budget_trials


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
