"""End-to-end tests of the trainer on a tiny random BERT and a few rows of the real data."""

from __future__ import annotations

import argparse
import csv
import json
import re

import numpy as np
import pytest
import torch
from tiny_model import DATA_DIR, DEVICE, needs_data, tiny_config

from data.atomic import atomic_write
from data.tokenize import swap_pair_order
from model.build import load_trained
from model.config import TrainConfig, reads_both_orders
from model.evaluation import evaluate_model, predict_values
from model.metrics import overall_score, task_metric, write_predictions
from model.rundir import RunDir
from model.splits import load_split
from model.train import NonFiniteLossError, Trainer, build_parser, config_from_args, main, parse_per_task, train

pytestmark = needs_data

HEADERS = {"sst": "Predicted_Sentiment", "para": "Predicted_Is_Paraphrase", "sts": "Predicted_Similarity"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One two-epoch run of all three tasks, shared by the tests that only read its files."""
    out = tmp_path_factory.mktemp("run")
    reports = []
    summary = train(tiny_config(epochs=2), out, report=reports.append)
    return out, summary, reports


def test_report_is_called_after_each_epoch_with_the_metrics(trained):
    _, summary, reports = trained
    assert [r["epoch"] for r in reports] == [1, 2]
    for r in reports:
        assert {"epoch", "train_loss", "sst", "para", "sts", "overall"} <= set(r)
        assert 0 <= r["sst"] <= 1 and 0 <= r["para"] <= 1 and -1 <= r["sts"] <= 1
        assert r["overall"] == pytest.approx((r["sst"] + r["para"] + (r["sts"] + 1) / 2) / 3)
    assert summary["history"] == reports
    best = max(reports, key=lambda r: r["overall"])
    assert summary["best_epoch"] == best["epoch"] and summary["best"] == best


def test_output_dir_has_every_file(trained):
    out, summary, _ = trained
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["tasks"] == ["sst", "para", "sts"] and saved["bert"]["hidden_size"] == 32
    assert json.loads((out / "metrics.json").read_text()) == summary
    assert (out / "model.safetensors").is_file() and (out / "last.pt").is_file()
    rows = {"dev": 24, "test": 24}
    for task in ("sst", "para", "sts"):
        for split, n in rows.items():
            with np.load(out / "outputs" / f"{task}-{split}.npz") as npz:
                assert npz["ids"].shape == (n,) and npz["ids"].dtype.kind == "U"
                values = npz["values"]
                assert values.shape == ((n, 5) if task == "sst" else (n,))
                if task == "sst":
                    np.testing.assert_allclose(values.sum(1), 1.0, rtol=1e-5)
                if task == "para":
                    assert ((values >= 0) & (values <= 1)).all()
                assert ("labels" in npz) == (split == "dev")
                ids = list(npz["ids"])
            with open(out / "predictions" / f"{task}-{split}-out.csv", newline="") as fp:
                table = list(csv.reader(fp))
            assert table[0] == ["id", HEADERS[task]]
            assert [r[0] for r in table[1:]] == ids
    # The dev outputs are those of the best epoch: their metrics are the reported best metrics.
    for task in ("sst", "para", "sts"):
        with np.load(out / "outputs" / f"{task}-dev.npz") as npz:
            assert task_metric(task, npz["values"], npz["labels"]) == pytest.approx(summary["best"][task])


def test_every_epochs_dev_outputs_are_kept(trained):
    out, summary, _ = trained
    run = RunDir(out)
    for task in ("sst", "para", "sts"):
        assert run.output_epochs(task) == [1, 2]
        for record in summary["history"]:
            kept = run.read_epoch_outputs(task, record["epoch"])
            assert task_metric(task, kept["values"], kept["labels"]) == pytest.approx(record[task])
        best = run.read_epoch_outputs(task, summary["best_epoch"])
        np.testing.assert_array_equal(best["values"], run.read_outputs(task, "dev")["values"])


def test_load_trained_and_evaluate_model_reproduce_the_dev_outputs(trained):
    out, summary, _ = trained
    model, cfg = load_trained(out)
    assert not model.training and cfg.tasks == ["sst", "para", "sts"]
    metrics, outputs = evaluate_model(model, cfg, "dev")
    for task in cfg.tasks:
        with np.load(out / "outputs" / f"{task}-dev.npz") as npz:
            np.testing.assert_array_equal(outputs[task]["ids"], npz["ids"])
            np.testing.assert_allclose(outputs[task]["values"], npz["values"], rtol=1e-4, atol=1e-5)
        assert metrics[task] == pytest.approx(summary["best"][task], abs=1e-6)
    assert metrics["overall"] == pytest.approx(summary["best"]["overall"], abs=1e-6)


def test_evaluate_model_on_given_examples(trained):
    from data.files import Example

    model, cfg = load_trained(trained[0])
    examples = {"sts": [Example("a", ("a cat sits", "a cat is sitting"), 4.0), Example("b", ("dogs run", "stocks fell"), 0.0)]}
    metrics, outputs = evaluate_model(model, cfg, "dev", examples=examples)
    assert list(outputs["sts"]["ids"]) == ["a", "b"] and outputs["sts"]["values"].shape == (2,)
    assert set(metrics) == {"sts", "overall"}


def test_a_model_trained_on_both_pair_orders_predicts_their_mean(tmp_path):
    """cross_order "both": the cross-encoded tasks train on both orders, and every output (dev, test,
    a reloaded model's) is the mean of the two orders' head outputs; a bi-encoded task reads as before."""
    config = tiny_config(
        tasks=["para", "sts"], pair_encoding={"para": "cross", "sts": "bi"}, sts_head="regression", cross_order="both",
    )  # fmt: skip
    trainer = Trainer(TrainConfig.from_dict(config), tmp_path, report=None, fresh=True)
    assert trainer.streams["para"].other_order is not None and trainer.streams["sts"].other_order is None
    summary = train(config, tmp_path)
    model, cfg = load_trained(tmp_path)
    run = RunDir(tmp_path)
    dev = {task: load_split(cfg, task, "dev", cfg.eval_limit) for task in cfg.tasks}
    given = predict_values(model, "para", dev["para"])
    other = predict_values(model, "para", swap_pair_order(dev["para"]))
    logit = lambda p: np.log(p) - np.log1p(-p)  # noqa: E731
    mean = 1 / (1 + np.exp(-(logit(given) + logit(other)) / 2))
    np.testing.assert_allclose(run.read_outputs("para", "dev")["values"], mean, rtol=1e-4, atol=1e-5)
    assert not np.allclose(mean, given, atol=1e-5), "the two orders give different outputs: the mean is not one of them"
    np.testing.assert_allclose(run.read_outputs("sts", "dev")["values"], predict_values(model, "sts", dev["sts"]), atol=1e-5)
    test = load_split(cfg, "para", "test", cfg.eval_limit)
    test_mean = predict_values(model, "para", test, both_orders=True)
    np.testing.assert_allclose(run.read_outputs("para", "test")["values"], test_mean, rtol=1e-4, atol=1e-5)
    metrics, _ = evaluate_model(model, cfg, "dev")
    assert metrics["para"] == pytest.approx(summary["best"]["para"], abs=1e-6)


def test_both_pair_orders_need_a_cross_encoded_pair_task():
    with pytest.raises(ValueError, match="cross_order 'both' needs a cross-encoded pair task"):
        TrainConfig(tasks=["sst", "sts"], pair_encoding="bi", sts_head="regression", cross_order="both")
    with pytest.raises(ValueError, match="cross_order must be one of"):
        TrainConfig(tasks=["para"], cross_order="reversed")
    cfg = TrainConfig(tasks=["sst", "para", "sts"], cross_order="both")  # para cross-encoded by default
    assert [reads_both_orders(cfg, t) for t in cfg.tasks] == [False, True, False]
    saved_before_the_field = {k: v for k, v in cfg.to_dict().items() if k != "cross_order"}
    assert not reads_both_orders(saved_before_the_field, "para")
    assert reads_both_orders(cfg.to_dict(), "para")


def test_same_seed_gives_the_same_metrics_and_resume_continues_exactly(tmp_path):
    config = tiny_config(epochs=2, tasks=["sst", "sts"], predict_test=False)
    straight = train(config, tmp_path / "a")
    again = train(config, tmp_path / "b")
    _same(again, straight)

    # Interrupt after epoch 1 (the report raises, as Ray does to stop a trial), then resume.
    def stop_after_first(metrics: dict) -> None:
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "c", report=stop_after_first)
    resumed = train(config, tmp_path / "c")
    _same(resumed, straight)


def test_a_crash_before_the_best_weights_resumes_without_redoing_the_epoch(tmp_path, monkeypatch):
    """The best weights are written after last.pt: a run stopped between the two resumes at that epoch
    (not redoing it, which on a GPU may give other weights than the recorded best) and saves the best
    epoch's weights and dev outputs from last.pt's model."""
    config = tiny_config(epochs=2, tasks=["sts"], predict_test=False)
    straight = train(config, tmp_path / "a")
    run, save_weights, holds = RunDir(tmp_path / "c"), RunDir.save_weights, []

    def stopped_at_the_best_epoch(self, state):  # called at each epoch that improved: the best is the last
        holds.append(run.load_state("cpu")["epoch"])  # what last.pt holds when the best weights are due
        if len(holds) == straight["best_epoch"]:
            raise KeyboardInterrupt
        save_weights(self, state)

    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "save_weights", stopped_at_the_best_epoch)
        with pytest.raises(KeyboardInterrupt):
            train(config, run.path)
    assert holds[-1] == straight["best_epoch"]
    reported = []
    resumed = train(config, run.path, report=lambda metrics: reported.append(metrics["epoch"]))
    assert reported == list(range(straight["best_epoch"] + 1, 3))  # nothing redone
    _same(resumed, straight)
    weights, expected = run.load_weights(), RunDir(tmp_path / "a").load_weights()
    assert all(torch.equal(weights[k], expected[k]) for k in expected) or DEVICE.type != "cpu"
    best_epoch_outputs = run.read_epoch_outputs("sts", resumed["best_epoch"])["values"]
    np.testing.assert_array_equal(run.read_outputs("sts", "dev")["values"], best_epoch_outputs)


def test_a_run_from_before_per_epoch_outputs_resumes_as_it_was(tmp_path):
    """A trainer before per-epoch dev outputs wrote its best weights before last.pt: resumed with every
    epoch done, the run keeps them, and does not fail for want of the epoch's outputs."""
    config = tiny_config(epochs=1, tasks=["sts"], predict_test=False)
    train(config, tmp_path)
    run = RunDir(tmp_path)
    weights = run.weights_file.read_bytes()
    for saved in (tmp_path / "outputs" / "epochs").iterdir():
        saved.unlink()
    assert train(config, tmp_path)["best_epoch"] == 1
    assert run.weights_file.read_bytes() == weights


def test_test_predictions_come_before_the_last_report(tmp_path):
    """ASHA stops a trial the moment it reports its final epoch: the test outputs must exist by then."""

    def stop_at_the_end(metrics: dict) -> None:
        assert (tmp_path / "outputs" / "sts-test.npz").is_file() == (metrics["epoch"] == 2)
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(epochs=2, tasks=["sts"]), tmp_path, report=stop_at_the_end)
    assert (tmp_path / "predictions" / "sts-test-out.csv").is_file()
    # Run again: every epoch is done and the test outputs are there, so nothing is redone.
    written = (tmp_path / "outputs" / "sts-test.npz").stat().st_mtime_ns
    assert train(tiny_config(epochs=2, tasks=["sts"]), tmp_path)["best_epoch"] in (1, 2)
    assert (tmp_path / "outputs" / "sts-test.npz").stat().st_mtime_ns == written


def _same(a: dict, b: dict) -> None:
    """Equal histories apart from the wall-clock times: exactly on the CPU; elsewhere (not
    deterministic, tiny_model.DEVICE) within one dev example's share of accuracy."""

    def drop(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in history]

    if DEVICE.type == "cpu":
        assert drop(a["history"]) == drop(b["history"])
        return
    for ours, theirs in zip(drop(a["history"]), drop(b["history"]), strict=True):
        assert ours == pytest.approx(theirs, abs=1 / tiny_config()["eval_limit"])


def test_resume_with_another_config_is_an_error_unless_fresh(tmp_path):
    train(tiny_config(tasks=["sts"], predict_test=False), tmp_path)
    with pytest.raises(ValueError, match=r"different config \(lr: 0.001 -> 0.002\).*fresh"):
        train(tiny_config(tasks=["sts"], predict_test=False, lr=2e-3), tmp_path)
    summary = train(tiny_config(tasks=["sts"], predict_test=False, lr=2e-3), tmp_path, fresh=True)
    assert summary["best_epoch"] == 1
    # Runtime-only fields may change on resume.
    train(tiny_config(tasks=["sts"], predict_test=False, lr=2e-3, threads=2), tmp_path)
    # A checkpoint written before a field existed resumes: the missing field is at its default.
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["config"]["task_layers"]
    torch.save(state, tmp_path / "last.pt")
    train(tiny_config(tasks=["sts"], predict_test=False, lr=2e-3), tmp_path)


def test_a_non_finite_loss_raises(tmp_path):
    with pytest.raises(NonFiniteLossError, match="loss is (nan|inf)"):
        train(tiny_config(tasks=["sts"], lr=1e12, max_grad_norm=0.0, epochs=3, predict_test=False), tmp_path)


def test_config_validation_names_the_bad_key():
    with pytest.raises(ValueError, match="unknown TrainConfig key.*'lrr'"):
        TrainConfig.from_dict({"lrr": 1e-3})
    with pytest.raises(ValueError, match="surgery"):
        TrainConfig(surgery="magic")
    with pytest.raises(ValueError, match=r"batch_size: no value for task\(s\) \['sts'\]"):
        TrainConfig(tasks=["sst", "sts"], batch_size={"sst": 8})
    with pytest.raises(ValueError, match="cosine"):
        TrainConfig(tasks=["sts"], sts_head="cosine", pair_encoding="cross")
    cfg = TrainConfig(tasks=["sts"], batch_size={"sts": 8})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_per_task_settings_are_checked_and_looked_up_per_task():
    pooling = {"sst": "cls", "para": "cls", "sts": "mean"}
    encoding = {"para": "cross", "sts": "bi"}
    cfg = TrainConfig(tasks=["sst", "para", "sts"], pair_encoding=encoding, pooling=pooling, sts_head="cosine")
    assert cfg.task_value("pair_encoding", "para") == "cross" and cfg.task_value("pair_encoding", "sts") == "bi"
    assert cfg.task_value("pooling", "sst") == "cls" and cfg.task_value("lr", "sst") == cfg.lr
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # pair_encoding needs no entry for a single-sentence task; pooling needs one for every task
    with pytest.raises(ValueError, match=r"pooling: no value for task\(s\) \['sst'\]"):
        TrainConfig(tasks=["sst", "sts"], pooling={"sts": "mean"})
    with pytest.raises(ValueError, match=r"pair_encoding: unknown task\(s\) \['qa'\]"):
        TrainConfig(tasks=["sts"], pair_encoding={"sts": "bi", "qa": "bi"})
    with pytest.raises(ValueError, match="pair_encoding must be one of"):
        TrainConfig(tasks=["sts"], pair_encoding={"sts": "tri"})
    with pytest.raises(ValueError, match="cosine.*sts"):
        TrainConfig(tasks=["para", "sts"], pair_encoding={"para": "bi", "sts": "cross"}, sts_head="cosine")


def test_per_task_encodings_train_and_reload(tmp_path):
    """One model cross-encodes paraphrase and bi-encodes STS (cosine head), each pooled its own way and
    through its own top layer."""
    config = tiny_config(
        tasks=["para", "sts"], pair_encoding={"para": "cross", "sts": "bi"}, pooling={"para": "cls", "sts": "mean"},
        sts_head="cosine", task_layers=1, predict_test=False,
    )  # fmt: skip
    summary = train(config, tmp_path)
    model, cfg = load_trained(tmp_path)
    assert model.pair_encoding == {"para": "cross", "sts": "bi"} and model.pooling == {"para": "cls", "sts": "mean"}
    assert set(model.task_layers) == {"para", "sts"} and len(model.bert.encoder.layer) == 1
    metrics, _ = evaluate_model(model, cfg, "dev")
    assert metrics["sts"] == pytest.approx(summary["best"]["sts"], abs=1e-5)
    assert metrics["para"] == pytest.approx(summary["best"]["para"], abs=1e-6)


def test_cli_flags_map_to_config_fields(tmp_path, capsys):
    parser = build_parser()
    help_text = parser.format_help()
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in help_text
    args = parser.parse_args(["--output-dir", "x", "--tasks", "sst", "sts", "--batch-size", "sst=8", "sts=4"])
    assert args.tasks == ["sst", "sts"] and args.batch_size == ["sst=8", "sts=4"]
    assert parse_per_task("pair_encoding", ["para=cross", "sts=bi"]) == {"para": "cross", "sts": "bi"}
    assert parse_per_task("batch_size", ["16"], int) == 16
    out = tmp_path / "cli"
    argv = [
        "--output-dir",
        str(out),
        "--tasks",
        "sts",
        "--model-config",
        json.dumps(tiny_config()["model_config"]),
        "--train-limit",
        "32",
        "--eval-limit",
        "16",
        "--batch-size",
        "sts=16",
        "--threads",
        "1",
        "--no-predict-test",
    ]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["train"]["batch_size"] == {"sts": 16}
    assert '"epoch": 3' in capsys.readouterr().out
    assert main(["--output-dir", str(out), "--tasks", "sts", "--pooling", "max"]) == 2
    assert "pooling must be one of" in capsys.readouterr().err
    assert main(["--output-dir", str(out), "--tasks", "sts", "--pair-encoding", "cross", "--sts-head", "cosine"]) == 2
    assert "needs pair_encoding 'bi'" in capsys.readouterr().err


def test_metrics_helpers(tmp_path):
    assert task_metric("sst", np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])) == 0.5
    assert task_metric("para", np.array([0.7, 0.2, 0.5]), np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert task_metric("sts", np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5])) == pytest.approx(
        np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1]
    )
    assert overall_score({"sst": 0.5, "para": 0.8, "sts": 0.6}, ["sst", "para", "sts"]) == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    write_predictions(tmp_path / "p.csv", "para", ["a", "b"], np.array([0.2, 0.9]))
    assert (tmp_path / "p.csv").read_text() == "id,Predicted_Is_Paraphrase\na,0\nb,1\n"
    with pytest.raises(ValueError, match="2 ids but 1 predictions"):
        write_predictions(tmp_path / "q.csv", "sts", ["a", "b"], np.array([1.0]))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")

    def half_write(tmp: str) -> None:
        with open(tmp, "wb") as fp:
            fp.write(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_write)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# A child process whose files may not grow past 4 KiB (RLIMIT_FSIZE): torch.save and safetensors then fail
