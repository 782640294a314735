"""Training speed on this machine: our BERT + AdamW against transformers' BertModel + torch.optim.AdamW,
and the trainer's multitask step with and without PCGrad. A benchmark, not a test:

    python scripts/benchmark_speed.py                       # every case, the precisions fast here
    python scripts/benchmark_speed.py --json results/speed.json --repeats 7

What it prints first: the CPU model, the instruction sets that matter for training (AVX2, FMA,
AVX-512, AVX512_BF16, AMX), torch's thread count, the precisions measured and why (by default fp32,
and bf16 where the trainer's --precision auto uses it), and estimates of the machine's peak.

Cases (``--cases``):
- ``sst``: single-task steps on SST sentences;
- ``sts``: single-task steps on cross-encoded STS pairs ([CLS] s1 [SEP] s2 [SEP]);
  both: ours (our BertModel + our AdamW, our trainer's head) against transformers' BertModel with
  the same head and ``torch.optim.AdamW``, from the same weights (the embedded default model unless
  --model-path), on the same length-bucketed batches, in train mode with dropout. Ratio: ours'
  speed / transformers' speed (> 1: ours is faster).
- ``multitask``: the trainer's own step (``Trainer._train_step``, gradient clipping included) over
  one batch each of SST, Quora and STS, round-robin, with the trainer's default settings (Quora
  cross-encoded, STS bi-encoded with the cosine head), ``surgery = none`` against
  ``surgery = pcgrad``, both from the same weights on the same batches. Ratio: the PCGrad step's
  time / the plain step's time (its cost; the issue's target is at most 1.3).

Levers, to measure them: --freeze-word-embeddings (both implementations; the trainer's
--freeze-word-embeddings), --beside-word-embeddings frozen lazy (ours with the trainer's frozen or
lazy word embeddings beside ours, side by side in one run: the speed-up each option gives) and
--compile (torch.compile of our encoder, dynamic shapes; its compile time falls in --warmup).

Timing, robust to load from other processes: all setups of a case run one step each in turn on the
same batch (interleaved), so that load hits them alike; ``--warmup`` untimed steps first, then
``--repeats`` repeats of ``--steps`` steps, each repeat on the same batches. Reported: throughput
(examples/s) per repeat, and the ratio's median and spread (min-max over repeats, and the
interquartile range of the per-step ratios of the paired steps). The single-task cases run on the
CPU; the multitask case on the trainer's device, a GPU where there is one (each clock read waits
for the GPU's queued work; the peak estimate stays the CPU's, so its % of peak means nothing there).

FLOPs of one training step on a batch of B sequences padded to T tokens, R of them real (batches
are length-bucketed so padding is small; the two views of a bi-encoded batch count as one batch of
2B rows, as the encoder runs them), for an encoder of L layers, width d and feed-forward width d_ff:
    6 * N * R  +  12 * L * B * T^2 * d,      N = L * (4 d^2 + 2 d d_ff)
N is the non-embedding weight-matrix parameter count (the Q, K, V, output and two feed-forward
matrices of each layer); each of its weights costs a multiply-add (2 FLOPs) per real token forward
and twice that backward (input and weight gradients): 6 N per token (Kaplan et al. 2020). Our
encoder does this work on the real tokens only (model.bert.Packing); transformers' does it on
padding too, work that is not counted, so both are measured against the work the batch needs. The
second term is attention's Q K^T and A V on the padded batch (both implementations), 2 * B * T^2 * d
FLOPs each forward, times 3 with the backward.
Embedding lookups, biases, LayerNorm, softmax, GELU, dropout, the heads, the optimizer and the
PCGrad projections are left out (memory-bound or small): GFLOP/s counts model FLOPs only.

Peak: an estimate of the machine's fp32 and bf16 FLOP/s (see scripts/machine.py); each setup's
GFLOP/s is set against the peak of its precision.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.batching import Batch, BatchStream  # noqa: E402
from model.bert import BertConfig  # noqa: E402
from model.build import bert_config_for, build_model  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.multitask import stack_views, task_loss  # noqa: E402
from model.optimizer import AdamW, param_groups  # noqa: E402
from model.runtime import autocast  # noqa: E402
from model.splits import load_split, model_dir  # noqa: E402
from model.train import Trainer  # noqa: E402
from scripts.machine import default_precisions, describe, machine  # noqa: E402
from scripts.speed_timing import (  # noqa: E402
    CASE_TITLES,
    WORD_EMBEDDING_SETUPS,
    Step,
    case_ratios,
    clock,
    measure,
    summarise,
    tables,
)

CASES = ("sst", "sts", "multitask")
MULTITASK = ("sst", "para", "sts")
CPU = torch.device("cpu")

# ------------------------------------------------------------------------------------------ FLOPs


def train_flops(config: BertConfig, shapes: list[tuple[int, int, int]]) -> float:
    """Model FLOPs of one forward + backward over batches of B sequences padded to T tokens, R of
    them real, given as (B, T, R) (see the top)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    matrix_params = layers * (4 * d * d + 2 * d * config.intermediate_size)
    return float(sum(6 * matrix_params * real + 12 * layers * b * t * t * d for b, t, real in shapes))


