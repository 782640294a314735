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
from test_ensemble_pool import add_trial, new_study
from tiny_model import DATA_DIR, needs_data, tiny_config

from data.files import TASKS as TASK_TABLE
from data.files import load_examples
from ensemble import build as ensemble_build
from ensemble import predict as ensemble_predict
from ensemble.estimate import paired_bootstrap
from ensemble.logits import align_outputs, average_outputs, fit_weights
from ensemble.members import EnsembleError, MemberArtifactError, MemberSkippedWarning, NoUsableTrialError, load_pool
from ensemble.soup import IncompatibleMembersError, SoupEvaluator, average_checkpoints, check_compatible, init_signature
from ensemble.taskpool import apply_scale, fit_scale
from model.metrics import task_metric
from model.train import train

pytestmark = needs_data
optuna.logging.set_verbosity(optuna.logging.WARNING)

TASKS = ["sst", "para", "sts"]


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


def test_the_greedy_soup_is_built_on_request_only():
    def chosen(*extra: str) -> tuple[str, ...]:
        return ensemble_build.chosen_methods(build_args(Path("."), "sqlite://", "s", *extra))

    assert chosen() == ("caruana", "top-k", "uniform-soup")
    assert chosen("--method", "all") == ("caruana", "top-k", "uniform-soup", "greedy-soup")
    assert chosen("--method", "greedy-soup", "logits") == ("top-k", "greedy-soup")
    assert chosen("--method", "default", "--fit-weights") == ("caruana", "top-k", "fitted", "uniform-soup")
    assert chosen("--method", "default", "greedy-soup") == ("caruana", "top-k", "uniform-soup", "greedy-soup")


def test_model_runs_are_cached_per_results_folder_or_in_the_output_folder(tmp_path):
    parser = ensemble_build.build_parser()
    shared = parser.parse_args(["--study", "a", "--study", "b"])
    assert ensemble_build.cache_dir(shared, tmp_path) == tmp_path / ".ensemble-cache"  # every build of tmp_path
    alone = parser.parse_args(["--study", "a", "--output-dir", str(tmp_path / "out")])
    assert ensemble_build.cache_dir(alone, tmp_path) == tmp_path / "out" / ".cache"


def tiny_study(url: str, name: str, dirs: list[Path]) -> optuna.Study:
    study = new_study(url, name, TASKS)
    for index, run in enumerate(dirs):
        add_trial(study, run, 0.9 - index / 100)
    return study


@pytest.fixture
def study_url(tmp_path, runs):
    """A study holding the three runs, plus a FAIL trial pointing at good artifacts, an early-stopped
    trial (a copy of the second run) and a trial whose artifact dir is gone."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = tiny_study(url, "tiny", runs)
    add_trial(study, runs[0], None, state=optuna.trial.TrialState.FAIL, error="boom")
    stopped = tmp_path / "stopped"
    shutil.copytree(runs[1], stopped)
    add_trial(study, stopped, None, state=optuna.trial.TrialState.PRUNED, early_stopped=True, best_value=0.2)
    add_trial(study, tmp_path / "gone", 0.95)
    return url


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fp:
        return list(csv.reader(fp))


def npz_values(run: Path, task: str, split: str) -> np.ndarray:
    with np.load(run / "outputs" / f"{task}-{split}.npz") as npz:
        return npz["values"]


def hand_mean(runs: list[Path], task: str, split: str) -> np.ndarray:
    """The members' mean; for STS each member first mapped onto the labels by its least-squares line on dev."""

    def on_scale(run: Path) -> np.ndarray:
        values = npz_values(run, task, split).astype(np.float64)
        if TASK_TABLE[task].label_kind != "score":
            return values
        with np.load(run / "outputs" / f"{task}-dev.npz") as dev:
            slope, offset = np.polyfit(dev["values"].astype(np.float64), dev["labels"].astype(np.float64), 1)
        return offset + slope * values

    return sum(on_scale(run) for run in runs) / len(runs)


def test_pool_skips_failed_and_missing_trials_and_takes_early_stopped_ones(study_url, runs):
    with pytest.warns(MemberSkippedWarning) as caught:
        pool = load_pool(["tiny"], study_url)
    messages = " ".join(str(w.message) for w in caught)
    assert "tiny/trial 5" in messages and "gone" in messages  # the missing artifact dir, named
    assert [m.name for m in pool.members] == ["tiny/trial 0", "tiny/trial 1", "tiny/trial 2", "tiny/trial 4"]
    assert pool.members[-1].early_stopped and pool.members[-1].value == 0.2  # its kept epoch's value
    assert any("1 failed" in note for note in pool.notes)
    with pytest.warns(MemberSkippedWarning):
        without = load_pool(["tiny"], study_url, include_early_stopped=False)
    assert [m.artifact_dir for m in without.members] == runs


