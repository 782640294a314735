"""Model soups (Wortsman et al. 2022): averaging the weights of fine-tuned checkpoints.

Weights only mix meaningfully when the checkpoints share an architecture and a starting point, so
members are checked first: the same BERT config (dropout rates aside, they hold no weights), the same
tasks and head settings, the same initial weights (model_path, or model_config, and the seed when the
encoder is randomly initialised or a head has parameters, since the trainer draws those from the
seed), and the same tensor names and shapes. A soup is judged by running it on dev once per member
set; those runs are cached in memory and on disk with joblib.Memory, keyed by the checkpoints' and
data files' identities and by the device and precision they ran with (a GPU's bf16 outputs are not
a CPU's fp32 ones), so that the per-task soups, their estimates on halves of dev, and reruns share
evaluations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import torch

from data.files import TASKS, Example, load_examples, resolve_data_dir
from ensemble.logits import Outputs
from ensemble.members import EnsembleError, Member
from model.bert import default_model_path, load_strict
from model.config import TrainConfig, value_for_task, with_defaults
from model.rundir import RunDir
from model.runtime import resolve_device, use_bf16

# Trainer settings that decide which parameters exist and what they start from.
HEAD_KEYS = ("tasks", "pair_encoding", "pooling", "sst_head", "sts_head", "task_layers")
INIT_KEYS = ("model_path", "model_config")
# BERT config fields that change no weight.
WEIGHTLESS_BERT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


class IncompatibleMembersError(EnsembleError):
    """Checkpoints that cannot be averaged; the message names the member and the differing key."""


def has_seeded_head(train: dict) -> bool:
    """Whether any trained task's head has parameters, which the trainer initialises from the seed.
    Only the STS cosine head (5 * cos(u, v)) has none."""
    return any(not (task == "sts" and value_for_task(train.get("sts_head"), task) == "cosine") for task in train.get("tasks", []))


def init_signature(train: dict) -> dict:
    """What the member started from. None and the embedded default's path are the same model. The seed
    counts for a random encoder init and for heads with parameters: two seeds start them apart."""
    path = train.get("model_path")
    signature = {"model_path": str(Path(path or default_model_path()).resolve()), "model_config": train.get("model_config")}
    if signature["model_config"] is not None or has_seeded_head(train):
        signature["seed"] = train.get("seed")
    return signature


def architecture_signature(config: dict) -> dict[str, object]:
    """Flat {key: value} of everything that must agree for two checkpoints to be averaged."""
    train, bert = with_defaults(config["train"]), config["bert"]
    signature: dict[str, object] = {f"bert.{k}": v for k, v in bert.items() if k not in WEIGHTLESS_BERT_KEYS}
    for key in HEAD_KEYS:
        value = train.get(key)
        signature[f"train.{key}"] = sorted(value) if key == "tasks" and value is not None else value
    signature.update({f"train.{k}": v for k, v in init_signature(train).items()})
    return signature


def tensor_shapes(artifact_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(RunDir(artifact_dir).weights_file), "pt") as checkpoint:
        return {key: tuple(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()}


def first_difference(expected: dict, found: dict) -> str | None:
    """The first key (in signature order: BERT config, heads, initialisation) whose values differ."""
    keys = list(expected) + [k for k in found if k not in expected]
    return next((k for k in keys if expected.get(k) != found.get(k)), None)


def check_compatible(members: Sequence[Member]) -> None:
    """Raise IncompatibleMembersError unless every member can be averaged with the first."""
    reference = members[0]
    ref_signature, ref_shapes = architecture_signature(reference.config), tensor_shapes(reference.artifact_dir)
    for member in members[1:]:
        # Config keys first: they give the clearest reason.
        for what, expected, found in (
            ("", ref_signature, architecture_signature(member.config)),
            ("the shape of tensor ", ref_shapes, tensor_shapes(member.artifact_dir)),
        ):
            key = first_difference(expected, found)
            if key is not None:
                raise IncompatibleMembersError(
                    f"cannot average {member.name} ({member.artifact_dir}) with {reference.name}: {what}{key} is "
                    f"{found.get(key)!r} there but {expected.get(key)!r} in {reference.name}"
                )


def average_checkpoints(artifact_dirs: Sequence[Path], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """(Weighted) mean of the members' model.safetensors, accumulated in float64 and stored in each
    tensor's own dtype. Non-float tensors (integer buffers) must be equal in every member."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for index, artifact_dir in enumerate(artifact_dirs):
        state = RunDir(artifact_dir).load_weights()
        scale = 1.0 if weights is None else float(weights[index])
        for key, tensor in state.items():
            if not tensor.is_floating_point():
                if key in total and not torch.equal(total[key], tensor):
                    raise IncompatibleMembersError(f"{artifact_dir}: integer tensor {key} differs from the first member's")
                total.setdefault(key, tensor)
                continue
            dtypes[key] = tensor.dtype
            contribution = tensor.to(torch.float64) * scale
            total[key] = contribution if key not in total else total[key] + contribution
    divisor = float(len(artifact_dirs)) if weights is None else 1.0
    return {key: (t / divisor).to(dtypes[key]) if key in dtypes else t for key, t in total.items()}


def fingerprint(path: Path) -> tuple[str, int, int]:
    """Identity of a file for caching: resolved path, size, modification time."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def as_numpy_outputs(outputs: dict) -> Outputs:
    """The trainer's outputs (lists, tensors or arrays) as arrays; labels None when absent."""
    converted: Outputs = {}
    for task, out in outputs.items():
        labels = out.get("labels")
        converted[task] = {
            "ids": np.asarray(out["ids"]).astype(str),
            "values": np.asarray(out["values"], dtype=np.float64),
            "labels": None if labels is None else np.asarray(labels),
        }
    return converted


