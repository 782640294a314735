"""Time per optimizer step of our AdamW (both paths) and torch's, on the parameters of a BERT.

Every optimizer gets its own copy of the parameters (the embedded default: all-MiniLM-L6-v2, 22.7M
parameters, unless --model-path) and the same fixed random gradients: dense, except that the word
embeddings get gradients in the rows of --embedding-rows random tokens only, as from training
batches (their other rows keep m = v = 0; 0 makes them dense too). Steps alternate between the
optimizers so that load from other processes hits all alike. A benchmark, not a test:

    python scripts/benchmark_optimizer.py --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.bert import BertModel, default_model_path  # noqa: E402
from model.optimizer import AdamW  # noqa: E402
from scripts.machine import describe, machine  # noqa: E402

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "ours foreach": lambda params: AdamW(params, lr=1e-5, weight_decay=0.01, foreach=True),
    "ours loop": lambda params: AdamW(params, lr=1e-5, weight_decay=0.01, foreach=False),
    "torch single-tensor": lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=False),
    "torch foreach": lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=True),
    "torch fused": lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=True),
}


def time_steps(
    optimizers: dict[str, Callable[..., torch.optim.Optimizer]], model_path: Path, steps: int, warmup: int, embedding_rows: int
) -> dict[str, list[float]]:
    """Seconds of each timed ``step()`` of each optimizer."""
    bert = BertModel.from_pretrained(model_path)
    words = bert.embeddings.word_embeddings.weight
    reference = [p.detach() for p in bert.parameters()]
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in reference]
    if embedding_rows:
        index = next(i for i, p in enumerate(bert.parameters()) if p is words)
        rows = torch.zeros(words.shape[0], 1)
        rows[torch.randint(0, words.shape[0], (embedding_rows,), generator=generator)] = 1.0
        grads[index] *= rows
    runs = {}
    for name, make in optimizers.items():
        params = [torch.nn.Parameter(p.clone()) for p in reference]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        runs[name] = make(params)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, optimizer in runs.items():  # interleaved: load hits all alike
            started = time.perf_counter()
            optimizer.step()
            if i >= warmup:
                seconds[name].append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embedding-rows", type=int, default=3000, help="word embedding rows with a gradient (0: all)")
    parser.add_argument("--model-path", type=Path, default=None, help="HF BERT directory (default: the embedded default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_path = args.model_path or default_model_path()
    seconds = time_steps(OPTIMIZERS, model_path, args.steps, args.warmup, args.embedding_rows)
    count = sum(p.numel() for p in BertModel.from_pretrained(model_path).parameters())
    rows = args.embedding_rows or "all"
    print("\n".join(describe(machine(args.threads, None, None))[:3]))
    print(
        f"torch {torch.__version__}, {args.threads} threads, {count / 1e6:.1f}M fp32 parameters, "
        f"word embedding gradients in {rows} rows, {args.steps} timed steps"
    )
    for name, times in seconds.items():
        print(f"  {name:20s} median {1e3 * statistics.median(times):7.1f} ms/step  (min {1e3 * min(times):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
