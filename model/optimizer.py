"""AdamW (Loshchilov & Hutter) with the efficient bias correction of Kingma & Ba, Section 2.

Same signature and update as ``torch.optim.AdamW``:
    theta <- theta - lr * wd * theta                       (decoupled weight decay)
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
    step = lr * sqrt(1 - b2^t) / (1 - b1^t)                (bias correction folded into the step)
    theta <- theta - step * m / (sqrt(v) + eps * sqrt(1 - b2^t))
The last line is Kingma & Ba's "efficient" form: it equals m_hat / (sqrt(v_hat) + eps). ``t`` is
counted per parameter: a parameter without a gradient at a step is skipped (no decay either).

A sparse gradient (``nn.Embedding(sparse=True)``: the trainer's ``lazy_word_embeddings``) is updated
lazily, as Keras' LazyAdam and ``torch.optim.SparseAdam`` do: only its rows (the tokens of the batch)
get the update above, with the same ``t``; the other rows keep their weights and moments, where the
dense update would decay them and go on moving them by their momentum. A step then reads and writes a
few thousand of the 30522 rows instead of all of them.

Two implementations give the same numbers, bit for bit on CPU: a loop over the parameters
(``foreach=False``, the readable reference) and a multi-tensor one (``foreach=True``, the default)
that applies each op to many tensors in one ``torch._foreach_*`` call. The update is a handful of
elementwise passes, so its cost is memory traffic: on CPU the foreach path runs them block by block
on pieces that fit in a core's cache (see ``_cache_blocks``) and avoids the slow CPU sqrt of 0.0
(see ``_foreach_denominators``).

``param_groups(model, weight_decay)`` builds the usual BERT recipe's two groups: weight decay on the
weight matrices and embeddings, none on biases and LayerNorm weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.optim import Optimizer

# Elements per thread in a block of the CPU update: p, g, m, v and the denominator of 131072 float32
# numbers are 2.6 MB, about a core's L2 cache (2 MB here), so that the block's passes after the first
# hit the cache. Measured on 22.7M parameters: 65536 to 262144 on 1 thread alike; on 2 threads,
# 262144-element blocks beat 131072 (fewer parallel regions).
CPU_BLOCK_NUMEL_PER_THREAD = 131072


def decays(name: str) -> bool:
    """Whether the parameter called ``name`` gets weight decay: not a bias, not a normalisation
    weight (``...LayerNorm.weight``, ``...layer_norm.weight``, ``...norm.weight``)."""
    return not (name.endswith("bias") or "norm" in name.lower())


LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
TASK_LAYER = re.compile(r"(?:^|\.)task_layers\.[^.]+\.(\d+)\.")  # a task's own top layers, above the shared ones
EMBEDDINGS = re.compile(r"(?:^|\.)embeddings\.")


def layer_depths(names: list[str]) -> dict[str, int]:
    """How many layers below the top each parameter sits: 0 for the heads and the pooler, L - i for
    encoder layer i of L, L + 1 for the embeddings. A task's own top layer j (``task_layers.<task>.j``)
    is layer S + j above S shared ones."""
    layer_of = {name: int(m.group(1)) for name in names if (m := LAYER.search(name))}
    shared = max(layer_of.values(), default=-1) + 1
    layer_of |= {name: shared + int(m.group(1)) for name in names if (m := TASK_LAYER.search(name))}
    count = max(layer_of.values(), default=-1) + 1
    top_down = {name: count - layer for name, layer in layer_of.items()}
    return {name: top_down.get(name, count + 1 if EMBEDDINGS.search(name) else 0) for name in names}


def param_groups(model: torch.nn.Module, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
    """The trainable parameters of ``model`` in optimizer groups, as in the usual BERT recipe
    (Devlin et al.'s ``exclude_from_weight_decay``): ``weight_decay`` on the others, 0 on biases and
    LayerNorm weights, which set a scale and an offset and should not be pulled towards 0.

    ``layer_lr_decay`` < 1 (layer-wise learning-rate decay; Howard & Ruder 2018, Sun et al. 2019)
    gives each group an ``lr_scale`` of decay^depth (``layer_depths``): the heads and the pooler learn
    at the full rate, the top encoder layer at decay times it, each layer below at decay times the one
    above, the embeddings at the lowest; lower layers hold the more general features and move less.
    At 1 there are the usual two groups. Each group keeps ``named_parameters`` order; an empty group is
    left out. Pass the result as the optimizer's ``params``; a group's own ``weight_decay`` overrides
    the optimizer's, and ``model.schedules.set_learning_rate`` multiplies its rate by ``lr_scale``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    depths = layer_depths([name for name, _ in named]) if layer_lr_decay != 1.0 else {}
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in named:
        decayed, depth = decays(name), depths.get(name, 0)
        group = groups.setdefault(
            (decayed, depth), {"params": [], "weight_decay": weight_decay if decayed else 0.0, "lr_scale": layer_lr_decay**depth}
        )
        group["params"].append(p)
    return [groups[key] for key in sorted(groups, key=lambda key: (key[1], not key[0]))]


@dataclass
class _Tensors:
    """Parameters that have a gradient at this step (of one group, device and dtype), with their
    state and the bias-corrected constants of their ``t``."""

    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)  # lr * sqrt(1 - b2^t) / (1 - b1^t)
    denom_eps: list[float] = field(default_factory=list)  # eps * sqrt(1 - b2^t)
    numel: int = 0

    def add(self, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step_size: float, denom_eps: float):
        self.params.append(p)
        self.grads.append(g)
        self.exp_avgs.append(m)
        self.exp_avg_sqs.append(v)
        self.step_sizes.append(step_size)
        self.denom_eps.append(denom_eps)
        self.numel += p.numel()

    def rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, float]]:
        """(p, g, m, v, step_size, denom_eps) of each tensor."""
        return zip(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.step_sizes, self.denom_eps, strict=True)


