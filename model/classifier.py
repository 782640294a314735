"""The single-task sentiment classifier (part 1 of the CS224N handout).

    python -m model.classifier --task {sst,cfimdb} --mode {pretrain,finetune}

pretrain: the encoder is frozen and only the head (dropout + linear on the pooled output) trains.
finetune: everything trains. The optimizer is our AdamW. Each epoch prints the dev accuracy; the
best epoch's weights are kept and write ``{output_dir}/{mode}-{task}-{dev,test}-out.csv``.

Pooling defaults to ``mean`` (the masked mean of the last hidden states): the embedded default
model, all-MiniLM-L6-v2, was trained as a sentence encoder through mean pooling, and its pooler
(tanh dense over [CLS]) was never trained, so ``pooler`` gives it random features. With
bert-base-uncased, whose pooler was trained on next-sentence prediction, ``--pooling pooler`` is
the handout's setup.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.batching import iterate_batches
from data.files import DataError
from data.tokenize import EncodedSplit
from model.build import build_model
from model.config import LR_SCHEDULES, POOLINGS, PRECISIONS, TrainConfig
from model.evaluation import EVAL_BATCH_SIZE, predict_values
from model.metrics import task_metric, write_predictions
from model.multitask import MultitaskBert, output_values, task_loss
from model.optimizer import AdamW, param_groups
from model.runtime import autocast, resolve_device, use_bf16
from model.schedules import set_learning_rate
from model.splits import load_split
from model.train import NonFiniteLossError, progress_bar

CLASSIFIER_TASKS = ("sst", "cfimdb")
MODES = ("pretrain", "finetune")
# pretrain: the handout's lr 1e-3, batch 8 and 10 epochs (a linear head on cached features is cheap).
# finetune: lr 5e-5 (a 6-layer, 384-wide model takes a higher rate than the handout's 1e-5 for
# bert-base) and batch 16 (each step updates all 22.7M weights, a fixed CPU cost that batch 8 doubles);
# 3 epochs, the best dev epoch kept.
DEFAULT_LR = {"pretrain": 1e-3, "finetune": 5e-5}
DEFAULT_EPOCHS = {"pretrain": 10, "finetune": 3}
DEFAULT_BATCH_SIZE = {"pretrain": 8, "finetune": 16}
# finetune: 10% warm-up then linear decay, the usual BERT recipe; pretrain keeps the handout's constant rate.
DEFAULT_LR_SCHEDULE = {"pretrain": "constant", "finetune": "linear"}
SPLIT_NAMES = ("train", "dev", "test")


def progress(batches: Iterable, examples: int, batch_size: int, desc: str) -> Iterable:
    """A progress bar over one pass of batches (shown on a terminal, silent in logs)."""
    return progress_bar(batches, total=-(-examples // batch_size), desc=desc)


def pooled_features(model: MultitaskBert, split: EncodedSplit, device: torch.device, bf16: bool) -> torch.Tensor:
    """(N, H) pooled encoder outputs in the split's order, in eval mode and without gradients."""
    model.eval()
    features = torch.empty(len(split), model.bert.config.hidden_size, device=device)
    batches = iterate_batches(split, EVAL_BATCH_SIZE)
    with torch.inference_mode(), autocast(device, bf16):
        for batch in progress(batches, len(split), EVAL_BATCH_SIZE, "encode"):
            batch = batch.to(device)
            features[batch.index.to(device)] = model.embed(batch.views[0]).float()
    return features


