"""Ensembles built from tiny trials trained here and recorded in a throw-away Optuna study."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from safetensors.torch import load_file
from tiny_model import DATA_DIR, needs_data, tiny_config

from ensemble import build as ensemble_build
from ensemble import predict as ensemble_predict
from ensemble.logits import align_outputs, average_outputs, fit_weights, score_outputs
from ensemble.members import EnsembleError, MemberSkippedWarning, NoUsableTrialError, select_members
from ensemble.soup import IncompatibleMembersError, average_checkpoints, check_compatible
from model.metrics import task_metric
from model.train import train

pytestmark = needs_data
optuna.logging.set_verbosity(optuna.logging.WARNING)

TASKS = ["sst", "para", "sts"]
LR = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)


def add_trial(
    study: optuna.Study, artifact_dir: Path | None, value: float | None, state=optuna.trial.TrialState.COMPLETE, **attrs
):
    user_attrs = {"epochs_run": 1, "early_stopped": False, **attrs}
    if artifact_dir is not None:
        user_attrs["artifact_dir"] = str(artifact_dir)
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            value=value,
            params={"lr": 1e-3},
            distributions={"lr": LR},
            user_attrs=user_attrs,
            intermediate_values={0: value if value is not None else 0.9},
        )
    )


def new_study(url: str, name: str) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for key, value in {"metric": "overall", "direction": "maximize", "tasks": TASKS}.items():
        study.set_user_attr(key, value)
    return study


def overall_of(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["best"]["overall"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Three compatible tiny trials (same random init, different learning rates), best first by objective."""
    root = tmp_path_factory.mktemp("trials")
    dirs = []
    for index, lr in enumerate((1e-3, 3e-3, 3e-4)):
        train(tiny_config(lr=lr), root / f"trial{index}")
        dirs.append(root / f"trial{index}")
    return sorted(dirs, key=overall_of, reverse=True)


def build_args(tmp_path: Path, url: str, study: str, *extra: str):
    argv = ["--study", study, "--storage", url, "--output-dir", str(tmp_path / "out"), "--data-dir", str(DATA_DIR), *extra]
    return ensemble_build.build_parser().parse_args(argv)


