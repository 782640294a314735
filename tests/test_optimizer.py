"""Our AdamW against torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch

from model.optimizer import AdamW

SHAPES = [(7,), (3, 5), (2, 3, 4), ()]


def make_params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)) for shape in SHAPES]


def run(optimizer_class, steps: int = 100, **kwargs) -> list[torch.Tensor]:
    """``steps`` updates of a quadratic-ish loss in two parameter groups; the last parameter never
    gets a gradient and one parameter skips the odd steps (its grad is None then)."""
    params = make_params(0)
    frozen = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    groups = [
        {"params": params[:2]},
        {"params": [*params[2:], frozen], "lr": kwargs.get("lr", 1e-3) * 3, "weight_decay": 0.1},
    ]
    optimizer = optimizer_class(groups, **kwargs)
    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        first = 0 if step % 2 == 0 else 1  # params[0] gets no gradient on odd steps
        loss = sum(((p - t) ** 2 * (1 + p.abs())).sum() for p, t in zip(params[first:], targets[first:], strict=True))
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in [*params, frozen]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 1e-2, "weight_decay": 0.01},
        {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.3},
    ],
)
def test_matches_torch_adamw_over_100_steps(kwargs):
    ours = run(AdamW, **kwargs)
    reference = run(torch.optim.AdamW, **kwargs)
    for got, expected in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(ours[0], make_params(0)[0]), "the parameters must have moved"


def test_params_without_grad_are_untouched_even_with_weight_decay():
    frozen = run(AdamW, lr=1e-2, weight_decay=0.5)[-1]
    torch.testing.assert_close(frozen, torch.ones(4, dtype=torch.float64))


def test_closure_is_evaluated_and_returned():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = AdamW([p], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == pytest.approx(1.0)
    assert p.item() < 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "learning rate"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.01}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_sparse_gradients_are_refused():
    embedding = torch.nn.Embedding(5, 3, sparse=True)
    optimizer = AdamW(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
