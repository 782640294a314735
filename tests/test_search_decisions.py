"""run_search's decisions without Ray: start, refuse, rename, resume, delete; what it reports at the
end; and the ASHA rung refill, on a study file and storage of its own."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_search import STUDY_TOML

from search import storage as names
from search.adapters import ORPHAN_ERROR
from search.options import command_line
from search.paths import StudyPaths
from search.summary import EXIT_REFUSED, best_ray_result
from search.tune import SearchOptions, run_search


class FakeResult:
    def __init__(self, values, error=None):
        import pandas as pd

        self.metrics_dataframe = pd.DataFrame({"sts": values})
        self.error = error
        self.config = {}


def test_best_ray_result_never_picks_an_errored_trial():
    errored = FakeResult([0.9, 0.95], error=RuntimeError("diverged"))
    good, better = FakeResult([0.2, 0.5]), FakeResult([0.7, 0.6])
    assert best_ray_result([errored, good, better], "sts", "max") is better
    assert best_ray_result([errored, FakeResult([float("nan")])], "sts", "max") is None


def test_ray_is_cross_checked_only_when_its_results_hold_the_recorded_best():
    """A resume that had to start a new Ray experiment holds only the trials run since: no note then."""
    from types import SimpleNamespace

    from search.adapters import TRIAL_NUMBER_KEY
    from search.summary import ray_disagreement

    def result(number, values):
        found = FakeResult(values)
        found.config = {TRIAL_NUMBER_KEY: number}
        return found

    ranked = [SimpleNamespace(number=1), SimpleNamespace(number=2)]  # the Optuna records: trial 1 best
    assert ray_disagreement([result(1, [0.8]), result(2, [0.5])], "sts", "max", ranked) is None
    note = ray_disagreement([result(1, [0.4]), result(2, [0.5])], "sts", "max", ranked)
    assert note == "Note: by Ray's results the best non-errored trial is 2, not 1."
    assert ray_disagreement([result(2, [0.5]), result(3, [0.6])], "sts", "max", ranked) is None  # trial 1 not in Ray's
    assert ray_disagreement([result(1, [0.4])], "sts", "max", []) is None
    without_config = FakeResult([0.9], error=RuntimeError("disk full"))
    without_config.config = None  # what Ray gives for a trial that errored before its first report
    assert ray_disagreement([without_config, result(1, [0.8])], "sts", "max", ranked) is None


@pytest.fixture
def no_ray(tmp_path, monkeypatch):
    """run_search with execute() replaced by a recorder, a study file and locations in tmp_path."""
    import search.tune

    calls = []

    def fake_execute(study, options, paths, data_dir):
        in_storage = "tiny" in optuna.study.get_all_study_names(options.storage)
        calls.append({"study": study, "options": options, "in_storage": in_storage})
        return search.tune.Outcome(0)

    monkeypatch.setattr(search.tune, "execute", fake_execute)
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    options = SearchOptions(study=str(study_file), storage=f"sqlite:///{tmp_path / 'o.db'}", results_dir=tmp_path / "results")
    return calls, options, StudyPaths(tmp_path / "results" / "tiny")


def test_new_study_runs_with_command_line_overrides(no_ray):
    calls, options, _ = no_ray
    options.trials, options.cpus_per_trial = 2, 0.5
    assert run_search(options).exit_code == 0
    assert calls[0]["study"].budget.trials == 2 and calls[0]["study"].budget.cpus_per_trial == 0.5


def test_name_renames_study_and_results_folder(no_ray, capsys):
    from search.tune import main_exit

    calls, options, _ = no_ray
    options.name = "tiny-no-asha"
    assert run_search(options).exit_code == 0 and calls[0]["study"].name == "tiny-no-asha"
    options.name = "../elsewhere"
    assert main_exit(options) == EXIT_REFUSED and "--name '../elsewhere'" in capsys.readouterr().err


def test_unfinished_study_is_not_appended_to(no_ray, capsys):
    calls, options, paths = no_ray
    optuna.create_study(study_name="tiny", storage=options.storage)
    assert run_search(options).exit_code == EXIT_REFUSED and not calls
    said = capsys.readouterr().out
    assert "already has an unfinished run" in said
    assert f"--resume --storage {options.storage} --results-dir {options.results_dir}" in said


def test_finished_study_says_so(no_ray, capsys):
    calls, options, paths = no_ray
    optuna.create_study(study_name="tiny", storage=options.storage)
    paths.root.mkdir(parents=True)
    paths.finished.write_text("{}")
    outcome = run_search(options)
    assert not calls and "has already finished" in capsys.readouterr().out
    assert outcome.exit_code == 1  # and no trial of it succeeded


def test_fresh_deletes_study_and_results_first(no_ray, capsys):
    calls, options, paths = no_ray
    optuna.create_study(study_name="tiny", storage=options.storage).ask()
    (paths.trials / "0").mkdir(parents=True)
    options.fresh, options.trials = True, 2
    assert run_search(options).exit_code == 0 and calls[0]["study"].budget.trials == 2
    said = capsys.readouterr().out
    assert "--fresh: deleting Optuna study 'tiny' (1 trials)" in said and f"--fresh: deleting {paths.root}" in said
    assert calls and not calls[0]["in_storage"] and not paths.root.exists()


def test_resume_needs_something_and_uses_the_saved_study_file(no_ray, capsys):
    calls, options, paths = no_ray
    options.resume = True
    assert run_search(options).exit_code == EXIT_REFUSED and "Nothing to resume" in capsys.readouterr().out
    started = optuna.create_study(study_name="tiny", storage=options.storage)
    paths.root.mkdir(parents=True)
    paths.snapshot.write_text(STUDY_TOML)
    Path(options.study).write_text(STUDY_TOML.replace("max_epochs = 3", "max_epochs = 2"))
    options.trials = 50
    assert run_search(options).exit_code == 0
    said = capsys.readouterr().out
    assert "changed since the run started" in said and "--trials and --max-concurrent do not change a resumed run" in said
    assert calls[0]["study"].budget.max_epochs == 3 and calls[0]["study"].path == Path(options.study)
    # The budget the run started with (e.g. `--trials 2`) is the one a resumed run finishes.
    started.set_user_attr("budget", {**calls[0]["study"].budget.__dict__, "trials": 2})
    options.cpus_per_trial = 0.5
    assert run_search(options).exit_code == 0
    assert calls[1]["study"].budget.trials == 2 and calls[1]["study"].budget.cpus_per_trial == 0.5


def test_bad_study_file_exits_2_naming_it(tmp_path, capsys):
    from search.tune import main_exit

    bad = tmp_path / "bad.toml"
    bad.write_text(STUDY_TOML.replace("grace_period = 1", "grace_period = 9"))
    assert main_exit(SearchOptions(study=str(bad), storage=f"sqlite:///{tmp_path / 'o.db'}")) == EXIT_REFUSED
    assert f"error: {bad}: budget.grace_period: must be between 1 and max_epochs" in capsys.readouterr().err


def test_asha_rungs_are_refilled_from_optuna(tmp_path):
    from search.adapters import ResumableASHA, fail_running_trials

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    for ray_id, values in (("a", [0.1, 0.4, 0.5]), ("b", [0.3]), ("c", [])):
        trial = study.ask()
        trial.set_user_attr(names.TRIAL_RAY_ID, ray_id)
        for epoch, value in enumerate(values, 1):
            trial.report(value, epoch)
    asha = ResumableASHA(
        storage_url=url, study_name="s", time_attr="epoch", metric="sts", mode="max", max_t=4, grace_period=1, reduction_factor=2
    )
    asha.seed_rungs(study)
    rungs = dict(asha._brackets[0]._rungs)
    assert rungs == {4: {}, 2: {"a": 0.4}, 1: {"a": 0.1, "b": 0.3}}
    assert fail_running_trials(study, keep={0}) == [1, 2]
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.FAIL]
    assert study.trials[1].user_attrs[names.TRIAL_ERROR] == ORPHAN_ERROR


def test_missing_data_fails_before_anything_starts(tmp_path, capsys):
    from search.tune import main_exit

    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    options = SearchOptions(study=str(study_file), storage=f"sqlite:///{tmp_path / 'o.db'}", results_dir=tmp_path / "r")
    options.data_dir = str(tmp_path / "no-data")
    assert main_exit(options) == EXIT_REFUSED
    assert f"{tmp_path / 'no-data' / 'sts-train.csv'}: file not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_cpu_without_bf16_hardware_is_told_its_trials_train_in_fp32(no_ray, monkeypatch):
    import dataclasses

    import search.tune

    calls, options, _ = no_ray
    run_search(options)
    study = calls[0]["study"]
    cpu_only = dataclasses.replace(study, budget=dataclasses.replace(study.budget, gpus_per_trial=0))
    monkeypatch.setattr(search.tune, "cpu_has_bf16_matmul", lambda: False)
    assert "fp32" in search.tune.fp32_note(cpu_only, options)
    # Not when the CPU has it, the study fixes or searches a precision, trials get GPUs, or a cluster runs them.
    variants = {"numbers": {"fast": {"precision": "bf16"}, "exact": {"precision": "fp32"}}}
    assert search.tune.fp32_note(dataclasses.replace(cpu_only, variants=variants), options) is None
    assert search.tune.fp32_note(dataclasses.replace(cpu_only, fixed={**cpu_only.fixed, "precision": "fp32"}), options) is None
    assert (
        search.tune.fp32_note(dataclasses.replace(study, budget=dataclasses.replace(study.budget, gpus_per_trial=1)), options)
        is None
    )
    assert search.tune.fp32_note(cpu_only, dataclasses.replace(options, address="10.0.0.1:6379")) is None
    monkeypatch.setattr(search.tune, "cpu_has_bf16_matmul", lambda: True)
    assert search.tune.fp32_note(cpu_only, options) is None


def test_first_rung_without_early_stopping_says_every_late_trial_is_cut(no_ray, capsys):
    calls, options, _ = no_ray
    note = "with --no-early-stopping there is no first rung"
    options.time_budget = 600.0
    for early_stopping, start_rule, noted in [(False, "first_rung", True), (True, "first_rung", False), (False, "finish", False)]:
        options.early_stopping, options.start_rule = early_stopping, start_rule
        assert run_search(options).exit_code == 0
        assert (note in capsys.readouterr().out) == noted


def test_model_path_is_checked_made_absolute_recorded_and_kept_on_resume(no_ray, capsys, tmp_path, monkeypatch):
    """--model-path: a directory lacking a file a trial reads is refused before anything runs, naming
    what is missing; a relative one is resolved where the command runs (a trial runs in its own folder);
    the run records it, a resume keeps it and refuses another."""
    from search.tune import main_exit
    from search.tuner import prepare_optuna_study

    calls, options, paths = no_ray
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text("{}")
    options.model_path = str(bert)
    assert main_exit(options) == EXIT_REFUSED and not calls
    said = capsys.readouterr().err
    assert "tiny.toml: model_path (fixed, or --model-path)" in said
    assert "no vocab.txt, no model.safetensors or pytorch_model.bin" in said
    (bert / "vocab.txt").write_text("[PAD]\n")
    (bert / "pytorch_model.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    options.model_path = "bert"
    assert run_search(options).exit_code == 0
    study = calls[0]["study"]
    assert study.fixed["model_path"] == str(bert.resolve())
    assert study.train_config({"lr": 1e-3, "dropout": 0.0})["model_path"] == str(bert.resolve())
    optuna.create_study(study_name="tiny", storage=options.storage)
    paths.root.mkdir(parents=True)
    paths.snapshot.write_text(STUDY_TOML)  # the study file's copy: it has no model_path
    prepare_optuna_study(study, options.storage, paths, options)  # what the run records
    options.resume, options.model_path = True, None
    assert run_search(options).exit_code == 0 and calls[1]["study"].fixed["model_path"] == str(bert.resolve())
    options.model_path = str(bert)  # the same directory, spelled otherwise
    assert run_search(options).exit_code == 0
    options.model_path = str(tmp_path)
    assert main_exit(options) == EXIT_REFUSED
    assert f"was started with the model in {bert.resolve()}, not {tmp_path}" in capsys.readouterr().err


def test_a_resume_without_the_study_in_storage_is_refused_when_trials_ran(no_ray, capsys):
    """Trials on disk but no Optuna study in this storage: the run was recorded elsewhere (another
    --storage) or its records are lost, and a new empty study would train the ended trials again."""
    calls, options, paths = no_ray
    (paths.trials / "0").mkdir(parents=True)
    paths.snapshot.write_text(STUDY_TOML)
    options.resume = True
    assert run_search(options).exit_code == EXIT_REFUSED and not calls
    said = capsys.readouterr().out
    assert f"has trials in {paths.root} but no Optuna study in {options.storage}" in said and "--storage" in said
    assert "tiny" not in optuna.study.get_all_study_names(options.storage)


def test_fresh_checks_the_new_run_before_deleting_the_old_one(no_ray, capsys):
    from search.tune import main_exit

    calls, options, paths = no_ray
    optuna.create_study(study_name="tiny", storage=options.storage).ask()
    (paths.trials / "0").mkdir(parents=True)
    options.fresh, options.model_path = True, str(paths.root / "no-such-model")
    assert main_exit(options) == EXIT_REFUSED and "no such directory" in capsys.readouterr().err
    options.model_path, options.max_concurrent = None, 0
    assert main_exit(options) == EXIT_REFUSED and "budget.max_concurrent" in capsys.readouterr().err
    assert "tiny" in optuna.study.get_all_study_names(options.storage) and (paths.trials / "0").is_dir() and not calls


def test_a_resume_keeps_how_the_run_started(no_ray, capsys):
    """Without ASHA (--no-early-stopping) it stays without, whatever the resume command says; a run
    recorded before the model attribute existed keeps its study file's model_path."""
    from model.bert import default_model_path

    calls, options, paths = no_ray
    started = optuna.create_study(study_name="tiny", storage=options.storage)
    started.set_user_attr("early_stopping", False)
    paths.root.mkdir(parents=True)
    model = default_model_path()
    paths.snapshot.write_text(STUDY_TOML.replace("[fixed]\n", f'[fixed]\nmodel_path = "{model}"\n'))
    options.resume, options.model_path = True, str(model)
    assert run_search(options).exit_code == 0
    assert calls[0]["options"].early_stopping is False and calls[0]["study"].fixed["model_path"] == str(model.resolve())
    assert "started without early stopping (ASHA), and resumes so" in capsys.readouterr().out
    assert "--no-early-stopping" in command_line(calls[0]["options"], "--resume")
