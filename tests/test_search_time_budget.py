"""The time budget (search.timebudget): its parsing, the decisions of the driver and of a trial, and a
tiny study run under a budget too short for it, then resumed with a new one."""

from __future__ import annotations

import importlib.util
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_search import STUDY_TOML
from tiny_model import needs_data

from search import storage as names
from search.spec import StudyError
from search.study import load_spec
from search.summary import summarize
from search.timebudget import TIME_BUDGET, TRIAL_START_SECONDS, TimeBudget, next_epoch_fits, parse_duration
from search.tune import SearchOptions, StudyPaths, as_started, main_exit


@pytest.mark.parametrize(
    "text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("1.5h", 5400), ("1h30m", 5400), (120, 120), (" 2m ", 120)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "", "15 minutes", "0", "-5m", "m", "1h30"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(ValueError, match="duration|positive"):
        parse_duration(text)


def test_a_study_file_takes_a_time_budget_and_names_the_key_when_it_is_bad(tmp_path):
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML.replace("[budget]\n", '[budget]\ntime = "15m"\n'))
    assert load_spec(study_file).budget.time_s == 900
    study_file.write_text(STUDY_TOML.replace("[budget]\n", '[budget]\ntime = "soon"\n'))
    with pytest.raises(StudyError, match=r"tiny.toml: budget.time: 'soon' is not a duration"):
        load_spec(study_file)
    study_file.write_text(STUDY_TOML)
    assert load_spec(study_file).budget.time_s is None


def test_no_trial_starts_that_cannot_finish():
    budget = TimeBudget()
    budget.start(None, max_epochs=3)
    assert budget.may_start_trial() and not budget.spent  # no budget: always
    budget.start(100.0, max_epochs=3)
    now = budget.deadline - 100.0
    assert budget.may_start_trial(now)  # nothing measured yet: its start must fit
    assert not budget.may_start_trial(budget.deadline - TRIAL_START_SECONDS / 2) and budget.refused
    budget.start(100.0, max_epochs=3)
    now = budget.deadline - 100.0
    budget.started("a")
    budget.observe({"epoch": 1, "epoch_seconds": 20.0})
    budget.observe({"epoch": 2, "epoch_seconds": 25.0})  # the slowest epoch sets the estimate
    assert budget.start_seconds() == TRIAL_START_SECONDS + 3 * 25.0
    assert budget.may_start_trial(now)  # 95 s <= 100 s
    assert not budget.may_start_trial(now + 10.0) and budget.refused
    assert not budget.spent  # trial "a" still runs
    budget.ended("a")
    assert budget.spent
    budget.start(100.0, max_epochs=3)  # a resumed run: a new deadline, nothing refused yet
    assert not budget.spent and budget.start_seconds() == TRIAL_START_SECONDS and budget.sizing() == ""


def test_the_first_rung_rule_starts_a_trial_that_can_reach_its_first_rung():
    budget = TimeBudget()
    budget.start(200.0, max_epochs=4, grace_period=2, start_rule="first_rung")
    now = budget.deadline - 100.0
    budget.observe({"epoch": 1, "epoch_seconds": 30.0})
    # Four epochs (140 s with the start) do not fit in the 100 s left, the first rung's two (80 s) do.
    assert budget.start_seconds() == TRIAL_START_SECONDS + 2 * 30.0 and budget.may_start_trial(now)
    assert budget.goal == "reach its first rung" and "to reach its first rung" in budget.sizing()
    budget.start(200.0, max_epochs=4, grace_period=2)  # the default rule: the whole trial must fit
    budget.observe({"epoch": 1, "epoch_seconds": 30.0})
    assert not budget.may_start_trial(now) and budget.goal == "finish"
    with pytest.raises(ValueError, match="start_rule: 'rung' is not one of"):
        budget.start(200.0, max_epochs=4, start_rule="rung")


def test_a_study_file_and_the_command_line_take_a_start_rule(tmp_path):
    script = importlib.util.spec_from_file_location("run_search", Path(__file__).resolve().parent.parent / "run_search.py")
    run_search = importlib.util.module_from_spec(script)
    script.loader.exec_module(run_search)  # a script at the project's root, not an installed module
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML.replace("[budget]\n", '[budget]\nstart_rule = "first_rung"\n'))
    assert load_spec(study_file).budget.start_rule == "first_rung"
    study_file.write_text(STUDY_TOML.replace("[budget]\n", '[budget]\nstart_rule = "rung"\n'))
    with pytest.raises(StudyError, match=r"tiny.toml: budget.start_rule: must be one of \['finish', 'first_rung'\]"):
        load_spec(study_file)
    study_file.write_text(STUDY_TOML.replace("[budget]\n", "[budget]\nstart_rule = 1\n"))
    with pytest.raises(StudyError, match=r"budget.start_rule: must be a string"):
        load_spec(study_file)
    study_file.write_text(STUDY_TOML)
    assert load_spec(study_file).budget.start_rule == "finish"
    assert run_search.build_parser().parse_args(["--start-rule", "first_rung"]).start_rule == "first_rung"
    assert run_search.build_parser().parse_args([]).start_rule is None  # the study file's rule


