"""Running a model on tokenised splits: every row's output values, and the task metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch

from data.batching import iterate_batches
from data.files import Example
from data.tokenize import EncodedSplit, swap_pair_order
from model.config import TrainConfig, as_config, reads_both_orders
from model.metrics import overall_score, task_metric
from model.multitask import MultitaskBert, output_values
from model.runtime import autocast, use_bf16
from model.splits import encoding_for, get_tokenizer, load_split

EVAL_BATCH_SIZE = 64


@torch.inference_mode()
def predict_values(
    model: MultitaskBert,
    task: str,
    split: EncodedSplit,
    bf16: bool = False,
    batch_size: int = EVAL_BATCH_SIZE,
    both_orders: bool = False,
) -> np.ndarray:
    """The task's output values (probabilities / P(duplicate) / score) for every row, in file order.
    ``both_orders``: a cross-encoded pair's raw output (logit or score) is the mean over its two orders."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast(device, bf16):
            if len(split.views) == 2:
                out = bi_encoded_outputs(model, task, split, device, batch_size)
            elif both_orders:
                out = (
                    joint_outputs(model, task, split, device, batch_size)
                    + joint_outputs(model, task, swap_pair_order(split), device, batch_size)
                ) / 2
            else:
                out = joint_outputs(model, task, split, device, batch_size)
    finally:
        model.train(was_training)
    return output_values(task, out).cpu().numpy()


def joint_outputs(model: MultitaskBert, task: str, split: EncodedSplit, device: torch.device, batch_size: int) -> torch.Tensor:
    """Head outputs of single sentences or cross-encoded pairs (one view), in file order."""
    out = torch.empty(0)
    for batch in iterate_batches(split, batch_size, shuffle=False):
        batch_out = model(task, batch.to(device).views).float()
        if out.numel() == 0:
            out = torch.empty((len(split), *batch_out.shape[1:]), device=device)
        out[batch.index.to(device)] = batch_out
    return out


def bi_encoded_outputs(
    model: MultitaskBert, task: str, split: EncodedSplit, device: torch.device, batch_size: int
) -> torch.Tensor:
    """Head outputs of bi-encoded pairs, encoding each distinct sentence of the split once."""
    position: dict[tuple, int] = {}
    for view in split.views:
        for ids, types in view:
            position.setdefault((tuple(ids), tuple(types)), len(position))
    sentences = EncodedSplit([str(i) for i in range(len(position))], [[(list(a), list(b)) for a, b in position]], None)
    embeddings = torch.empty((len(position), model.bert.config.hidden_size), device=device)
    for batch in iterate_batches(sentences, batch_size, shuffle=False):
        embeddings[batch.index.to(device)] = model.embed(batch.to(device).views[0], task=task).float()
    first, second = (
        torch.tensor([position[(tuple(ids), tuple(types))] for ids, types in view], device=device) for view in split.views
    )
    return torch.cat(
        [
            model.heads[task]([embeddings[first[i : i + batch_size]], embeddings[second[i : i + batch_size]]]).float()
            for i in range(0, len(split), batch_size)
        ]
    )


def evaluate_splits(
    model: MultitaskBert, splits: dict[str, EncodedSplit], bf16: bool = False, both_orders: Collection[str] = ()
) -> tuple[dict[str, float], dict[str, dict]]:
    """Metrics (when labelled) and outputs {task: {ids, values[, labels]}} of tokenised splits; the tasks
    in ``both_orders`` read each cross-encoded pair in both orders (``reads_both_orders``)."""
    metrics, outputs = {}, {}
    for task, split in splits.items():
        values = predict_values(model, task, split, bf16, both_orders=task in both_orders)
        outputs[task] = {"ids": np.array(split.ids), "values": values}
        if split.labels is not None:
            labels = np.array(split.labels)
            outputs[task]["labels"] = labels
            metrics[task] = task_metric(task, values, labels)
    if metrics and len(metrics) == len(splits):
        metrics["overall"] = overall_score(metrics, list(splits))
    return metrics, outputs


def evaluate_model(
    model: MultitaskBert,
    cfg: TrainConfig | dict,
    split: str,
    data_dir: str | Path | None = None,
    examples: dict[str, list[Example]] | None = None,
) -> tuple[dict[str, float], dict[str, dict]]:
    """Run ``model`` on the dev or test split of each of ``cfg.tasks`` (first ``cfg.eval_limit`` rows),
    or on ``examples`` ({task: [Example]}) when given. Returns (metrics, outputs): metrics has each
    task's metric and "overall" when labels exist; outputs[task] = {"ids", "values"[, "labels"]}."""
    cfg = as_config(cfg)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=str(data_dir))
    if examples is not None:
        tokenizer = get_tokenizer(cfg)
        splits = {task: tokenizer.encode_examples(rows, encoding_for(task, cfg)) for task, rows in examples.items()}
    else:
        splits = {task: load_split(cfg, task, split, cfg.eval_limit) for task in cfg.tasks}
    device = next(model.parameters()).device
    return evaluate_splits(model, splits, use_bf16(cfg.precision, device), both_order_tasks(cfg))


def both_order_tasks(cfg: TrainConfig) -> list[str]:
    """The config's tasks that a model reads in both pair orders."""
    return [task for task in cfg.tasks if reads_both_orders(cfg, task)]
