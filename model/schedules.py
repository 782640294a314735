"""What each optimizer step trains on and at what rate: task sampling and the learning-rate schedule.

A step is one optimizer update over one batch from each trained task (``round_robin``), or over as
many batches as there are tasks, each from a task drawn at random (``proportional``: p(task)
proportional to its number of training examples; ``annealed``: p proportional to n**alpha with alpha
going linearly from 1 at the first epoch to 0.5 at the last, as in MT-DNN / Stickland & Murray 2019,
so small tasks get more weight as training goes on).
"""

from __future__ import annotations

import math
import random

import torch

from model.config import TrainConfig


def task_probabilities(cfg: TrainConfig, sizes: dict[str, int], epoch: int) -> dict[str, float]:
    """Sampling probabilities of the proportional (alpha = 1) and annealed schedules."""
    if cfg.schedule == "annealed":
        progress = (epoch - 1) / (cfg.epochs - 1) if cfg.epochs > 1 else 0.0
        alpha = 1.0 - 0.5 * progress
    else:
        alpha = 1.0
    weights = {t: sizes[t] ** alpha for t in cfg.tasks}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def default_steps_per_epoch(cfg: TrainConfig, sizes: dict[str, int]) -> int:
    """``epoch_fraction`` of a pass: over the largest task (round_robin), or over all the data in
    expectation (proportional, annealed)."""
    batches = {t: math.ceil(sizes[t] / cfg.task_batch_size(t)) for t in cfg.tasks}
    steps = max(batches.values()) if cfg.schedule == "round_robin" else sum(batches.values()) / len(cfg.tasks)
    return max(1, math.ceil(steps * cfg.epoch_fraction))


def step_tasks(cfg: TrainConfig, probabilities: dict[str, float], rng: random.Random) -> list[str]:
    if cfg.schedule == "round_robin":
        return list(cfg.tasks)
    return rng.choices(list(probabilities), weights=list(probabilities.values()), k=len(cfg.tasks))


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The rate of optimizer step ``step`` (0-based) of ``total_steps``: constant, or 10% linear
    warm-up then linear decay to 0."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warmup = max(1, int(0.1 * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total_steps: int) -> None:
    rate = learning_rate(cfg, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = rate * group.get("lr_scale", 1.0)  # layer-wise decay (model.optimizer.param_groups)
