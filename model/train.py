"""Multitask fine-tuning of one BERT on SST, Quora paraphrase and STS (any subset of them).

Python: ``train(TrainConfig(...) or dict, output_dir, report=callback)``; command line:
``python -m model.train --tasks sst para sts --output-dir results/run1`` (``--help`` lists every option;
each flag is a ``TrainConfig`` field, model/config.py).

Each step draws one batch per task (model/schedules.py), sums the task losses (``surgery="none"``)
or combines their encoder gradients by PCGrad / GradVac (model/surgery.py), and takes one AdamW step.
After every epoch the model is evaluated on dev, the best epoch's weights (highest dev "overall") and
the resume state are saved, and ``report`` is called; the output folder's layout is model/rundir.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.batching import Batch, BatchStream, make_batch
from data.files import TASKS, resolve_data_dir
from data.tokenize import swap_pair_order
from model.build import build_model
from model.config import (
    CHOICE_FIELDS,
    NUMBER_PER_TASK_FIELDS,
    PER_TASK_FIELDS,
    RUNTIME_FIELDS,
    TrainConfig,
    as_config,
    with_defaults,
)
from model.distill import distill_loss, transfer_splits, with_distill_digest
from model.evaluation import both_order_tasks, evaluate_splits
from model.multitask import multiple_negatives_ranking_loss, task_loss
from model.optimizer import clip_grad_norm_
from model.rundir import RunDir, RunFileError
from model.runtime import autocast, device_rng_state, release_free_memory, resolve_device, set_device_rng_state, use_bf16
from model.schedules import default_steps_per_epoch, set_learning_rate, step_tasks, task_probabilities
from model.smart import smart_loss
from model.splits import load_split
from model.surgery import gradvac, pcgrad, random_orders

# How often a run with a ``threads`` callback asks it for its thread count (a file read in a study).
THREADS_POLL_SECONDS = 2.0


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; the run stops (a search records the trial as failed)."""


def progress_bar(iterable: Iterable | None = None, *, total: int, desc: str, unit: str = "batch", enabled: bool = True) -> tqdm:
    """A progress bar on stderr that shows only on a terminal, never in a log file or a Ray trial."""
    disable = None if enabled else True
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=disable, file=sys.stderr, dynamic_ncols=True)


def epoch_line(record: dict) -> str:
    """An epoch's record as one short line: ``train_loss 0.4123, sst 0.4950, ..., 581 s``."""
    parts = [f"{key} {value:.4f}" for key, value in record.items() if key not in ("epoch", "train_seconds")]
    return ", ".join(parts) + f", {record['train_seconds']:.0f} s of training"