def run_soup(
    checkpoints: tuple[tuple[str, int, int], ...],
    weights: tuple[float, ...] | None,
    split: str,
    data_dir: str,
    device: str | None,
    cache_key: tuple,
    lent: tuple[str, str] | None = None,
) -> Outputs:
    """Build the soup of ``checkpoints`` (fingerprints of model.safetensors files) and run it on
    ``split`` with the first member's config; ``lent`` = (head, task): run its ``head`` on ``task``'s
    rows instead of its own tasks (ensemble.lend). ``cache_key`` (that config's and the data files'
    fingerprints, the precision) only tells joblib.Memory when a cached result is stale."""
    from model.build import load_trained
    from model.evaluation import evaluate_model

    artifact_dirs = [Path(path).parent for path, _, _ in checkpoints]
    model, cfg = load_trained(artifact_dirs[0], device=device)
    soup_state = average_checkpoints(artifact_dirs, weights)
    load_strict(model, soup_state, f"soup of {[str(d) for d in artifact_dirs]}")
    model.eval()
    if lent is None:
        _, outputs = evaluate_model(model, cfg, split, data_dir=data_dir)
        return as_numpy_outputs(outputs)
    head, task = lent
    # The first eval_limit rows, as every member's own evaluations cover (pools need the same rows); no
    # labels, so the head's own metric is not computed against another task's labels.
    rows = [Example(e.id, e.texts, None) for e in load_examples(task, split, data_dir)[: cfg.eval_limit]]
    _, outputs = evaluate_model(model, cfg, split, examples={head: rows})
    return as_numpy_outputs({task: outputs[head]})


class SoupEvaluator:
    """Runs soups (uniform averages of members' weights) on a split: {task: outputs} for every task of
    the first member's config. Cached in memory and under ``cache_dir`` (on disk only when given)."""

    def __init__(self, data_dir: str | Path | None, device: str | None, cache_dir: Path | None):
        self.device, self.cache_dir = device, cache_dir
        self.data_dir = str(resolve_data_dir(data_dir).resolve())
        self.run = None  # made on first use: joblib.Memory creates its folder, and a refused build writes nothing
        self.seen: dict[tuple, Outputs] = {}

    def __call__(self, members: Sequence[Member], split: str = "dev", lent_to: str | None = None) -> Outputs:
        """{task: outputs} of the soup on ``split``; with ``lent_to`` (members lent by ensemble.lend, each
        with its ``head``): {lent_to: its head's outputs on lent_to's rows}."""
        checkpoints = tuple(fingerprint(m.run.weights_file) for m in members)
        lent = None if lent_to is None else (members[0].head, lent_to)
        if (checkpoints, split, lent) not in self.seen:
            tasks = members[0].tasks if lent_to is None else [lent_to]
            data_files = tuple(fingerprint(TASKS[t].path(split, self.data_dir)) for t in tasks)
            # The device as resolved (None means a GPU on one machine, the CPU on another) and the
            # precision evaluate_model will use on it: the outputs differ with each.
            device = resolve_device(self.device)
            bf16 = use_bf16(members[0].config["train"].get("precision", TrainConfig.precision), device)
            cache_key = (fingerprint(members[0].run.config_file), data_files, "bf16" if bf16 else "fp32")
            if self.run is None:
                self.run = joblib.Memory(None if self.cache_dir is None else str(self.cache_dir), verbose=0).cache(run_soup)
            self.seen[checkpoints, split, lent] = self.run(checkpoints, None, split, self.data_dir, str(device), cache_key, lent)
        return self.seen[checkpoints, split, lent]


@dataclass
class GreedyStep:
    member: str
    score: float  # held-out score of the soup with this member added
    kept: bool
    size: int  # soup size after this step


def greedy_soup(ranked: Sequence[Member], score: Callable[[Sequence[Member]], float]) -> tuple[list[Member], list[GreedyStep]]:
    """Wortsman et al. 2022 (their code): start from the first of ``ranked`` (best held-out score first)
    and keep each next member only when the soup's held-out score strictly improves."""
    ingredients, best = [ranked[0]], score(ranked[:1])
    steps = [GreedyStep(ranked[0].name, best, True, 1)]
    for member in ranked[1:]:
        candidate = score([*ingredients, member])
        kept = candidate > best
        if kept:
            ingredients.append(member)
            best = candidate
        steps.append(GreedyStep(member.name, candidate, kept, len(ingredients)))
    return ingredients, steps


def write_soup_predictor(directory: Path, members: Sequence[Member], weights: Sequence[float] | None, method: str) -> None:
    """The soup as a trainer output dir (config.json + model.safetensors, so load_trained reads it),
    plus soup.json naming its members. Each file is written to a temp file and renamed."""
    run = RunDir(directory)
    run.save_weights(average_checkpoints([m.artifact_dir for m in members], weights), metadata={"format": "pt"})
    run.write_config(members[0].config["train"], members[0].config["bert"])
    described = [
        {
            "study": m.study,
            "trial": m.trial_number,
            "artifact_dir": str(m.artifact_dir),
            "weight": 1.0 / len(members) if weights is None else float(w),
        }
        for m, w in zip(members, weights or [None] * len(members), strict=True)
    ]
    run.write_json(directory / "soup.json", {"method": method, "members": described})


def compatible_members(reference: Member, candidates: Sequence[Member]) -> tuple[list[Member], list[str]]:
    """Those of ``candidates`` (``reference`` included or not) that can be averaged with ``reference``,
    reference first, and the reasons the others were refused."""
    compatible, refusals = [reference], []
    for member in candidates:
        if member is reference:
            continue
        try:
            check_compatible([reference, member])
        except IncompatibleMembersError as err:
            refusals.append(str(err))
            continue
        compatible.append(member)
    return compatible, refusals
