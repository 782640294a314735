"""AdamW (Loshchilov & Hutter) with the efficient bias correction of Kingma & Ba, Section 2.

Same signature and update as ``torch.optim.AdamW``:
    theta <- theta - lr * wd * theta                       (decoupled weight decay)
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    step = lr * sqrt(1 - b2^t) / (1 - b1^t)                (bias correction folded into the step)
    theta <- theta - step * m / (sqrt(v) + eps * sqrt(1 - b2^t))
The last line is Kingma & Ba's "efficient" form: it equals m_hat / (sqrt(v_hat) + eps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer


class AdamW(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}: must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}: must be >= 0")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]

                p.mul_(1.0 - lr * weight_decay)
                m.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)

                bias_correction1 = 1.0 - beta1**t
                sqrt_bias_correction2 = math.sqrt(1.0 - beta2**t)
                step_size = lr * sqrt_bias_correction2 / bias_correction1
                denom = v.sqrt().add_(eps * sqrt_bias_correction2)
                p.addcdiv_(m, denom, value=-step_size)
        return loss