@pytest.fixture
def study_url(tmp_path, runs):
    """A study holding the three runs, plus a FAIL trial pointing at good artifacts, an early-stopped
    trial, a trial whose artifact dir is gone and one with a truncated checkpoint."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = new_study(url, "tiny")
    for run in runs:
        add_trial(study, run, overall_of(run))
    add_trial(study, runs[0], None, state=optuna.trial.TrialState.FAIL, error="boom")
    # Early-stopped: Optuna's intermediate value 0.9, but the epoch whose weights were kept scored 0.2.
    add_trial(study, runs[1], None, state=optuna.trial.TrialState.PRUNED, early_stopped=True, best_value=0.2)
    add_trial(study, tmp_path / "gone", 0.95)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs[2], corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    add_trial(study, corrupt, 0.94)
    return url


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fp:
        return list(csv.reader(fp))


def npz_values(run: Path, task: str, split: str) -> np.ndarray:
    with np.load(run / "outputs" / f"{task}-{split}.npz") as npz:
        return npz["values"]


def hand_mean(runs: list[Path], task: str, split: str) -> np.ndarray:
    return sum(npz_values(run, task, split).astype(np.float64) for run in runs) / len(runs)


def test_selection_skips_failed_early_stopped_missing_and_corrupt_trials(study_url, runs):
    with pytest.warns(MemberSkippedWarning) as caught:
        selection = select_members("tiny", study_url, top_k=10)
    messages = " ".join(str(w.message) for w in caught)
    assert "trial 5" in messages and "gone" in messages  # the missing artifact dir, named
    assert "trial 6" in messages and "model.safetensors" in messages  # the truncated checkpoint, named
    assert [m.artifact_dir for m in selection.members] == runs  # no FAIL (trial 3), no early-stopped (trial 4)
    assert [m.trial_number for m in selection.members] == [0, 1, 2]
    assert any("only 3 usable" in note for note in selection.notes)
    assert any("early-stopped" in note for note in selection.notes)

    with pytest.warns(MemberSkippedWarning):
        with_early = select_members("tiny", study_url, top_k=10, include_early_stopped=True)
    assert 4 in [m.trial_number for m in with_early.members] and 3 not in [m.trial_number for m in with_early.members]
    assert with_early.members[-1].trial_number == 4 and with_early.members[-1].value == 0.2  # ranked by best_value


def test_no_usable_trial_is_a_clear_error(tmp_path, runs, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = new_study(url, "bad")
    add_trial(study, runs[0], None, state=optuna.trial.TrialState.FAIL, error="boom")
    add_trial(study, tmp_path / "gone", 0.5)
    with pytest.warns(MemberSkippedWarning), pytest.raises(NoUsableTrialError, match="no usable trial"):
        select_members("bad", url, top_k=3)
    with pytest.warns(MemberSkippedWarning):
        assert ensemble_build.main(["--study", "bad", "--storage", url, "--output-dir", str(tmp_path / "o")]) == 1
    assert "no usable trial" in capsys.readouterr().err
    assert ensemble_build.main(["--study", "missing", "--storage", url]) == 1
    assert "no study named 'missing'" in capsys.readouterr().err


def test_logit_average_equals_the_hand_computed_mean(tmp_path, study_url, runs):
    with pytest.warns(MemberSkippedWarning):
        results = ensemble_build.build(build_args(tmp_path, study_url, "tiny", "--method", "logits", "--top-k", "3"))
    result = results["logits"]
    out = tmp_path / "out" / "logits"
    for task in TASKS:
        for split, outputs in (("dev", result.dev_outputs), ("test", result.test_outputs)):
            by_hand = hand_mean(runs, task, split)
            np.testing.assert_allclose(outputs[task]["values"], by_hand, rtol=0, atol=1e-12)
            rows = read_csv(out / "predictions" / f"{task}-{split}-out.csv")
            assert len(rows) == 1 + len(by_hand)
            if task == "sts":
                np.testing.assert_allclose([float(r[1]) for r in rows[1:]], by_hand, atol=6e-5)
    summary = json.loads((out / "summary.json").read_text())
    ensemble = next(r for r in summary["rows"] if r["kind"] == "ensemble")
    with np.load(runs[0] / "outputs" / "sts-dev.npz") as npz:
        labels = npz["labels"]
    assert ensemble["metrics"]["sts"] == pytest.approx(task_metric("sts", hand_mean(runs, "sts", "dev"), labels))
    assert [r["kind"] for r in summary["rows"]] == ["member"] * 3 + ["best single", "ensemble"]
    manifest = json.loads((out / "predictor" / "manifest.json").read_text())
    assert [m["artifact_dir"] for m in manifest["members"]] == [str(r) for r in runs]
    assert (out / "summary.md").read_text().count("\n|") >= 6
    assert (out / "objective_vs_size.png").stat().st_size > 0 and (out / "sts_dev_scatter.png").stat().st_size > 0


def test_uniform_soup_of_identical_checkpoints_equals_the_checkpoint(tmp_path, runs):
    copies = []
    for index in range(3):
        copies.append(tmp_path / f"copy{index}")
        shutil.copytree(runs[0], copies[-1])
    original = load_file(str(runs[0] / "model.safetensors"))
    soup = average_checkpoints(copies)
    assert soup.keys() == original.keys()
    assert all(torch.equal(soup[k], original[k]) for k in original)

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = new_study(url, "same")
    for copy in copies:
        add_trial(study, copy, overall_of(runs[0]))
    results = ensemble_build.build(build_args(tmp_path, url, "same", "--method", "uniform-soup", "--no-cache"))
    predictor = tmp_path / "out" / "uniform-soup" / "predictor"
    saved = load_file(str(predictor / "model.safetensors"))
    assert all(torch.equal(saved[k], original[k]) for k in original)
    # The soup, run again on dev, reproduces the trainer's saved dev outputs of the checkpoint.
    for task in TASKS:
        np.testing.assert_allclose(
            results["uniform-soup"].dev_outputs[task]["values"], npz_values(runs[0], task, "dev"), atol=1e-5
        )


def test_greedy_soup_never_scores_below_its_first_member(tmp_path, study_url, runs):
    with pytest.warns(MemberSkippedWarning):
        results = ensemble_build.build(build_args(tmp_path, study_url, "tiny", "--method", "all", "--fit-weights"))
    greedy = results["greedy-soup"]
    steps = greedy.details["steps"]
    assert steps[0]["kept"] and len(steps) == 3
    first_alone = steps[0]["objective"]
    assert greedy.rows[0].objective >= first_alone
    assert greedy.rows[0].objective == max(s["objective"] for s in steps if s["kept"])
    # The first ingredient is the member with the best dev score, and run alone it scores what its outputs say.
    first = greedy.details["order"][0]
    member_scores = {
        f"trial {i}": score_outputs(align_outputs(["a"], [outputs_of(r)], "dev")[0], TASKS, "overall")[1]
        for i, r in enumerate(runs)
    }
    assert member_scores[first] == max(member_scores.values())
    assert first_alone == pytest.approx(member_scores[first], abs=1e-6)
    root = tmp_path / "out"
    for method in ("logits", "uniform-soup", "greedy-soup"):
        assert (root / method / "summary.md").is_file() and (root / method / "predictions" / "sts-test-out.csv").is_file()
    assert (root / "greedy-soup" / "predictor" / "config.json").is_file()
    summary = json.loads((root / "summary.json").read_text())
    assert "weight_fit" in summary["methods"]["logits"]
    fit = summary["methods"]["logits"]["weight_fit"]
    assert fit["uniform_dev"] is not None and fit["cv_dev"] is not None and abs(sum(fit["weights"]) - 1) < 1e-9
    assert (root / "objective_vs_size.png").is_file()


def outputs_of(run: Path) -> dict:
    outputs = {}
    for task in TASKS:
        with np.load(run / "outputs" / f"{task}-dev.npz") as npz:
            outputs[task] = {"ids": npz["ids"], "values": npz["values"], "labels": npz["labels"]}
    return outputs


@pytest.mark.parametrize("method", ["logits", "uniform-soup"])
def test_predict_round_trip(tmp_path, study_url, runs, method):
    with pytest.warns(MemberSkippedWarning):
        results = ensemble_build.build(build_args(tmp_path, study_url, "tiny", "--method", method, "--top-k", "2"))
    # A new file in the CS224N format: the first 10 STS dev rows, labels kept.
    lines = (DATA_DIR / "sts-dev.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    new_file = tmp_path / "my-sts-pairs.csv"
    new_file.write_text("".join(lines[:11]), encoding="utf-8")
    ensemble_dir = tmp_path / "out" / method
    assert ensemble_predict.main(["--ensemble", str(ensemble_dir), "--input", str(new_file)]) == 0
    written = read_csv(ensemble_dir / "predict" / "my-sts-pairs-sts-out.csv")
    assert written[0] == ["id", "Predicted_Similarity"] and len(written) == 11
    dev = results[method].dev_outputs["sts"]
    expected = dict(zip(dev["ids"], dev["values"], strict=True))
    for row_id, value in written[1:]:
        assert float(value) == pytest.approx(expected[row_id], abs=1e-4)


def test_predict_infers_the_task_or_asks(tmp_path):
    header = ["", "id", "sentence"]
    assert ensemble_predict.infer_task(Path("ids-cfimdb-test-student.csv"), header, ["sst", "cfimdb"]) == "cfimdb"
    assert ensemble_predict.infer_task(Path("new.csv"), header, ["sst", "sts"]) == "sst"
    assert ensemble_predict.infer_task(Path("x.csv"), ["", "id", "sentence1", "sentence2", "is_duplicate"], TASKS) == "para"
    with pytest.raises(ValueError, match="pass --task"):
        ensemble_predict.infer_task(Path("new.csv"), ["", "id", "sentence1", "sentence2"], TASKS)


def test_incompatible_checkpoints_are_refused_with_the_key(tmp_path, study_url, runs):
    with pytest.warns(MemberSkippedWarning):
        members = select_members("tiny", study_url, top_k=3).members
    check_compatible(members)  # same init, heads and architecture: fine
    other = tmp_path / "other-pooling"
    shutil.copytree(runs[1], other)
    config = json.loads((other / "config.json").read_text())
    config["train"]["pooling"] = "cls"
    (other / "config.json").write_text(json.dumps(config))
    members[1].config = config
    members[1].artifact_dir = other
    with pytest.raises(IncompatibleMembersError, match=r"trial 1 .*train\.pooling"):
        check_compatible(members)
    members[1].config = json.loads((runs[1] / "config.json").read_text())
    members[1].config["train"]["seed"] = 7  # a different random init
    with pytest.raises(IncompatibleMembersError, match=r"train\.seed"):
        check_compatible(members)

    url = f"sqlite:///{tmp_path / 'optuna2.db'}"
    study = new_study(url, "mixed")
    add_trial(study, runs[0], 0.9)
    add_trial(study, other, 0.8)
    with pytest.raises(EnsembleError, match="train.pooling"):
        ensemble_build.build(build_args(tmp_path, url, "mixed", "--method", "uniform-soup"))
    add_trial(study, runs[2], 0.7)  # compatible: the soup goes on without the refused member
    results = ensemble_build.build(build_args(tmp_path, url, "mixed", "--method", "uniform-soup"))
    assert results["uniform-soup"].rows[0].members == [0, 2]
    assert "refused: cannot average trial 1" in (tmp_path / "out" / "uniform-soup" / "summary.md").read_text()


def test_weight_fitting_is_kept_only_when_it_wins_cross_validation():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 200)
    ids = np.array([f"id{i}" for i in range(200)])

    def member(values):
        return {"sts": {"ids": ids, "values": values, "labels": gold}}

    good, noise = member(gold + rng.normal(0, 0.5, 200)), member(rng.uniform(0, 5, 200))
    fit = fit_weights([good, noise], ["sts"], "sts", "maximize")
    assert fit.kept and fit.weights[0] > 0.9 and abs(sum(fit.weights) - 1) < 1e-9 and min(fit.weights) >= 0
    assert fit.cv_dev > fit.uniform_dev
    same = fit_weights([good, good], ["sts"], "sts", "maximize")
    assert not same.kept and same.weights == [0.5, 0.5]
    averaged = average_outputs([good, noise], [0.25, 0.75])["sts"]["values"]
    np.testing.assert_allclose(averaged, 0.25 * good["sts"]["values"] + 0.75 * noise["sts"]["values"])


def test_members_must_agree_on_ids():
    a = {"sts": {"ids": np.array(["x", "y"]), "values": np.array([1.0, 2.0]), "labels": np.array([1.0, 2.0])}}
    b = {"sts": {"ids": np.array(["y", "x"]), "values": np.array([4.0, 3.0]), "labels": np.array([2.0, 1.0])}}
    c = {"sts": {"ids": np.array(["x", "z"]), "values": np.array([1.0, 2.0]), "labels": np.array([1.0, 2.0])}}
    aligned = align_outputs(["a", "b"], [a, b], "dev")
    np.testing.assert_array_equal(aligned[1]["sts"]["values"], [3.0, 4.0])
    with pytest.raises(EnsembleError, match="disagree on the sts-dev ids"):
        align_outputs(["a", "c"], [a, c], "dev")


def test_a_member_without_test_outputs_is_run_on_test(tmp_path, runs):
    """ASHA-stopped trials never wrote test outputs; the logit ensemble runs their checkpoint instead."""
    stopped = tmp_path / "stopped"
    shutil.copytree(runs[1], stopped)
    for task in TASKS:
        (stopped / "outputs" / f"{task}-test.npz").unlink()
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = new_study(url, "stopped")
    add_trial(study, runs[0], 0.9)
    add_trial(study, stopped, None, state=optuna.trial.TrialState.PRUNED, early_stopped=True)
    results = ensemble_build.build(build_args(tmp_path, url, "stopped", "--method", "logits", "--include-early-stopped"))
    assert any("trial 1 saved no test outputs" in note for note in results["logits"].notes)
    for task in TASKS:
        np.testing.assert_allclose(results["logits"].test_outputs[task]["values"], hand_mean(runs[:2], task, "test"), atol=1e-5)


def test_soup_evaluations_are_cached_until_a_checkpoint_changes(tmp_path, runs, monkeypatch):
    import os

    import model.train
    from ensemble.soup import SoupEvaluator

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = new_study(url, "cache")
    member_dir = tmp_path / "member"
    shutil.copytree(runs[0], member_dir)
    add_trial(study, member_dir, 0.9)
    members = select_members("cache", url, top_k=1).members
    evaluate = SoupEvaluator(TASKS, "overall", DATA_DIR, "cpu", tmp_path / "cache")
    first = evaluate(members)

    def no_model_runs(*args, **kwargs):
        raise AssertionError("the model ran although the result was cached")

    monkeypatch.setattr(model.train, "evaluate_model", no_model_runs)
    again = evaluate(members)
    assert again.objective == first.objective
    np.testing.assert_array_equal(again.outputs["sts"]["values"], first.outputs["sts"]["values"])
    weights_file = member_dir / "model.safetensors"
    os.utime(weights_file, ns=(weights_file.stat().st_atime_ns, weights_file.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="the model ran"):
        evaluate(members)
