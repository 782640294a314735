"""Multitask fine-tuning of one BERT on SST, Quora paraphrase and STS (any subset of them).

Python: ``train(TrainConfig(...) or dict, output_dir, report=callback)``; command line:
``python -m model.train --tasks sst para sts --output-dir results/run1`` (``--help`` lists every option;
each flag is a ``TrainConfig`` field).

What a step is: one optimizer update over one batch from each trained task (``round_robin``), or
over as many batches as there are tasks, each from a task drawn at random (``proportional``:
p(task) proportional to its number of training examples; ``annealed``: p proportional to n**alpha
with alpha going linearly from 1 at the first epoch to 0.5 at the last, as in MT-DNN / Stickland &
Murray 2019, so small tasks get more weight as training goes on). The task losses of a step are
summed (``surgery="none"``) or their encoder gradients combined by PCGrad / GradVac.

output_dir after training (the best epoch is the one with the highest dev "overall"):
  config.json, model.safetensors (best weights), last.pt (resume state), metrics.json,
  outputs/<task>-<split>.npz (ids, values[, labels]) and predictions/<task>-<split>-out.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.batching import Batch, BatchStream, iterate_batches, make_batch
from data.files import TASK_FILES, Example, load_examples, resolve_data_dir
from data.tokenize import EncodedSplit, Tokenizer, cached_encode
from model.bert import BertConfig, BertModel, default_model_path, load_strict
from model.metrics import atomic_write_text, overall_score, task_metric, write_predictions
from model.multitask import (
    PAIR_ENCODINGS,
    POOLINGS,
    SST_HEADS,
    STS_HEADS,
    STS_LOSSES,
    MultitaskBert,
    multiple_negatives_ranking_loss,
    output_values,
    task_loss,
)
from model.smart import smart_loss
from model.surgery import gradvac, pcgrad, random_orders

TASKS = ("sst", "para", "sts", "cfimdb")
SURGERIES = ("none", "pcgrad", "gradvac")
SCHEDULES = ("round_robin", "proportional", "annealed")
LR_SCHEDULES = ("constant", "linear")
PRECISIONS = ("auto", "fp32", "bf16")
# TrainConfig's string fields that take one of a fixed set of values: checked in __post_init__,
# offered as choices on the command line.
CHOICE_FIELDS = {
    "surgery": SURGERIES,
    "schedule": SCHEDULES,
    "pair_encoding": PAIR_ENCODINGS,
    "sts_head": STS_HEADS,
    "sts_loss": STS_LOSSES,
    "sst_head": SST_HEADS,
    "pooling": POOLINGS,
    "lr_schedule": LR_SCHEDULES,
    "precision": PRECISIONS,
}
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / "cache" / "tokens"
EVAL_BATCH_SIZE = 64
# Bi-encoded STS with a cosine head and cross-encoded paraphrase are each the better choice on
# all-MiniLM-L6-v2 (README, "Measured results"), so they are the defaults, in one model.
DEFAULT_PAIR_ENCODING = {"para": "cross", "sts": "bi"}
# Fields that take one value for every task or a {task: value} table; a table covers every trained
# task the field applies to (pair_encoding: the pair tasks only).
PER_TASK_FIELDS = ("batch_size", "pair_encoding", "pooling")
# Fields that change how a run executes but not what it computes; a resumed run may change them.
RUNTIME_FIELDS = ("threads", "device", "predict_test", "cache_dir", "data_dir")


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; the run stops (a search records the trial as failed)."""


def is_pair_task(task: str) -> bool:
    return len(TASK_FILES[task].text_columns) == 2