# to write a checkpoint as they do on a full disk, each with an error of its own and no errno.
FAILED_WRITES = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing the process
import torch
from safetensors.torch import save_file
import data.atomic
if sys.argv[2] == "full":  # what the folder's filesystem says once the disk has filled
    data.atomic.shutil.disk_usage = lambda folder: type("Usage", (), {"free": 0})()
state = {"w": torch.zeros(100_000)}
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
for name, write in (("last.pt", lambda tmp: torch.save(state, tmp)), ("model.safetensors", lambda tmp: save_file(state, tmp))):
    try:
        data.atomic.atomic_write(f"{sys.argv[1]}/{name}", write)
    except OSError as error:
        print(name, "OSError", error.errno)
    except Exception as error:
        print(name, type(error).__name__)
"""


@pytest.mark.parametrize("disk", ["full", "not full"])
def test_a_checkpoint_write_that_fails_on_a_full_disk_raises_enospc(tmp_path, disk):
    """torch.save and safetensors say a failed write in their own words; atomic_write says ENOSPC when
    the disk is full (what a trial needs to stop the study), and passes other failures on unchanged."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ran = subprocess.run(
        [sys.executable, "-c", FAILED_WRITES, str(tmp_path), disk], cwd=root, capture_output=True, text=True, timeout=120
    )
    lines = ran.stdout.splitlines()
    if disk == "full":
        assert lines == ["last.pt OSError 28", "model.safetensors OSError 28"], ran.stdout + ran.stderr
    else:
        assert lines == ["last.pt RuntimeError", "model.safetensors SafetensorError"], ran.stdout + ran.stderr
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_the_trainer_decays_weights_but_not_biases_or_layer_norms(tmp_path):
    trainer = Trainer(TrainConfig.from_dict(tiny_config(tasks=["sts"], weight_decay=0.05)), tmp_path, None, fresh=True)
    decayed, not_decayed = trainer.optimizer.param_groups
    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in not_decayed["params"])
    assert all(names[id(p)].endswith("weight") and "LayerNorm" not in names[id(p)] for p in decayed["params"])


