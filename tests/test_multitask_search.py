"""The multitask search end to end on a tiny random BERT: per-task encodings (a variant), every
surgery choice, and a trial that fails; then the per-task ensemble of the study, with leaderboard
CSVs for all three tasks on dev and test."""

from __future__ import annotations

import csv
import json
import shutil

import optuna
import pytest
from optuna.trial import TrialState
from tiny_model import DATA_DIR, TINY_BERT, needs_data

from ensemble import build as ensemble_build
from ensemble import predict as ensemble_predict
from search import storage as names
from search.tune import SearchOptions, StudyPaths, run_search

TASKS = ("sst", "para", "sts")
# One trial per surgery choice, each with its own encoding; the last diverges (lr 1e30).
START_POINTS = [
    {"surgery": "none", "lr": 1e-3, "encoder": "mixed"},
    {"surgery": "pcgrad", "lr": 1e-3, "encoder": "cross"},
    {"surgery": "gradvac", "lr": 1e-3, "encoder": "mixed"},
    {"surgery": "pcgrad", "lr": 1e30, "encoder": "mixed"},
]
STUDY_TOML = f"""
description = "tiny random BERT, three tasks, every surgery, per-task encodings; one trial diverges"
tasks = ["sst", "para", "sts"]

[objective]
metric = "overall"
direction = "maximize"

[budget]
trials = {len(START_POINTS)}
max_epochs = 1
grace_period = 1
max_concurrent = 1
cpus_per_trial = 1
seed = 3
trial_seeds = true

[search]
surgery = {{ choices = ["none", "pcgrad", "gradvac"] }}
lr = {{ choices = [1e-3, 1e30] }}

[variants.encoder]
mixed = {{ pair_encoding = {{ para = "cross", sts = "bi" }}, sts_head = "cosine" }}
cross = {{ pair_encoding = "cross", sts_head = "regression" }}

[fixed]
model_config = {json.dumps(TINY_BERT).replace('": ', '" = ')}
train_limit = 24
eval_limit = 24
max_length = 32
batch_size = 8
steps_per_epoch = 4
""" + "".join("\n[[start_points]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in point.items()) for point in START_POINTS)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multitask-search")
    study_file = tmp / "tinymt.toml"
    study_file.write_text(STUDY_TOML)
    url = f"sqlite:///{tmp / 'optuna.db'}"
    results = tmp / "results"
    outcome = run_search(SearchOptions(study=str(study_file), storage=url, results_dir=results, data_dir=str(DATA_DIR)))
    shutil.rmtree(StudyPaths(results / "tinymt").ray_temp_dir(), ignore_errors=True)
    return {"url": url, "results": results, "outcome": outcome, "tmp": tmp}


@needs_data
def test_every_surgery_and_encoding_trains_and_the_failure_is_recorded(searched):
    study = optuna.load_study(study_name="tinymt", storage=searched["url"])
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert [t.params for t in trials] == START_POINTS
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3 + [TrialState.FAIL]
    assert "loss is" in trials[3].user_attrs[names.TRIAL_ERROR]
    for trial in trials[:3]:
        config = json.loads((searched["results"] / "tinymt" / "trials" / str(trial.number) / "config.json").read_text())
        expected = {"para": "cross", "sts": "bi"} if trial.params["encoder"] == "mixed" else "cross"
        assert config["train"]["surgery"] == trial.params["surgery"] and config["train"]["pair_encoding"] == expected
        assert trial.value == pytest.approx(trial.user_attrs[names.TRIAL_BEST_VALUE])
        assert set(trial.intermediate_values) == {1}


@needs_data
def test_the_ensemble_of_the_study_predicts_every_task(searched, capsys):
    out = searched["tmp"] / "ensemble"
    argv = ["--study", "tinymt", "--storage", searched["url"], "--output-dir", str(out), "--data-dir", str(DATA_DIR)]
    assert ensemble_build.main([*argv, "--method", "caruana", "top-k", "--splits", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "tinymt/trial 3" not in json.dumps(summary["members"])  # the failed trial is never a member
    manifest = json.loads((out / "caruana" / "predictor" / "manifest.json").read_text())
    assert set(manifest["tasks"]) == set(TASKS)
    for task in TASKS:
        for split in ("dev", "test"):
            with open(out / "caruana" / "predictions" / f"{task}-{split}-out.csv", newline="") as fp:
                rows = list(csv.reader(fp))
            assert rows[0][0].strip() == "id" and len(rows) == 1 + 24
    # The predictor runs again from its folder on every task it covers.
    again = searched["tmp"] / "again"
    assert ensemble_predict.main(["--ensemble", str(out / "caruana"), "--splits", "dev", "--output-dir", str(again)]) == 0
    assert {p.name for p in again.rglob("*-out.csv")} == {f"{t}-dev-out.csv" for t in TASKS}