def test_a_corrupt_checkpoint_stops_the_build(tmp_path, runs, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs[2], corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    tiny_study(url, "corrupt", [runs[0], corrupt])
    with pytest.raises(MemberArtifactError, match=r"study 'corrupt', trial 1: .*model\.safetensors"):
        load_pool(["corrupt"], url)
    assert ensemble_build.main(["--study", "corrupt", "--storage", url, "--output-dir", str(tmp_path / "out")]) == 1
    assert "trial 1" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_no_usable_trial_is_a_clear_error(tmp_path, runs, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = new_study(url, "bad", TASKS)
    add_trial(study, runs[0], None, state=optuna.trial.TrialState.FAIL, error="boom")
    add_trial(study, tmp_path / "gone", 0.5)
    with pytest.warns(MemberSkippedWarning), pytest.raises(NoUsableTrialError, match="no usable trial"):
        load_pool(["bad"], url)
    with pytest.warns(MemberSkippedWarning):
        assert ensemble_build.main(["--study", "bad", "--storage", url, "--output-dir", str(tmp_path / "o")]) == 1
    assert "no usable trial" in capsys.readouterr().err
    assert ensemble_build.main(["--study", "missing", "--storage", url]) == 1
    assert "no study named 'missing'" in capsys.readouterr().err


def test_top_k_logit_average_equals_the_hand_computed_mean(tmp_path, study_url, runs):
    with pytest.warns(MemberSkippedWarning):
        args = build_args(tmp_path, study_url, "tiny", "--method", "top-k", "--top-k", "3", "--exclude-early-stopped")
        results = ensemble_build.build(args)
    out = tmp_path / "out" / "top-k"
    manifest = json.loads((out / "predictor" / "manifest.json").read_text())
    for task in TASKS:
        result = results[task]
        for split, values in (("dev", result.choices["top-k"].values), ("test", result.test["top-k"]["values"])):
            by_hand = hand_mean(runs, task, split)
            np.testing.assert_allclose(values, by_hand, rtol=0, atol=1e-12)
            rows = read_csv(out / "predictions" / f"{task}-{split}-out.csv")
            assert len(rows) == 1 + len(by_hand)
            if task == "sts":
                np.testing.assert_allclose([float(r[1]) for r in rows[1:]], by_hand, atol=6e-5)
        assert {m["artifact_dir"] for m in manifest["tasks"][task]["members"]} == {str(r) for r in runs}
        assert manifest["tasks"][task]["inference_cost"] == 3 * (2 if task == "sts" else 1)  # sts bi-encoded
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    row = next(r for r in summary["rows"] if r["name"] == "top-k" and r["task"] == "sts")
    with np.load(runs[0] / "outputs" / "sts-dev.npz") as npz:
        labels = npz["labels"]
    assert row["dev"] == pytest.approx(task_metric("sts", hand_mean(runs, "sts", "dev"), labels))
    assert row["estimate"]["splits"] == 20 and row["estimate"]["gain_mean"] is not None
    kinds = [r["kind"] for r in summary["rows"] if r["task"] == "sts"]
    assert kinds == ["baseline", "selected", "selected"] + ["member"] * 3
    assert (tmp_path / "out" / "summary.md").read_text().count("\n|") >= 3 * 8
    assert (tmp_path / "out" / "sts_dev_vs_size.png").stat().st_size > 0 and (out / "sts_dev_scatter.png").stat().st_size > 0


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
    tiny_study(url, "same", copies)
    results = ensemble_build.build(build_args(tmp_path, url, "same", "--method", "uniform-soup", "--no-cache"))
    predictor = tmp_path / "out" / "uniform-soup" / "predictor"
    saved = load_file(str(predictor / "soup-1" / "model.safetensors"))  # one soup folder serves all three tasks
    assert all(torch.equal(saved[k], original[k]) for k in original) and not (predictor / "soup-2").exists()
    # The soup, run again on dev, reproduces the trainer's saved dev outputs of the checkpoint, mapped as
    # the pool maps that member alone (STS: the same line to the labels, fitted on the same rows).
    for task in TASKS:
        pool, soup_choice = results[task].pool, results[task].choices["uniform-soup"]
        member = pool.prepared(np.arange(len(pool.labels))).values[0]
        np.testing.assert_allclose(soup_choice.values, member, atol=1e-4)
        if task == "sts":
            assert not np.allclose(member, npz_values(runs[0], task, "dev"), atol=1e-3)  # mapped, not raw
            np.testing.assert_allclose(soup_choice.scales[0], pool.prepared(np.arange(len(pool.labels))).scales[0], atol=1e-4)
        else:
            np.testing.assert_allclose(soup_choice.values, npz_values(runs[0], task, "dev"), atol=1e-5)
    manifest = json.loads((predictor / "manifest.json").read_text())
    assert manifest["format"] == 6 and "scale" in manifest["tasks"]["sts"] and "scale" not in manifest["tasks"]["sst"]
    assert all("scale" not in m for m in manifest["tasks"]["sts"]["members"])  # the soup model's map, not its members'


def test_greedy_soup_keeps_a_member_only_when_it_strictly_improves(tmp_path, study_url, runs):
    with pytest.warns(MemberSkippedWarning):
        args = build_args(tmp_path, study_url, "tiny", "--method", "all", "--fit-weights", "--exclude-early-stopped")
        results = ensemble_build.build(args)
    for task in TASKS:
        pool, greedy = results[task].pool, results[task].choices["greedy-soup"]
        steps = greedy.details["steps"]
        assert len(steps) == 3 and steps[0]["kept"]
        assert steps[0]["member"] == pool.members[pool.ranking()[0]].name  # the task's best member first
        best = steps[0]["score"]
        for step in steps[1:]:
            assert step["kept"] == (step["score"] > best)
            best = max(best, step["score"])
        assert pool.score(greedy.values) == pytest.approx(best)
    root = tmp_path / "out"
    for method in ("caruana", "top-k", "fitted", "uniform-soup", "greedy-soup"):
        assert (root / method / "summary.md").is_file() and (root / method / "predictions" / "sts-test-out.csv").is_file()
    assert (root / "greedy-soup" / "predictor" / "soup-1" / "config.json").is_file()
    summary = json.loads((root / "summary.json").read_text())
    fitted = next(r for r in summary["rows"] if r["name"] == "fitted" and r["task"] == "sts")
    fit = fitted["extra"]["details"]["weight_fit"]
    assert fit["uniform_dev"] is not None and abs(sum(fit["weights"]) - 1) < 1e-9
    assert {r["name"] for r in summary["rows"] if r["kind"] == "selected"} == {
        "best single", "caruana", "top-k", "fitted", "uniform-soup", "greedy-soup"
    }  # fmt: skip
    assert (root / "para_dev_vs_size.png").is_file()


def head_of(source: Path, target: Path, rows: int) -> None:
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join(lines[: rows + 1]), encoding="utf-8")


@pytest.mark.parametrize("method", ["top-k", "caruana-bagged", "uniform-soup"])
def test_predict_round_trip(tmp_path, study_url, runs, method):
    with pytest.warns(MemberSkippedWarning):
        results = ensemble_build.build(build_args(tmp_path, study_url, "tiny", "--method", method, "--top-k", "2"))
    # A new file in the CS224N format: the first 10 STS dev rows, labels kept.
    new_file = tmp_path / "my-sts-pairs.csv"
    head_of(DATA_DIR / "sts-dev.csv", new_file, 10)
    ensemble_dir = tmp_path / "out" / method
    assert ensemble_predict.main(["--ensemble", str(ensemble_dir), "--input", str(new_file)]) == 0
    written = read_csv(ensemble_dir / "predict" / "my-sts-pairs-sts-out.csv")
    assert written[0] == ["id", "Predicted_Similarity"] and len(written) == 11
    dev = results["sts"]
    expected = dict(zip(dev.pool.ids, dev.choices[method].values, strict=True))
    for row_id, value in written[1:]:
        assert float(value) == pytest.approx(expected[row_id], abs=1e-4)
    # Every covered task's dev and test files of a data dir (here: their first rows).
    data = tmp_path / "data"
    data.mkdir()
    for task in TASKS:
        for split in ("dev", "test"):
            path = TASK_TABLE[task].path(split, DATA_DIR)
            head_of(path, data / path.name, 12)
    argv = ["--ensemble", str(ensemble_dir), "--splits", "dev", "test", "--data-dir", str(data)]
    assert ensemble_predict.main(argv) == 0
    for task in TASKS:
        for split in ("dev", "test"):
            assert len(read_csv(ensemble_dir / "predict" / f"{task}-{split}-out.csv")) == 13
        expected = dict(zip(results[task].pool.ids, results[task].choices[method].values, strict=True))
        rows = read_csv(ensemble_dir / "predict" / f"{task}-dev-out.csv")[1:]
        predicted = {r[0]: r[1] for r in rows}
        assert set(predicted) <= set(expected)
        if task == "sts":
            assert all(float(predicted[i]) == pytest.approx(expected[i], abs=1e-4) for i in predicted)


def test_a_calibrated_build_scales_each_member_and_predict_applies_the_same_temperatures(tmp_path, study_url, runs):
    with pytest.warns(MemberSkippedWarning):
        flags = ["--method", "top-k", "--top-k", "3", "--exclude-early-stopped", "--calibrate"]
        args = build_args(tmp_path, study_url, "tiny", *flags)
        results = ensemble_build.build(args)
    out = tmp_path / "out" / "top-k"
    manifest = json.loads((out / "predictor" / "manifest.json").read_text())
    for task in ("sst", "para"):
        with np.load(runs[0] / "outputs" / f"{task}-dev.npz") as npz:
            labels = npz["labels"]
        scales = {run: fit_scale(npz_values(run, task, "dev"), labels, task) for run in runs}
        assert {m["artifact_dir"]: tuple(m["scale"]) for m in manifest["tasks"][task]["members"]} == {
            str(run): scale for run, scale in scales.items()
        }
        for split, values in (("dev", results[task].choices["top-k"].values), ("test", results[task].test["top-k"]["values"])):
            by_hand = sum(apply_scale(npz_values(run, task, split), scales[run], task) for run in runs) / len(runs)
            np.testing.assert_allclose(values, by_hand, rtol=0, atol=1e-12)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]["calibrate"] is True
    assert manifest["format"] == 4  # an older reader would apply the temperatures as lines: it must refuse
    # ensemble.predict runs the members again and applies the manifest's temperatures: the build's values.
    plans = ensemble_predict.load_plans(out / "predictor")
    runner = ensemble_predict.Runner("cpu")
    for task in ("sst", "para"):
        pool = results[task].pool
        rows = {e.id: e for e in load_examples(task, "dev", DATA_DIR)}
        predicted = runner.predict(plans[task], task, [rows[i] for i in pool.ids])
        np.testing.assert_array_equal(predicted["ids"], pool.ids)
        np.testing.assert_allclose(predicted["values"], results[task].choices["top-k"].values, atol=1e-5)
        unscaled = sum(npz_values(run, task, "dev").astype(np.float64) for run in runs) / len(runs)
        assert np.abs(unscaled - results[task].choices["top-k"].values).max() > 1e-3  # the temperatures mattered