@pytest.mark.parametrize(
    "tasks, surgery, lazy", [(["sts"], "none", False), (["sst", "sts"], "pcgrad", False), (["sst", "sts"], "gradvac", True)]
)
def test_frozen_word_embeddings_get_no_gradient_and_no_update(tmp_path, tasks, surgery, lazy):
    """Alone and under gradient surgery (which then combines the other shared parameters' gradients);
    lazy updates of a frozen matrix are none either."""
    cfg = tiny_config(tasks=tasks, surgery=surgery, freeze_word_embeddings=True, predict_test=False, lazy_word_embeddings=lazy)
    cfg = TrainConfig.from_dict(cfg)
    trainer = Trainer(cfg, tmp_path, None, fresh=True)
    words = trainer.model.bert.embeddings.word_embeddings.weight
    before = words.detach().clone()
    layer = trainer.model.bert.encoder.layer[0].attention.self.query.weight
    layer_before = layer.detach().clone()
    trainer._train_step(tasks)
    assert words.grad is None and torch.equal(words, before)
    assert not torch.equal(layer, layer_before)  # the rest of the encoder still learns
    assert all(words is not p for group in trainer.optimizer.param_groups for p in group["params"])
    assert build_parser().parse_args(["--output-dir", "x", "--freeze-word-embeddings"]).freeze_word_embeddings


