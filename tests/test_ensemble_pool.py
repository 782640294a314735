"""Member pools across studies, per-task selection, and bad input, on made-up trial folders (no training).

A made-up trial is a folder with config.json, a one-tensor model.safetensors and outputs/*.npz, recorded
in a throw-away Optuna study the way search.records records real trials.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from safetensors.torch import save_file

from ensemble import build as ensemble_build
from ensemble.members import EnsembleError, MemberSkippedWarning, NoUsableTrialError, load_pool
from ensemble.taskpool import encoder_passes

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROWS = 80
LR = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)
rng = np.random.default_rng(0)
IDS = np.array([f"row{i}" for i in range(ROWS)])
LABELS = {"sst": rng.integers(0, 5, ROWS), "sts": rng.uniform(0, 5, ROWS)}


# ------------------------------------------------------------------------------ Optuna helpers


def new_study(url: str, name: str, tasks: list[str], metric: str = "overall") -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for key, value in {"metric": metric, "direction": "maximize", "tasks": tasks}.items():
        study.set_user_attr(key, value)
    return study


def add_trial(
    study: optuna.Study, artifact_dir: Path | None, value: float | None, state=optuna.trial.TrialState.COMPLETE, **attrs
) -> None:
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


# ------------------------------------------------------------------------------ made-up trials


def sst_outputs(accuracy: float, seed: int) -> np.ndarray:
    """Class probabilities whose argmax is right on about ``accuracy`` of the rows."""
    local = np.random.default_rng(seed)
    probs = local.dirichlet(np.ones(5), ROWS) * 0.5
    right = local.random(ROWS) < accuracy
    guesses = np.where(right, LABELS["sst"], (LABELS["sst"] + local.integers(1, 5, ROWS)) % 5)
    probs[np.arange(ROWS), guesses] += 0.6
    return probs / probs.sum(axis=1, keepdims=True)


def sts_outputs(noise: float, seed: int) -> np.ndarray:
    return LABELS["sts"] + np.random.default_rng(seed).normal(0, noise, ROWS)


def fake_trial(
    root: Path,
    name: str,
    values: dict[str, np.ndarray],
    pair_encoding: str = "cross",
    seed: int = 0,
    train_fields: dict | None = None,
    **changes,
) -> Path:
    """A trial folder; ``train_fields`` adds to its saved train config; ``changes`` can replace "ids" or
    "weights" (a tensor) to make it broken."""
    folder = root / name
    (folder / "outputs").mkdir(parents=True)
    train = {"tasks": list(values), "pair_encoding": pair_encoding, "seed": seed, "model_config": {"hidden_size": 4}}
    train |= train_fields or {}
    (folder / "config.json").write_text(json.dumps({"train": train, "bert": {"hidden_size": 4}}))
    save_file({"w": changes.get("weights", torch.ones(3))}, str(folder / "model.safetensors"))
    history = [{"epoch": 1, "train_seconds": 30.0}]
    (folder / "metrics.json").write_text(json.dumps({"best_epoch": 1, "best": history[0], "history": history}))
    for task, task_values in values.items():
        ids = changes.get("ids", IDS)
        np.savez(folder / "outputs" / f"{task}-dev.npz", ids=ids, values=task_values, labels=LABELS[task])
        np.savez(folder / "outputs" / f"{task}-test.npz", ids=ids, values=task_values)
    return folder


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> str:
    """One storage for the module's studies (making a SQLite schema takes a second or two)."""
    return f"sqlite:///{tmp_path_factory.mktemp('optuna') / 'optuna.db'}"


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory, storage) -> str:
    """Study "multi": two sst+sts trials (trial 0 good at sst, bad at sts); "sts": three bi-encoded sts trials."""
    url, tmp_path = storage, tmp_path_factory.mktemp("trials")
    multi = new_study(url, "multi", ["sst", "sts"])
    add_trial(multi, fake_trial(tmp_path, "m0", {"sst": sst_outputs(0.9, 1), "sts": sts_outputs(3.0, 2)}), 0.7)
    add_trial(multi, fake_trial(tmp_path, "m1", {"sst": sst_outputs(0.4, 3), "sts": sts_outputs(2.5, 4)}), 0.6)
    add_trial(multi, None, None, state=optuna.trial.TrialState.FAIL, error="boom")
    sts = new_study(url, "sts", ["sts"], metric="sts")
    for n, noise in enumerate((0.5, 0.8)):
        add_trial(sts, fake_trial(tmp_path, f"s{n}", {"sts": sts_outputs(noise, 10 + n)}, pair_encoding="bi"), 0.9 - n / 10)
    # Early-stopped: a member unless --exclude-early-stopped.
    stopped = fake_trial(tmp_path, "s2", {"sts": sts_outputs(0.7, 12)}, pair_encoding="bi")
    add_trial(sts, stopped, None, state=optuna.trial.TrialState.PRUNED, early_stopped=True, best_value=0.85)
    return url