@pytest.fixture(scope="module")
def recipe_seeds(tmp_path_factory) -> list[Path]:
    """One recipe trained with seeds 0 and 1: a study's usual recipe and its seed run."""
    root = tmp_path_factory.mktemp("recipe")
    for seed in (0, 1):
        train(tiny_config(lr=2e-3, seed=seed), root / f"seed{seed}")
    return [root / "seed0", root / "seed1"]


def rows_of_ids(source: Path, target: Path, ids: set[str]) -> None:
    """The header and the rows of a CS224N file whose id is in ``ids``."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join([lines[0], *(line for line in lines[1:] if line.split("\t")[1] in ids)]), encoding="utf-8")


def test_predict_compares_a_build_with_its_usual_recipe_and_seeds_on_a_labelled_file(tmp_path, runs, recipe_seeds, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    tiny_study(url, "recipe", [*recipe_seeds, *runs])  # trial 0 is the baseline, trial 1 its seed run
    results = ensemble_build.build(build_args(tmp_path, url, "recipe", "--method", "top-k", "--top-k", "3"))
    out = tmp_path / "out" / "top-k"
    references = json.loads((out / "predictor" / "manifest.json").read_text())["tasks"]["sts"]["references"]
    assert {name: [(m["artifact_dir"], m["weight"]) for m in members] for name, members in references.items()} == {
        "baseline (usual recipe)": [(str(recipe_seeds[0]), 1.0)],
        "usual recipe x seeds": [(str(run), 0.5) for run in recipe_seeds],
    }
    # Labelled STS pairs as a held-out file would hold them (dev rows here, whose outputs are on disk).
    with np.load(recipe_seeds[0] / "outputs" / "sts-dev.npz") as npz:
        ids, labels = npz["ids"].tolist(), npz["labels"]
    new_file = tmp_path / "held-out-sts.csv"
    rows_of_ids(DATA_DIR / "sts-dev.csv", new_file, set(ids))
    assert ensemble_predict.main(["--ensemble", str(out), "--input", str(new_file), "--compare"]) == 0
    printed = capsys.readouterr().out
    compared = json.loads((out / "predict" / "held-out-sts-sts-out-compare.json").read_text())
    assert str(out / "predict" / "held-out-sts-sts-out-compare.json") in printed and "predictor minus it" in printed
    build = dict(zip(results["sts"].pool.ids, results["sts"].choices["top-k"].values, strict=True))
    by_hand = {
        "predictor": np.array([build[i] for i in ids]),
        "baseline (usual recipe)": npz_values(recipe_seeds[0], "sts", "dev"),
        "usual recipe x seeds": hand_mean(recipe_seeds, "sts", "dev"),  # each seed on the labels' scale, averaged
    }
    assert compared["rows"] == len(ids) == len(set(ids))
    assert {name: len(members) for name, members in compared["members"].items()} == {
        "predictor": 3,
        "baseline (usual recipe)": 1,
        "usual recipe x seeds": 2,
    }
    assert compared["predictor"] == str(out / "predictor")
    for name, values in by_hand.items():
        assert compared["scores"][name] == pytest.approx(task_metric("sts", values, labels), abs=1e-4), name
    for name in ("baseline (usual recipe)", "usual recipe x seeds"):
        difference = compared["differences"][name]
        assert difference["mean"] == pytest.approx(compared["scores"]["predictor"] - compared["scores"][name], abs=1e-12)
        expected = paired_bootstrap("sts", by_hand["predictor"], by_hand[name], labels)[1]  # the same draws of rows
        assert difference["standard_error"] == pytest.approx(expected, rel=1e-2) and expected > 0


def test_predict_compare_checks_the_references_before_running_anything(tmp_path, runs, recipe_seeds, capsys):
    seeds = [shutil.copytree(run, tmp_path / run.name) for run in recipe_seeds]
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    tiny_study(url, "recipe", [*seeds, runs[0]])
    ensemble_build.build(build_args(tmp_path, url, "recipe", "--method", "top-k", "--top-k", "1"))
    (seeds[1] / "model.safetensors").unlink()  # a seed run pruned after the build: the predictor does not need it
    new_file = tmp_path / "held-out-sts.csv"
    head_of(DATA_DIR / "sts-dev.csv", new_file, 25)
    output = tmp_path / "out.csv"
    argv = ["--ensemble", str(tmp_path / "out" / "top-k"), "--input", str(new_file), "--output", str(output)]
    assert ensemble_predict.main(argv) == 0
    output.unlink()
    capsys.readouterr()
    assert ensemble_predict.main([*argv, "--compare"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compare: member recipe/trial 1") and "without --compare it is not run" in err, err
    assert len(err.splitlines()) == 1 and not output.exists()


def test_predict_compare_needs_a_labelled_file_and_a_built_predictor(tmp_path, runs, capsys):
    unlabelled = tmp_path / "pairs-sts.csv"
    head_of(DATA_DIR / "sts-test-student.csv", unlabelled, 5)
    assert ensemble_predict.main(["--ensemble", str(runs[0]), "--input", str(unlabelled), "--compare"]) == 1
    err = capsys.readouterr().err
    assert str(unlabelled) in err and "--compare needs labels" in err and "'similarity'" in err
    labelled = tmp_path / "labelled-sts.csv"
    head_of(DATA_DIR / "sts-dev.csv", labelled, 5)
    output = tmp_path / "out.csv"
    assert ensemble_predict.main(["--ensemble", str(runs[0]), "--input", str(labelled), "--compare"]) == 1
    assert "5 labelled rows; --compare needs at least 20" in capsys.readouterr().err  # a bootstrap of 5 rows is noise
    head_of(DATA_DIR / "sts-dev.csv", labelled, 25)
    argv = ["--ensemble", str(runs[0]), "--input", str(labelled), "--output", str(output), "--compare"]
    assert ensemble_predict.main(argv) == 1
    err = capsys.readouterr().err
    assert "no baseline recorded for sts" in err and "python -m ensemble.build" in err
    assert not output.exists()  # nothing written before the comparison could be made
    # A manifest written before per-task entries (one member list for every task) records no baseline either.
    old = tmp_path / "old-predictor"
    old.mkdir()
    members = [{"trial": 0, "artifact_dir": str(runs[0]), "weight": 1.0}]
    (old / "manifest.json").write_text(json.dumps({"tasks": TASKS, "members": members}))
    assert ensemble_predict.main(["--ensemble", str(old), "--input", str(labelled), "--output", str(output), "--compare"]) == 1
    assert "no baseline recorded for sts" in capsys.readouterr().err and not output.exists()
    with pytest.raises(SystemExit):
        ensemble_predict.main(["--ensemble", str(runs[0]), "--splits", "dev", "--compare"])
    assert "--compare needs --input" in capsys.readouterr().err


def test_a_reusing_runner_runs_a_model_once_per_examples_and_keeps_its_outputs_intact(runs, monkeypatch):
    calls = []
    run = ensemble_predict.Runner.run
    monkeypatch.setattr(ensemble_predict.Runner, "run", lambda self, *args: calls.append(args[:2]) or run(self, *args))
    examples = load_examples("sts", "dev", DATA_DIR)[:8]
    runner = ensemble_predict.Runner("cpu", reuse=True)
    first = runner(runs[0], "sts", examples)
    first["sts"]["values"] = first["sts"]["values"] * 0  # as Runner.predict replaces them with rescaled ones
    again = runner(runs[0], "sts", examples)
    assert calls == [(runs[0], "sts")] and np.abs(again["sts"]["values"]).sum() > 0
    runner(runs[0], "sts", list(examples))  # other examples: run again
    ensemble_predict.Runner("cpu")(runs[0], "sts", examples)  # without reuse: every call runs
    assert len(calls) == 3


def test_predict_infers_the_task_or_asks(tmp_path):
    header = ["", "id", "sentence"]
    assert ensemble_predict.infer_task(Path("ids-cfimdb-test-student.csv"), header, ["sst", "cfimdb"]) == "cfimdb"
    assert ensemble_predict.infer_task(Path("new.csv"), header, ["sst", "sts"]) == "sst"
    assert ensemble_predict.infer_task(Path("x.csv"), ["", "id", "sentence1", "sentence2", "is_duplicate"], TASKS) == "para"
    with pytest.raises(ValueError, match="pass --task"):
        ensemble_predict.infer_task(Path("new.csv"), ["", "id", "sentence1", "sentence2"], TASKS)


def test_incompatible_checkpoints_are_refused_with_the_key(tmp_path, study_url, runs):
    with pytest.warns(MemberSkippedWarning):
        members = load_pool(["tiny"], study_url, include_early_stopped=False).members
    check_compatible(members)  # same init, heads and architecture: fine
    other = tmp_path / "other-pooling"
    shutil.copytree(runs[1], other)
    config = json.loads((other / "config.json").read_text())
    config["train"]["pooling"] = "cls"
    (other / "config.json").write_text(json.dumps(config))
    members[1].config = config
    members[1].artifact_dir = other
    with pytest.raises(IncompatibleMembersError, match=r"tiny/trial 1 .*train\.pooling"):
        check_compatible(members)
    members[1].config = json.loads((runs[1] / "config.json").read_text())
    del members[1].config["train"]["task_layers"]  # written before the field existed: its default, 0
    check_compatible(members)
    members[1].config["train"]["task_layers"] = 1
    with pytest.raises(IncompatibleMembersError, match=r"train\.task_layers"):
        check_compatible(members)
    members[1].config["train"]["task_layers"] = 0
    members[1].config["train"]["seed"] = 7  # a different random init
    with pytest.raises(IncompatibleMembersError, match=r"train\.seed"):
        check_compatible(members)

    url = f"sqlite:///{tmp_path / 'optuna2.db'}"
    study = tiny_study(url, "mixed", [runs[0], other])
    with pytest.raises(EnsembleError, match="train.pooling"):  # no task can have a soup
        ensemble_build.build(build_args(tmp_path, url, "mixed", "--method", "uniform-soup"))
    assert not (tmp_path / "out").exists()
    add_trial(study, runs[2], 0.7)  # compatible with trial 0: soups go on without the refused member
    results = ensemble_build.build(build_args(tmp_path, url, "mixed", "--method", "uniform-soup"))
    for result in results.values():
        if "uniform-soup" in result.choices:
            assert result.names(result.choices["uniform-soup"]) == ["mixed/trial 0", "mixed/trial 2"]
        else:
            assert "train.pooling" in result.refused["uniform-soup"]
    assert "cannot average mixed/trial 1" in (tmp_path / "out" / "summary.md").read_text()


def test_the_seed_counts_only_for_heads_with_parameters():
    bi_cosine = {"tasks": ["sts"], "pair_encoding": "bi", "sts_head": "cosine", "seed": 3, "model_config": None}
    assert "seed" not in init_signature(bi_cosine)  # 5 * cos(u, v): nothing drawn from the seed
    per_task = bi_cosine | {"pair_encoding": {"sts": "bi"}, "sts_head": {"sts": "cosine"}}
    assert "seed" not in init_signature(per_task)
    assert init_signature(bi_cosine | {"sts_head": "regression"})["seed"] == 3  # a linear head
    assert init_signature(bi_cosine | {"tasks": ["sts", "sst"]})["seed"] == 3  # the SST head
    assert init_signature(bi_cosine | {"model_config": {"hidden_size": 32}})["seed"] == 3  # a random encoder


def test_weight_fitting_is_kept_only_when_it_wins_cross_validation():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 200)
    ids = np.array([f"id{i}" for i in range(200)])

    def member(values):
        return {"sts": {"ids": ids, "values": values, "labels": gold}}

    good, noise = member(gold + rng.normal(0, 0.5, 200)), member(rng.uniform(0, 5, 200))
    fit = fit_weights([good, noise], ["sts"], "sts")
    assert fit.kept and fit.weights[0] > 0.9 and abs(sum(fit.weights) - 1) < 1e-9 and min(fit.weights) >= 0
    assert fit.cv_dev > fit.uniform_dev
    same = fit_weights([good, good], ["sts"], "sts")
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
    study = tiny_study(url, "stopped", [runs[0]])
    add_trial(study, stopped, None, state=optuna.trial.TrialState.PRUNED, early_stopped=True)
    results = ensemble_build.build(build_args(tmp_path, url, "stopped", "--method", "top-k", "--top-k", "2"))
    notes = json.loads((tmp_path / "out" / "summary.json").read_text())["notes"]
    assert "stopped/trial 1 saved no test outputs for sst, para, sts: ran its checkpoint on test" in notes
    for task in TASKS:
        np.testing.assert_allclose(results[task].test["top-k"]["values"], hand_mean(runs[:2], task, "test"), atol=1e-5)


def test_soup_evaluations_are_cached_until_a_checkpoint_changes(tmp_path, runs, monkeypatch):
    import os

    import model.evaluation

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    member_dir = tmp_path / "member"
    shutil.copytree(runs[0], member_dir)
    tiny_study(url, "cache", [member_dir])
    members = load_pool(["cache"], url).members
    first = SoupEvaluator(DATA_DIR, "cpu", tmp_path / "cache")(members)

    def no_model_runs(*args, **kwargs):
        raise AssertionError("the model ran although the result was cached")

    monkeypatch.setattr(model.evaluation, "evaluate_model", no_model_runs)
    again = SoupEvaluator(DATA_DIR, "cpu", tmp_path / "cache")(members)  # a new process would start like this
    np.testing.assert_array_equal(again["sts"]["values"], first["sts"]["values"])
    weights_file = member_dir / "model.safetensors"
    os.utime(weights_file, ns=(weights_file.stat().st_atime_ns, weights_file.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="the model ran"):
        SoupEvaluator(DATA_DIR, "cpu", tmp_path / "cache")(members)


def test_soup_evaluations_are_cached_per_device_and_precision(tmp_path, runs, monkeypatch):
    """The key is the device as resolved (None is the CPU here, a GPU elsewhere) and the precision
    evaluate_model uses on it: outputs computed in bf16, or on a GPU, are not another setup's."""
    import model.build
    import model.runtime

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    tiny_study(url, "keys", runs[:1])
    members = load_pool(["keys"], url).members
    cache = tmp_path / "cache"
    monkeypatch.setattr(model.runtime, "cpu_has_bf16_matmul", lambda: False)
    SoupEvaluator(DATA_DIR, None, cache)(members)  # fp32 on the CPU

    def no_model_runs(*args, **kwargs):
        raise AssertionError("the model ran although the result was cached")

    monkeypatch.setattr(model.build, "load_trained", no_model_runs)
    SoupEvaluator(DATA_DIR, "cpu", cache)(members)  # the same device by name: cached
    for device, bf16_cpu in (("cpu", True), ("meta", False)):
        monkeypatch.setattr(model.runtime, "cpu_has_bf16_matmul", lambda bf16_cpu=bf16_cpu: bf16_cpu)
        with pytest.raises(AssertionError, match="the model ran"):
            SoupEvaluator(DATA_DIR, device, cache)(members)