@pytest.mark.parametrize("tasks, surgery", [(["sts"], "none"), (["sst", "para", "sts"], "none"), (["sst", "sts"], "pcgrad")])
def test_lazy_word_embeddings_update_only_the_rows_of_the_batchs_tokens(tmp_path, tasks, surgery):
    """Alone, summed over tasks, and under gradient surgery (which densifies the gradient to combine
    it and hands AdamW the rows any task touched)."""
    cfg = TrainConfig.from_dict(tiny_config(tasks=tasks, surgery=surgery, lazy_word_embeddings=True, predict_test=False))
    trainer = Trainer(cfg, tmp_path, None, fresh=True)
    words = trainer.model.bert.embeddings.word_embeddings.weight
    before = words.detach().clone()
    trainer._train_step(tasks)
    assert words.grad.is_sparse
    rows = words.grad.coalesce().indices()[0]
    changed = (words.detach() != before).any(dim=1).nonzero()[:, 0]
    assert torch.equal(changed, rows)  # every row of the batch's tokens moved, and no other row
    assert 0 < len(rows) < 0.5 * len(words)
    assert build_parser().parse_args(["--output-dir", "x", "--lazy-word-embeddings"]).lazy_word_embeddings


@pytest.mark.parametrize("surgery", ["pcgrad", "gradvac"])
def test_surgery_gives_each_tasks_own_top_layers_its_own_gradient(tmp_path, surgery):
    cfg = TrainConfig.from_dict(tiny_config(tasks=["sst", "sts"], surgery=surgery, task_layers=1, predict_test=False))
    trainer = Trainer(cfg, tmp_path, None, fresh=True)
    before = {k: v.clone() for k, v in trainer.model.task_layers.state_dict().items()}
    trainer._train_step(["sst", "sts"])
    for task in ("sst", "sts"):
        own = trainer.model.task_layers[task]
        assert all(p.grad is not None for p in own.parameters())
        assert not torch.equal(own[0].output.dense.weight, before[f"{task}.0.output.dense.weight"])
    with pytest.raises(ValueError, match="task_layers must be an int >= 0, not 1.5"):
        TrainConfig.from_dict(tiny_config(task_layers=1.5))