def run_build(tmp_path: Path, url: str, *argv: str) -> dict:
    argv = ("--storage", url, "--output-dir", str(tmp_path / "out"), "--splits", "20", *argv)
    return ensemble_build.build(ensemble_build.build_parser().parse_args(argv))


# ------------------------------------------------------------------------------------- tests


def test_pool_takes_every_usable_trial_of_each_study(two_studies):
    pool = load_pool(["multi", "sts"], two_studies)
    assert [m.name for m in pool.members] == ["multi/trial 0", "multi/trial 1", "sts/trial 0", "sts/trial 1", "sts/trial 2"]
    assert pool.tasks == ["sst", "sts"] and pool.find("sts", 2).early_stopped
    assert any("1 failed" in note for note in pool.notes)
    without = load_pool(["multi", "sts"], two_studies, include_early_stopped=False)
    assert "sts/trial 2" not in [m.name for m in without.members]


def test_per_task_selection_across_two_studies(tmp_path, two_studies):
    results = run_build(
        tmp_path, two_studies, "--study", "multi", "--study", "sts", "--method", "caruana", "top-k", "--top-k", "1"
    )
    # SST: only the multitask trials train it, and trial 0 is the better; STS: the sts study's best.
    for method in ("caruana", "top-k", "best single"):
        assert results["sst"].names(results["sst"].choices[method])[0] == "multi/trial 0"
    assert results["sts"].names(results["sts"].choices["top-k"]) == ["sts/trial 0"]
    caruana = results["sts"].choices["caruana"]
    weights = dict(zip(results["sts"].names(caruana), caruana.weights, strict=True))
    # Members on one scale: the noisy multitask trials may still help, but the sts trials carry the ensemble.
    assert (
        max(weights, key=weights.get) == "sts/trial 0"
        and weights.get("multi/trial 0", 0) + weights.get("multi/trial 1", 0) < 0.25
    )
    manifest = json.loads((tmp_path / "out" / "caruana" / "predictor" / "manifest.json").read_text())
    assert manifest["format"] == 3 and set(manifest["tasks"]) == {"sst", "sts"}
    sts_entry = manifest["tasks"]["sts"]
    assert abs(sum(m["weight"] for m in sts_entry["members"]) - 1) < 1e-9
    # Bi-encoded sts trials cost 2 passes per pair, the cross-encoded multitask trial 1.
    assert sts_entry["inference_cost"] == sum(2 if m["study"] == "sts" else 1 for m in sts_entry["members"])
    assert manifest["tasks"]["sst"]["inference_cost"] == len(manifest["tasks"]["sst"]["members"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # The default baseline of a task: trial 0 of the first study that trains it alone, else of the first
    # study that trains it (a multitask trial, said in the notes).
    baselines = {r["task"]: r["members"] for r in summary["rows"] if r["name"] == "baseline (usual recipe)"}
    assert baselines == {"sts": ["sts/trial 0"], "sst": ["multi/trial 0"]}
    assert any("sst baseline: multi/trial 0 (a multitask trial" in note for note in summary["notes"])
    top = next(r for r in summary["rows"] if r["name"] == "top-k" and r["task"] == "sst")
    assert top["estimate"]["splits"] == 20 and top["estimate"]["gain_mean"] is not None
    # Every row says what it took to train: a dev-selected one the whole pool.
    sst_pool = [r for r in summary["rows"] if r["task"] == "sst" and r["kind"] == "member"]
    assert top["training"]["trial_epochs"] == sum(r["training"]["trial_epochs"] for r in sst_pool) > 0
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert "## sst" in markdown and "## sts" in markdown and "out-of-selection" in markdown
    for method in ("caruana", "top-k"):
        for name in ("sst-dev-out.csv", "sst-test-out.csv", "sts-dev-out.csv", "sts-test-out.csv"):
            assert (tmp_path / "out" / method / "predictions" / name).is_file()


def test_baseline_can_be_named(tmp_path, two_studies):
    results = run_build(tmp_path, two_studies, "--study", "multi", "--study", "sts", "--method", "top-k", "--baseline", "sts/1")
    assert results["sts"].pool.members[results["sts"].baseline].name == "sts/trial 1"
    # The sts trial trains no SST: SST keeps its default.
    assert results["sst"].pool.members[results["sst"].baseline].name == "multi/trial 0"
    results = run_build(
        tmp_path, two_studies, "--study", "multi", "--study", "sts", "--method", "top-k", "--baseline", "sst=multi/1"
    )
    assert results["sst"].pool.members[results["sst"].baseline].name == "multi/trial 1"
    assert results["sts"].pool.members[results["sts"].baseline].name == "sts/trial 0"
    refusals = {
        "sts/9": "sts/trial 9 is not a usable member",
        "sst=sts/1": "sts/trial 1 trains .'sts'., not sst",
        "poetry=sts/1": "unknown task 'poetry'",
        "sts/one": "a member is named STUDY/N",
    }
    for ref, message in refusals.items():
        with pytest.raises(EnsembleError, match=message):
            run_build(tmp_path, two_studies, "--study", "sts", "--method", "top-k", "--baseline", ref)


def test_a_study_missing_from_the_storage_is_one_line_naming_it(tmp_path, two_studies, capsys):
    argv = ["--study", "sts", "--study", "nope", "--storage", two_studies, "--output-dir", str(tmp_path / "out")]
    assert ensemble_build.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and err[0].startswith("error:")
    assert not (tmp_path / "out").exists()


def expect_refusal(tmp_path: Path, url: str, study: str, *words: str, capsys) -> None:
    """The build stops with exit 1, an error naming ``words``, and writes nothing."""
    argv = ["--study", study, "--storage", url, "--output-dir", str(tmp_path / "out"), "--method", "caruana"]
    assert ensemble_build.main(argv) == 1
    error = capsys.readouterr().err
    for word in words:
        assert word in error, error
    assert not (tmp_path / "out").exists()


def test_an_unknown_study_is_refused(tmp_path, two_studies, capsys):
    expect_refusal(tmp_path, two_studies, "nope", "no study named 'nope'", "'multi'", capsys=capsys)


def test_a_study_with_no_usable_trial_is_refused(tmp_path, storage, capsys):
    url = storage
    study = new_study(url, "broken", ["sts"])
    add_trial(study, None, None, state=optuna.trial.TrialState.FAIL, error="boom")
    nan_outputs = fake_trial(tmp_path, "nan-outputs", {"sts": np.full(ROWS, np.nan)})
    nan_weights = fake_trial(tmp_path, "nan-weights", {"sts": sts_outputs(0.5, 1)}, weights=torch.tensor([1.0, np.nan]))
    add_trial(study, nan_outputs, 0.5)
    add_trial(study, nan_weights, 0.5)
    with pytest.warns(MemberSkippedWarning) as caught:
        with pytest.raises(NoUsableTrialError, match="study 'broken' has no usable trial"):
            load_pool(["broken"], url)
    messages = [str(w.message) for w in caught]
    assert any("broken/trial 1" in m and "sts-dev.npz" in m and "NaN" in m for m in messages)
    assert any("broken/trial 2" in m and "model.safetensors" in m and "non-finite" in m for m in messages)
    with pytest.warns(MemberSkippedWarning):
        expect_refusal(tmp_path, url, "broken", "'broken'", "no usable trial", capsys=capsys)


def test_members_covering_different_ids_are_refused(tmp_path, storage, capsys):
    url = storage
    study = new_study(url, "ids", ["sts"])
    add_trial(study, fake_trial(tmp_path, "a", {"sts": sts_outputs(0.5, 1)}), 0.9)
    other_ids = IDS.copy()
    other_ids[5] = "elsewhere"
    add_trial(study, fake_trial(tmp_path, "b", {"sts": sts_outputs(0.5, 2)}, ids=other_ids), 0.8)
    expect_refusal(
        tmp_path, url, "ids", "ids/trial 1", "ids/trial 0", str(tmp_path / "b" / "outputs" / "sts-dev.npz"), capsys=capsys
    )


def test_a_corrupt_outputs_file_is_refused(tmp_path, storage, capsys):
    url = storage
    study = new_study(url, "corrupt", ["sts"])
    add_trial(study, fake_trial(tmp_path, "a", {"sts": sts_outputs(0.5, 1)}), 0.9)
    bad = fake_trial(tmp_path, "b", {"sts": sts_outputs(0.5, 2)})
    (bad / "outputs" / "sts-dev.npz").write_bytes(b"not a zip file")
    add_trial(study, bad, 0.8)
    expect_refusal(tmp_path, url, "corrupt", "'corrupt'", "trial 1", str(bad / "outputs" / "sts-dev.npz"), capsys=capsys)


def test_the_usual_recipe_with_its_seeds_is_a_row_of_its_own(tmp_path, storage):
    """Trials 0-2 run the usual recipe with seeds 0-2; trial 3 another recipe; trial 4 the usual recipe,
    early-stopped. The seed row averages trials 0-2 uniformly and is not a dev-selected predictor.
    Trial 2 was saved by a newer trainer that writes a field the others lack at its default value
    (loss_weight 1.0): the same recipe all the same. Trial 5 sets that field to another value: another
    recipe."""
    study = new_study(storage, "seeds", ["sts"], metric="sts")
    for n, (noise, encoding) in enumerate(((0.9, "bi"), (0.9, "bi"), (0.9, "bi"), (0.5, "cross"))):
        newer = {"loss_weight": 1.0} if n == 2 else None
        trial = fake_trial(tmp_path, f"t{n}", {"sts": sts_outputs(noise, 40 + n)}, encoding, seed=n, train_fields=newer)
        add_trial(study, trial, 0.8)
    stopped = fake_trial(tmp_path, "t4", {"sts": sts_outputs(0.9, 44)}, "bi", seed=4)
    add_trial(study, stopped, None, state=optuna.trial.TrialState.PRUNED, early_stopped=True, best_value=0.8)
    weighted = fake_trial(tmp_path, "t5", {"sts": sts_outputs(0.9, 45)}, "bi", seed=5, train_fields={"loss_weight": 2.0})
    add_trial(study, weighted, 0.8)
    results = run_build(tmp_path, storage, "--study", "seeds", "--method", "caruana")
    average = results["sts"].fixed["usual recipe x seeds"]
    assert [results["sts"].pool.members[i].name for i in average.members] == [f"seeds/trial {n}" for n in range(3)]
    assert average.weights == [1 / 3] * 3
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    row = next(r for r in summary["rows"] if r["name"] == "usual recipe x seeds")
    assert row["kind"] == "baseline" and "not selected" in row["note"]
    assert row["training"] == {"trial_epochs": 3, "train_seconds": 90.0}
    # Three noisy seeds averaged beat one of them, paired on the same halves.
    assert row["estimate"]["gain_mean"] > 0 and row["estimate"]["splits"] == 20
    assert "usual recipe x seeds" not in results["sts"].choices  # not among the dev-selected predictors
    assert "usual recipe x seeds" in (tmp_path / "out" / "caruana" / "summary.md").read_text()
    # Every row is also paired with the seed average on the same halves (a user's other cheap choice).
    rows = {r["name"]: r for r in summary["rows"]}
    caruana, baseline = rows["caruana"]["estimate"], rows["baseline (usual recipe)"]["estimate"]
    expected = [c - s for c, s in zip(caruana["scores"], row["estimate"]["scores"], strict=True)]
    assert caruana["reference_gains"] == pytest.approx(expected)
    assert caruana["reference_gain_mean"] == pytest.approx(np.mean(expected))
    assert baseline["reference_gain_mean"] == pytest.approx(-row["estimate"]["gain_mean"])
    assert row["estimate"]["reference_gains"] is None  # not paired with itself
    assert "gain over the baseline's seeds averaged" in (tmp_path / "out" / "summary.md").read_text()


def test_encoder_passes_count_each_order_a_cross_encoder_reads():
    cross = {"tasks": ["para", "sts"], "pair_encoding": {"para": "cross", "sts": "bi"}}
    assert [encoder_passes({"train": cross}, t) for t in ("para", "sts")] == [1, 2]
    both = cross | {"cross_order": "both"}
    assert [encoder_passes({"train": both}, t) for t in ("para", "sts")] == [2, 2], "both orders: 2; bi: 2 anyway"
    assert encoder_passes({"train": {"tasks": ["sst", "para"], "cross_order": "both"}}, "sst") == 1