def poisoned_copy(run: Path, target: Path, value: float) -> Path:
    """A copy of a trained run whose first weight tensor was set to ``value`` after the build."""
    from safetensors.torch import save_file

    shutil.copytree(run, target)
    tensors = load_file(str(target / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
@pytest.mark.parametrize("kind", ["one-model", "logit-average"])
def test_predict_refuses_a_member_that_turned_non_finite(tmp_path, runs, kind, labelled, capsys):
    """A member's weights became NaN after the build: one line naming the member and its file, exit 1,
    no CSV (before: a CSV of nan and exit 0, or a traceback)."""
    bad = poisoned_copy(runs[1], tmp_path / "bad-member", float("nan"))
    predictor = bad
    if kind == "logit-average":
        predictor = tmp_path / "predictor"
        predictor.mkdir()
        members = [{"trial": n, "artifact_dir": str(d), "weight": 0.5} for n, d in enumerate((runs[0], bad))]
        (predictor / "manifest.json").write_text(json.dumps({"tasks": TASKS, "members": members}))
    new_file = tmp_path / "pairs-sts.csv"
    head_of(DATA_DIR / ("sts-dev.csv" if labelled else "sts-test-student.csv"), new_file, 5)
    output = tmp_path / "out.csv"
    assert ensemble_predict.main(["--ensemble", str(predictor), "--input", str(new_file), "--output", str(output)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad / "model.safetensors") in err and "non-finite weights" in err, err
    assert not output.exists()


def test_predict_refuses_non_finite_outputs(tmp_path, runs, capsys):
    """Finite weights whose outputs overflow: named, exit 1, no CSV."""
    huge = poisoned_copy(runs[0], tmp_path / "huge", 3e38)
    new_file = tmp_path / "pairs-sts.csv"
    head_of(DATA_DIR / "sts-test-student.csv", new_file, 5)
    output = tmp_path / "out.csv"
    assert ensemble_predict.main(["--ensemble", str(huge), "--input", str(new_file), "--output", str(output)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "huge" in err and "NaN or infinite outputs" in err, err
    assert not output.exists()


def test_predict_covers_rows_without_a_label_and_scores_the_labelled_ones(tmp_path, runs, capsys):
    """An --input whose label is empty on some rows: every row is predicted, the metric is on the labelled
    rows only, and the output says how many those were (before: those rows had no prediction)."""
    new_file = tmp_path / "some-sts.csv"
    head_of(DATA_DIR / "sts-dev.csv", new_file, 10)
    header, *rows = new_file.read_text(encoding="utf-8").splitlines(keepends=True)
    blanked = [row if n not in (1, 4) else row.rsplit("\t", 1)[0] + "\t\n" for n, row in enumerate(rows)]
    new_file.write_text(header + "".join(blanked), encoding="utf-8")
    output = tmp_path / "out.csv"
    argv = ["--ensemble", str(runs[0]), "--input", str(new_file), "--output", str(output)]
    assert ensemble_predict.main(argv) == 0
    written = read_csv(output)[1:]
    assert [r[0] for r in written] == [row.split("\t")[1] for row in rows]  # every row, in the file's order
    labelled = [n for n in range(10) if n not in (1, 4)]
    labels = [float(rows[n].rstrip("\n").split("\t")[-1]) for n in labelled]
    expected = task_metric("sts", np.array([float(written[n][1]) for n in labelled]), np.array(labels))
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {output} (10 rows; Pearson r on the 8 of them with a label: "), line
    assert float(line.rsplit(": ", 1)[1].rstrip(")")) == pytest.approx(expected, abs=1e-3)  # the CSV's values are rounded
    new_file.write_text(header + "".join(row.rsplit("\t", 1)[0] + "\t\n" for row in rows), encoding="utf-8")
    assert ensemble_predict.main(argv) == 0
    assert len(read_csv(output)) == 11 and "(10 rows; none has a label)" in capsys.readouterr().out
    assert ensemble_predict.main([*argv, "--compare"]) == 1
    assert "0 labelled rows; --compare needs at least 20" in capsys.readouterr().err


def test_compare_scores_the_labelled_rows_only(tmp_path):
    """--compare on a file with some empty labels: the predictor and its references are run on every row,
    scored and bootstrapped on the labelled ones; the report says how many of how many."""
    from data.files import Example

    rng = np.random.default_rng(0)
    examples = [Example(f"r{i}", ("a", "b"), None if i % 4 == 0 else float(rng.uniform(0, 5))) for i in range(40)]
    mine, theirs = rng.uniform(0, 5, 40), rng.uniform(0, 5, 40)

    class FakeRunner:
        def predict(self, plan, task, rows):
            assert rows is examples  # run on every row
            return {"values": theirs}

    plans = {name: ensemble_predict.TaskPlan("soup", [], [], [name]) for name in (ensemble_predict.PREDICTOR, "baseline")}
    job = ("sts", examples, tmp_path / "x-sts-out.csv")
    result = ensemble_predict.compare(tmp_path, plans, FakeRunner(), job, {"values": mine}, tmp_path / "x.csv")
    keep = np.array([e.label is not None for e in examples])
    labels = np.array([e.label for e in examples if e.label is not None])
    assert result.rows == 30 and result.total == 40 and "30 labelled rows of 40" in result.lines()[0]
    assert result.scores == {
        "predictor": task_metric("sts", mine[keep], labels),
        "baseline": task_metric("sts", theirs[keep], labels),
    }
    assert result.differences["baseline"] == paired_bootstrap("sts", mine[keep], theirs[keep], labels)