def test_a_fresh_run_leaves_no_epoch_of_the_run_it_replaces(tmp_path):
    train(tiny_config(epochs=2, tasks=["sts"], predict_test=False), tmp_path)
    train(tiny_config(epochs=1, tasks=["sts"], predict_test=False), tmp_path, fresh=True)
    assert RunDir(tmp_path).output_epochs("sts") == [1]


def test_a_fresh_run_interrupted_before_its_test_predictions_does_not_take_the_old_ones(tmp_path, monkeypatch):
    """The old run's test outputs are written last: a fresh run stopped after its last epoch, then
    resumed, must predict test itself rather than find the old files and report them as its own."""
    run = RunDir(tmp_path)
    train(tiny_config(epochs=1, tasks=["sts"]), tmp_path)
    old_test = run.read_outputs("sts", "test")["values"]

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_predict_test", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(epochs=1, tasks=["sts"], lr=3e-3), tmp_path, fresh=True)
    assert not run.has_outputs(["sts"], "test") and not run.predictions_file("sts", "test").exists()
    train(tiny_config(epochs=1, tasks=["sts"], lr=3e-3), tmp_path)  # resumed: every epoch done, test not yet
    assert not np.allclose(run.read_outputs("sts", "test")["values"], old_test)


@pytest.mark.parametrize("surgery", ["none", "pcgrad"])
def test_a_tasks_loss_weight_scales_its_gradient_alone(tmp_path, surgery):
    """Two trainers, one seed, the same batches: weighting SST by 2 doubles the gradient of SST's own
    parameters (exact: a power of two) and leaves STS's alone; the shared encoder's changes."""

    def one_step(weights: dict | float, folder: str) -> Trainer:
        config = tiny_config(tasks=["sst", "sts"], surgery=surgery, task_layers=1, loss_weight=weights)
        config |= {"dropout": 0.0, "max_grad_norm": 0.0, "predict_test": False}
        trainer = Trainer(TrainConfig.from_dict(config), tmp_path / folder, None, fresh=True)
        trainer._train_step(["sst", "sts"])
        return trainer

    plain, weighted = one_step(1.0, "plain"), one_step({"sst": 2, "sts": 1}, "weighted")
    for task, factor in (("sst", 2.0), ("sts", 1.0)):
        for p, q in zip(plain.model.task_parameters(task), weighted.model.task_parameters(task), strict=True):
            assert torch.equal(q.grad, factor * p.grad)
    shared = zip(plain.model.encoder_parameters(), weighted.model.encoder_parameters(), strict=True)
    assert any(not torch.allclose(p.grad, q.grad) for p, q in shared if p.grad is not None)
    assert weighted.cfg.loss_weight == {"sst": 2.0, "sts": 1.0}


