"""The single-task classifier on a tiny random BERT and a few rows of the real files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from tiny_model import DATA_DIR, TINY_BERT, needs_data

from data.files import load_examples
from model.classifier import ClassifierRun, build_parser, main, train_config
from model.evaluation import predict_values

pytestmark = needs_data

TRAIN_ROWS, EVAL_ROWS = 40, 24


def classifier_args(task: str, mode: str, output_dir, *extra: str) -> list[str]:
    return [
        "--task", task, "--mode", mode, "--model-config", json.dumps(TINY_BERT), "--data-dir", str(DATA_DIR),
        "--train-limit", str(TRAIN_ROWS), "--eval-limit", str(EVAL_ROWS), "--epochs", "2", "--threads", "1",
        "--max-length", "64", "--output-dir", str(output_dir), *extra,
    ]  # fmt: skip


def read_predictions(path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fp:
        header, *rows = list(csv.reader(fp))
    return header, rows


def run_classifier(task: str, mode: str, output_dir, *extra: str) -> tuple[ClassifierRun, dict, dict]:
    """Train and return the run, its result and the encoder weights from before training."""
    args = build_parser().parse_args(classifier_args(task, mode, output_dir, *extra))
    run = ClassifierRun(train_config(args), args.mode, args.output_dir)
    before = {k: v.detach().clone() for k, v in run.model.bert.state_dict().items()}
    return run, run.run(), before


@pytest.mark.parametrize(
    ("task", "mode"), [("sst", "pretrain"), ("sst", "finetune"), ("cfimdb", "pretrain"), ("cfimdb", "finetune")]
)
def test_writes_both_prediction_files_for_every_id(tmp_path, task, mode):
    run, result, before = run_classifier(task, mode, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{mode}-{task}-dev-out.csv", f"{mode}-{task}-test-out.csv"]
    classes = {"sst": 5, "cfimdb": 2}[task]
    for split in ("dev", "test"):
        header, rows = read_predictions(tmp_path / f"{mode}-{task}-{split}-out.csv")
        assert header == ["id", "Predicted_Sentiment"]
        expected_ids = [e.id for e in load_examples(task, split, DATA_DIR)[:EVAL_ROWS]]
        assert sorted(r[0] for r in rows) == sorted(expected_ids) and len(rows) == EVAL_ROWS
        assert all(0 <= int(r[1]) < classes for r in rows)

    # The dev file holds the best epoch's predictions: its accuracy is the best one reported.
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["dev_accuracy"] == max(h["dev_accuracy"] for h in result["history"])
    labels = {e.id: e.label for e in load_examples(task, "dev", DATA_DIR)}
    _, rows = read_predictions(tmp_path / f"{mode}-{task}-dev-out.csv")
    assert np.mean([int(p) == labels[i] for i, p in rows]) == pytest.approx(result["dev_accuracy"])

    after = run.model.bert.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if mode == "pretrain":
        assert changed == [], "pretrain must leave the encoder untouched"
        assert all(not p.requires_grad for p in run.model.bert.parameters())
    else:
        assert "encoder.layer.0.attention.self.query.weight" in changed and "embeddings.word_embeddings.weight" in changed
    head = run.model.heads[task].net[-1]
    assert head.out_features == classes
    # The lr schedule saw every step: finetune decays linearly to near 0, pretrain stays constant.
    assert run.steps == run.total_steps
    last_lr = run.optimizer.param_groups[0]["lr"]
    assert last_lr == run.cfg.lr if mode == "pretrain" else 0 < last_lr <= 0.2 * run.cfg.lr


def test_pretrain_head_trains_on_features_like_the_full_model(tmp_path):
    """The cached-feature shortcut: the head's dev predictions equal those of the whole model."""
    run, result, _ = run_classifier("sst", "pretrain", tmp_path, "--pooling", "cls", "--precision", "fp32")
    _, rows = read_predictions(tmp_path / "pretrain-sst-dev-out.csv")
    full_model = predict_values(run.model, "sst", run.splits["dev"]).argmax(1)
    assert [int(p) for _, p in rows] == full_model.tolist()


def test_main_defaults_and_errors(tmp_path, capsys):
    args = build_parser().parse_args(["--task", "cfimdb", "--mode", "finetune"])
    cfg = train_config(args)
    assert (cfg.lr, cfg.pooling, cfg.max_length, cfg.tasks) == (5e-5, "mean", 512, ["cfimdb"])
    assert cfg.lr_schedule == "linear"
    pretrain = train_config(build_parser().parse_args(["--task", "sst", "--mode", "pretrain"]))
    assert (pretrain.lr, pretrain.lr_schedule) == (1e-3, "constant")
    constant = build_parser().parse_args(["--task", "sst", "--mode", "finetune", "--lr-schedule", "constant"])
    assert train_config(constant).lr_schedule == "constant"

    assert main(classifier_args("sst", "pretrain", tmp_path / "out", "--data-dir", str(tmp_path))) == 2
    assert f"{tmp_path / 'ids-sst-train.csv'}: file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(classifier_args("sst", "pretrain", tmp_path, "--lr", "-1"))
    assert "lr must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(classifier_args("sst", "pretrain", tmp_path, "--model-config", "{broken"))
    assert "--model-config" in capsys.readouterr().err
    assert main(classifier_args("sst", "pretrain", tmp_path, "--max-length", "600")) == 2
    assert "max_length 600 exceeds" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_no_weight_decay_on_biases_and_layer_norm_weights(tmp_path, mode):
    args = build_parser().parse_args(classifier_args("sst", mode, tmp_path, "--weight-decay", "0.2"))
    run = ClassifierRun(train_config(args), args.mode, args.output_dir)
    names = {id(p): n for n, p in run.model.named_parameters()}
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in run.optimizer.param_groups}
    assert groups[0.2] == sorted(
        n for n, p in run.model.named_parameters() if p.requires_grad and n.endswith("weight") and "LayerNorm" not in n
    )
    assert groups[0.0] == sorted(
        n for n, p in run.model.named_parameters() if p.requires_grad and (n.endswith("bias") or "LayerNorm" in n)
    )
    if mode == "finetune":
        assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in groups[0.0]
        assert "bert.encoder.layer.0.attention.self.query.weight" in groups[0.2]
    else:
        assert groups == {0.2: ["heads.sst.net.1.weight"], 0.0: ["heads.sst.net.1.bias"]}