def test_a_resumed_run_takes_the_budget_it_started_with(tmp_path, capsys):
    """The stored budget wins over the study file's (the rule a run started with is kept when --resume
    gives none); one stored before start_rule existed resumes under "finish"; a field this version does
    not know is refused by name."""
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    spec = load_spec(study_file)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    stored = optuna.create_study(study_name=spec.name, storage=url)
    stored.set_user_attr("budget", {**spec.budget.__dict__, "time_s": 600.0, "start_rule": "first_rung"})
    options = SearchOptions(study=str(study_file), storage=url)
    resumed, _ = as_started(spec, options)
    assert "resuming under the time budget the run started with (10m), counted from now" in capsys.readouterr().out
    assert (resumed.budget.start_rule, resumed.budget.time_s) == ("first_rung", 600.0)
    assert resumed.with_budget(start_rule="finish").budget.start_rule == "finish"  # --start-rule on the resume
    older = {k: v for k, v in spec.budget.__dict__.items() if k != "start_rule"}
    stored.set_user_attr("budget", {**older, "time_s": 600.0})
    assert as_started(spec, options)[0].budget.start_rule == "finish"
    stored.set_user_attr("budget", {**older, "rungs": 3})
    with pytest.raises(StudyError, match=r"budget fields this version does not know \(rungs\)"):
        as_started(spec, options)


def test_the_spent_message_sizes_a_trial_once_an_epoch_was_measured():
    budget = TimeBudget()
    budget.start(600.0, max_epochs=2)
    assert budget.sizing() == ""  # nothing measured yet
    budget.epoch_seconds += [100.0, 130.0]
    minutes = (TRIAL_START_SECONDS + 2 * 130.0) / 60
    assert budget.sizing() == f" (a trial takes about {minutes:.1f} min here, estimated as its start and 2 x the slowest epoch)"
    budget.epoch_seconds[:] = [10.0]
    assert budget.sizing().startswith(f" (a trial takes about {TRIAL_START_SECONDS + 20:.0f} s here")


def test_a_trial_stops_when_its_next_epoch_would_end_past_the_deadline():
    assert next_epoch_fits(None, 1e9)
    assert next_epoch_fits(deadline=100.0, epoch_seconds=30.0, now=70.0)
    assert not next_epoch_fits(deadline=100.0, epoch_seconds=30.0, now=70.1)


def test_a_restored_search_generator_may_start_trials_again():
    from ray.tune.search import Searcher, SearchGenerator

    from search.adapters import ResumableSearchGenerator

    stopped = SearchGenerator(Searcher())
    stopped.set_finished()  # what Ray's stopper does when it ends an experiment
    state = {**stopped.get_state(), "total_samples": 6}  # 0 of 6 trials created
    plain, ours = SearchGenerator(Searcher()), ResumableSearchGenerator(Searcher())
    plain.set_state(state)
    ours.set_state(state)
    assert plain.is_finished() and not ours.is_finished()


