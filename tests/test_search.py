"""The search end to end on a tiny random BERT: a driver is killed mid-run, resumed, and the Optuna
records are checked against the trainer's own artifacts and Ray's trials.

One scenario (two Ray sessions, started once for the module) serves every end-to-end check:
  1. ``run_search.py`` runs as a subprocess in its own process group; one trial draws lr = 1e30,
     whose loss goes NaN (the last one);
     ASHA stops some of the others after their first epoch;
  2. once two trials have ended and another is mid-way, the whole process group is SIGKILLed
     (driver and Ray alike), as a crashed machine would leave it;
  3. a rerun without flags refuses; an Optuna trial asked after Ray's last checkpoint is simulated;
  4. ``--resume`` finishes the experiment in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from tiny_model import DATA_DIR, TINY_BERT, needs_data

from search import storage as names
from search.adapters import ORPHAN_ERROR, SEARCH_FINISHED, SEARCHER_CHECKPOINT_FILES
from search.storage import PROJECT_ROOT, open_storage
from search.study import load_spec
from search.tune import EXIT_REFUSED, SearchOptions, StudyPaths, main_exit, run_search

TRIALS, MAX_EPOCHS = 6, 3
STUDY_TOML = f"""
description = "tiny random BERT, a few rows; a trial with lr = 1e30 diverges"
tasks = ["sts"]

[objective]
metric = "sts"
direction = "maximize"

[budget]
trials = {TRIALS}
max_epochs = {MAX_EPOCHS}
grace_period = 1
reduction_factor = 2
max_concurrent = 1
cpus_per_trial = 1
seed = 18
startup_trials = {TRIALS}  # random sampling: with seed 18 the last trial, and only it, draws lr = 1e30
trial_seeds = true        # trial n trains with seed 18 + n

[search]
lr = {{ choices = [1e-3, 3e-3, 1e30] }}  # 1e30: the loss goes NaN at once
dropout = {{ low = 0.0, high = 0.2 }}

[fixed]
model_config = {json.dumps(TINY_BERT).replace('": ', '" = ')}
train_limit = 32
eval_limit = 32
max_length = 32
batch_size = 8
steps_per_epoch = 10
predict_test = true

[[start_points]]
lr = 1e-3
dropout = 0.0
"""


# A config that the seeded sampler never draws (dropout), and that diverges: a resumed orphan that fails is recorded too.
ORPHAN_PARAMS = {"lr": 1e30, "dropout": 0.05}


def optuna_trials(url: str | optuna.storages.BaseStorage, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


MARK = "MINBERT_SEARCH_TEST_MARK"


def live_processes_marked(mark: str, group: int) -> list[str]:
    """Running (not zombie) Ray processes, other than this one, with MARK=mark in their environment
    or in process group ``group``.

    Ray's workers inherit the driver's environment but start their own process group; its agents
    (ray::DashboardAgent, ray::RuntimeEnvAgent) get another environment but stay in the group."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            name = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:100]
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        marked = f"{MARK}={mark}".encode() in environ or (pgrp == group and "ray" in name)
        if marked and state != "Z":
            found.append(f"{proc.name}: {name}")
    return found


