"""Training speed of our model + AdamW against Hugging Face transformers' BertModel + torch.optim.AdamW.

Both start from the same weights (the embedded default unless --model-path), run the same head
(mean pooling, then our SST / STS head), the same loss and the same batches (from the trainer's
length-bucketed stream), in train mode with dropout. Steps alternate between the two models so
that load from other processes hits both alike. A benchmark, not a test:

    python scripts/benchmark_speed.py --steps 30 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.batching import Batch, BatchStream  # noqa: E402
from model.multitask import task_loss  # noqa: E402
from model.optimizer import AdamW  # noqa: E402
from model.train import TrainConfig, autocast, build_model, load_split, model_dir, use_bf16  # noqa: E402


class HFModel(torch.nn.Module):
    """transformers.BertModel with our head on mean-pooled tokens."""

    def __init__(self, path: Path, head: torch.nn.Module):
        super().__init__()
        from transformers import BertModel as HFBertModel
        from transformers.utils import logging

        logging.set_verbosity_error()  # the checkpoint's untrained pooler is left out on purpose

        self.bert = HFBertModel.from_pretrained(str(path), add_pooling_layer=False)
        self.head = head

    def forward(self, views: list) -> torch.Tensor:
        input_ids, mask, types = views[0]
        hidden = self.bert(input_ids=input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head([(hidden * m).sum(1) / m.sum(1).clamp(min=1.0)])


def step(model: torch.nn.Module, optimizer, forward, task: str, batch: Batch, bf16: bool) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with autocast(torch.device("cpu"), bf16):
        loss = task_loss(task, forward(model, batch), batch.labels)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def benchmark(task: str, steps: int, warmup: int, batch_size: int, precisions: list[str], model_path: str | None) -> dict:
    """Examples per second of each (implementation, precision), timed on the same batches."""
    cfg = TrainConfig(tasks=[task], pair_encoding="cross", pooling="mean", model_path=model_path, batch_size=batch_size)
    stream = BatchStream(load_split(cfg, task, "train"), batch_size, seed=0)
    batches = [stream.next() for _ in range(warmup + steps)]
    runners = {}
    for precision in precisions:
        torch.manual_seed(0)
        ours = build_model(cfg).train()
        theirs = HFModel(model_dir(cfg), copy.deepcopy(ours.heads[task])).train()
        runners[("ours", precision)] = (
            ours,
            AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01),
            lambda m, b: m(task, b.views),
        )
        runners[("transformers", precision)] = (
            theirs,
            torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01),
            lambda m, b: m(b.views),
        )
    seconds = dict.fromkeys(runners, 0.0)
    for i, batch in enumerate(batches):
        for key, (model, optimizer, forward) in runners.items():  # interleaved: load hits all alike
            elapsed = step(model, optimizer, forward, task, batch, key[1] == "bf16")
            if i >= warmup:
                seconds[key] += elapsed
    tokens = sum(int(b.views[0][1].sum()) for b in batches[warmup:]) / (steps * batch_size)
    return {"tokens": tokens, **{key: steps * batch_size / s for key, s in seconds.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per task and model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=["sst", "sts"], choices=["sst", "para", "sts"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--model-path", default=None, help="HF BERT directory (default: the embedded default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    default = "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32"
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, {args.steps} timed steps; "
        f"the trainer's default precision on this CPU: {default}"
    )
    for task in args.tasks:
        result = benchmark(task, args.steps, args.warmup, args.batch_size, args.precisions, args.model_path)
        kind = "cross-encoded pairs" if task != "sst" else "sentences"
        print(f"{task} ({kind}, {result['tokens']:.1f} tokens/example):")
        for precision in args.precisions:
            ours, theirs = result[("ours", precision)], result[("transformers", precision)]
            print(f"  {precision}: ours {ours:.1f} ex/s, transformers {theirs:.1f} ex/s, ratio {ours / theirs:.2f}")
        if "fp32" in args.precisions and default in args.precisions:
            ratio = result[("ours", default)] / result[("transformers", "fp32")]
            print(f"  ours at the default precision ({default}) vs transformers fp32: ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