@needs_data
def test_a_study_stops_within_its_time_budget_and_resumes_with_a_new_one(tmp_path):
    """Three tiny trials, one at a time. Under 10 s (Ray's start included) none can start: a trial's
    start alone is estimated at TRIAL_START_SECONDS. Resumed under 35 s (Ray saved an experiment
    without trials, which its own restore cannot read), not all can run: every record is truthful
    (nothing RUNNING, trials cut short PRUNED with their epochs). Resumed with a long budget, the rest run."""
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    options = SearchOptions(
        study=str(study_file), storage=f"sqlite:///{tmp_path / 'o.db'}", results_dir=tmp_path / "r", trials=3, time_budget=10.0
    )
    out = io.StringIO()
    with redirect_stdout(out):
        main_exit(options)
    assert "The time budget (10s) is spent" in out.getvalue() and "--resume" in out.getvalue()
    study = optuna.load_study(study_name="tiny", storage=options.storage)
    assert not [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    out = io.StringIO()
    with redirect_stdout(out):
        main_exit(SearchOptions(**{**options.__dict__, "resume": True, "time_budget": 35.0}))
    trials = study.get_trials(deepcopy=False)
    ended = [t for t in trials if t.state.is_finished()]
    assert "The time budget (35s) is spent" in out.getvalue()
    assert re.search(r"no other could finish in time \(a trial takes about [0-9.]+ (s|min) here", out.getvalue())
    assert 1 <= len(ended) < 3 and not [t for t in trials if t.state == TrialState.RUNNING]
    assert not StudyPaths(tmp_path / "r" / "tiny").finished.is_file()  # unfinished, not failed
    for trial in trials:
        if trial.user_attrs.get(names.TRIAL_STOPPED_FOR_TIME):
            assert trial.state == TrialState.PRUNED and trial.user_attrs[names.TRIAL_EPOCHS_RUN] >= 1
    resumed = SearchOptions(**{**options.__dict__, "resume": True, "time_budget": 600.0, "start_rule": "first_rung"})
    with redirect_stdout(io.StringIO()):
        main_exit(resumed)
    assert TIME_BUDGET.start_rule == "first_rung"  # the command line's rule reached the driver's budget
    trials = study.get_trials(deepcopy=False)
    assert len([t for t in trials if t.state.is_finished()]) == 3
    assert StudyPaths(tmp_path / "r" / "tiny").finished.is_file()


def test_the_summary_counts_trials_stopped_for_time_and_start_points_never_started(tmp_path):
    """A run ended by its budget: PRUNED by ASHA and by the budget are told apart, and start points still
    queued in Optuna (WAITING) are counted, not silently left out of the total."""
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    spec = load_spec(study_file)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name=spec.name, storage=url, direction="maximize")
    for state, attrs in [
        (TrialState.COMPLETE, {names.TRIAL_BEST_VALUE: 0.8, names.TRIAL_EPOCHS_RUN: 2}),
        (TrialState.PRUNED, {names.TRIAL_BEST_VALUE: 0.7, names.TRIAL_EPOCHS_RUN: 1}),
        (TrialState.PRUNED, {names.TRIAL_BEST_VALUE: 0.75, names.TRIAL_EPOCHS_RUN: 1, names.TRIAL_STOPPED_FOR_TIME: True}),
    ]:
        study.add_trial(
            optuna.trial.create_trial(
                state=state, value=attrs[names.TRIAL_BEST_VALUE] if state == TrialState.COMPLETE else None, user_attrs=attrs
            )
        )
    study.enqueue_trial({"lr": 5e-5})
    out = io.StringIO()
    with redirect_stdout(out):
        summarize(spec, url, StudyPaths(tmp_path / "r" / spec.name), top=3)
    assert (
        "4 trials: 1 complete, 1 stopped early by ASHA (PRUNED), 1 stopped by the time budget (PRUNED), 0 failed, "
        "0 running, 1 queued start point(s) not started (WAITING)"
    ) in out.getvalue()


def test_a_trial_reports_its_epoch_time_and_stops_when_the_next_epoch_cannot_fit(tmp_path, monkeypatch):
    """run_trial around a stand-in trainer whose epochs take 0.2 s, with 0.3 s left: epoch 1 is
    reported with its wall time and the flag, and the trial ends there without an error."""
    import time

    import ray.tune

    import search.trial
    from search.adapters import TRIAL_NUMBER_KEY
    from search.trial import TrialJob, run_trial

    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    reports, trained = [], []

    def fake_train(config, output_dir, report, data_dir=None, threads=None):
        for epoch in (1, 2, 3):
            time.sleep(0.2)
            trained.append(epoch)
            report({"epoch": epoch, "sts": 0.5})

    monkeypatch.setattr(search.trial, "train", fake_train)
    monkeypatch.setattr(ray.tune, "report", lambda metrics: reports.append(metrics))
    job = TrialJob(study=load_spec(study_file), artifacts_root=str(tmp_path / "trials"), deadline=time.time() + 0.3)
    run_trial({TRIAL_NUMBER_KEY: 1, "lr": 1e-3, "dropout": 0.0}, job)
    assert trained == [1] and [r["epoch"] for r in reports] == [1]
    assert reports[0][names.TRIAL_STOPPED_FOR_TIME] is True and reports[0]["epoch_seconds"] >= 0.2
    # Without a deadline every epoch runs, and none says it stopped for time.
    reports.clear(), trained.clear()
    run_trial({TRIAL_NUMBER_KEY: 2, "lr": 1e-3, "dropout": 0.0}, TrialJob(study=job.study, artifacts_root=job.artifacts_root))
    assert trained == [1, 2, 3] and not any(names.TRIAL_STOPPED_FOR_TIME in r for r in reports)