class ClassifierRun:
    """One training run of one task in one mode; ``run()`` trains, keeps the best dev epoch's
    weights, writes the dev and test predictions and returns the best epoch and the history."""

    def __init__(self, cfg: TrainConfig, mode: str, output_dir: str | Path):
        self.cfg, self.mode, self.task, self.output_dir = cfg, mode, cfg.tasks[0], Path(output_dir)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.bf16 = use_bf16(cfg.precision, self.device)
        limits = {"train": cfg.train_limit, "dev": cfg.eval_limit, "test": cfg.eval_limit}
        self.splits = {name: load_split(cfg, self.task, name, limits[name]) for name in SPLIT_NAMES}
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        if mode == "pretrain":
            for p in self.model.bert.parameters():
                p.requires_grad_(False)
        self.optimizer = AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.dev_labels = np.asarray(self.splits["dev"].labels)
        self.steps, self.total_steps = 0, cfg.epochs * -(-len(self.splits["train"]) // cfg.batch_size)

    def run(self) -> dict:
        cfg, sizes = self.cfg, ", ".join(f"{len(split)} {name}" for name, split in self.splits.items())
        tqdm.write(
            f"{self.mode}-{self.task}: {sizes} examples; lr {cfg.lr} ({cfg.lr_schedule}), batch {cfg.batch_size}, "
            f"{cfg.epochs} epochs, "
            f"max_length {cfg.max_length}, {cfg.pooling} pooling, {self.device} {'bf16' if self.bf16 else 'fp32'}"
        )
        if self.mode == "pretrain":
            return self.run_pretrain()
        return self.run_finetune()

    def run_pretrain(self) -> dict:
        # The frozen encoder runs once, in eval mode, and the head trains on the cached pooled
        # outputs. That is the handout's frozen-encoder training with the encoder in eval mode
        # (the head's dropout still applies at every step), at a fraction of the cost.
        features = {name: pooled_features(self.model, split, self.device, self.bf16) for name, split in self.splits.items()}
        labels = torch.as_tensor(self.splits["train"].labels, device=self.device)
        head = self.model.heads[self.task]
        generator = torch.Generator().manual_seed(self.cfg.seed)

        def train_epoch(epoch: int) -> float:
            head.train()
            losses = []
            batches = torch.randperm(len(labels), generator=generator).split(self.cfg.batch_size)
            for index in progress(batches, len(labels), self.cfg.batch_size, f"epoch {epoch}"):
                index = index.to(self.device)
                losses.append(self.step(task_loss(self.task, head([features["train"][index]]), labels[index])))
            return float(np.mean(losses))

        def values(split: str) -> np.ndarray:
            head.eval()
            with torch.inference_mode():
                return output_values(self.task, head([features[split]])).cpu().numpy()

        return self.fit(train_epoch, values)

    def run_finetune(self) -> dict:
        train = self.splits["train"]

        def train_epoch(epoch: int) -> float:
            self.model.train()
            losses = []
            batches = iterate_batches(train, self.cfg.batch_size, shuffle=True, rng=random.Random(f"{self.cfg.seed}-{epoch}"))
            for batch in progress(batches, len(train), self.cfg.batch_size, f"epoch {epoch}"):
                batch = batch.to(self.device)
                with autocast(self.device, self.bf16):
                    logits = self.model(self.task, batch.views)
                losses.append(self.step(task_loss(self.task, logits, batch.labels)))
            return float(np.mean(losses))

        return self.fit(train_epoch, lambda split: predict_values(self.model, self.task, self.splits[split], self.bf16))

    def step(self, loss: torch.Tensor) -> float:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{self.mode}-{self.task}: the training loss is {loss.item()}; try a lower --lr than {self.cfg.lr}"
            )
        set_learning_rate(self.optimizer, self.cfg, self.steps, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.item()

    def fit(self, train_epoch: Callable[[int], float], values: Callable[[str], np.ndarray]) -> dict:
        """Train the epochs, keep the weights of the best dev epoch, write its predictions."""
        best = {"epoch": 0, "dev_accuracy": -1.0}
        best_state, best_dev_values, history = None, None, []
        for epoch in range(1, self.cfg.epochs + 1):
            start = time.perf_counter()
            loss = train_epoch(epoch)
            dev_values = values("dev")
            accuracy = task_metric(self.task, dev_values, self.dev_labels)
            seconds = time.perf_counter() - start
            history.append({"epoch": epoch, "train_loss": loss, "dev_accuracy": accuracy, "seconds": seconds})
            tqdm.write(
                f"{self.mode}-{self.task} epoch {epoch}: train loss {loss:.4f}, dev accuracy {accuracy:.4f} ({seconds:.0f} s)"
            )
            if accuracy > best["dev_accuracy"]:
                best = {"epoch": epoch, "dev_accuracy": accuracy}
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                best_dev_values = dev_values
        self.model.load_state_dict(best_state)
        written = [self.output_dir / f"{self.mode}-{self.task}-{split}-out.csv" for split in ("dev", "test")]
        write_predictions(written[0], self.task, self.splits["dev"].ids, best_dev_values)
        write_predictions(written[1], self.task, self.splits["test"].ids, values("test"))
        tqdm.write(f"best epoch {best['epoch']}: dev accuracy {best['dev_accuracy']:.4f}; wrote {', '.join(map(str, written))}")
        return best | {"history": history, "predictions": written}


def model_config_arg(text: str) -> dict:
    """A JSON object of BertConfig fields, inline or in a file."""
    try:
        raw = text if text.lstrip().startswith("{") else Path(text).read_text()
        config = json.loads(raw)
    except (OSError, json.JSONDecodeError) as err:
        raise argparse.ArgumentTypeError(f"--model-config: {err}") from err
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError("--model-config must be a JSON object of BertConfig fields")
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=CLASSIFIER_TASKS, required=True)
    parser.add_argument("--mode", choices=MODES, required=True, help="pretrain: frozen encoder; finetune: train everything")
    parser.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default: {DEFAULT_LR})")
    parser.add_argument("--epochs", type=int, default=None, help=f"default: {DEFAULT_EPOCHS}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"training batch size (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=None,
        help=f"constant, or linear (10%% warm-up then linear decay to 0) (default: {DEFAULT_LR_SCHEDULE})",
    )
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout before the linear head and in the encoder")
    parser.add_argument(
        "--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay (none on biases and LayerNorm weights)"
    )
    parser.add_argument(
        "--pooling",
        choices=POOLINGS,
        default="mean",
        help="sentence vector: mean of the tokens (default; what the embedded MiniLM was trained with, its pooler "
        "is untrained), cls, or pooler (tanh dense over [CLS]: the handout's choice for bert-base)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="tokens per input; longer ones are truncated (SST sentences have at most 80; CFIMDB reviews a median "
        "of ~205 and a 99th percentile of ~470)",
    )
    parser.add_argument("--seed", type=int, default=11711)
    parser.add_argument("--data-dir", default=None, help="CS224N data files (default: $MINBERT_DATA, else ./datasets)")
    parser.add_argument("--model-path", default=None, help="Hugging Face BERT directory (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument(
        "--model-config",
        type=model_config_arg,
        default=None,
        help="JSON object (inline or a file) of BertConfig fields: a randomly initialised encoder of that size "
        "instead of pretrained weights (for tests); the tokenizer still comes from --model-path",
    )
    parser.add_argument("--output-dir", default="predictions", help="where the prediction CSVs go (default: predictions)")
    parser.add_argument("--cache-dir", default=None, help="token cache (default: <repo>/cache/tokens)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocast or fp32; auto: bf16 on CUDA and on CPUs with bf16 matrix units (AMX or AVX512_BF16), else fp32",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--train-limit", type=int, default=None, help="use the first N training examples")
    parser.add_argument("--eval-limit", type=int, default=None, help="use the first N dev and test examples")
    return parser


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The classifier's settings as a TrainConfig (which validates them), with per-mode defaults."""
    return TrainConfig(
        tasks=[args.task],
        lr=DEFAULT_LR[args.mode] if args.lr is None else args.lr,
        epochs=DEFAULT_EPOCHS[args.mode] if args.epochs is None else args.epochs,
        batch_size=DEFAULT_BATCH_SIZE[args.mode] if args.batch_size is None else args.batch_size,
        lr_schedule=DEFAULT_LR_SCHEDULE[args.mode] if args.lr_schedule is None else args.lr_schedule,
        weight_decay=args.weight_decay,
        dropout=args.dropout,
        pooling=args.pooling,
        max_length=args.max_length,
        seed=args.seed,
        model_path=args.model_path,
        model_config=args.model_config,
        data_dir=args.data_dir,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
        cache_dir=args.cache_dir,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = train_config(args)
    except ValueError as err:
        parser.error(str(err))
    if cfg.lr <= 0:
        parser.error(f"--lr must be positive, not {cfg.lr}")
    try:
        ClassifierRun(cfg, args.mode, args.output_dir).run()
    except (DataError, FileNotFoundError, KeyError, ValueError) as err:
        # Bad data, a missing or mismatched model, or settings the model cannot take.
        print(f"error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
