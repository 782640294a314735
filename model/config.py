"""What one training run is: ``TrainConfig``, the trainer's settings, and the names they may take.

Torch-free, so that study files (search/study.py) can be checked without loading the trainer. Every
field is a command-line flag of ``python -m model.train`` and a key of a study file's [fixed] or
[search] tables. The per-task fields (``PER_TASK_FIELDS``: ``batch_size``, ``pair_encoding``, ``pooling``,
``augment_limit``, ``loss_weight``, ``distill_alpha``) take one value for every task or a {task: value} table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

from data.files import TASKS

POOLINGS = ("mean", "cls", "pooler")
PAIR_ENCODINGS = ("cross", "bi")
# given: a cross-encoder reads each pair as the file has it; both: trained on both orders, and its output
# is the mean of both (a cross-encoder's score depends on the order; similarity and paraphrase do not).
CROSS_ORDERS = ("given", "both")
SST_HEADS = ("linear", "hidden")
STS_HEADS = ("regression", "cosine")
STS_LOSSES = ("mse", "cosent")
# ce: cross-entropy; smoothed: label smoothing 0.1; emd: cross-entropy plus the squared earth mover's
# distance between predicted and gold class CDFs, which charges far-off classes more (SST's five
# classes are ordered: "very negative" is further from "positive" than from "negative").
SST_LOSSES = ("ce", "smoothed", "emd")
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
    "cross_order": CROSS_ORDERS,
    "sts_head": STS_HEADS,
    "sts_loss": STS_LOSSES,
    "sst_head": SST_HEADS,
    "sst_loss": SST_LOSSES,
    "pooling": POOLINGS,
    "lr_schedule": LR_SCHEDULES,
    "precision": PRECISIONS,
}

# Bi-encoded STS with a cosine head and cross-encoded paraphrase are each the better choice on
# all-MiniLM-L6-v2 (README, "Measured results"), so they are the defaults, in one model.
DEFAULT_PAIR_ENCODING = {"para": "cross", "sts": "bi"}
# Fields that take one value for every task or a {task: value} table; a table covers every trained
# task the field applies to (pair_encoding: the pair tasks only).
PER_TASK_FIELDS = ("batch_size", "pair_encoding", "pooling", "augment_limit", "loss_weight", "distill_alpha")
# The per-task fields whose values are numbers, and their type (the others are names).
NUMBER_PER_TASK_FIELDS = {"batch_size": int, "augment_limit": int, "loss_weight": float, "distill_alpha": float}
# Fields that change how a run executes but not what it computes; a resumed run may change them.
RUNTIME_FIELDS = ("threads", "device", "predict_test", "cache_dir", "data_dir")


def applies_to(name: str, task: str) -> bool:
    """Whether a per-task field means anything for ``task`` (pair encoding: pair tasks only)."""
    return name != "pair_encoding" or TASKS[task].is_pair


def value_for_task(value: object, task: str) -> object:
    """A per-task setting's value for ``task``: the one value, or the {task: value} table's entry
    (None where the table has none). Reads a TrainConfig field or a saved config.json alike."""
    return value.get(task) if isinstance(value, dict) else value


def reads_both_orders(train: TrainConfig | dict, task: str) -> bool:
    """Whether a model reads ``task``'s pairs in both orders (cross_order "both", a cross-encoded pair
    task): two encoder passes per pair, the mean of their outputs. Reads a TrainConfig or a saved
    config's "train" table alike (a table from before cross_order reads them as given)."""
    values = train if isinstance(train, dict) else vars(train)
    encoding = value_for_task(values.get("pair_encoding", DEFAULT_PAIR_ENCODING), task)
    return TASKS[task].is_pair and encoding == "cross" and values.get("cross_order") == "both"


def _help(text: str, **kwargs) -> dict:
    return {"metadata": {"help": text}, **kwargs}


