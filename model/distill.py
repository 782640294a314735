"""Knowledge distillation inside the trainer: each task's training split becomes the transfer set (the
gold training rows, then extra unlabelled rows), every row with the teacher's output as a soft target.

A distill folder (``TrainConfig.distill_dir``; ``python -m ensemble.distill`` writes one) holds per task:

  <task>-teacher.npz   ids (N,), values (N,) or (N, C): the teacher's output values (class probabilities,
                       P(duplicate), the STS score on the 0-5 scale) for every row the student trains on
  <task>-augment.csv   optional: extra unlabelled rows in the CS224N format (id and the text columns)

The loss of a batch (``distill_loss``) is, averaged over its rows: on a gold row
``(1 - alpha) * gold loss + alpha * soft loss`` (alpha one number or per task); on an augmented row
the soft loss alone (it has no gold label). ``distill_digest`` fingerprints the folder's content, and
the trainer records it in the run's config, so a resumed run refuses a changed teacher like any other
changed setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.files import TASKS
from data.tokenize import EncodedSplit
from model.config import TrainConfig
from model.multitask import cosent_loss, task_loss
from model.rundir import RunFileError, read_npz_outputs
from model.splits import load_file

EPS = 1e-7


def teacher_file(directory: str | Path, task: str) -> Path:
    return Path(directory) / f"{task}-teacher.npz"


def augment_file(directory: str | Path, task: str) -> Path:
    return Path(directory) / f"{task}-augment.csv"


def read_teacher(path: Path, task: str) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's ids and values for one task, checked (shape, finite); RunFileError naming the file."""
    out = read_npz_outputs(path)
    ids, values = out["ids"], np.asarray(out["values"], dtype=np.float64)
    spec = TASKS[task]
    expected = (len(ids), spec.num_classes) if spec.label_kind == "class" else (len(ids),)
    if values.shape != expected:
        raise RunFileError(f"{path}: {task} teacher values have shape {values.shape}, expected {expected}")
    if not np.isfinite(values).all():
        raise RunFileError(f"{path}: {int((~np.isfinite(values)).sum())} teacher value(s) are NaN or inf")
    return ids, values


def distill_digest(directory: str | Path, tasks: list[str]) -> str:
    """A digest of what the folder says for ``tasks``: the teacher's ids and values (not the .npz bytes,
    which carry a zip timestamp) and the augmented rows' file."""
    digest = hashlib.sha256()
    for task in sorted(tasks):
        ids, values = read_teacher(teacher_file(directory, task), task)
        digest.update(f"{task}\0{len(ids)}\0".encode() + "\0".join(ids).encode() + values.tobytes())
        extra = augment_file(directory, task)
        digest.update(extra.read_bytes() if extra.is_file() else b"-")
    return digest.hexdigest()[:16]


