"""Members lent across tasks (ensemble.lend, ``ensemble.build --cross-task``): STS members in the
paraphrase pool, built from tiny trials trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from test_ensemble import build_args
from test_ensemble_pool import add_trial, new_study
from tiny_model import DATA_DIR, needs_data, tiny_config

from data.files import load_examples
from ensemble import build as ensemble_build
from ensemble import predict as ensemble_predict
from ensemble.taskpool import apply_scale, fit_logistic, fit_scale, to_log_odds
from model.build import load_trained
from model.evaluation import evaluate_model
from model.train import train

pytestmark = needs_data
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, list[Path]]:
    """Two multitask runs (they train paraphrase) and two STS-only runs (the lenders)."""
    root = tmp_path_factory.mktemp("lend")
    runs = {"multi": [], "sts": []}
    for index, lr in enumerate((1e-3, 3e-3)):
        train(tiny_config(lr=lr), root / f"multi{index}")
        runs["multi"].append(root / f"multi{index}")
        train(tiny_config(tasks=["sts"], lr=lr, seed=index + 1), root / f"sts{index}")
        runs["sts"].append(root / f"sts{index}")
    return runs


@pytest.fixture
def storage(tmp_path, trained) -> str:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    for name, tasks in (("multi", ["sst", "para", "sts"]), ("sts", ["sts"])):
        study = new_study(url, name, tasks)
        for index, run in enumerate(trained[name]):
            add_trial(study, run, 0.9 - index / 100)
    return url


def sts_scores_on_para_dev(run: Path) -> tuple[list[str], np.ndarray]:
    """The STS head's scores on the paraphrase dev pairs the members were evaluated on (eval_limit rows)."""
    model, cfg = load_trained(run)
    rows = load_examples("para", "dev", DATA_DIR)[: cfg.eval_limit]
    _, outputs = evaluate_model(model, cfg, "dev", examples={"sts": rows})
    return list(outputs["sts"]["ids"]), np.asarray(outputs["sts"]["values"], dtype=np.float64)


def test_lent_sts_members_join_the_paraphrase_pool_and_predict_repeats_the_build(tmp_path, storage, trained):
    args = build_args(tmp_path, storage, "multi", "--study", "sts", "--cross-task", "--method", "top-k", "--top-k", "4")
    results = ensemble_build.build(args)
    para = results["para"]
    names = [m.name for m in para.pool.members]
    assert names == ["multi/trial 0", "multi/trial 1", "sts/trial 0 (sts head)", "sts/trial 1 (sts head)"]
    assert [m.name for m in results["sts"].pool.members] == ["multi/trial 0", "multi/trial 1", "sts/trial 0", "sts/trial 1"]

    manifest = json.loads((tmp_path / "out" / "top-k" / "predictor" / "manifest.json").read_text())
    assert manifest["format"] == 5  # a format-4 reader would run the STS members' own head on paraphrase
    entries = {m["name"]: m for m in manifest["tasks"]["para"]["members"]}
    labels = para.pool.labels
    by_hand = []
    for index, run in enumerate(trained["sts"]):
        ids, scores = sts_scores_on_para_dev(run)
        np.testing.assert_array_equal(ids, para.pool.ids)
        entry = entries[f"sts/trial {index} (sts head)"]
        assert entry["head"] == "sts"
        np.testing.assert_allclose(entry["standardize"], [scores.mean(), scores.std()], rtol=1e-9)
        probabilities = 1 / (1 + np.exp(-(scores - scores.mean()) / scores.std()))
        scale = fit_scale(probabilities, labels, "para", offset=True)  # on all of dev: the predictor's map
        np.testing.assert_allclose(entry["scale"], scale, rtol=1e-9)
        by_hand.append(apply_scale(probabilities, scale, "para"))
    for index, run in enumerate(trained["multi"]):
        with np.load(run / "outputs" / "para-dev.npz") as npz:
            by_hand.append(npz["values"].astype(np.float64))
        assert "head" not in entries[f"multi/trial {index}"] and "scale" not in entries[f"multi/trial {index}"]
    np.testing.assert_allclose(para.choices["top-k"].values, np.mean(by_hand, axis=0), atol=1e-12)
    assert para.choices["top-k"].cost(para.pool) == 1 + 1 + 2 + 2  # two cross-encoded members, two bi-encoded STS heads
    assert np.isfinite(para.test["top-k"]["values"]).all() and len(para.test["top-k"]["values"]) == 24

    # ensemble.predict runs the STS members' heads on the pairs and maps them as the build did.
    plans = ensemble_predict.load_plans(tmp_path / "out" / "top-k" / "predictor")
    rows = {e.id: e for e in load_examples("para", "dev", DATA_DIR)}
    predicted = ensemble_predict.Runner("cpu").predict(plans["para"], "para", [rows[i] for i in para.pool.ids])
    np.testing.assert_allclose(predicted["values"], para.choices["top-k"].values, atol=1e-5)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "sts/trial 0 (sts head)" in summary and "lent" in summary


@pytest.mark.parametrize("calibrate", [False, True], ids=["plain", "calibrated"])
def test_a_lent_members_map_is_fitted_on_the_selection_rows_only(tmp_path, storage, calibrate):
    flags = ["--cross-task", "--method", "top-k"] + (["--calibrate"] if calibrate else [])
    pool = ensemble_build.build(build_args(tmp_path, storage, "multi", "--study", "sts", *flags))["para"].pool
    rows = np.arange(0, len(pool.labels), 2)
    prepared = pool.prepared(rows)
    for i, member in enumerate(pool.members):
        own = member.head is None
        if own and not calibrate:
            assert prepared.scales[i] is None
            continue
        expected = fit_scale(pool.values[i][rows], pool.labels[rows], "para", offset=not own)
        assert prepared.scales[i] == expected
        assert (expected[0] == 0.0) == own  # a temperature has no offset; a lent member's line has one


def test_cross_task_without_a_lender_is_a_clear_error(tmp_path, storage, capsys):
    argv = ["--study", "multi", "--storage", storage, "--output-dir", str(tmp_path / "out"), "--cross-task"]
    assert ensemble_build.main([*argv, "--data-dir", str(DATA_DIR)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --cross-task lends sts members to the para pool")
    assert "every member of ['multi'] that trains sts trains para too" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_fit_logistic_recovers_offset_and_slope():
    rng = np.random.default_rng(0)
    z = rng.normal(size=20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-(-0.7 + 1.8 * z)))).astype(float)
    offset, slope = fit_logistic(z, labels, "para")
    assert offset == pytest.approx(-0.7, abs=0.06) and slope == pytest.approx(1.8, abs=0.08)
    # through fit_scale and apply_scale: the probabilities of that line
    p = 1 / (1 + np.exp(-z))
    scale = fit_scale(p, labels, "para", offset=True)
    np.testing.assert_allclose(apply_scale(p, scale, "para"), 1 / (1 + np.exp(-(scale[0] + scale[1] * to_log_odds(p, "para")))))
    with pytest.raises(ValueError, match="class probabilities"):
        fit_logistic(z, labels, "sst")