@dataclass
class TrainConfig:
    tasks: list[str] = field(
        **_help("tasks to train, any subset of sst para sts (and cfimdb)", default_factory=lambda: ["sst", "para", "sts"])
    )
    lr: float = field(**_help("AdamW learning rate", default=5e-5))
    weight_decay: float = field(**_help("AdamW decoupled weight decay", default=0.01))
    layer_lr_decay: float = field(
        **_help(
            "layer-wise learning-rate decay: heads at lr, the top encoder layer at lr x this, each layer below x this "
            "again, the embeddings lowest (1: one rate everywhere)",
            default=1.0,
        )
    )
    dropout: float = field(
        **_help("dropout of the encoder's hidden layers and of the heads (attention dropout stays the model's)", default=0.1)
    )
    surgery: str = field(**_help(f"how task gradients on the shared encoder combine: {', '.join(SURGERIES)}", default="none"))
    schedule: str = field(**_help(f"task sampling: {', '.join(SCHEDULES)}", default="round_robin"))
    batch_size: int | dict[str, int] = field(**_help("batch size: one int, or per task as task=int pairs", default=32))
    loss_weight: float | dict[str, float] = field(
        **_help(
            "weight of each task's loss in a step's sum, per task as task=weight pairs (relative: one value for every "
            "task only rescales the gradient, which clipping and AdamW mostly undo)",
            default=1.0,
        )
    )
    epochs: int = field(**_help("number of epochs (dev evaluation and checkpoint after each)", default=3))
    steps_per_epoch: int | None = field(
        **_help(
            "optimizer steps per epoch; default: one pass over the largest task (round_robin) "
            "or over all the data in expectation (proportional, annealed)",
            default=None,
        )
    )
    epoch_fraction: float = field(
        **_help(
            "without steps_per_epoch: an epoch is this fraction of that default pass, whatever the batch size "
            "(0.5: dev evaluation, checkpoint and a report to the search's ASHA twice a pass)",
            default=1.0,
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
    cross_order: str = field(
        **_help(
            "cross-encoded pairs: given (sentence 1 first, as in the file) or both: train on each pair in both orders "
            "(each once every two passes, with no extra steps) and predict the mean of both orders' outputs (2 encoder "
            "passes per pair instead of 1)",
            default="given",
        )
    )
    sts_head: str = field(**_help("sts: regression (linear) or cosine (5 * cos(u, v); bi only)", default="cosine"))
    sts_loss: str = field(**_help("sts: mse (on the 0-5 score) or cosent (ranking of the pairs within a batch)", default="mse"))
    sst_head: str = field(**_help("sentiment head: linear or hidden (one hidden layer)", default="linear"))
    sst_loss: str = field(
        **_help(
            "sentiment loss: ce (cross-entropy), smoothed (label smoothing 0.1), or emd (cross-entropy plus the squared "
            "earth mover's distance between class CDFs, for ordered classes)",
            default="ce",
        )
    )
    pooling: str | dict[str, str] = field(
        **_help("sentence vector: mean (of tokens), cls, or pooler; one value, or per task as task=value", default="mean")
    )
    freeze_layers: int = field(**_help("freeze the embeddings and this many lower layers (0: train all)", default=0))
    freeze_word_embeddings: bool = field(
        **_help(
            "freeze the word-embedding matrix only (half of MiniLM's weights): no dense 30522 x hidden gradient, "
            "clipping, AdamW or surgery work on it each step",
            default=False,
        )
    )
    lazy_word_embeddings: bool = field(
        **_help(
            "train the word-embedding matrix lazily: a sparse gradient of the batch's tokens' rows, and AdamW "
            "updates those rows only (the others keep weights and moments); no effect on frozen word embeddings",
            default=False,
        )
    )
    task_layers: int = field(
        **_help(
            "give each task its own copy of the encoder's top N layers over the shared lower ones (0: every layer shared)",
            default=0,
        )
    )
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
            "fp32, bf16 (autocast), or auto: bf16 on CUDA and on CPUs with bf16 matrix units (AMX or AVX512_BF16), else fp32",
            default="auto",
        )
    )
    predict_test: bool = field(**_help("write test-set outputs and predictions with the best weights", default=True))
    cache_dir: str | None = field(**_help("token cache directory (default: <repo>/cache/tokens)", default=None))
    # Knowledge distillation (model/distill.py; ensemble.distill writes the folder): soft targets from a teacher.
    distill_dir: str | None = field(
        **_help(
            "distil from the teacher outputs in this folder: <task>-teacher.npz (ids, values) for every training row, "
            "and optionally <task>-augment.csv, extra unlabelled rows in the CS224N format (default: no distillation)",
            default=None,
        )
    )
    distill_alpha: float | dict[str, float] = field(
        **_help(
            "weight of the soft (teacher) loss on gold rows, 1 - alpha that of the gold loss; augmented rows: soft only. "
            "One number, or per task as task=number pairs",
            default=0.5,
        )
    )
    distill_temperature: float = field(
        **_help("sentiment: temperature of the KL between softened teacher and student distributions (times T^2)", default=1.0)
    )
    augment_limit: int | dict[str, int] | None = field(
        **_help("use at most this many augmented rows: one int, or per task as task=int pairs (default: all)", default=None)
    )
    distill_digest: str | None = field(
        **_help("digest of distill_dir's files, filled in by the trainer (a resumed run refuses a changed teacher)", default=None)
    )

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = list(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct names from {list(TASKS)}, got {self.tasks}")
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
        if self.cross_order == "both" and not any(reads_both_orders(self, t) for t in self.tasks):
            raise ValueError("cross_order 'both' needs a cross-encoded pair task (para or sts with pair_encoding cross)")
        if isinstance(self.batch_size, dict):
            self.batch_size = {t: int(b) for t, b in self.batch_size.items()}
        if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.values_of("batch_size")):
            raise ValueError(f"batch_size must be a positive int or task=int pairs, not {self.batch_size!r}")
        if not all(_positive_number(w) for w in self.values_of("loss_weight")):
            raise ValueError(f"loss_weight must be a finite number > 0 or task=number pairs, not {self.loss_weight!r}")
        alphas = self.values_of("distill_alpha")
        if any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"distill_alpha must be in [0, 1] or task=number pairs, not {self.distill_alpha!r}")
        # Always floats, so that a saved config.json and the messages read the same whether 2 or 2.0 was given.
        for name in ("loss_weight", "distill_alpha"):
            value = getattr(self, name)
            setattr(self, name, {t: float(v) for t, v in value.items()} if isinstance(value, dict) else float(value))
        for name in ("epochs", "max_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, not {getattr(self, name)!r}")
        for name in ("steps_per_epoch", "train_limit", "eval_limit", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, not {value!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, not {self.max_length}")
        for name in ("freeze_layers", "task_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, not {value!r}")
        for name in ("lr", "weight_decay", "smart_weight", "mnrl_weight", "max_grad_norm"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0, not {getattr(self, name)!r}")
        fraction = self.epoch_fraction
        if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
            raise ValueError(f"epoch_fraction must be in (0, 1], not {self.epoch_fraction!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ValueError(f"layer_lr_decay must be in (0, 1], not {self.layer_lr_decay!r}")
        if not 0.0 < self.gradvac_beta <= 1.0:
            raise ValueError(f"gradvac_beta must be in (0, 1], not {self.gradvac_beta!r}")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise ValueError(f"distill_temperature must be a finite number > 0, not {self.distill_temperature!r}")
        limits = [v for v in self.values_of("augment_limit") if v is not None]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in limits):
            raise ValueError(f"augment_limit must be an int >= 0, task=int pairs or None, not {self.augment_limit!r}")
        if self.distill_dir is not None:
            self.distill_dir = str(self.distill_dir)
        if self.model_config is not None:
            from model.bert import BertConfig  # only here: the rest of this module needs no torch

            known = {f.name for f in fields(BertConfig)}
            bad = [k for k in self.model_config if k not in known and k != "model_type"]
            if bad:
                raise ValueError(f"model_config: unknown BertConfig field(s) {bad}; known: {sorted(known)}")
            BertConfig(**{k: v for k, v in self.model_config.items() if k != "model_type"}).check("model_config")
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
        """The value of a per-task field (PER_TASK_FIELDS) for one task."""
        value = getattr(self, name)
        if isinstance(value, dict) and task not in value:
            raise KeyError(f"{name} gives no value for task {task!r} (it has {sorted(value)})")
        return value_for_task(value, task)

    def task_batch_size(self, task: str) -> int:
        return self.task_value("batch_size", task)


def _positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        value = float(value)
    except OverflowError:  # an int beyond any float
        return False
    return value > 0 and math.isfinite(value)


def with_defaults(saved: dict) -> dict:
    """A saved config (a run's config.json or state.pt) with the fields added since it was written at
    their defaults, so that a new field does not make an old run look different. This holds only
    because a new field's default always does what the trainer did before the field existed: keep it
    so (resume and the ensembles' seed runs rely on it)."""
    return TrainConfig().to_dict() | saved


def as_config(config: TrainConfig | dict) -> TrainConfig:
    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