class Trainer:
    """Holds the state of one training run; ``run()`` trains the remaining epochs."""

    def __init__(
        self,
        cfg: TrainConfig,
        output_dir: Path,
        report: Callable[[dict], None] | None,
        fresh: bool,
        progress: bool = False,
        threads: Callable[[], int] | None = None,
    ):
        self.cfg, self.run_dir, self.report, self.progress = cfg, RunDir(output_dir), report, progress
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.threads, self._threads_polled = threads, -math.inf
        self.device = resolve_device(cfg.device)
        self.bf16 = use_bf16(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        gold = {t: load_split(cfg, t, "train", cfg.train_limit) for t in cfg.tasks}
        # With a distill_dir: the gold rows plus augmented ones, and the teacher's soft targets per row.
        self.train_splits, self.soft_targets = transfer_splits(cfg, gold)
        self.dev_splits = {t: load_split(cfg, t, "dev", cfg.eval_limit) for t in cfg.tasks}
        # Read now, though used after the last epoch: a missing or bad test file must not wait for the training.
        self.test_splits = {t: load_split(cfg, t, "test", cfg.eval_limit) for t in cfg.tasks} if cfg.predict_test else {}
        self.sizes = {t: len(s) for t, s in self.train_splits.items()}
        self.both_orders = both_order_tasks(cfg)  # trained on, and read in, both pair orders
        self.streams = {
            t: BatchStream(
                split,
                cfg.task_batch_size(t),
                seed=cfg.seed * 1000 + i,
                other_order=swap_pair_order(split) if t in self.both_orders else None,
            )
            for i, (t, split) in enumerate(self.train_splits.items())
        }
        self.steps_per_epoch = cfg.steps_per_epoch or default_steps_per_epoch(cfg, self.sizes)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.optimizer = self._optimizer()
        self.rng = random.Random(cfg.seed)
        # GradVac's EMA target cosine per task pair (Wang et al. start them at 0).
        self.gradvac_targets = torch.zeros(len(cfg.tasks), len(cfg.tasks))
        # MNRL encodes paraphrase sentences alone, whatever the pair encoding of the classifier.
        self.para_bi_split = None
        self._task_grads: torch.Tensor | None = None
        if cfg.mnrl_weight > 0 and "para" in cfg.tasks:
            self.para_bi_split = load_split(cfg, "para", "train", cfg.train_limit, pair_encoding="bi")
        self.step = 0
        self.epoch = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        if self.run_dir.state_file.is_file() and not fresh:
            self._resume()
        else:  # a fresh start: another run's files left in the folder must not pass for this one's
            self.run_dir.clear_run_files()

    def _optimizer(self) -> torch.optim.Optimizer:
        from model.optimizer import AdamW, param_groups

        groups = param_groups(self.model, self.cfg.weight_decay, self.cfg.layer_lr_decay)
        return AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # --- checkpoints

    def _state(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "streams": {t: s.state_dict() for t, s in self.streams.items()},
            "sampler": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": device_rng_state(self.device),
            "gradvac_targets": self.gradvac_targets,
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best": self.best,
        }

    def _resume(self) -> None:
        try:
            state = self.run_dir.load_state(self.device)
        except RunFileError as err:
            raise RuntimeError(f"{err}; pass fresh=True / --fresh to start over") from err
        saved, current = with_defaults(state["config"]), self.cfg.to_dict()
        differing = sorted(k for k in set(saved) | set(current) if k not in RUNTIME_FIELDS and saved.get(k) != current.get(k))
        if differing:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
            raise ValueError(
                f"{self.run_dir.state_file} was written with a different config ({details}); use another output directory, "
                "or pass fresh=True / --fresh to overwrite it"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as err:  # e.g. written by an older version of the trainer
            raise RuntimeError(
                f"{self.run_dir.state_file}: does not fit this trainer ({err}); pass fresh=True / --fresh to start over"
            ) from err
        for task, stream_state in state["streams"].items():
            self.streams[task].load_state_dict(stream_state)
        version, internal, gauss = state["sampler"]
        self.rng.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state["torch_rng"].cpu())
        set_device_rng_state(self.device, state["cuda_rng"])
        self.gradvac_targets = state["gradvac_targets"].cpu()
        self.epoch, self.step, self.history, self.best = state["epoch"], state["step"], state["history"], state["best"]
        if self.best is not None and self.best["epoch"] == self.epoch:  # perhaps stopped before _save_best
            self._save_best_again()

    def _write_metrics(self) -> dict:
        summary = {"best_epoch": self.best["epoch"] if self.best else None, "best": self.best, "history": self.history}
        self.run_dir.write_metrics(summary)
        return summary

    # --- steps

    def _batch_loss(self, task: str, batch: Batch) -> torch.Tensor:
        """The task loss of one batch plus its optional SMART and MNRL terms, times the task's
        loss_weight (_step_total checks it)."""
        cfg, model = self.cfg, self.model
        with autocast(self.device, self.bf16):
            out = model(task, batch.views)
            if task in self.soft_targets:
                loss = distill_loss(task, out, batch.labels, batch.index, self.soft_targets[task], cfg)
            else:
                loss = task_loss(task, out, batch.labels, cfg.sts_loss, cfg.sst_loss)
            if cfg.smart_weight > 0:
                loss = loss + cfg.smart_weight * smart_loss(model, task, batch.views, out)
            if cfg.mnrl_weight > 0 and task == "para":
                loss = loss + cfg.mnrl_weight * self._mnrl_loss(batch)
        weight = cfg.task_value("loss_weight", task)
        return loss if weight == 1.0 else weight * loss

    def _step_total(self, losses: list[tuple[str, torch.Tensor]]) -> float:
        """The step's summed loss; raises on NaN/inf. One read from the device per step, not one
        per task (each read waits for the device to finish its queued work)."""
        values = torch.stack([loss.float() for _, loss in losses]).tolist()
        for (task, _), value in zip(losses, values, strict=True):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"epoch {self.epoch + 1}, step {self.step + 1}: the {task} loss is {value}; "
                    f"training diverged (try a lower learning rate than {self.cfg.lr})"
                )
        return sum(values)

    def _mnrl_loss(self, batch: Batch) -> torch.Tensor:
        """MNRL on the paraphrase positives of the batch, each sentence encoded alone."""
        positives = batch.index[batch.labels.cpu() == 1].tolist()
        if len(positives) < 2:  # a single pair has no in-batch negative
            return torch.zeros((), device=self.device)
        pairs = make_batch(self.para_bi_split, positives).to(self.device)
        anchors, paraphrases = self.model.encode_views("para", pairs.views, [None, None])
        return multiple_negatives_ranking_loss(anchors, paraphrases)

    def _train_step(self, tasks: list[str]) -> float:
        """One optimizer update over one batch of each of ``tasks``; returns the summed loss."""
        cfg, model = self.cfg, self.model
        set_learning_rate(self.optimizer, cfg, self.step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[tuple[str, torch.Tensor]] = []
        if cfg.surgery == "none" or len(set(tasks)) == 1:
            for task in tasks:
                loss = self._batch_loss(task, self.streams[task].next().to(self.device))
                # Backward per batch: the gradients add up to those of the summed loss, and each
                # batch's graph is freed at once.
                loss.backward()
                losses.append((task, loss.detach()))
        else:
            task_losses: dict[str, torch.Tensor] = {}
            for task in tasks:
                loss = self._batch_loss(task, self.streams[task].next().to(self.device))
                task_losses[task] = task_losses[task] + loss if task in task_losses else loss
                losses.append((task, loss.detach()))
            self._surgery_backward(task_losses)
        total = self._step_total(losses)
        if cfg.max_grad_norm > 0:
            clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        return total

    def _surgery_backward(self, task_losses: dict[str, torch.Tensor]) -> None:
        """One backward per task: each head (and a task's own top layers) gets its own task's gradient;
        the shared encoder gets the per-task gradients combined by PCGrad or GradVac."""
        encoder = self.model.encoder_parameters()
        size = sum(p.numel() for p in encoder)
        if self._task_grads is None:  # reused: a fresh (tasks, params) buffer each step costs page faults
            self._task_grads = torch.empty((len(self.cfg.tasks), size), device=self.device)
        stacked = self._task_grads[: len(task_losses)]
        touched: dict[int, list[torch.Tensor]] = {}  # lazy word embeddings: per sparse gradient, the rows each task touched
        used: set[int] = set()  # the shared parameters some task of this step reached (the pooler may be one task's)
        for row, (task, loss) in enumerate(task_losses.items()):
            own = self.model.task_parameters(task)
            grads = torch.autograd.grad(loss, encoder + own, allow_unused=True)
            for p, g in zip(own, grads[len(encoder) :], strict=True):
                p.grad = g
            parts = []
            for i, (p, g) in enumerate(zip(encoder, grads[: len(encoder)], strict=True)):
                if g is not None:
                    used.add(i)
                if g is not None and g.is_sparse:
                    g = g.coalesce()
                    touched.setdefault(i, []).append(g.indices()[0])
                    g = g.to_dense()  # the surgery works on whole gradient vectors
                parts.append((torch.zeros_like(p) if g is None else g).reshape(-1))
            if parts:
                torch.cat(parts, out=stacked[row])
        if not used:  # nothing shared to combine (every shared layer frozen, no task on the pooler): heads only
            return
        orders = random_orders(len(task_losses), self.rng)
        if self.cfg.surgery == "pcgrad":
            combined = pcgrad(stacked, orders)
        else:
            index = torch.tensor([self.cfg.tasks.index(t) for t in task_losses], device="cpu")
            targets = self.gradvac_targets[index][:, index]
            combined, targets = gradvac(stacked, targets, self.cfg.gradvac_beta, orders)
            self.gradvac_targets[index[:, None], index[None, :]] = targets.cpu()
        offset = 0
        for i, p in enumerate(encoder):
            if i not in used:  # no gradient, as without surgery: AdamW skips it (no step, no decay, no momentum)
                p.grad = None
                offset += p.numel()
                continue
            grad = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
            if i in touched:  # sparse again, over the rows any task touched: AdamW stays lazy
                rows = torch.unique(torch.cat(touched[i]))
                grad = torch.sparse_coo_tensor(rows[None], grad[rows], p.shape, is_coalesced=True, check_invariants=False)
            p.grad = grad
            offset += p.numel()

    def _save_best(self, dev_outputs: dict[str, dict]) -> None:
        """The best epoch's weights and dev outputs, once last.pt holds that epoch (see run)."""
        self.run_dir.save_weights(self.model.state_dict())
        self.run_dir.write_outputs("dev", dev_outputs)

    def _save_best_again(self) -> None:
        """The best weights and dev outputs from last.pt's model and that epoch's saved dev outputs. A
        run from before per-epoch outputs has none, and needs none: that trainer wrote its best
        weights before last.pt."""
        files = {task: self.run_dir.epoch_outputs_file(task, self.epoch) for task in self.dev_splits}
        if all(path.is_file() for path in files.values()):
            self._save_best({task: self.run_dir.read_epoch_outputs(task, self.epoch) for task in files})

    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.write_config(cfg.to_dict(), self.model.bert.config.to_dict())
        if self.epoch:
            self._write_metrics()  # resumed: metrics.json says what last.pt holds
        while self.epoch < cfg.epochs:
            self.model.train()
            probabilities = task_probabilities(cfg, self.sizes, self.epoch + 1)
            started, losses = time.perf_counter(), []
            bar = progress_bar(
                total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="step", enabled=self.progress
            )
            with bar:
                for _ in range(self.steps_per_epoch):
                    self._follow_threads()
                    losses.append(self._train_step(step_tasks(cfg, probabilities, self.rng)))
                    bar.update()
                    if not bar.disable:
                        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
                train_seconds = time.perf_counter() - started
                bar.set_description(f"epoch {self.epoch + 1}/{cfg.epochs}: dev evaluation", refresh=True)
                self._follow_threads()
                metrics, dev_outputs = evaluate_splits(self.model, self.dev_splits, self.bf16, self.both_orders)
            self.epoch += 1
            record = {"epoch": self.epoch, "train_loss": float(np.mean(losses)), **metrics}
            record["train_seconds"] = round(train_seconds, 2)
            self.history.append(record)
            if self.progress:  # one line per epoch: what a log file shows, where the bar does not
                print(f"epoch {self.epoch}/{cfg.epochs}: {epoch_line(record)}", file=sys.stderr, flush=True)
            self.run_dir.write_epoch_outputs(self.epoch, dev_outputs)
            improved = self.best is None or record["overall"] > self.best["overall"]
            if improved:
                self.best = record
            # metrics.json, last.pt, then the best weights. metrics.json may run one epoch ahead of last.pt
            # after a crash, never behind: the resumed run redoes that epoch. The best weights come last, so
            # they never hold an epoch that last.pt does not (a redone epoch may differ on a GPU); a crash
            # just before them leaves last.pt holding the best epoch's model, which the resume saves.
            self._write_metrics()
            self.run_dir.save_state(self._state())
            if improved:
                self._save_best(dev_outputs)
            release_free_memory()
            if self.epoch == cfg.epochs and cfg.predict_test:
                # Before the last report: a scheduler (ASHA at max_t) stops a trial as soon as it
                # sees its final epoch, which would cut the test predictions short.
                self._predict_test()
            if self.report is not None:
                self.report(dict(record))
        if cfg.predict_test and not self._test_predicted:  # a resumed run whose epochs were all done
            self._predict_test()
        return self._write_metrics()

    def _follow_threads(self) -> None:
        """Take the thread count that ``threads()`` gives now (a study's spare cores, search.spare);
        asked every few seconds, not every step."""
        now = time.monotonic()
        if self.threads is None or now - self._threads_polled < THREADS_POLL_SECONDS:
            return
        self._threads_polled = now
        wanted = self.threads()
        if wanted != torch.get_num_threads():
            print(f"{self.run_dir.path}: {wanted} threads from now on", file=sys.stderr, flush=True)
            torch.set_num_threads(wanted)

    @property
    def _test_predicted(self) -> bool:
        return self.run_dir.has_outputs(self.cfg.tasks, "test")

    def _predict_test(self) -> None:
        best = self.run_dir.load_weights(self.device)
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(best)
        try:
            _, outputs = evaluate_splits(self.model, self.test_splits, self.bf16, self.both_orders)
            self.run_dir.write_outputs("test", outputs)
        finally:
            self.model.load_state_dict(current)


def train(
    config: TrainConfig | dict,
    output_dir: str | Path,
    report: Callable[[dict], None] | None = None,
    data_dir: str | Path | None = None,
    fresh: bool = False,
    progress: bool = False,
    threads: Callable[[], int] | None = None,
) -> dict:
    """Train, evaluating on dev after every epoch; returns metrics.json's content
    {"best_epoch", "best", "history"}. ``report(metrics)`` is called after each epoch's evaluation
    (and checkpoint) with {"epoch", "train_loss" (mean over the epoch's steps of each step's sum of
    task losses, each times its loss_weight, SMART/MNRL terms included), <task metrics>, "overall", "train_seconds"}; an
    exception it raises propagates. An ``output_dir`` holding a ``last.pt`` of the same config is
    resumed; ``fresh=True`` starts over instead. ``progress=True`` shows a progress bar of each
    epoch's steps on a terminal (stderr). ``threads()``, when given, is asked every few seconds how
    many torch threads to use from then on (a study hands a trial its idle cores: search.spare)."""
    cfg = as_config(config)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=str(data_dir))
    if cfg.data_dir is None:
        cfg = dataclasses.replace(cfg, data_dir=str(resolve_data_dir(None)))
    cfg = with_distill_digest(cfg)  # recorded in config.json: a resumed run refuses a changed teacher
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, output_dir, report, fresh, progress, threads).run()


