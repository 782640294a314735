"""One study on the tiny BERT, its driver killed with SIGKILL at five points, each time resumed with
--resume: in its first seconds, after the first report, mid-study, right after a trial ended, and during
the last trial. The kills take the whole process group (as a crashed machine leaves it), except the
fourth, which kills the driver alone: Ray's processes must not outlive it. At the end: the budget exactly,
no trial lost, no configuration twice, nothing RUNNING, and every Optuna record agrees with its trial folder.

Opt-in (MINBERT_KILL_TEST=1, about four minutes on 2 cores): the suite's test_search.py already kills
and resumes at two of these points and stops with SIGTERM at a third."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_search import MAX_EPOCHS, STUDY_TOML, TRIALS, optuna_trials, run_driver
from tiny_model import DATA_DIR, needs_data

from search import storage as names
from search.tune import SearchOptions, StudyPaths, run_search

pytestmark = pytest.mark.skipif(os.environ.get("MINBERT_KILL_TEST") != "1", reason="set MINBERT_KILL_TEST=1 (about 2 minutes)")


def running(trials):
    return [t for t in trials if t.state == TrialState.RUNNING]


def ended(trials):
    return [t for t in trials if t.state.is_finished()]


def kill_points():
    """(label, when, whole group) triples; ``when(trials, log)`` is truthy at the moment to kill."""
    state = {}

    def after_a_trial_ended(trials, log):
        count = len(ended(trials))
        state.setdefault("ended_at_start", count)
        return True if count > state["ended_at_start"] else None

    return [
        ("first-seconds", lambda trials, log: True if running(trials) else None, True),
        ("first-report", lambda trials, log: True if any(t.intermediate_values for t in running(trials)) else None, True),
        ("mid-study", lambda trials, log: True if len(ended(trials)) >= 2 and running(trials) else None, True),
        ("a-trial-just-ended", after_a_trial_ended, False),
        ("last-trial", lambda trials, log: True if len(ended(trials)) == TRIALS - 1 and running(trials) else None, True),
    ]


def check_records_agree_with_folders(study: optuna.Study, paths: StudyPaths) -> None:
    trials = study.trials
    assert len(trials) == TRIALS, [(t.number, t.state.name) for t in trials]
    assert not running(trials)
    configs = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(configs)) == len(configs), configs
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.params["lr"] == 1e30 and t.user_attrs[names.TRIAL_ERROR].startswith("NonFiniteLossError"), t
            continue
        folder = Path(t.user_attrs[names.TRIAL_ARTIFACT_DIR])
        history = json.loads((folder / "metrics.json").read_text())["history"]
        epochs = t.user_attrs[names.TRIAL_EPOCHS_RUN]
        assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), (t.number, history, epochs)
        assert [h["sts"] for h in history] == [t.intermediate_values[e] for e in range(1, epochs + 1)]
        assert (t.state == TrialState.COMPLETE) == (epochs == MAX_EPOCHS)
        assert (folder / "outputs" / "sts-test.npz").is_file() == (t.state == TrialState.COMPLETE), t.number


@needs_data
def test_five_kills_lose_and_repeat_nothing(tmp_path):
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    paths = StudyPaths(tmp_path / "results" / "tiny")
    args = ["--study", str(study_file), "--storage", url, "--results-dir", str(tmp_path / "results"), "--data-dir", str(DATA_DIR)]
    fired = []
    for index, (label, when, group) in enumerate(kill_points()):
        run = run_driver(tmp_path, [*args, "--resume"] if index else args, label, when, signal.SIGKILL, group=group)
        fired.append((label, run.fired is not None, len(optuna_trials(url, "tiny"))))
    outcome = run_search(SearchOptions(study=str(study_file), storage=url, results_dir=tmp_path / "results", resume=True))
    shutil.rmtree(paths.ray_temp_dir(), ignore_errors=True)
    print("kills (point, killed, trials then):", fired)
    assert sum(killed for _, killed, _ in fired) >= 4, fired
    assert outcome.exit_code == 0 and paths.finished.is_file()
    check_records_agree_with_folders(optuna.load_study(study_name="tiny", storage=url), paths)