def applies_to(name: str, task: str) -> bool:
    """Whether a per-task field means anything for ``task`` (pair encoding: pair tasks only)."""
    return name != "pair_encoding" or is_pair_task(task)


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class TrainConfig:
    tasks: list[str] = field(
        **_help("tasks to train, any subset of sst para sts (and cfimdb)", default_factory=lambda: ["sst", "para", "sts"])
    )
    lr: float = field(**_help("AdamW learning rate", default=5e-5))
    weight_decay: float = field(**_help("AdamW decoupled weight decay", default=0.01))
    dropout: float = field(
        **_help("dropout of the encoder's hidden layers and of the heads (attention dropout stays the model's)", default=0.1)
    )
    surgery: str = field(**_help(f"how task gradients on the shared encoder combine: {', '.join(SURGERIES)}", default="none"))
    schedule: str = field(**_help(f"task sampling: {', '.join(SCHEDULES)}", default="round_robin"))
    batch_size: int | dict[str, int] = field(**_help("batch size: one int, or per task as task=int pairs", default=32))
    epochs: int = field(**_help("number of epochs (dev evaluation and checkpoint after each)", default=3))
    steps_per_epoch: int | None = field(
        **_help(
            "optimizer steps per epoch; default: one pass over the largest task (round_robin) "
            "or over all the data in expectation (proportional, annealed)",
            default=None,
        )
    )
    max_length: int = field(
        **_help("maximum tokens per sequence (a pair counts as one sequence when cross-encoded)", default=128)
    )
    seed: int = field(**_help("random seed (weights of the heads, dropout, batches, task sampling)", default=0))
    pair_encoding: str | dict[str, str] = field(
        **_help(
            "para/sts: cross (one joint sequence) or bi (each sentence alone); one value, or per task as task=value "
            "(default: para=cross sts=bi, the better choice for each task on the embedded model)",
            default_factory=lambda: dict(DEFAULT_PAIR_ENCODING),
        )
    )
    sts_head: str = field(**_help("sts: regression (linear) or cosine (5 * cos(u, v); bi only)", default="cosine"))
    sts_loss: str = field(**_help("sts: mse (on the 0-5 score) or cosent (ranking of the pairs within a batch)", default="mse"))
    sst_head: str = field(**_help("sentiment head: linear or hidden (one hidden layer)", default="linear"))
    pooling: str | dict[str, str] = field(
        **_help("sentence vector: mean (of tokens), cls, or pooler; one value, or per task as task=value", default="mean")
    )
    freeze_layers: int = field(**_help("freeze the embeddings and this many lower layers (0: train all)", default=0))
    smart_weight: float = field(**_help("weight of the SMART adversarial smoothness loss (0: off)", default=0.0))
    mnrl_weight: float = field(
        **_help("weight of the multiple-negatives ranking loss on paraphrase positives (0: off)", default=0.0)
    )
    gradvac_beta: float = field(**_help("GradVac: EMA rate of the target cosine similarity", default=0.01))
    max_grad_norm: float = field(**_help("clip the global gradient norm to this (0: no clipping)", default=1.0))
    lr_schedule: str = field(**_help("constant, or linear (10%% warm-up then linear decay to 0)", default="linear"))
    model_path: str | None = field(**_help("Hugging Face BERT directory (default: the embedded all-MiniLM-L6-v2)", default=None))
    model_config: dict | None = field(
        **_help("JSON of BertConfig fields: a randomly initialised BERT of that size instead of loaded weights", default=None)
    )
    data_dir: str | None = field(**_help("CS224N data directory (default: $MINBERT_DATA, else ./datasets)", default=None))
    train_limit: int | None = field(**_help("use at most this many training rows per task", default=None))
    eval_limit: int | None = field(**_help("use at most this many dev/test rows per task", default=None))
    threads: int | None = field(**_help("torch CPU threads (default: torch's choice)", default=None))
    device: str | None = field(**_help("cpu, cuda or cuda:N (default: cuda when available)", default=None))
    precision: str = field(
        **_help(
            "fp32, bf16 (autocast), or auto: bf16 on CUDA and on CPUs with bf16 matrix units (AMX), else fp32", default="auto"
        )
    )
    predict_test: bool = field(**_help("write test-set outputs and predictions with the best weights", default=True))
    cache_dir: str | None = field(**_help("token cache directory (default: <repo>/cache/tokens)", default=None))

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = list(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct names from {TASKS}, got {self.tasks}")
        for name in PER_TASK_FIELDS:
            value = getattr(self, name)
            if isinstance(value, dict):
                extra = [t for t in value if t not in TASKS]
                missing = [t for t in self.tasks if applies_to(name, t) and t not in value]
                if extra or missing:
                    raise ValueError(f"{name}: unknown task(s) {extra}" if extra else f"{name}: no value for task(s) {missing}")
                setattr(self, name, dict(value))
        for name, allowed in CHOICE_FIELDS.items():
            for value in self.values_of(name):
                if value not in allowed:
                    raise ValueError(f"{name} must be one of {allowed}, not {value!r}")
        if self.sts_head == "cosine" and "sts" in self.tasks and self.task_value("pair_encoding", "sts") != "bi":
            raise ValueError("sts_head 'cosine' needs pair_encoding 'bi' for sts")
        if isinstance(self.batch_size, dict):
            self.batch_size = {t: int(b) for t, b in self.batch_size.items()}
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.values_of("batch_size")):
            raise ValueError(f"batch_size must be a positive int or task=int pairs, not {self.batch_size!r}")
        for name in ("epochs", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, not {getattr(self, name)!r}")
        for name in ("steps_per_epoch", "train_limit", "eval_limit", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, not {value!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, not {self.max_length}")
        for name in ("lr", "weight_decay", "smart_weight", "mnrl_weight", "max_grad_norm", "freeze_layers"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0, not {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")
        if not 0.0 < self.gradvac_beta <= 1.0:
            raise ValueError(f"gradvac_beta must be in (0, 1], not {self.gradvac_beta!r}")
        if self.model_config is not None:
            known = {f.name for f in fields(BertConfig)}
            bad = [k for k in self.model_config if k not in known and k != "model_type"]
            if bad:
                raise ValueError(f"model_config: unknown BertConfig field(s) {bad}; known: {sorted(known)}")
        if self.model_path is not None:
            self.model_path = str(self.model_path)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def values_of(self, name: str) -> list:
        """The values a per-task field takes (one, or one per task); other fields: [value]."""
        value = getattr(self, name)
        return list(value.values()) if isinstance(value, dict) else [value]

    def task_value(self, name: str, task: str):
        """The value of a per-task field (batch_size, pair_encoding, pooling) for one task."""
        value = getattr(self, name)
        if not isinstance(value, dict):
            return value
        if task not in value:
            raise KeyError(f"{name} gives no value for task {task!r} (it has {sorted(value)})")
        return value[task]

    def task_batch_size(self, task: str) -> int:
        return self.task_value("batch_size", task)


def as_config(config: TrainConfig | dict) -> TrainConfig:
    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))


# --------------------------------------------------------------------------------------- building


def model_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.model_path) if cfg.model_path else default_model_path()


@lru_cache(maxsize=4)
def _tokenizer(path: str, max_length: int) -> Tokenizer:
    return Tokenizer(path, max_length)


def get_tokenizer(cfg: TrainConfig) -> Tokenizer:
    return _tokenizer(str(model_dir(cfg)), cfg.max_length)


def bert_config_for(cfg: TrainConfig) -> BertConfig:
    if cfg.model_config is not None:
        config = BertConfig(**{k: v for k, v in cfg.model_config.items() if k != "model_type"})
    else:
        config = BertConfig.from_json(model_dir(cfg) / "config.json")
    config.hidden_dropout_prob = cfg.dropout
    if cfg.max_length > config.max_position_embeddings:
        raise ValueError(
            f"max_length {cfg.max_length} exceeds the model's max_position_embeddings {config.max_position_embeddings}"
        )
    return config


def build_model(cfg: TrainConfig) -> MultitaskBert:
    """The encoder (loaded weights, or random ones of ``model_config``'s size) with fresh heads."""
    config = bert_config_for(cfg)
    if cfg.model_config is not None:
        bert = BertModel(config)
    else:
        bert = BertModel.from_pretrained(model_dir(cfg), hidden_dropout_prob=cfg.dropout)
    vocab = get_tokenizer(cfg).backend.get_vocab_size()
    if vocab > config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} tokens but the model's vocab_size is {config.vocab_size}")
    return wrap_encoder(bert, cfg, cfg.freeze_layers)


def wrap_encoder(bert: BertModel, cfg: TrainConfig, freeze_layers: int = 0) -> MultitaskBert:
    """``bert`` with fresh heads for ``cfg``'s tasks, encodings and pooling."""
    return MultitaskBert(
        bert,
        cfg.tasks,
        pair_encoding=cfg.pair_encoding,
        pooling=cfg.pooling,
        sst_head=cfg.sst_head,
        sts_head=cfg.sts_head,
        dropout=cfg.dropout,
        freeze_layers=freeze_layers,
    )


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX); elsewhere bf16 is slower."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matmul())
    return precision == "bf16"


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights, optimizer state and losses stay fp32), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def encoding_for(task: str, cfg: TrainConfig) -> str:
    # Single sentences encode the same either way; one cache entry serves both.
    return cfg.task_value("pair_encoding", task) if is_pair_task(task) else "cross"


