"""SMART smoothness-inducing adversarial regularisation (Jiang et al. 2020, ACL), one ascent step.

    R = max_{delta} D(f(x + delta), f(x))

where x is the word-embedding output (fed to BERT as ``inputs_embeds``) and D is the symmetric KL
divergence for classifiers (softmax over classes, or the Bernoulli of a paraphrase logit) and the
squared error for regression (STS). The max is approximated as in the paper's Algorithm 1 with one
power-iteration step: delta starts as N(0, sigma^2) noise, then moves by ``step_size`` along the
gradient of D normalised per token to unit infinity-norm. sigma = 1e-5 and the step 1e-3 follow the
paper's sigma and eta; the step is relative to word embeddings whose entries are about 0.05 in size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.multitask import SENTENCE_TASKS, MultitaskBert, View

NOISE_STD = 1e-5
STEP_SIZE = 1e-3


def divergence(task: str, perturbed: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Symmetric KL (classifiers) or mean squared error (STS) between two outputs, batch mean."""
    perturbed, clean = perturbed.float(), clean.float()
    if task in SENTENCE_TASKS:
        p, q = F.log_softmax(perturbed, -1), F.log_softmax(clean, -1)
    elif task == "para":
        # Two-class log-probabilities of the duplicate logit: [log(1 - s), log s].
        p = torch.stack([F.logsigmoid(-perturbed), F.logsigmoid(perturbed)], -1)
        q = torch.stack([F.logsigmoid(-clean), F.logsigmoid(clean)], -1)
    else:
        return F.mse_loss(perturbed, clean)
    return ((p.exp() - q.exp()) * (p - q)).sum(-1).mean()  # KL(p||q) + KL(q||p)


def smart_loss(model: MultitaskBert, task: str, views: list[View], clean: torch.Tensor) -> torch.Tensor:
    """The SMART regulariser for one batch; ``clean`` is the model's unperturbed output on it.
    Gradients flow into the model through both the perturbed and the clean output."""
    embeds = [model.word_embeddings(view) for view in views]
    noise = [(torch.randn_like(e) * NOISE_STD).requires_grad_() for e in embeds]
    # Ascent step: only the direction of the noise is learnt here, not the model.
    ascent = divergence(task, model(task, views, [e.detach() + n for e, n in zip(embeds, noise, strict=True)]), clean.detach())
    grads = torch.autograd.grad(ascent, noise)
    deltas = []
    for n, g in zip(noise, grads, strict=True):
        direction = g / (g.abs().amax(-1, keepdim=True) + 1e-12)
        deltas.append((n + STEP_SIZE * direction).detach())
    perturbed = model(task, views, [e + d for e, d in zip(embeds, deltas, strict=True)])
    return divergence(task, perturbed, clean)