def with_distill_digest(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``distill_digest`` filled in from its distill folder; a digest given that no longer
    matches the folder (the teacher changed since the config was written) is an error."""
    if cfg.distill_dir is None:
        return cfg
    digest = distill_digest(cfg.distill_dir, cfg.tasks)
    if cfg.distill_digest not in (None, digest):
        raise ValueError(
            f"distill_dir {cfg.distill_dir}: its teacher files changed since this config was written "
            f"(distill_digest {cfg.distill_digest} -> {digest})"
        )
    return dataclasses.replace(cfg, distill_digest=digest)


@dataclass
class SoftTargets:
    """One task's soft targets, in the row order of its transfer split (``Batch.index`` looks them up)."""

    values: torch.Tensor  # (N,) or (N, C) the teacher's output values
    gold: torch.Tensor  # (N,) bool: a gold training row (else an augmented one, without a label)


def concat_splits(gold: EncodedSplit, extra: EncodedSplit) -> EncodedSplit:
    """``gold`` then ``extra``; the unlabelled rows get a placeholder label of the gold labels' type (the
    gold loss never sees them, and 0 is never a paraphrase positive for MNRL)."""
    placeholder = type(gold.labels[0])(0)
    views = [a + b for a, b in zip(gold.views, extra.views, strict=True)]
    return EncodedSplit(gold.ids + extra.ids, views, gold.labels + [placeholder] * len(extra))


def transfer_split(cfg: TrainConfig, task: str, gold: EncodedSplit) -> tuple[EncodedSplit, SoftTargets]:
    """The task's transfer split (gold rows, then at most ``augment_limit`` augmented rows) and its soft targets."""
    split = gold
    extra_file = augment_file(cfg.distill_dir, task)
    limit = cfg.task_value("augment_limit", task)
    if extra_file.is_file() and limit != 0:
        extra = load_file(cfg, task, extra_file, labelled=False, limit=limit)
        clash = set(extra.ids) & set(gold.ids)
        if clash:
            raise ValueError(f"{extra_file}: {len(clash)} id(s) are also training ids (e.g. {sorted(clash)[:3]})")
        split = concat_splits(gold, extra)
    path = teacher_file(cfg.distill_dir, task)
    ids, values = read_teacher(path, task)
    position = {row_id: p for p, row_id in enumerate(ids)}
    missing = [row_id for row_id in split.ids if row_id not in position]
    if missing:
        raise ValueError(
            f"{path}: no teacher output for {len(missing)} of the {len(split)} {task} training rows (e.g. {missing[:3]}); "
            "label them again (python -m ensemble.distill)"
        )
    soft = torch.tensor(values[[position[i] for i in split.ids]], dtype=torch.float32)
    is_gold = torch.arange(len(split)) < len(gold)
    return split, SoftTargets(soft, is_gold)


def transfer_splits(cfg: TrainConfig, gold: dict[str, EncodedSplit]) -> tuple[dict[str, EncodedSplit], dict[str, SoftTargets]]:
    """Each task's training split and soft targets: the gold splits and no targets without a distill_dir."""
    if cfg.distill_dir is None:
        return gold, {}
    pairs = {task: transfer_split(cfg, task, split) for task, split in gold.items()}
    return {t: p[0] for t, p in pairs.items()}, {t: p[1] for t, p in pairs.items()}


def soft_loss(task: str, output: torch.Tensor, soft: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-row loss of the student's raw ``output`` against the teacher's output values ``soft``.
    Sentiment: KL(teacher || student), both softened at ``temperature`` (the teacher's probabilities as
    p^(1/T) renormalised, i.e. its log-probabilities divided by T), times T^2 so that the gradient's
    scale does not shrink with T (Hinton et al. 2015). Paraphrase: binary cross-entropy with the
    teacher's P(duplicate) as the label. STS: squared error to the teacher's score."""
    output, soft = output.float(), soft.float()
    kind = TASKS[task].label_kind
    if kind == "class":
        teacher = F.log_softmax(soft.clamp_min(EPS).log() / temperature, dim=-1)
        student = F.log_softmax(output / temperature, dim=-1)
        return (teacher.exp() * (teacher - student)).sum(-1) * temperature**2
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(output, soft, reduction="none")
    return (output - soft).pow(2)


def distill_loss(
    task: str, output: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, targets: SoftTargets, cfg: TrainConfig
) -> torch.Tensor:
    """One batch's loss (rows ``index`` of the transfer split): the soft loss on every row, weighted
    alpha on gold rows and 1 on augmented ones, plus (1 - alpha) times the task's own loss on the gold
    rows, weighted by their share of the batch. With ``sts_loss="cosent"`` the STS soft loss is CoSENT
    on the teacher's scores (the student's scores then have no fixed scale to match)."""
    soft = targets.values[index].to(output.device)
    gold_cpu = targets.gold[index]  # counted and indexed on the host: no device sync per batch
    gold = gold_cpu.to(output.device)
    alpha = cfg.task_value("distill_alpha", task)
    weights = 1.0 - (1.0 - alpha) * gold.float()  # alpha on gold rows, 1 on augmented ones
    if TASKS[task].label_kind == "score" and cfg.sts_loss == "cosent":
        loss = weights.mean() * cosent_loss(output.float(), soft)
    else:
        loss = (weights * soft_loss(task, output, soft, cfg.distill_temperature)).mean()
    rows = torch.nonzero(gold_cpu).squeeze(-1)
    if len(rows) and alpha < 1.0:  # alpha 1: the gold labels are not used at all
        rows = rows.to(output.device)
        hard = task_loss(task, output[rows], labels[rows], cfg.sts_loss, cfg.sst_loss)
        loss = loss + (1.0 - alpha) * len(rows) / len(gold_cpu) * hard
    return loss
