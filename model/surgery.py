"""Gradient surgery: combining per-task gradients of the shared encoder into one update.

Every function is pure: it takes the task gradients as rows of a (tasks, params) tensor (each
task's gradient of the shared encoder, flattened) and returns the combined (params,) gradient.
The random task orders are arguments so that the results are reproducible and testable.

- ``sum_gradients``: plain multitask learning (the sum of the task losses).
- ``pcgrad`` (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): for each task i, in a
  random order over the other tasks j, if g_i . g_j < 0, g_i <- g_i - (g_i . g_j / |g_j|^2) g_j
  (g_i is projected onto the normal plane of g_j; g_j stays the original gradient). The
  projected gradients are summed.
- ``gradvac`` (Wang et al. 2020, "Gradient Vaccine", Algorithm 1, one granularity: the whole
  encoder): each task pair keeps an EMA target cosine phi_hat_ij (initially 0). When the current
  cosine phi_ij = cos(g_i, g_j) is below the target, g_i <- g_i + w g_j with the closed form
      w = |g_i| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2)),
  which makes cos(g_i + w g_j, g_j) exactly phi_hat. Then phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij.
  With all targets at 0 the first step equals PCGrad.
"""

from __future__ import annotations

import random

import torch

EPS = 1e-12


def random_orders(num_tasks: int, rng: random.Random) -> list[list[int]]:
    """For each task i, the other tasks in a random order."""
    orders = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        rng.shuffle(others)
        orders.append(others)
    return orders


def _check(grads: torch.Tensor, orders: list[list[int]] | None) -> list[list[int]]:
    if grads.dim() != 2:
        raise ValueError(f"expected task gradients of shape (tasks, params), got {tuple(grads.shape)}")
    num_tasks = grads.shape[0]
    if orders is None:
        return [[j for j in range(num_tasks) if j != i] for i in range(num_tasks)]
    if len(orders) != num_tasks or any(sorted(o) != [j for j in range(num_tasks) if j != i] for i, o in enumerate(orders)):
        raise ValueError(f"orders must list, for each of the {num_tasks} tasks, every other task once; got {orders}")
    return orders


def _gram_and_identity(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gram matrix G = grads grads^T and the identity coefficients, both (tasks, tasks) float64
    on the CPU. The coefficient loops branch on G's entries pair by pair: on the CPU that costs one
    copy from the gradients' device, not one sync per pair."""
    gram = (grads @ grads.T).to("cpu", torch.float64)
    return gram, torch.eye(grads.shape[0], dtype=torch.float64, device="cpu")


def _combine(coef: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """sum_i coef[i] . grads on the gradients' device: the one (params,)-sized operation."""
    return coef.sum(0).to(grads.device, torch.float32) @ grads


def sum_gradients(grads: torch.Tensor) -> torch.Tensor:
    return grads.sum(0)


def pcgrad(grads: torch.Tensor, orders: list[list[int]] | None = None) -> torch.Tensor:
    """PCGrad; ``orders[i]`` is the order in which task i meets the other tasks (default: index order).

    Every projected gradient stays a combination of the original ones, projected_i = sum_k
    coef[i, k] g_k, so each dot product it needs is a sum over the Gram matrix G = grads grads^T:
    projected_i . g_j = coef[i] . G[:, j]. The gradients (tens of millions of numbers per task) are
    read twice, once for G and once for the final sum, however many projections there are."""
    orders = _check(grads, orders)
    grads = grads.float()
    gram, coef = _gram_and_identity(grads)
    for i, order in enumerate(orders):
        for j in order:
            dot = coef[i] @ gram[:, j]
            if dot < 0 and gram[j, j] > EPS:
                coef[i, j] -= dot / gram[j, j]
    return _combine(coef, grads)


def gradvac(
    grads: torch.Tensor,
    targets: torch.Tensor,
    beta: float,
    orders: list[list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GradVac; returns (combined gradient, updated targets on the CPU). ``targets[i, j]`` is the
    EMA target cosine of the pair (i, j) and is not modified in place."""
    orders = _check(grads, orders)
    num_tasks = grads.shape[0]
    if targets.shape != (num_tasks, num_tasks):
        raise ValueError(f"targets must have shape ({num_tasks}, {num_tasks}), got {tuple(targets.shape)}")
    grads = grads.float()
    targets = targets.to("cpu", torch.float32, copy=True)  # updated pair by pair, beside the Gram matrix
    # As in pcgrad: vaccinated_i = sum_k coef[i, k] g_k, its norms and dot products from the Gram matrix.
    gram, coef = _gram_and_identity(grads)
    norms = gram.diagonal().sqrt()
    for i, order in enumerate(orders):
        for j in order:
            norm_i = (coef[i] @ gram @ coef[i]).clamp(min=0).sqrt()
            if norm_i <= EPS or norms[j] <= EPS:
                continue  # a zero gradient has no direction to align
            phi = ((coef[i] @ gram[:, j]) / (norm_i * norms[j])).clamp(-1.0, 1.0)
            target = targets[i, j].double()
            if phi < target:
                weight = norm_i * (target * (1 - phi**2).sqrt() - phi * (1 - target**2).sqrt())
                coef[i, j] += weight / (norms[j] * (1 - target**2).sqrt().clamp(min=EPS))
            targets[i, j] = ((1 - beta) * target + beta * phi).float()
    return _combine(coef, grads), targets