def leftovers_after_wait(mark: str, group: int, seconds: float = 60) -> list[str]:
    """Ray's processes take a moment to exit after a shutdown or a kill (a worker notices that its raylet
    died only at its next check, later on a loaded machine); wait for them, up to a limit."""
    deadline = time.monotonic() + seconds
    while (found := live_processes_marked(mark, group)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@dataclass
class DriverRun:
    fired: Any  # what ``when`` returned when the signal was sent; None if the run ended first
    returncode: int
    log: str
    leftovers: list[str]
    linger_s: float  # how long Ray's processes outlived the driver


def run_driver(
    tmp: Path, args: list[str], label: str, when: Any, sig: int, group: bool, seconds: float = 150, kill_at: str | None = None
) -> DriverRun:
    """Run run_search.py in its own process group; send ``sig`` once ``when(optuna trials, log)`` is truthy
    (to the whole group, as a crashed machine leaves it, or to the driver alone, as `kill` does).
    ``kill_at``: a point of tests/kill_at.py where the driver SIGKILLs itself (returncode -9)."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1", MARK: label}  # the log is polled
    # One connection for every poll: a new one each time (schema check, on PostgreSQL a login) is slow
    # enough to miss the short moments polled for.
    storage = open_storage(args[args.index("--storage") + 1])
    program = [str(PROJECT_ROOT / "run_search.py")] if kill_at is None else [str(Path(__file__).parent / "kill_at.py"), kill_at]
    with open(tmp / f"{label}.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, *program, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        fired = None
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and driver.poll() is None:
                try:
                    fired = when(optuna_trials(storage, "tiny"), (tmp / f"{label}.log").read_text())
                except KeyError:  # the study is not created yet
                    fired = None
                if fired is not None and fired != []:
                    (os.killpg if group else os.kill)(driver.pid, sig)
                    break
                time.sleep(0.05)
            else:
                fired = None
            driver.wait(timeout=seconds)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    ended = time.monotonic()
    leftovers = leftovers_after_wait(label, driver.pid)
    assert not leftovers, leftovers
    return DriverRun(fired, driver.returncode, (tmp / f"{label}.log").read_text(), leftovers, time.monotonic() - ended)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    if not (DATA_DIR / "sts-train.csv").is_file():
        pytest.skip(f"CS224N data not found in {DATA_DIR}")
    tmp = tmp_path_factory.mktemp("search")
    study_file = tmp / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    url = f"sqlite:///{tmp / 'optuna.db'}"
    results = tmp / "results"
    paths = StudyPaths(results / "tiny")
    args = ["--study", str(study_file), "--storage", url, "--results-dir", str(results), "--data-dir", str(DATA_DIR)]
    started_trials = lambda trials: [t for t in trials if t.state == TrialState.RUNNING]  # noqa: E731

    # 1. Killed in its first seconds: a trial asked, none reported, Ray's experiment state not yet
    #    saved (removed here to make that deterministic: Ray writes it moments after the first ask).
    early = run_driver(tmp, args, "early", lambda trials, log: started_trials(trials), signal.SIGKILL, group=True)
    assert early.fired, f"the first run ended before it could be killed early:\n{early.log[-3000:]}"
    for state in paths.experiment.glob("*state-*"):
        state.unlink()

    # 2. Resumed, then killed once two trials have ended and another is mid-way (a crashed machine).
    #    Just before the kill, a second driver tries to resume the same study and must refuse.
    second_driver = {}

    def mid_way(trials, log):
        ended = [t for t in trials if t.state.is_finished()]
        running = [t for t in started_trials(trials) if t.intermediate_values]
        if not (len(ended) >= 2 and running):
            return None
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            second_driver["exit"] = main_exit(SearchOptions(study=str(study_file), storage=url, results_dir=results, resume=True))
        second_driver["said"] = said.getvalue()
        return running[0].number

    killed = run_driver(tmp, [*args, "--resume"], "killed", mid_way, signal.SIGKILL, group=True)
    assert killed.fired is not None, f"the resumed run ended before it could be killed mid-way:\n{killed.log[-3000:]}"
    killed_running = killed.fired
    first_log = early.log + killed.log

    refused_output = io.StringIO()
    with contextlib.redirect_stdout(refused_output):
        refused = run_search(SearchOptions(study=str(study_file), storage=url, results_dir=results))

    # An Optuna trial that the searcher asked for after Ray's last checkpoint: Ray does not know it,
    # so the resumed searcher must hand it out again instead of losing it or drawing its params anew.
    study = optuna.load_study(study_name="tiny", storage=url)
    study.enqueue_trial(ORPHAN_PARAMS)
    orphan = study.ask(fixed_distributions=load_spec(study_file).distributions()).number

    # 3. Resumed again, and stopped with SIGTERM (what job schedulers send) once Ray Tune runs a trial.
    def tune_runs_a_trial(trials, log):
        return True if "started with configuration" in log else None

    terminated = run_driver(tmp, [*args, "--resume"], "terminated", tune_runs_a_trial, signal.SIGTERM, group=False)

    # 4. Resumed to the end in this process.
    options = SearchOptions(study=str(study_file), storage=url, results_dir=results, data_dir=str(DATA_DIR), resume=True)
    os.environ[MARK] = "resume"  # inherited by the Ray processes that the resumed driver starts
    try:
        outcome = run_search(options)
    finally:
        del os.environ[MARK]
    search_finished = SEARCH_FINISHED.is_set()
    leftovers_after = leftovers_after_wait("resume", os.getpgid(0))
    rerun = run_search(SearchOptions(study=str(study_file), storage=url, results_dir=results))
    # The fallback Ray temp dir is under /tmp, outside tmp_path: remove it (its processes are gone).
    shutil.rmtree(paths.ray_temp_dir(), ignore_errors=True)
    yield {
        "url": url,
        "paths": paths,
        "killed_running": killed_running,
        "orphan": orphan,
        "refused": refused,
        "refused_output": refused_output.getvalue(),
        "outcome": outcome,
        "rerun": rerun,
        "leftovers_after": leftovers_after,
        "first_log": first_log,
        "terminated": terminated,
        "second_driver": second_driver,
        "search_finished": search_finished,
    }


@needs_data
def test_spare_cores_go_to_the_running_trial(scenario):
    """Once the budget is spent the driver knows that no trial will start (search.spare shares out
    the idle cores then); at the end no trial holds a share."""
    assert scenario["search_finished"]
    assert json.loads(scenario["paths"].threads.read_text()) == {}


@needs_data
def test_optuna_records_tell_the_truth(scenario):
    study = optuna.load_study(study_name="tiny", storage=scenario["url"])
    assert study.user_attrs[names.STUDY_METRIC] == "sts"
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.user_attrs[names.STUDY_TASKS] == ["sts"]
    assert study.user_attrs[names.STUDY_FILE].endswith("tiny.toml")
    trials = study.trials
    assert len(trials) == TRIALS, [(t.number, t.state.name, t.params, t.user_attrs.get("error")) for t in study.trials]
    by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
    assert not by_state[TrialState.RUNNING]

    # The diverging trial: FAIL, with the trainer's NaN error as the message; no other trial failed.
    diverged = [t for t in trials if t.params["lr"] == 1e30]
    assert diverged and by_state[TrialState.FAIL] == diverged
    for t in diverged:
        assert t.user_attrs[names.TRIAL_ERROR].startswith("NonFiniteLossError: ")
        assert "loss is nan" in t.user_attrs[names.TRIAL_ERROR]
    assert trials[0].params == {"lr": 1e-3, "dropout": 0.0}  # the start point came first

    assert by_state[TrialState.COMPLETE] and by_state[TrialState.PRUNED], [(t.number, t.state.name) for t in trials]
    for t in by_state[TrialState.COMPLETE] + by_state[TrialState.PRUNED]:
        attrs = t.user_attrs
        epochs_run = attrs[names.TRIAL_EPOCHS_RUN]
        # Every epoch is an intermediate value, the last (stopping) one too.
        assert sorted(t.intermediate_values) == list(range(1, epochs_run + 1))
        assert attrs[names.TRIAL_EARLY_STOPPED] == (t.state == TrialState.PRUNED)
        assert (epochs_run < MAX_EPOCHS) == (t.state == TrialState.PRUNED)
        # The artifacts are the trainer's, and agree with the records.
        artifact_dir = Path(attrs[names.TRIAL_ARTIFACT_DIR])
        assert artifact_dir == scenario["paths"].trials / str(t.number)
        metrics = json.loads((artifact_dir / "metrics.json").read_text())
        assert [h["epoch"] for h in metrics["history"]] == list(range(1, epochs_run + 1))
        assert [h["sts"] for h in metrics["history"]] == [t.intermediate_values[e] for e in range(1, epochs_run + 1)]
        assert metrics["best_epoch"] == attrs["best_epoch"]
        assert attrs["best_value"] == max(t.intermediate_values.values())
        assert (artifact_dir / "model.safetensors").is_file()
        # A COMPLETE trial has its test outputs, also when its driver was killed after its last epoch.
        assert (artifact_dir / "outputs" / "sts-test.npz").is_file() == (t.state == TrialState.COMPLETE)
        config = json.loads((artifact_dir / "config.json").read_text())["train"]
        assert config["seed"] == 18 + t.number and config["lr"] == t.params["lr"]
        if t.state == TrialState.COMPLETE:
            assert t.value == attrs["best_value"]
        else:
            assert t.value == t.intermediate_values[epochs_run]  # Optuna's convention for PRUNED
    assert len({t.user_attrs[names.TRIAL_RAY_ID] for t in trials}) == TRIALS


@needs_data
def test_resume_loses_and_repeats_nothing(scenario):
    said = scenario["refused_output"]
    assert scenario["refused"].exit_code == EXIT_REFUSED, said
    assert "unfinished run" in said and "--resume" in said and "--fresh" in said

    trials = {t.number: t for t in optuna_trials(scenario["url"], "tiny")}
    # The budget exactly: the trial asked after Ray's checkpoint ran as itself, not as a FAIL plus a new draw.
    assert len(trials) == TRIALS
    orphan = trials[scenario["orphan"]]
    assert orphan.params == ORPHAN_PARAMS and orphan.state == TrialState.FAIL
    assert orphan.user_attrs[names.TRIAL_ERROR].startswith("NonFiniteLossError: ")
    assert not [t for t in trials.values() if t.user_attrs.get(names.TRIAL_ERROR) == ORPHAN_ERROR]
    configs = [tuple(sorted(t.params.items())) for t in trials.values()]
    assert len(set(configs)) == len(configs), "a configuration was trained twice"
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    resumed = trials[scenario["killed_running"]]
    assert resumed.state in (TrialState.COMPLETE, TrialState.PRUNED)

    # Every Ray trial is an Optuna trial (Ray's state may predate trials that ended before the kill).
    # An adopted trial runs again under its number; Ray then names its second folder trial_<n>_<hex>.
    ray_numbers = {int(p.name.split("_")[1]) for p in scenario["paths"].experiment.glob("trial_*")}
    assert ray_numbers <= set(trials)
    assert scenario["outcome"].exit_code == 0
    assert scenario["paths"].finished.is_file()
    assert not scenario["leftovers_after"], scenario["leftovers_after"]


@needs_data
def test_an_experiment_saved_without_its_searcher_is_not_restored(scenario, tmp_path):
    """Ray uploads its trial list and the searcher's checkpoint as separate files, copied in place: without
    the searcher's, Ray's restore would keep the searcher the Tuner was created with (its table of trials
    empty), and with one cut short it would fail at every resume. So the resume starts a new Tuner,
    which adopts what Optuna holds RUNNING."""
    from search.tuner import saved_ray_trials

    experiment = tmp_path / "ray"
    shutil.copytree(scenario["paths"].experiment, experiment)
    whole_run = saved_ray_trials(experiment)
    assert whole_run is not None and whole_run[0] >= TRIALS and whole_run[1] == {}  # every trial of the run ended
    for pattern in (*SEARCHER_CHECKPOINT_FILES, "tuner.pkl"):
        newest = sorted(experiment.glob(pattern))[-1]
        whole = newest.read_bytes()
        newest.write_bytes(whole[: len(whole) // 2])  # cut short, as a killed copy leaves it
        assert saved_ray_trials(experiment) is None, pattern
        newest.write_bytes(whole)
        aside = tmp_path / "aside"
        aside.mkdir(exist_ok=True)
        for saved in experiment.glob(pattern):  # none at all: older runs' files would be restored instead
            saved.rename(aside / saved.name)
        assert saved_ray_trials(experiment) is None, pattern
        for saved in aside.iterdir():
            saved.rename(experiment / saved.name)
        assert saved_ray_trials(experiment) == whole_run


@needs_data
def test_a_second_driver_refuses_while_the_first_runs(scenario):
    second = scenario["second_driver"]
    assert second["exit"] == EXIT_REFUSED, second
    assert "study 'tiny' is being run by driver pid" in second["said"] and socket.gethostname() in second["said"]


WORKER_PREFIX = re.compile(r"\(run_trial pid=\d+\)")


def crash_tracebacks(log: str) -> list[str]:
    """The log's tracebacks, less the ones a trial worker printed for an exception that Python
    ignored ("Exception ignored in: ..."; e.g. the stop signal landing in a weakref callback while Ray
    tears the worker down): those ended nothing. A traceback of the driver always counts."""
    lines = log.splitlines()
    crashes = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" not in line:
            continue
        worker = WORKER_PREFIX.search(line)
        before = lines[i - 1] if i else ""
        if worker and "Exception ignored in" in before and worker.group(0) in before:
            continue
        crashes.append("\n".join(lines[max(0, i - 1) : i + 8]))
    return crashes


def test_only_tracebacks_that_ended_something_count():
    worker = "\x1b[36m(run_trial pid=7672)\x1b[0m"
    ignored = f"{worker} Exception ignored in: <function WeakSet.__init__.<locals>._remove>\n"
    ignored += f"{worker} Traceback (most recent call last):"
    assert crash_tracebacks(f"Note: ...\n{ignored}\n{worker}   File ...") == []
    assert len(crash_tracebacks(f"{worker} epoch 1\n{worker} Traceback (most recent call last):")) == 1
    assert len(crash_tracebacks(f"{ignored}\nTraceback (most recent call last):\n  File run_search.py")) == 1
    other = "\x1b[36m(run_trial pid=9)\x1b[0m Traceback (most recent call last):"
    assert len(crash_tracebacks(f"{worker} Exception ignored in: <x>\n{other}")) == 1


@needs_data
def test_sigterm_stops_as_gracefully_as_ctrl_c(scenario):
    terminated = scenario["terminated"]
    assert terminated.fired, f"the run ended before SIGTERM could be sent:\n{terminated.log[-3000:]}"
    assert terminated.returncode == 130, terminated.log[-3000:]
    assert "The run was interrupted. Continue it with: python run_search.py --study" in terminated.log
    crashes = crash_tracebacks(terminated.log)
    assert not crashes, crashes
    assert not terminated.leftovers


@needs_data
def test_end_of_run_report_and_rerun(scenario, capsys):
    outcome = scenario["outcome"]
    ranked = outcome.ranked
    assert ranked and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in ranked)
    values = [t.user_attrs["best_value"] for t in ranked]
    assert values == sorted(values, reverse=True)
    # A finished study is not appended to: the rerun says so, shows the results and adds no trial.
    rerun = scenario["rerun"]
    assert rerun.exit_code == 0
    assert [t.number for t in rerun.ranked] == [t.number for t in ranked]
    assert len(optuna_trials(scenario["url"], "tiny")) == TRIALS