def batch_shapes(batch: Batch) -> list[tuple[int, int, int]]:
    """(B, T, real tokens) of what the encoder runs: one view, or a bi-encoded batch's two stacked
    (``stack_views``, as ``MultitaskBert.encode_views`` runs them)."""
    views = [stack_views(*batch.views)] if len(batch.views) == 2 else batch.views
    return [(*view[0].shape, int(view[1].sum())) for view in views]


# ----------------------------------------------------------------------------------------- setups


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


@dataclass
class SingleTask:
    """One model + optimizer trained on a fixed list of batches of one task."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    forward: Callable[[torch.nn.Module, Batch], torch.Tensor]
    task: str
    batches: list[Batch]
    bf16: bool
    config: BertConfig
    position: int = 0

    def rewind(self) -> None:
        self.position = 0

    def step(self) -> Step:
        batch = self.batches[self.position % len(self.batches)]
        self.position += 1
        started = clock(CPU)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(CPU, self.bf16):
            loss = task_loss(self.task, self.forward(self.model, batch), batch.labels)
        loss.backward()
        self.optimizer.step()
        seconds = clock(CPU) - started
        return Step(seconds, len(batch), int(batch.views[0][1].sum()), train_flops(self.config, batch_shapes(batch)))


@dataclass
class _Recorder:
    """Stands in for a trainer's BatchStream and notes the batches it hands out."""

    stream: BatchStream
    seen: list[Batch] = field(default_factory=list)

    def next(self) -> Batch:
        batch = self.stream.next()
        self.seen.append(batch)
        return batch


def apply_levers(bert: torch.nn.Module, args: argparse.Namespace, ours: bool) -> None:
    """Speed levers, to measure them: frozen word embeddings (no
    gradient, no optimizer update: about half the parameters), and torch.compile of our encoder
    with dynamic shapes (``Module.compile`` in place, so the state-dict names stay)."""
    if args.freeze_word_embeddings:
        bert.embeddings.word_embeddings.weight.requires_grad_(False)
    if args.compile and ours:
        bert.encoder.compile(dynamic=True)


class TrainerStep:
    """The trainer's own step (``Trainer._train_step``) over one batch of each task."""

    def __init__(self, cfg: TrainConfig, output_dir: Path, args: argparse.Namespace):
        self.trainer = Trainer(cfg, output_dir, None, fresh=True)
        apply_levers(self.trainer.model.bert, args, ours=True)  # a frozen parameter gets no grad: AdamW skips it
        self.config = self.trainer.model.bert.config
        self.recorders = {t: _Recorder(s) for t, s in self.trainer.streams.items()}
        self.trainer.streams = self.recorders
        self.start = {t: r.stream.state_dict() for t, r in self.recorders.items()}

    def rewind(self) -> None:
        for task, recorder in self.recorders.items():
            recorder.stream.load_state_dict(self.start[task])

    def step(self) -> Step:
        for recorder in self.recorders.values():
            recorder.seen.clear()
        started = clock(self.trainer.device)  # the trainer's device: a GPU where there is one
        self.trainer._train_step(list(self.trainer.cfg.tasks))
        seconds = clock(self.trainer.device) - started
        batches = [b for r in self.recorders.values() for b in r.seen]
        shapes = [s for b in batches for s in batch_shapes(b)]
        tokens = sum(int(view[1].sum()) for b in batches for view in b.views)
        return Step(seconds, sum(len(b) for b in batches), tokens, train_flops(self.config, shapes))


def beside_word_embeddings(args: argparse.Namespace) -> list[str]:
    """The word-embedding options to time beside ours (--beside-word-embeddings and its older form)."""
    return list(dict.fromkeys(args.beside_word_embeddings + (["frozen"] if args.beside_frozen_word_embeddings else [])))


def single_task_setups(task: str, precisions: list[str], args: argparse.Namespace) -> dict[tuple[str, str], SingleTask]:
    cfg = TrainConfig(
        tasks=[task],
        pair_encoding="cross",
        pooling="mean",
        sts_head="regression",
        model_path=args.model_path,
        batch_size=args.batch_size,
    )
    stream = BatchStream(load_split(cfg, task, "train"), args.batch_size, seed=0)
    batches = [stream.next() for _ in range(args.steps)]
    config = bert_config_for(cfg)
    setups = {}
    for precision in precisions:
        torch.manual_seed(0)
        ours = build_model(cfg).train()
        theirs = HFModel(model_dir(cfg), copy.deepcopy(ours.heads[task])).train()
        candidates = [("ours", ours, AdamW), ("transformers", theirs, torch.optim.AdamW)]
        for option in beside_word_embeddings(args):  # the trainer's options, from the same weights, timed in the same run
            torch.manual_seed(0)
            setting = {"freeze_word_embeddings": option == "frozen", "lazy_word_embeddings": option == "lazy"}
            candidates.append((WORD_EMBEDDING_SETUPS[option], build_model(dataclasses.replace(cfg, **setting)).train(), AdamW))
        for name, model, optimizer_class in candidates:
            apply_levers(model.bert, args, ours=name != "transformers")
            forward = (lambda m, b: m(b.views)) if name == "transformers" else (lambda m, b: m(task, b.views))
            optimizer = optimizer_class(param_groups(model, 0.01), lr=1e-5)
            setups[(name, precision)] = SingleTask(model, optimizer, forward, task, batches, precision == "bf16", config)
    return setups


