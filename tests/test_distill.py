"""Distillation in the trainer: the soft losses and a student that follows a made-up teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_model import DATA_DIR, needs_data, tiny_config

from data.files import TASKS, load_examples
from model.build import load_trained
from model.config import TrainConfig
from model.distill import SoftTargets, distill_loss, soft_loss, teacher_file
from model.evaluation import predict_values
from model.multitask import task_loss
from model.rundir import RunFileError, write_npz_outputs
from model.splits import load_split
from model.train import train

ALL = ["sst", "para", "sts"]


# ----------------------------------------------------------------------------------- the soft losses


def test_soft_loss_of_each_task_type():
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(4, 5), -1)
    for temperature in (1.0, 2.0):
        # Zero where the student's distribution is the teacher's, and the softened KL times T^2 elsewhere.
        assert soft_loss("sst", teacher.log(), teacher, temperature).abs().max() < 1e-5
        logits = torch.randn(4, 5)
        soft_t, student_t = (teacher.log() / temperature).softmax(-1), (logits / temperature).softmax(-1)
        kl = (soft_t * (soft_t.log() - student_t.log())).sum(-1) * temperature**2
        assert torch.allclose(soft_loss("sst", logits, teacher, temperature), kl, atol=1e-5)
    p, logits = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    expected = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))
    assert torch.allclose(soft_loss("para", logits, p), expected)
    at_teacher = torch.logit(p).requires_grad_()
    soft_loss("para", at_teacher, p).sum().backward()  # its minimum is at the teacher's P(duplicate)
    assert at_teacher.grad.abs().max() < 1e-6
    assert torch.allclose(soft_loss("sts", torch.tensor([1.0, 4.0]), torch.tensor([2.0, 4.5])), torch.tensor([1.0, 0.25]))


def test_distill_loss_mixes_gold_and_soft_rows():
    scores, gold_labels = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 5.0, 1.0, 2.0])
    soft = torch.tensor([1.5, 2.0, 2.0, 3.0])
    all_gold = SoftTargets(soft, torch.ones(4, dtype=torch.bool))
    index = torch.arange(4)

    def loss(targets: SoftTargets, alpha: float, sts_loss: str = "mse") -> torch.Tensor:
        cfg = TrainConfig(tasks=["sts"], distill_dir="x", distill_alpha=alpha, sts_loss=sts_loss)
        return distill_loss("sts", scores, gold_labels, index, targets, cfg)

    assert torch.isclose(loss(all_gold, 0.0), task_loss("sts", scores, gold_labels))  # alpha 0: the gold loss only
    assert torch.isclose(loss(all_gold, 1.0), (scores - soft).pow(2).mean())  # alpha 1: the teacher only
    mixed = 0.3 * (scores - soft).pow(2).mean() + 0.7 * task_loss("sts", scores, gold_labels)
    assert torch.isclose(loss(all_gold, 0.3), mixed)
    # Augmented rows (the last two) carry the soft loss at full weight and never their placeholder label.
    half = SoftTargets(soft, torch.tensor([True, True, False, False]))
    soft_rows = torch.tensor([0.3, 0.3, 1.0, 1.0]) * (scores - soft).pow(2)
    expected = soft_rows.mean() + 0.7 * 2 / 4 * task_loss("sts", scores[:2], gold_labels[:2])
    assert torch.isclose(loss(half, 0.3), expected)
    assert loss(half, 0.3, "cosent") > 0  # CoSENT on the teacher's scores, a ranking loss over the batch


def test_distill_settings_are_checked():
    for bad, match in (({"distill_alpha": 1.5}, "distill_alpha"), ({"distill_temperature": 0.0}, "distill_temperature")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="augment_limit"):
        TrainConfig(augment_limit=-1)


# ------------------------------------------------------------------------- a student and its teacher


def write_teacher(directory: Path, rows: int, values_of) -> None:
    """A made-up teacher: ``values_of(task, gold labels)`` for the first ``rows`` training rows of each task."""
    for task in ALL:
        examples = load_examples(task, "train", DATA_DIR)[:rows]
        labels = np.array([e.label for e in examples], dtype=np.float64)
        ids = np.array([e.id for e in examples])
        write_npz_outputs(teacher_file(directory, task), {"ids": ids, "values": values_of(task, labels)})


def opposite(task: str, labels: np.ndarray) -> np.ndarray:
    """The opposite of the gold label: class 4 - y, 1 - is_duplicate, 5 - similarity."""
    if TASKS[task].label_kind == "class":
        values = np.full((len(labels), 5), 0.025)
        values[np.arange(len(labels)), 4 - labels.astype(int)] = 0.9
        return values
    return 1.0 - labels if TASKS[task].label_kind == "binary" else 5.0 - labels


@needs_data
def test_as_alpha_goes_to_one_the_student_follows_the_teacher_not_the_gold_labels(tmp_path):
    rows = 32
    write_teacher(tmp_path / "teacher", rows, opposite)
    toward_teacher = {}
    for alpha in (0.0, 1.0):
        config = tiny_config(distill_dir=str(tmp_path / "teacher"), distill_alpha=alpha, train_limit=rows, eval_limit=8)
        train(config | {"epochs": 4, "lr": 3e-3, "predict_test": False}, tmp_path / f"alpha{alpha}")
        model, cfg = load_trained(tmp_path / f"alpha{alpha}")
        for task in ALL:
            gold = np.array(load_split(cfg, task, "train", rows).labels, dtype=np.float64)
            values = predict_values(model, task, load_split(cfg, task, "train", rows))
            if TASKS[task].label_kind == "class":  # probability of the teacher's class minus that of the gold one
                y = gold.astype(int)
                toward_teacher[task, alpha] = float((values[np.arange(rows), 4 - y] - values[np.arange(rows), y]).mean())
            else:  # distance to the gold labels minus distance to the teacher's values
                teacher = opposite(task, gold)
                toward_teacher[task, alpha] = float(np.abs(values - gold).mean() - np.abs(values - teacher).mean())
    for task in ALL:
        assert toward_teacher[task, 1.0] > 0 > toward_teacher[task, 0.0], (task, toward_teacher)


@needs_data
def test_the_trainer_refuses_a_bad_teacher_file_naming_it(tmp_path):
    write_teacher(tmp_path / "short", 8, opposite)  # outputs for 8 rows; the student trains on 24
    with pytest.raises(ValueError, match=r"sst-teacher.npz: no teacher output for 16 of the 24 sst training rows"):
        train(tiny_config(distill_dir=str(tmp_path / "short"), train_limit=24), tmp_path / "a")
    write_teacher(tmp_path / "nan", 24, lambda task, y: opposite(task, y) * np.nan)
    with pytest.raises(RunFileError, match=r"nan/para-teacher.npz: 24 teacher value\(s\) are NaN"):
        train(tiny_config(distill_dir=str(tmp_path / "nan"), train_limit=24), tmp_path / "b")
