"""Gradient surgery against hand-computed examples, and its wiring into the trainer."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_model import needs_data, tiny_config

from model.surgery import gradvac, pcgrad, random_orders, sum_gradients


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def assert_close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def test_pcgrad_leaves_non_conflicting_gradients_alone():
    grads = t([1.0, 0.0], [0.0, 1.0])  # orthogonal: dot 0 is not a conflict
    assert_close(pcgrad(grads), [1.0, 1.0])
    grads = t([1.0, 1.0], [1.0, 0.0])
    assert_close(pcgrad(grads), [2.0, 1.0])
    assert_close(sum_gradients(grads), [2.0, 1.0])


def test_pcgrad_projects_conflicting_gradients_onto_the_normal_plane():
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1.
    # g1' = g1 - (-1 / |g2|^2) g2 = (1, 0) + 0.5 (-1, 1) = (0.5, 0.5)
    # g2' = g2 - (-1 / |g1|^2) g1 = (-1, 1) + (1, 0) = (0, 1)
    grads = t([1.0, 0.0], [-1.0, 1.0])
    assert_close(pcgrad(grads), [0.5, 1.5])


def test_pcgrad_projects_against_the_original_gradients_in_the_given_order():
    # g1 = (1,0,0), g2 = (-1,1,0), g3 = (-1,0,1). g2' = (0,1,0) and g3' = (0,0,1) in either order.
    # g1 meeting g2 then g3: (0.5,0.5,0), then dot with g3 = -0.5 -> + 0.25 g3 = (0.25, 0.5, 0.25)
    # g1 meeting g3 then g2: (0.5,0,0.5), then dot with g2 = -0.5 -> + 0.25 g2 = (0.25, 0.25, 0.5)
    grads = t([1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0])
    assert_close(pcgrad(grads, [[1, 2], [0, 2], [0, 1]]), [0.25, 1.5, 1.25])
    assert_close(pcgrad(grads, [[2, 1], [2, 0], [1, 0]]), [0.25, 1.25, 1.5])
    # One conflicting pair only: the third gradient passes unchanged.
    grads = t([1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    assert_close(pcgrad(grads), [0.5, 1.5, 1.0])


def test_pcgrad_rejects_bad_orders():
    with pytest.raises(ValueError, match="orders"):
        pcgrad(t([1.0], [2.0]), [[0], [0]])


def test_random_orders_lists_every_other_task_once():
    orders = random_orders(4, random.Random(0))
    assert [sorted(o) for o in orders] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_gradvac_with_zero_targets_equals_pcgrad_on_a_conflict_and_updates_the_ema():
    # phi = cos((1,0), (-1,1)) = -1/sqrt2 < target 0:
    # w1 = |g1| (0 - phi * 1) / (|g2| * 1) = 0.7071 / 1.4142 = 0.5  -> g1' = (0.5, 0.5)
    # w2 = |g2| (0 - phi) / |g1| = 1.4142 * 0.7071 = 1          -> g2' = (0, 1)
    grads = t([1.0, 0.0], [-1.0, 1.0])
    targets = torch.zeros(2, 2)
    combined, new_targets = gradvac(grads, targets, beta=0.5)
    assert_close(combined, [0.5, 1.5])
    phi = -1 / math.sqrt(2)
    assert_close(new_targets, [[0.0, 0.5 * phi], [0.5 * phi, 0.0]])
    assert torch.equal(targets, torch.zeros(2, 2))  # the input is not modified


def test_gradvac_raises_agreement_up_to_a_positive_target():
    # g1 = (1, 0), g2 = (1, 1): phi = 0.7071, no conflict, but below the target 0.9 of pair (0, 1):
    # w = |g1| (0.9 sqrt(1 - 0.5) - 0.7071 sqrt(1 - 0.81)) / (|g2| sqrt(1 - 0.81))
    #   = (0.63640 - 0.30822) / (1.41421 * 0.43589) = 0.53237   -> g1' = (1.53237, 0.53237)
    # The pair (1, 0) has target 0 and phi > 0: g2 unchanged.
    grads = t([1.0, 0.0], [1.0, 1.0])
    targets = t([0.0, 0.9], [0.0, 0.0])
    combined, new_targets = gradvac(grads, targets, beta=0.01)
    assert_close(combined, [1.53237 + 1.0, 0.53237 + 1.0])
    vaccinated = combined - grads[1]
    assert torch.nn.functional.cosine_similarity(vaccinated, grads[1], dim=0).item() == pytest.approx(0.9, abs=1e-5)
    phi = 1 / math.sqrt(2)
    assert_close(new_targets, [[0.0, 0.99 * 0.9 + 0.01 * phi], [0.01 * phi, 0.0]])


def test_gradvac_leaves_gradients_above_their_targets_alone():
    grads = t([1.0, 0.0], [1.0, 1.0])
    combined, _ = gradvac(grads, torch.zeros(2, 2), beta=0.01)
    assert_close(combined, [2.0, 1.0])


@needs_data
@pytest.mark.parametrize("surgery", ["pcgrad", "gradvac"])
def test_trainer_applies_surgery_to_the_encoder_and_gives_heads_their_own_gradient(surgery, tmp_path):
    """One surgery backward equals: per-task autograd, surgery on the flattened encoder gradients,
    and each head's gradient from its own task's loss alone."""
    from model.config import TrainConfig
    from model.train import Trainer

    no_dropout = tiny_config()["model_config"] | {"attention_probs_dropout_prob": 0.0}
    cfg = TrainConfig.from_dict(tiny_config(surgery=surgery, dropout=0.0, model_config=no_dropout, predict_test=False))
    trainer = Trainer(cfg, output_dir=tmp_path, report=None, fresh=True)
    model = trainer.model
    batches = {task: trainer.streams[task].next().to(trainer.device) for task in cfg.tasks}

    def losses() -> dict[str, torch.Tensor]:
        return {task: trainer._batch_loss(task, batch) for task, batch in batches.items()}

    encoder = model.encoder_parameters()
    per_task = []
    for loss in losses().values():
        grads = torch.autograd.grad(loss, encoder)
        per_task.append(torch.cat([g.reshape(-1) for g in grads]))
    # (the default STS head, 5 * cos(u, v), has no parameters)
    heads = {task: list(model.heads[task].parameters()) for task in cfg.tasks}
    head_grads = {task: torch.autograd.grad(loss, heads[task]) for task, loss in losses().items() if heads[task]}

    orders = random_orders(len(cfg.tasks), random.Random(123))
    if surgery == "pcgrad":
        expected = pcgrad(torch.stack(per_task), orders)
    else:
        expected, _ = gradvac(torch.stack(per_task), torch.zeros(3, 3), cfg.gradvac_beta, orders)

    model.zero_grad(set_to_none=True)
    trainer.rng = random.Random(123)
    trainer._surgery_backward(losses())
    actual = torch.cat([p.grad.reshape(-1) for p in encoder])
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-4)
    for task, grads in head_grads.items():
        for p, g in zip(model.heads[task].parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, g)
    if surgery == "gradvac":
        assert (trainer.gradvac_targets != 0).sum() == 6  # every ordered pair's EMA moved


def direct_pcgrad(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """The paper's loop, on the vectors themselves (what the Gram-matrix version must equal)."""
    projected = grads.double().clone()
    for i, order in enumerate(orders):
        for j in order:
            g_j = grads[j].double()
            dot = projected[i] @ g_j
            if dot < 0:
                projected[i] -= dot / (g_j @ g_j) * g_j
    return projected.sum(0)


