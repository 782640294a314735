"""One study on the tiny BERT, its driver killed with SIGKILL at nine points, each time resumed with
--resume, on SQLite and on PostgreSQL. Four points lie between a trial being asked and its first report
recorded, too short to hit from outside, so the driver kills itself there (tests/kill_at.py): inside
Optuna's ask of the start point (RUNNING, no params), params written but not the trial's folder, the
config handed to Ray, the first report received but not recorded; then inside the ask of a sampled
trial. Five are hit by polling the storage: the first report, mid-study, right after a trial ended,
the last trial. The polled kills take the whole process group (as a crashed machine leaves it), except
"a-trial-just-ended", which kills the driver alone, as the self-kills do: Ray's processes must not
outlive it. After "mid-study" the searcher's checkpoint is put back to the one the self-kills left
(older than Ray's trial list), after "a-trial-just-ended" it is removed: what a driver killed while
Ray copied its experiment files can leave. At the end: the budget exactly, no trial lost, no configuration twice, nothing RUNNING,
and every Optuna record agrees with its trial folder.

Opt-in (MINBERT_KILL_TEST=1, several minutes on 2 cores): the suite's test_search.py already kills
and resumes at two of these points and stops with SIGTERM at a third; test_adapters.py adopts a trial
killed inside its ask."""

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
from test_search_postgres import postgres_url  # noqa: F401 (a fixture)
from tiny_model import DATA_DIR, needs_data

from search import storage as names
from search.adapters import SEARCHER_CHECKPOINT_FILES
from search.tune import SearchOptions, StudyPaths, run_search

pytestmark = pytest.mark.skipif(os.environ.get("MINBERT_KILL_TEST") != "1", reason="set MINBERT_KILL_TEST=1 (several minutes)")


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


def save_searcher_checkpoint(experiment: Path, aside: Path) -> Path:
    aside.mkdir()
    for pattern in SEARCHER_CHECKPOINT_FILES:
        for saved in experiment.glob(pattern):
            shutil.copy2(saved, aside / saved.name)
    assert any(aside.iterdir()), "Ray saved no searcher checkpoint in the first runs"
    return aside


def replace_searcher_checkpoint(experiment: Path, aside: Path | None) -> None:
    """The searcher's files in Ray's experiment folder become those set aside (None: none at all)."""
    for pattern in SEARCHER_CHECKPOINT_FILES:
        for saved in experiment.glob(pattern):
            saved.unlink()
    for saved in aside.iterdir() if aside else ():
        shutil.copy2(saved, experiment / saved.name)


# Ray's processes end with a killed driver: within the reaper's poll and a process's exit, not when a
# worker notices by itself that its raylet is gone (15-50 s).
LINGER_LIMIT_S = 5.0

# Points of tests/kill_at.py, in this order: each resumed run first adopts what the last one left.
SELF_KILLS = ["asking-start-point", "params-recorded", "suggested", "report-unrecorded", "asking-sampled"]


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    return f"sqlite:///{tmp_path / 'optuna.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


@needs_data
def test_nine_kills_lose_and_repeat_nothing(tmp_path, storage_url):
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    paths = StudyPaths(tmp_path / "results" / "tiny")
    args = ["--study", str(study_file), "--storage", storage_url, "--results-dir", str(tmp_path / "results")]
    args += ["--data-dir", str(DATA_DIR)]
    fired = []
    for index, point in enumerate(SELF_KILLS):
        run = run_driver(tmp_path, [*args, "--resume"] if index else args, point, lambda *_: None, 0, False, kill_at=point)
        assert run.returncode == -signal.SIGKILL, (point, run.log[-3000:])
        fired.append((point, True, len(optuna_trials(storage_url, "tiny")), round(run.linger_s, 1)))
    early_checkpoint = save_searcher_checkpoint(paths.experiment, tmp_path / "early-checkpoint")
    for label, when, group in kill_points():
        run = run_driver(tmp_path, [*args, "--resume"], label, when, signal.SIGKILL, group=group)
        fired.append((label, run.fired is not None, len(optuna_trials(storage_url, "tiny")), round(run.linger_s, 1)))
        # What a driver killed while Ray copied its experiment can leave (Ray copies the trial list and the
        # searcher's checkpoint as separate files): a searcher checkpoint older than the trial list, then none.
        if label == "mid-study":
            replace_searcher_checkpoint(paths.experiment, early_checkpoint)
        if label == "a-trial-just-ended":
            replace_searcher_checkpoint(paths.experiment, None)
    outcome = run_search(SearchOptions(study=str(study_file), storage=storage_url, results_dir=tmp_path / "results", resume=True))
    shutil.rmtree(paths.ray_temp_dir(), ignore_errors=True)
    print("kills (point, killed, trials then, seconds Ray's processes outlived the driver):", fired)
    assert sum(killed for _, killed, _, _ in fired) >= len(SELF_KILLS) + 3, fired
    assert max(linger for *_, linger in fired) <= LINGER_LIMIT_S, fired
    assert outcome.exit_code == 0 and paths.finished.is_file()
    check_records_agree_with_folders(optuna.load_study(study_name="tiny", storage=storage_url), paths)