def cache_dir_for(cfg: TrainConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else DEFAULT_CACHE_DIR


def limit_split(split: EncodedSplit, limit: int | None) -> EncodedSplit:
    if limit is None or limit >= len(split):
        return split
    labels = None if split.labels is None else split.labels[:limit]
    return EncodedSplit(split.ids[:limit], [view[:limit] for view in split.views], labels)


def load_split(
    cfg: TrainConfig, task: str, split: str, limit: int | None = None, pair_encoding: str | None = None
) -> EncodedSplit:
    """Tokenised rows of one file, from the token cache when possible (the whole file is cached,
    then the first ``limit`` rows kept, so limits never invalidate the cache)."""
    source = TASK_FILES[task].path(split, cfg.data_dir)
    try:
        stat = source.stat()
    except OSError:
        load_examples(task, split, cfg.data_dir)  # raises the DataError that explains what is missing
        raise
    key = (str(source), stat.st_mtime_ns, stat.st_size)
    encoded = _encoded_file(
        task, split, key, str(model_dir(cfg)), cfg.max_length, pair_encoding or encoding_for(task, cfg), str(cache_dir_for(cfg))
    )
    return limit_split(encoded, limit)


@lru_cache(maxsize=32)
def _encoded_file(
    task: str, split: str, key: tuple, tokenizer_dir: str, max_length: int, encoding: str, cache_dir: str
) -> EncodedSplit:
    """In-process memo over the disk cache: trials and tests in one process parse each file once.
    ``key`` (path, mtime, size) makes an edited file a new entry. Callers never mutate the result."""
    path = Path(key[0])
    examples = load_examples(task, split, path.parent)
    return cached_encode(_tokenizer(tokenizer_dir, max_length), path, examples, encoding, cache_dir)


# ------------------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def predict_values(
    model: MultitaskBert, task: str, split: EncodedSplit, bf16: bool = False, batch_size: int = EVAL_BATCH_SIZE
) -> np.ndarray:
    """The task's output values (probabilities / P(duplicate) / score) for every row, in file order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast(device, bf16):
            if len(split.views) == 2:
                out = bi_encoded_outputs(model, task, split, device, batch_size)
            else:
                out = torch.empty(0)
                for batch in iterate_batches(split, batch_size, shuffle=False):
                    batch_out = model(task, batch.to(device).views).float()
                    if out.numel() == 0:
                        out = torch.empty((len(split), *batch_out.shape[1:]), device=device)
                    out[batch.index.to(device)] = batch_out
    finally:
        model.train(was_training)
    return output_values(task, out).cpu().numpy()


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
    model: MultitaskBert, splits: dict[str, EncodedSplit], bf16: bool = False
) -> tuple[dict[str, float], dict[str, dict]]:
    """Metrics (when labelled) and outputs {task: {ids, values[, labels]}} of tokenised splits."""
    metrics, outputs = {}, {}
    for task, split in splits.items():
        values = predict_values(model, task, split, bf16)
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
    return evaluate_splits(model, splits, use_bf16(cfg.precision, device))


def atomic_save(path: Path, write: Callable[[str], None]) -> None:
    """``write(temp_path)`` in the target's directory, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_save(path, lambda tmp: np.savez(tmp, **arrays))