def multitask_setups(precisions: list[str], args: argparse.Namespace, output_dir: Path) -> dict[tuple[str, str], TrainerStep]:
    setups = {}
    for precision in precisions:
        for surgery in ("none", "pcgrad"):
            cfg = TrainConfig(  # the trainer's defaults otherwise (para cross-encoded, STS bi-encoded, cosine head)
                tasks=list(MULTITASK),
                surgery=surgery,
                batch_size=args.batch_size,
                model_path=args.model_path,
                precision=precision,
                threads=args.threads,
                eval_limit=8,
                predict_test=False,
            )
            (output_dir / f"{surgery}-{precision}").mkdir()
            setups[(surgery, precision)] = TrainerStep(cfg, output_dir / f"{surgery}-{precision}", args)
    return setups


# ------------------------------------------------------------------------------------------ output


def header(info: dict, args: argparse.Namespace) -> str:
    return "\n".join(
        [
            *describe(info),
            f"batch {args.batch_size}; {args.warmup} warm-up steps; {args.repeats} x {args.steps} timed steps, interleaved",
            f"precision: {', '.join(args.precisions)}. Why: {info['precision_reason']}",
            f"levers: word embeddings {'frozen' if args.freeze_word_embeddings else 'trained'}, "
            f"our encoder {'compiled (dynamic shapes)' if args.compile else 'eager'}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repeat and setup")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of --steps steps (the spread is over these)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per setup first")
    parser.add_argument("--batch-size", type=int, default=32, help="per task")
    parser.add_argument(
        "--threads", type=int, default=available, help=f"torch threads (default: the CPUs available, {available})"
    )
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], help="default: fp32, and bf16 where auto uses it")
    parser.add_argument("--model-path", default=None, help="HF BERT directory (default: the embedded default)")
    parser.add_argument(
        "--freeze-word-embeddings", action="store_true", help="no training of the word embeddings (ours and transformers)"
    )
    parser.add_argument(
        "--beside-word-embeddings",
        nargs="+",
        choices=sorted(WORD_EMBEDDING_SETUPS),
        default=[],
        help="single-task cases: also time ours with the trainer's frozen or lazy word embeddings, interleaved with the others",
    )
    parser.add_argument(
        "--beside-frozen-word-embeddings", action="store_true", help="the same as --beside-word-embeddings frozen"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile our encoder (dynamic shapes); needs a C++ compiler")
    parser.add_argument("--json", type=Path, default=None, help="also write the machine, settings and results here")
    parser.add_argument("--ghz", type=float, default=None, help="clock for the peak estimate (default: read from the system)")
    parser.add_argument("--flops-per-cycle", type=int, default=None, help="fp32 FLOPs per cycle per core for the peak estimate")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats, args.threads, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --repeats, --threads and --batch-size must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    info = machine(args.threads, args.ghz, args.flops_per_cycle)
    defaults, info["precision_reason"] = default_precisions(info["isa"])
    if args.precisions is None:
        args.precisions = defaults
    elif "bf16" in args.precisions and "bf16" not in defaults:
        print(f"warning: bf16 requested; {info['precision_reason']}", file=sys.stderr)
    print(header(info, args), flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="benchmark-speed-") as tmp:
        for case in args.cases:
            started = time.perf_counter()
            if case == "multitask":
                setups = multitask_setups(args.precisions, args, Path(tmp))
            else:
                setups = single_task_setups(case, args.precisions, args)
            timed = measure(setups, args.steps, args.warmup, args.repeats)
            results.append(
                {
                    "case": case,
                    "summary": CASE_TITLES[case],
                    "setups": summarise(timed, info),
                    "ratios": case_ratios(case, timed, args.precisions),
                    "wall_seconds": round(time.perf_counter() - started, 1),
                }
            )
            del setups
            print(f"{case}: done in {results[-1]['wall_seconds']} s", file=sys.stderr, flush=True)
    print()
    print(tables(results))
    if args.json:
        command = " ".join(["python scripts/benchmark_speed.py", *(argv if argv is not None else sys.argv[1:])])
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        record = {"command": command, "date": date, "machine": info, "settings": vars(args), "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