# -------------------------------------------------------------------------------------------- CLI


def parse_per_task(name: str, values: list[str], kind: type = str) -> object:
    """``--NAME VALUE`` (every task) or ``--NAME task=VALUE ...`` (per task) as a value or a table."""
    if len(values) == 1 and "=" not in values[0]:
        return _typed_flag(name, values[0], kind)
    table = {}
    for value in values:
        task, sep, item = value.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: give one value or task=value pairs, not {values}")
        table[task] = _typed_flag(name, item, kind)
    return table


def _typed_flag(name: str, value: str, kind: type) -> object:
    try:
        return kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: {value!r} is not {what}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output-dir", required=True, type=Path, help="where the run writes its files (resumed if it holds last.pt)"
    )
    parser.add_argument("--fresh", action="store_true", help="ignore an existing last.pt in --output-dir and start over")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        helptext = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" (default: {default})")
        if f.name == "tasks":
            parser.add_argument(flag, nargs="+", choices=list(TASKS), default=default, help=helptext)
        elif f.name in PER_TASK_FIELDS:
            number = NUMBER_PER_TASK_FIELDS.get(f.name)
            metavar = {int: "N|TASK=N", float: "X|TASK=X"}.get(number, "VALUE|TASK=VALUE")
            if default is None:
                given = None
            else:
                given = [f"{t}={v}" for t, v in default.items()] if isinstance(default, dict) else [str(default)]
            parser.add_argument(flag, nargs="+", default=given, metavar=metavar, help=helptext)
        elif f.name == "model_config":
            parser.add_argument(flag, type=json.loads, default=None, metavar="JSON", help=helptext)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif f.name in CHOICE_FIELDS:
            parser.add_argument(flag, choices=CHOICE_FIELDS[f.name], default=default, help=helptext)
        else:
            kind = float if isinstance(default, float) else int if isinstance(default, int) else str
            if f.name in ("steps_per_epoch", "train_limit", "eval_limit", "threads"):
                kind = int
            parser.add_argument(flag, type=kind, default=default, help=helptext)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that parsed command-line flags describe (ValueError or ArgumentTypeError if none)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    for name in PER_TASK_FIELDS:
        if values[name] is not None:
            values[name] = parse_per_task(name, values[name], NUMBER_PER_TASK_FIELDS.get(name, str))
    return TrainConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def show(metrics: dict) -> None:
        print(json.dumps(metrics), flush=True)

    try:
        summary = train(cfg, args.output_dir, report=show, fresh=args.fresh, progress=True)
    except (ValueError, OSError, NonFiniteLossError) as err:  # DataError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"best epoch {summary['best_epoch']}: {json.dumps(summary['best'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