def write_outputs(output_dir: str | Path, split: str, outputs: dict[str, dict]) -> None:
    """outputs/<task>-<split>.npz and predictions/<task>-<split>-out.csv for each task."""
    output_dir = Path(output_dir)
    for task, out in outputs.items():
        save_npz(output_dir / "outputs" / f"{task}-{split}.npz", out)
        write_predictions(output_dir / "predictions" / f"{task}-{split}-out.csv", task, out["ids"], out["values"])


# ------------------------------------------------------------------------------ saving and loading


def save_weights(model: MultitaskBert, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_save(path, lambda tmp: save_file(state, tmp))


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def load_trained(output_dir: str | Path, device: str | None = None) -> tuple[MultitaskBert, TrainConfig]:
    """The best model of a finished (or running) training, in eval mode, and its config."""
    from safetensors.torch import load_file

    output_dir = Path(output_dir)
    config_file, weights_file = output_dir / "config.json", output_dir / "model.safetensors"
    for path in (config_file, weights_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; is {output_dir} the output directory of a training run?")
    try:
        saved = json.loads(config_file.read_text())
        cfg = TrainConfig.from_dict(saved["train"])
        bert_config = BertConfig(**{k: v for k, v in saved["bert"].items() if k != "model_type"})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{config_file}: not a valid training config: {err}") from err
    model = wrap_encoder(BertModel(bert_config), cfg)
    load_strict(model, load_file(str(weights_file)), str(weights_file))
    return model.to(resolve_device(device)).eval(), cfg


def predict_split(output_dir: str | Path, split: str = "test", data_dir: str | Path | None = None) -> dict[str, dict]:
    """Write outputs/ and predictions/ of ``split`` for the saved best model of ``output_dir``
    (e.g. test files of a run that a search stopped before its end)."""
    model, cfg = load_trained(output_dir)
    _, outputs = evaluate_model(model, cfg, split, data_dir=data_dir)
    write_outputs(output_dir, split, outputs)
    return outputs


# --------------------------------------------------------------------------------------- training


def task_probabilities(cfg: TrainConfig, sizes: dict[str, int], epoch: int) -> dict[str, float]:
    """Sampling probabilities of the proportional (alpha = 1) and annealed schedules."""
    if cfg.schedule == "annealed":
        progress = (epoch - 1) / (cfg.epochs - 1) if cfg.epochs > 1 else 0.0
        alpha = 1.0 - 0.5 * progress
    else:
        alpha = 1.0
    weights = {t: sizes[t] ** alpha for t in cfg.tasks}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def default_steps_per_epoch(cfg: TrainConfig, sizes: dict[str, int]) -> int:
    batches = {t: math.ceil(sizes[t] / cfg.task_batch_size(t)) for t in cfg.tasks}
    if cfg.schedule == "round_robin":
        return max(batches.values())
    return math.ceil(sum(batches.values()) / len(cfg.tasks))


def step_tasks(cfg: TrainConfig, probabilities: dict[str, float], rng: random.Random) -> list[str]:
    if cfg.schedule == "round_robin":
        return list(cfg.tasks)
    return rng.choices(list(probabilities), weights=list(probabilities.values()), k=len(cfg.tasks))


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The rate of optimizer step ``step`` (0-based) of ``total_steps``: constant, or 10% linear
    warm-up then linear decay to 0."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warmup = max(1, int(0.1 * total_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total_steps: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step, total_steps)


def progress_bar(iterable: Iterable | None = None, *, total: int, desc: str, unit: str = "batch", enabled: bool = True) -> tqdm:
    """A progress bar on stderr that shows only on a terminal, never in a log file or a Ray trial."""
    disable = None if enabled else True
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=disable, file=sys.stderr, dynamic_ncols=True)


class Trainer:
    """Holds the state of one training run; ``run()`` trains the remaining epochs."""

    def __init__(
        self, cfg: TrainConfig, output_dir: Path, report: Callable[[dict], None] | None, fresh: bool, progress: bool = False
    ):
        self.cfg, self.output_dir, self.report, self.progress = cfg, output_dir, report, progress
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.bf16 = use_bf16(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.train_splits = {t: load_split(cfg, t, "train", cfg.train_limit) for t in cfg.tasks}
        self.dev_splits = {t: load_split(cfg, t, "dev", cfg.eval_limit) for t in cfg.tasks}
        self.sizes = {t: len(s) for t, s in self.train_splits.items()}
        self.streams = {
            t: BatchStream(split, cfg.task_batch_size(t), seed=cfg.seed * 1000 + i)
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
        self.last_file = output_dir / "last.pt"
        if self.last_file.is_file() and not fresh:
            self._resume()

    def _optimizer(self) -> torch.optim.Optimizer:
        from model.optimizer import AdamW, param_groups

        return AdamW(param_groups(self.model, self.cfg.weight_decay), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # --- checkpoints

    def _state(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "streams": {t: s.state_dict() for t, s in self.streams.items()},
            "sampler": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "gradvac_targets": self.gradvac_targets,
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "best": self.best,
        }

    def _resume(self) -> None:
        try:
            state = torch.load(self.last_file, map_location=self.device, weights_only=True)
        except Exception as err:
            raise RuntimeError(
                f"{self.last_file}: cannot read the checkpoint ({err}); pass fresh=True / --fresh to start over"
            ) from err
        saved, current = state["config"], self.cfg.to_dict()
        differing = sorted(k for k in set(saved) | set(current) if k not in RUNTIME_FIELDS and saved.get(k) != current.get(k))
        if differing:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
            raise ValueError(
                f"{self.last_file} was written with a different config ({details}); use another output directory, "
                "or pass fresh=True / --fresh to overwrite it"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for task, stream_state in state["streams"].items():
            self.streams[task].load_state_dict(stream_state)
        version, internal, gauss = state["sampler"]
        self.rng.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state["torch_rng"].cpu())
        if self.device.type == "cuda" and state["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.gradvac_targets = state["gradvac_targets"].cpu()
        self.epoch, self.step, self.history, self.best = state["epoch"], state["step"], state["history"], state["best"]

    def _checkpoint(self) -> None:
        state = self._state()
        atomic_save(self.last_file, lambda tmp: torch.save(state, tmp))

    def _write_metrics(self) -> dict:
        summary = {"best_epoch": self.best["epoch"] if self.best else None, "best": self.best, "history": self.history}
        write_json(self.output_dir / "metrics.json", summary)
        return summary

    # --- steps

    def _batch_loss(self, task: str, batch: Batch) -> torch.Tensor:
        """The task loss of one batch plus its optional SMART and MNRL terms; raises on NaN/inf."""
        cfg, model = self.cfg, self.model
        with autocast(self.device, self.bf16):
            out = model(task, batch.views)
            loss = task_loss(task, out, batch.labels, cfg.sts_loss)
            if cfg.smart_weight > 0:
                loss = loss + cfg.smart_weight * smart_loss(model, task, batch.views, out)
            if cfg.mnrl_weight > 0 and task == "para":
                loss = loss + cfg.mnrl_weight * self._mnrl_loss(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"epoch {self.epoch + 1}, step {self.step + 1}: the {task} loss is {loss.item()}; "
                f"training diverged (try a lower learning rate than {cfg.lr})"
            )
        return loss

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
        total = 0.0
        if cfg.surgery == "none" or len(set(tasks)) == 1:
            for task in tasks:
                loss = self._batch_loss(task, self.streams[task].next().to(self.device))
                # Backward per batch: the gradients add up to those of the summed loss, and each
                # batch's graph is freed at once.
                loss.backward()
                total += loss.item()
        else:
            task_losses: dict[str, torch.Tensor] = {}
            for task in tasks:
                loss = self._batch_loss(task, self.streams[task].next().to(self.device))
                task_losses[task] = task_losses[task] + loss if task in task_losses else loss
                total += loss.item()
            self._surgery_backward(task_losses)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        return total

    def _surgery_backward(self, task_losses: dict[str, torch.Tensor]) -> None:
        """One backward per task: each head gets its own task's gradient; the shared encoder gets
        the per-task gradients combined by PCGrad or GradVac."""
        encoder = self.model.encoder_parameters()
        size = sum(p.numel() for p in encoder)
        if self._task_grads is None:  # reused: a fresh (tasks, params) buffer each step costs page faults
            self._task_grads = torch.empty((len(self.cfg.tasks), size), device=self.device)
        stacked = self._task_grads[: len(task_losses)]
        for row, (task, loss) in enumerate(task_losses.items()):
            head = [p for p in self.model.heads[task].parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, encoder + head, allow_unused=True)
            for p, g in zip(head, grads[len(encoder) :], strict=True):
                p.grad = g
            parts = [
                (torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(encoder, grads[: len(encoder)], strict=True)
            ]
            torch.cat(parts, out=stacked[row])
        orders = random_orders(len(task_losses), self.rng)
        if self.cfg.surgery == "pcgrad":
            combined = pcgrad(stacked, orders)
        else:
            index = torch.tensor([self.cfg.tasks.index(t) for t in task_losses])
            targets = self.gradvac_targets[index][:, index]
            combined, targets = gradvac(stacked, targets, self.cfg.gradvac_beta, orders)
            self.gradvac_targets[index[:, None], index[None, :]] = targets.cpu()
        offset = 0
        for p in encoder:
            p.grad = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()

    def _new_best(self, record: dict, dev_outputs: dict[str, dict]) -> None:
        self.best = record
        save_weights(self.model, self.output_dir / "model.safetensors")
        write_outputs(self.output_dir, "dev", dev_outputs)

    def run(self) -> dict:
        cfg = self.cfg
        write_json(self.output_dir / "config.json", {"train": cfg.to_dict(), "bert": self.model.bert.config.to_dict()})
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
                    losses.append(self._train_step(step_tasks(cfg, probabilities, self.rng)))
                    bar.update()
                    if not bar.disable:
                        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
                train_seconds = time.perf_counter() - started
                bar.set_description(f"epoch {self.epoch + 1}/{cfg.epochs}: dev evaluation", refresh=True)
                metrics, dev_outputs = evaluate_splits(self.model, self.dev_splits, self.bf16)
            self.epoch += 1
            record = {"epoch": self.epoch, "train_loss": float(np.mean(losses)), **metrics}
            record["train_seconds"] = round(train_seconds, 2)
            self.history.append(record)
            if self.best is None or record["overall"] > self.best["overall"]:
                self._new_best(record, dev_outputs)
            # metrics.json first: it may run one epoch ahead of last.pt after a crash, never behind
            # (a resumed run then redoes that epoch, with the same result on CPU).
            self._write_metrics()
            self._checkpoint()
            if self.epoch == cfg.epochs and cfg.predict_test:
                # Before the last report: a scheduler (ASHA at max_t) stops a trial as soon as it
                # sees its final epoch, which would cut the test predictions short.
                self._predict_test()
            if self.report is not None:
                self.report(dict(record))
        if cfg.predict_test and not self._test_predicted:  # a resumed run whose epochs were all done
            self._predict_test()
        return self._write_metrics()

    @property
    def _test_predicted(self) -> bool:
        return all((self.output_dir / "outputs" / f"{t}-test.npz").is_file() for t in self.cfg.tasks)

    def _predict_test(self) -> None:
        from safetensors.torch import load_file

        best = load_file(str(self.output_dir / "model.safetensors"), device=str(self.device))
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(best)
        try:
            splits = {t: load_split(self.cfg, t, "test", self.cfg.eval_limit) for t in self.cfg.tasks}
            _, outputs = evaluate_splits(self.model, splits, self.bf16)
            write_outputs(self.output_dir, "test", outputs)
        finally:
            self.model.load_state_dict(current)


def train(
    config: TrainConfig | dict,
    output_dir: str | Path,
    report: Callable[[dict], None] | None = None,
    data_dir: str | Path | None = None,
    fresh: bool = False,
    progress: bool = False,
) -> dict:
    """Train, evaluating on dev after every epoch; returns metrics.json's content
    {"best_epoch", "best", "history"}. ``report(metrics)`` is called after each epoch's evaluation
    (and checkpoint) with {"epoch", "train_loss" (mean over the epoch's steps of each step's summed
    loss, SMART/MNRL terms included), <task metrics>, "overall", "train_seconds"}; an
    exception it raises propagates. An ``output_dir`` holding a ``last.pt`` of the same config is
    resumed; ``fresh=True`` starts over instead. ``progress=True`` shows a progress bar of each
    epoch's steps on a terminal (stderr)."""
    cfg = as_config(config)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=str(data_dir))
    if cfg.data_dir is None:
        cfg = dataclasses.replace(cfg, data_dir=str(resolve_data_dir(None)))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, output_dir, report, fresh, progress).run()


# -------------------------------------------------------------------------------------------- CLI


def parse_per_task(name: str, values: list[str], kind: type = str) -> object:
    """``--NAME VALUE`` (every task) or ``--NAME task=VALUE ...`` (per task) as a value or a table."""
    if len(values) == 1 and "=" not in values[0]:
        return kind(values[0])
    table = {}
    for value in values:
        task, sep, item = value.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: give one value or task=value pairs, not {values}")
        table[task] = kind(item)
    return table


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
            parser.add_argument(flag, nargs="+", choices=TASKS, default=default, help=helptext)
        elif f.name in PER_TASK_FIELDS:
            metavar = "N|TASK=N" if f.name == "batch_size" else "VALUE|TASK=VALUE"
            given = [f"{t}={v}" for t, v in default.items()] if isinstance(default, dict) else [str(default)]
            parser.add_argument(flag, nargs="+", default=given, metavar=metavar, help=helptext)
        elif f.name == "model_config":
            parser.add_argument(flag, type=json.loads, default=None, metavar="JSON", help=helptext)
        elif f.name == "predict_test":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif f.name in CHOICE_FIELDS:
            parser.add_argument(flag, choices=CHOICE_FIELDS[f.name], default=default, help=helptext)
        else:
            kind = float if isinstance(default, float) else int if isinstance(default, int) else str
            if f.name in ("steps_per_epoch", "train_limit", "eval_limit", "threads"):
                kind = int
            parser.add_argument(flag, type=kind, default=default, help=helptext)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    try:
        for name in PER_TASK_FIELDS:
            values[name] = parse_per_task(name, values[name], int if name == "batch_size" else str)
        cfg = TrainConfig.from_dict(values)
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
