"""A full disk: the trial that cannot write fails with a clear message, the driver stops the study
at once (instead of spending the budget on the same error), leaves nothing RUNNING, and the study
resumes once there is space again. Runs Ray twice on the tiny BERT (about 30 s)."""

from __future__ import annotations

import shutil

import optuna
from optuna.trial import TrialState
from test_search import STUDY_TOML
from tiny_model import DATA_DIR, needs_data

import search.tune
import search.tuner
from search import storage as names
from search.tune import EXIT_NO_SUCCESS, SearchOptions, StudyPaths, run_search

TRIALS = 3


@needs_data
def test_a_full_disk_stops_the_study_cleanly_and_it_resumes(tmp_path, monkeypatch, capfd):
    study_file = tmp_path / "tiny.toml"
    toml = STUDY_TOML.replace("trials = 6", f"trials = {TRIALS}").replace("startup_trials = 6", f"startup_trials = {TRIALS}")
    study_file.write_text(toml.replace("max_epochs = 3", "max_epochs = 1").replace("1e-3, 3e-3, 1e30", "1e-3, 3e-3"))
    url = f"sqlite:///{tmp_path / 'o.db'}"
    options = SearchOptions(study=str(study_file), storage=url, results_dir=tmp_path / "r", data_dir=str(DATA_DIR))
    paths = StudyPaths(tmp_path / "r" / "tiny")

    def run_trial(config, job):  # Ray's restore checks the trainable's name
        """run_trial in a Ray worker whose every atomic write fails with ENOSPC (a nested function, so
        that cloudpickle sends it by value; the worker imports the real modules and patches its own)."""
        import errno

        import data.atomic
        import model.rundir
        from search.trial import run_trial as real_run_trial

        def no_space(path, write):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        data.atomic.atomic_write = model.rundir.atomic_write = no_space  # the project's one file writer
        return real_run_trial(config, job)

    with monkeypatch.context() as patch:
        patch.setattr(search.tuner, "run_trial", run_trial)
        outcome = run_search(options)
    out, err = capfd.readouterr()
    said = out + err
    print(said)  # shown when the test fails
    assert outcome.exit_code == EXIT_NO_SUCCESS, said
    assert "Stopped: trial 0 could not write its files (DiskFullError: trial 0 cannot write its files in" in said
    assert "No space left on device" in said and "Free some space, then continue with: python run_search.py" in said
    assert "Traceback" not in said
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[names.TRIAL_ERROR].startswith("DiskFullError: ")
    assert len(trials) < TRIALS, "the budget was spent on the same error"
    assert all(t.state == TrialState.FAIL for t in trials)  # nothing left RUNNING
    assert not paths.finished.exists()

    options.resume = True
    outcome = run_search(options)
    shutil.rmtree(paths.ray_temp_dir(), ignore_errors=True)
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert outcome.exit_code == 0 and paths.finished.is_file()
    assert len(trials) == TRIALS and [t.state for t in trials].count(TrialState.COMPLETE) == TRIALS - len(
        [t for t in trials if t.state == TrialState.FAIL]
    )