def direct_gradvac(grads: torch.Tensor, targets: torch.Tensor, beta: float, orders: list[list[int]]) -> tuple:
    vaccinated, targets = grads.double().clone(), targets.double().clone()
    for i, order in enumerate(orders):
        for j in order:
            g_j = grads[j].double()
            phi = vaccinated[i] @ g_j / (vaccinated[i].norm() * g_j.norm())
            target = targets[i, j]
            if phi < target:
                weight = vaccinated[i].norm() * (target * (1 - phi**2).sqrt() - phi * (1 - target**2).sqrt())
                vaccinated[i] += weight / (g_j.norm() * (1 - target**2).sqrt()) * g_j
            targets[i, j] = (1 - beta) * target + beta * phi
    return vaccinated.sum(0), targets


@pytest.mark.parametrize("seed", range(5))
def test_gram_matrix_surgery_equals_the_direct_loops(seed):
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(5000, generator=generator)
    # Four tasks that partly agree and partly conflict: a common direction, signs flipped at random.
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])[torch.randperm(4, generator=generator)]
    grads = signs[:, None] * shared + 0.8 * torch.randn(4, 5000, generator=generator)
    orders = random_orders(4, random.Random(seed))
    torch.testing.assert_close(pcgrad(grads, orders).double(), direct_pcgrad(grads, orders), atol=1e-4, rtol=1e-5)
    targets = torch.rand(4, 4, generator=generator) * 0.4 - 0.1
    combined, new_targets = gradvac(grads, targets, 0.05, orders)
    expected, expected_targets = direct_gradvac(grads, targets, 0.05, orders)
    torch.testing.assert_close(combined.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(new_targets.double(), expected_targets, atol=1e-6, rtol=1e-5)


@needs_data
def test_surgery_leaves_a_shared_parameter_no_task_of_the_step_reached_without_a_gradient(tmp_path):
    """The pooler serves SST alone here: a step of paraphrase and STS gives it no gradient, so AdamW
    must neither count a step for it, nor decay it, nor move it by its momentum (as without surgery)."""
    from model.config import TrainConfig
    from model.train import Trainer

    pooling = {"sst": "pooler", "para": "mean", "sts": "mean"}
    cfg = TrainConfig.from_dict(tiny_config(surgery="pcgrad", pooling=pooling, weight_decay=0.1, predict_test=False))
    trainer = Trainer(cfg, output_dir=tmp_path, report=None, fresh=True)
    pooler = list(trainer.model.bert.pooler.parameters())
    before = [p.detach().clone() for p in pooler]
    losses = {task: trainer._batch_loss(task, trainer.streams[task].next().to(trainer.device)) for task in ("para", "sts")}
    trainer._surgery_backward(losses)
    assert all(p.grad is None for p in pooler)
    assert all(p.grad is not None for p in trainer.model.bert.encoder.parameters() if p.requires_grad)
    trainer.optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(pooler, before, strict=True))
    assert all(p not in trainer.optimizer.state or not trainer.optimizer.state[p] for p in pooler)


@needs_data
def test_surgery_with_nothing_shared_to_train_steps_the_heads_alone(tmp_path):
    """Every shared layer frozen (the top one is each task's own) and no task on the pooler: nothing to
    combine, so a step trains the heads and the tasks' own layers, not a crash on an empty gradient."""
    from model.config import TrainConfig
    from model.train import Trainer

    cfg = TrainConfig.from_dict(tiny_config(surgery="gradvac", task_layers=1, freeze_layers=1, predict_test=False))
    trainer = Trainer(cfg, output_dir=tmp_path, report=None, fresh=True)
    assert trainer.model.encoder_parameters() == []
    heads = [p for task in cfg.tasks for p in trainer.model.task_parameters(task)]
    before = [p.detach().clone() for p in heads]
    trainer._train_step(list(cfg.tasks))
    assert any(not torch.equal(p, b) for p, b in zip(heads, before, strict=True))