@dataclass
class _LazyRows:
    """The rows of one parameter that its sparse gradient touches: the update runs on dense copies of
    them (``tensors``), which ``write_back`` puts back into the parameter and its moments."""

    index: torch.Tensor
    full: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the parameter, exp_avg, exp_avg_sq
    tensors: _Tensors

    def write_back(self) -> None:
        rows = (self.tensors.params[0], self.tensors.exp_avgs[0], self.tensors.exp_avg_sqs[0])
        for full, updated in zip(self.full, rows, strict=True):
            full.index_copy_(0, self.index, updated)


class AdamW(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        foreach: bool = True,
    ):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}: must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}: must be >= 0")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts saved before the flag existed
            group.setdefault("foreach", True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            update = _foreach_update if group["foreach"] else _loop_update
            collected, lazy = self._advance(group)
            for tensors in [*collected.values(), *(rows.tensors for rows in lazy)]:
                update(tensors, group["lr"], *group["betas"], group["weight_decay"])
            for rows in lazy:
                rows.write_back()
        return loss

    def _advance(self, group: dict) -> tuple[dict[tuple[torch.device, torch.dtype], _Tensors], list[_LazyRows]]:
        """Counts a step for each parameter of ``group`` that has a gradient (creating its state at
        the first), and collects the dense ones by device and dtype (what one ``_foreach_*`` call
        takes) and the touched rows of the sparse ones."""
        (beta1, beta2), eps = group["betas"], group["eps"]
        collected: dict[tuple[torch.device, torch.dtype], _Tensors] = {}
        lazy: list[_LazyRows] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse and p.grad.sparse_dim() != 1:
                raise RuntimeError(f"AdamW takes sparse gradients of whole rows (sparse_dim 1), not {p.grad.sparse_dim()}")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"]
            sqrt_bias_correction2 = math.sqrt(1.0 - beta2**t)
            step_size = group["lr"] * sqrt_bias_correction2 / (1.0 - beta1**t)
            constants = dict(step_size=step_size, denom_eps=eps * sqrt_bias_correction2)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            if p.grad.is_sparse:
                grad = p.grad.coalesce()  # one row per token, repeats summed
                index, rows = grad.indices()[0], _Tensors()
                rows.add(p.index_select(0, index), grad.values(), m.index_select(0, index), v.index_select(0, index), **constants)
                lazy.append(_LazyRows(index, (p, m, v), rows))
            else:
                collected.setdefault((p.device, p.dtype), _Tensors()).add(p, p.grad, m, v, **constants)
        return collected, lazy


def _loop_update(tensors: _Tensors, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """The update, one parameter at a time (the reference for ``_foreach_update``)."""
    for p, g, m, v, step_size, denom_eps in tensors.rows():
        p.mul_(1.0 - lr * weight_decay)  # theta <- theta - lr * wd * theta
        m.lerp_(g, 1.0 - beta1)  # m <- m + (1 - b1) (g - m) = b1 m + (1 - b1) g
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)  # v <- b2 v + (1 - b2) g^2
        denom = v.sqrt().add_(denom_eps)  # sqrt(v) + eps sqrt(1 - b2^t)
        p.addcdiv_(m, denom, value=-step_size)  # theta <- theta - step * m / denom


def _foreach_update(tensors: _Tensors, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """The same ops as ``_loop_update``, each applied to many tensors at once."""
    on_cpu = tensors.params[0].device.type == "cpu"
    block_numel = CPU_BLOCK_NUMEL_PER_THREAD * torch.get_num_threads()
    for block in _cache_blocks(tensors, block_numel) if on_cpu else [tensors]:
        params, grads, ms, vs = block.params, block.grads, block.exp_avgs, block.exp_avg_sqs
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)  # theta <- theta - lr * wd * theta
        torch._foreach_lerp_(ms, grads, 1.0 - beta1)  # m <- b1 m + (1 - b1) g
        torch._foreach_mul_(vs, beta2)  # v <- b2 v ...
        torch._foreach_addcmul_(vs, grads, grads, 1.0 - beta2)  # ... + (1 - b2) g^2
        denoms = _foreach_denominators(vs, block.denom_eps)  # sqrt(v) + eps sqrt(1 - b2^t)
        torch._foreach_addcdiv_(params, ms, denoms, [-s for s in block.step_sizes])  # theta <- theta - step * m / denom


def _foreach_denominators(vs: list[torch.Tensor], denom_eps: list[float]) -> list[torch.Tensor]:
    """sqrt(v) + denom_eps for each v.

    On CPU, torch's sqrt of 0.0 is ~15x slower than of other numbers, and v stays 0 in the embedding
    rows of tokens not seen yet (half of a BERT's parameters). So there v is first raised to the
    smallest normal number ``tiny``: sqrt(tiny) is less than a quarter of eps_dtype * denom_eps, so
    below half an ulp of denom_eps and the sum rounds to the same number as sqrt(v) + denom_eps, bit
    for bit. Where that bound does not hold (tiny eps, float16) the plain sqrt is kept."""
    info = torch.finfo(vs[0].dtype)
    if vs[0].device.type == "cpu" and min(denom_eps) > 4.0 * math.sqrt(info.tiny) / info.eps:
        denoms = torch._foreach_clamp_min(vs, info.tiny)  # max(v, tiny) ...
        torch._foreach_sqrt_(denoms)  # ... sqrt
    else:
        denoms = torch._foreach_sqrt(vs)
    torch._foreach_add_(denoms, denom_eps)
    return denoms


def _cache_blocks(tensors: _Tensors, block_numel: int) -> Iterator[_Tensors]:
    """``tensors`` regrouped into blocks of at most ``block_numel`` elements (or one tensor): big
    contiguous tensors are cut into 1-D pieces and small ones packed together, each piece with its
    parameter's constants. The update's passes over one block then read and write main memory once
    instead of once per pass."""
    block = _Tensors()
    for p, g, m, v, step_size, denom_eps in tensors.rows():
        if p.numel() > block_numel and all(t.is_contiguous() for t in (p, g, m, v)):
            pieces = zip(*(t.view(-1).split(block_numel) for t in (p, g, m, v)), strict=True)
        else:
            pieces = [(p, g, m, v)]
        for piece in pieces:
            if block.params and block.numel + piece[0].numel() > block_numel:
                yield block
                block = _Tensors()
            block.add(*piece, step_size, denom_eps)
    if block.params:
        yield block


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) over ``params``' gradients, sparse ones included:
    each sparse gradient is first coalesced in place (repeated rows summed), so that the norm of its
    values is its norm and scaling them scales it. Returns the total norm before clipping."""
    dense, sparse_values = [], []
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            sparse_values.append(p.grad.values())  # a view: scaling it scales the gradient
        elif p.grad is not None:
            dense.append(p)
    total = torch.nn.utils.get_total_norm([p.grad for p in dense] + sparse_values, 2.0)
    torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    if sparse_values:
        coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's formula, once
        torch._foreach_mul_(sparse_values, coefficient)
    return total
