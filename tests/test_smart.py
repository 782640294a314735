"""SMART: the perturbation stays in the epsilon ball, its ascent step ascends, and the regulariser
runs in fp32 under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from model.bert import BertConfig, BertModel
from model.multitask import MultitaskBert
from model.smart import EPSILON, NOISE_STD, STEP_SIZE, adversarial_perturbation, divergence, smart_loss

TINY = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
TASKS = ["sst", "para", "sts"]


def views_for(task: str, pair_encoding: str, batch: int = 4) -> list:
    g = torch.Generator().manual_seed(7)
    widths = [7, 5] if task != "sst" and pair_encoding == "bi" else [9]
    views = []
    for width in widths:
        ids = torch.randint(1, TINY.vocab_size, (batch, width), generator=g)
        mask = torch.ones(batch, width, dtype=torch.long)
        mask[0, width - 2 :] = 0  # one padded row
        ids[0, width - 2 :] = 0
        views.append((ids, mask, torch.zeros_like(ids)))
    return views


def make_model(pair_encoding: str = "cross") -> MultitaskBert:
    torch.manual_seed(0)
    return MultitaskBert(BertModel(TINY), TASKS, pair_encoding=pair_encoding).eval()  # eval: no dropout


def perturbation(model, task, views, seed: int = 0, **kwargs) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    embeds = [model.word_embeddings(view).detach() for view in views]
    clean = model(task, views).detach()
    torch.manual_seed(seed)
    return adversarial_perturbation(model, task, views, embeds, clean, **kwargs), embeds, clean


def test_the_paper_settings():
    assert (NOISE_STD, STEP_SIZE, EPSILON) == (1e-5, 1e-3, 1e-5)


@pytest.mark.parametrize("pair_encoding", ["cross", "bi"])
@pytest.mark.parametrize("task", TASKS)
def test_the_perturbation_stays_in_the_epsilon_ball(task, pair_encoding):
    model = make_model(pair_encoding)
    views = views_for(task, pair_encoding)
    deltas, embeds, _ = perturbation(model, task, views)
    assert len(deltas) == len(views)
    for delta, embed in zip(deltas, embeds, strict=True):
        assert delta.shape == embed.shape and not delta.requires_grad
        assert delta.abs().max().item() <= EPSILON
        # eta = 100 epsilon: the step reaches the surface of the ball almost everywhere
        assert (delta.abs() == EPSILON).float().mean().item() > 0.9


def test_a_wide_ball_leaves_the_noise_plus_one_normalised_step():
    model = make_model()
    views = views_for("sst", "cross")
    (delta,), _, _ = perturbation(model, "sst", views, epsilon=1.0)
    torch.manual_seed(0)
    noise = torch.randn_like(delta) * NOISE_STD
    step = (delta - noise) / STEP_SIZE  # the normalised ascent direction
    real = views[0][1].bool()  # tokens that are not padding
    torch.testing.assert_close(step.abs().amax(-1)[real], torch.ones(int(real.sum())), atol=1e-3, rtol=0)


def test_the_ascent_step_finds_a_worse_perturbation_than_random_signs():
    """Among perturbations of the same size (epsilon in every entry), the ascent's raises D more than
    random sign patterns do."""
    model = make_model()
    g = torch.Generator().manual_seed(1)
    for task in TASKS:
        views = views_for(task, "cross")
        (delta,), (embed,), clean = perturbation(model, task, views, epsilon=1e-2, step_size=1e-1, noise_std=1e-2)
        signs = [1e-2 * (torch.randint(0, 2, delta.shape, generator=g) * 2 - 1) for _ in range(5)]
        with torch.no_grad():
            ascent, *random = (divergence(task, model(task, views, [embed + d]), clean).item() for d in [delta, *signs])
        assert ascent > max(random), task


@pytest.mark.parametrize("task", TASKS)
def test_under_bf16_autocast_the_regulariser_runs_in_fp32(task):
    """The same perturbation and penalty as in fp32: nothing is rounded to bf16, and the caller's
    bf16 output is replaced by an fp32 one as the clean reference."""
    model = make_model()
    views = views_for(task, "cross")
    torch.manual_seed(3)
    fp32 = smart_loss(model, task, views, model(task, views))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clean = model(task, views)
        assert clean.dtype == torch.bfloat16
        torch.manual_seed(3)
        mixed = smart_loss(model, task, views, clean)
    assert mixed.dtype == torch.float32 and fp32.item() > 0
    torch.testing.assert_close(mixed, fp32, rtol=1e-5, atol=0)
    mixed.backward()
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_under_bf16_the_perturbation_would_be_rounded_away():
    """Why the regulariser avoids bf16: at epsilon, the outputs in bf16 barely see the perturbation
    that fp32 sees (the tiny model's embeddings are about 0.02 in size, like a BERT's)."""
    model = make_model()
    views = views_for("sts", "cross")
    (delta,), (embed,), _ = perturbation(model, "sts", views)
    with torch.no_grad():
        fp32 = (model("sts", views, [embed + delta]) - model("sts", views, [embed])).abs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = (model("sts", views, [embed + delta]).float() - model("sts", views, [embed]).float()).abs()
    assert fp32.min().item() > 0
    assert not torch.allclose(bf16, fp32, rtol=0.5, atol=0)
