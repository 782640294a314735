"""SMART smoothness-inducing adversarial regularisation (Jiang et al. 2020, ACL), one ascent step.

    R = max_{||delta||_inf <= epsilon} D(f(x + delta), f(x))

where x is the word-embedding output (fed to BERT as ``inputs_embeds``) and D is the symmetric KL
divergence for classifiers (softmax over classes, or the Bernoulli of a paraphrase logit) and the
squared error for regression (STS). The max is approximated as in the paper's Algorithm 1 with one
projected ascent step (T = 1): delta starts as N(0, sigma^2) noise, moves by ``step_size`` (eta)
along the gradient of D normalised per token to unit infinity-norm, and is projected back onto the
ball: each entry clamped to [-epsilon, epsilon]. sigma = epsilon = 1e-5 and eta = 1e-3 are the
paper's (Section 5). Since eta is 100 times epsilon, the step always reaches the ball's surface:
after the projection, delta is epsilon * sign of the ascent direction wherever the normalised
gradient is not tiny, as in a sign-gradient (FGSM-like) step of size epsilon.

Precision: a perturbation of 1e-5 on word-embedding entries of about 0.05 is a relative change of
2e-4, far below bfloat16's resolution (2^-8, about 4e-3): under bf16 autocast the noise would be
rounded away at the first matrix product and D and its gradient would measure rounding, not
smoothness. So the whole regulariser (the ascent step, the perturbed output and its clean
reference) runs in fp32 with autocast turned off. Under autocast the caller's ``clean`` output is
bf16-rounded (about 1e-2 away from the fp32 output, more than the perturbation moves it), so it is
recomputed in fp32; without autocast it is reused. The cost under bf16: one more forward pass, and
the SMART passes at fp32 speed.

Dropout: the passes run in the model's mode. In training, each pass draws its own dropout masks
(as in the MT-DNN reference implementation), so D also contains the difference between masks, an
R-Drop-like consistency term on top of the adversarial one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.files import TASKS
from model.multitask import MultitaskBert, View

NOISE_STD = 1e-5  # sigma: the initial noise
STEP_SIZE = 1e-3  # eta: the ascent step along the normalised gradient
EPSILON = 1e-5  # radius of the infinity-norm ball that delta stays in


def divergence(task: str, perturbed: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Symmetric KL (classifiers) or mean squared error (STS) between two outputs, batch mean."""
    perturbed, clean = perturbed.float(), clean.float()
    kind = TASKS[task].label_kind
    if kind == "class":
        p, q = F.log_softmax(perturbed, -1), F.log_softmax(clean, -1)
    elif kind == "binary":
        # Two-class log-probabilities of the duplicate logit: [log(1 - s), log s].
        p = torch.stack([F.logsigmoid(-perturbed), F.logsigmoid(perturbed)], -1)
        q = torch.stack([F.logsigmoid(-clean), F.logsigmoid(clean)], -1)
    else:
        return F.mse_loss(perturbed, clean)
    return ((p.exp() - q.exp()) * (p - q)).sum(-1).mean()  # KL(p||q) + KL(q||p)


def adversarial_perturbation(
    model: MultitaskBert,
    task: str,
    views: list[View],
    embeds: list[torch.Tensor],
    clean: torch.Tensor,
    noise_std: float = NOISE_STD,
    step_size: float = STEP_SIZE,
    epsilon: float = EPSILON,
) -> list[torch.Tensor]:
    """delta for each view's word embeddings ``embeds``: one projected ascent step of
    D(f(x + delta), clean) from N(0, noise_std^2), each entry within [-epsilon, epsilon]. Only the
    direction of delta is learnt here: the model gets no gradient, and delta is detached. Runs at
    the precision of the caller's context (``smart_loss`` turns autocast off)."""
    noise = [(torch.randn_like(e) * noise_std).requires_grad_() for e in embeds]
    ascent = divergence(task, model(task, views, [e.detach() + n for e, n in zip(embeds, noise, strict=True)]), clean.detach())
    grads = torch.autograd.grad(ascent, noise)
    deltas = []
    for n, g in zip(noise, grads, strict=True):
        direction = g / (g.abs().amax(-1, keepdim=True) + 1e-12)  # unit infinity-norm per token
        deltas.append((n.detach() + step_size * direction).clamp_(-epsilon, epsilon))  # projection onto the ball
    return deltas


def smart_loss(
    model: MultitaskBert,
    task: str,
    views: list[View],
    clean: torch.Tensor,
    noise_std: float = NOISE_STD,
    step_size: float = STEP_SIZE,
    epsilon: float = EPSILON,
) -> torch.Tensor:
    """The SMART regulariser for one batch, in fp32 even under autocast (see the module's
    docstring); ``clean`` is the model's unperturbed output on it. Gradients flow into the model
    through both the perturbed and the clean output."""
    device_type = views[0][0].device.type
    under_autocast = torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False):
        if under_autocast:
            clean = model(task, views)
        embeds = [model.word_embeddings(view) for view in views]
        deltas = adversarial_perturbation(model, task, views, embeds, clean, noise_std, step_size, epsilon)
        perturbed = model(task, views, [e + d for e, d in zip(embeds, deltas, strict=True)])
        return divergence(task, perturbed, clean)