def test_loss_weights_are_checked_and_read_from_the_command_line():
    for bad in (0, -1.0, float("nan"), "high", True, 10**400, {"sst": 1.0, "sts": 0.0}):
        with pytest.raises(
            ValueError, match=re.escape(f"loss_weight must be a finite number > 0 or task=number pairs, not {bad!r}")
        ):
            TrainConfig(tasks=["sst", "sts"], loss_weight=bad)
    with pytest.raises(ValueError, match=r"loss_weight: no value for task\(s\) \['sts'\]"):
        TrainConfig(tasks=["sst", "sts"], loss_weight={"sst": 2.0})
    args = build_parser().parse_args(["--output-dir", "x", "--tasks", "sst", "sts", "--loss-weight", "sst=0.5", "sts=2"])
    assert config_from_args(args).loss_weight == {"sst": 0.5, "sts": 2.0}
    assert "--loss-weight X|TASK=X" in build_parser().format_help()
    with pytest.raises(argparse.ArgumentTypeError, match="--loss-weight: 'x' is not a number"):
        parse_per_task("loss_weight", ["sst=x"], float)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"hidden_size": 10, "num_attention_heads": 4}, r"hidden_size \(10\) must be a multiple of num_attention_heads \(4\)"),
        ({"hidden_act": "swish"}, "hidden_act 'swish' is not one of"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, not 0"),
        ({"intermediate_size": 6.5}, "intermediate_size must be a positive integer, not 6.5"),
    ],
)
def test_a_model_config_the_bert_cannot_run_is_refused_before_training(bad, message):
    """Checked with the config, as a config.json is, not at the first forward pass after the setup."""
    with pytest.raises(ValueError, match=rf"model_config: {message}"):
        TrainConfig.from_dict(tiny_config(model_config=tiny_config()["model_config"] | bad))


def test_a_missing_test_file_stops_the_run_before_it_trains(tmp_path):
    """Test predictions come last: the file they need is read when the run starts, not after every epoch."""
    from data.files import DataError

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev"):
        (data / f"sts-{split}.csv").symlink_to(DATA_DIR / f"sts-{split}.csv")
    with pytest.raises(DataError, match="sts-test-student.csv: file not found"):
        train(tiny_config(tasks=["sts"], data_dir=str(data)), tmp_path / "run")
    assert not RunDir(tmp_path / "run").state_file.exists()
    train(tiny_config(tasks=["sts"], data_dir=str(data), predict_test=False), tmp_path / "run")  # not needed: not read
