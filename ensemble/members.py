"""Choosing ensemble members: a study's trials ranked by objective, with their artifacts checked.

A trial is eligible when it is COMPLETE (or early-stopped, when asked) and names its artifact dir.
Eligible trials are taken in rank order; one whose artifacts are missing or corrupt is skipped with a
warning naming it, and the next one is taken instead, until K usable members are found.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search.storage import (
    STUDY_METRIC,
    STUDY_TASKS,
    TRIAL_ARTIFACT_DIR,
    TRIAL_EARLY_STOPPED,
    load_study,
)

SPLITS = ("dev", "test")


class EnsembleError(RuntimeError):
    """Base of the errors that stop an ensemble build with a message for the user."""


class NoUsableTrialError(EnsembleError):
    """The study has no trial that can be an ensemble member."""


class MemberArtifactError(EnsembleError):
    """A trial's artifacts (checkpoint, config, saved outputs) are missing or unreadable."""


class MemberSkippedWarning(UserWarning):
    """A trial was passed over because its artifacts are missing or corrupt."""


# What one task's saved outputs hold: ids (N,), values (N,) or (N, C), labels (N,) or None.
TaskOutputs = dict[str, np.ndarray | None]


@dataclass
class Member:
    """One usable trial: its rank in the study, objective, artifact dir and saved outputs."""

    trial_number: int
    rank: int  # 1 = best objective among the usable trials
    value: float
    artifact_dir: Path
    early_stopped: bool
    params: dict
    config: dict  # the trainer's config.json: {"train": ..., "bert": ...}
    outputs: dict[str, dict[str, TaskOutputs]] = field(default_factory=dict)  # split -> task -> outputs

    @property
    def name(self) -> str:
        return f"trial {self.trial_number}"

    def has_split(self, split: str) -> bool:
        return split in self.outputs


@dataclass
class Selection:
    study_name: str
    metric: str
    direction: str  # "maximize" or "minimize"
    tasks: list[str]
    members: list[Member]
    skipped: list[str]  # "trial N (dir): reason"
    notes: list[str]  # things the user should be told (K too large, early-stopped trials left out, ...)


def read_outputs(artifact_dir: Path, task: str, split: str) -> TaskOutputs:
    """Read ``outputs/<task>-<split>.npz`` (no pickles), checking shapes and finiteness."""
    path = artifact_dir / "outputs" / f"{task}-{split}.npz"
    if not path.is_file():
        raise MemberArtifactError(f"{path}: missing")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as err:  # zip, header and dtype errors all mean the same thing here
        raise MemberArtifactError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    for key in ("ids", "values"):
        if key not in arrays:
            raise MemberArtifactError(f"{path}: no {key!r} array (it has {sorted(arrays)})")
    ids, values, labels = arrays["ids"].astype(str), arrays["values"], arrays.get("labels")
    if len(ids) == 0 or len(values) != len(ids) or (labels is not None and len(labels) != len(ids)):
        raise MemberArtifactError(
            f"{path}: {len(ids)} ids, {len(values)} values, labels {None if labels is None else len(labels)}"
        )
    if not np.isfinite(values).all():
        raise MemberArtifactError(f"{path}: values contain NaN or inf")
    if split == "dev" and labels is None:
        raise MemberArtifactError(f"{path}: dev outputs have no 'labels' array")
    return {"ids": ids, "values": values, "labels": labels}


def check_checkpoint(artifact_dir: Path) -> dict:
    """Validate config.json and model.safetensors (header and size) and return the config."""
    config_file, weights = artifact_dir / "config.json", artifact_dir / "model.safetensors"
    if not config_file.is_file():
        raise MemberArtifactError(f"{config_file}: missing")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise MemberArtifactError(f"{config_file}: unreadable ({err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict) or not isinstance(config.get("bert"), dict):
        raise MemberArtifactError(f"{config_file}: expected an object with 'train' and 'bert' sections")
    if not weights.is_file():
        raise MemberArtifactError(f"{weights}: missing")
    from safetensors import safe_open

    try:  # safe_open checks that the header parses and the file covers every tensor it declares
        with safe_open(str(weights), "pt") as checkpoint:
            if not list(checkpoint.keys()):
                raise MemberArtifactError(f"{weights}: holds no tensors")
    except MemberArtifactError:
        raise
    except Exception as err:
        raise MemberArtifactError(f"{weights}: corrupt ({err})") from err
    return config


def load_member_artifacts(artifact_dir: Path, tasks: list[str]) -> tuple[dict, dict[str, dict[str, TaskOutputs]]]:
    """Config and saved outputs of one trial. Dev outputs are required; test outputs are kept when
    every task has them (a member without them can still be in a soup, but not in test logit averages)."""
    if not artifact_dir.is_dir():
        raise MemberArtifactError(f"{artifact_dir}: artifact directory missing")
    config = check_checkpoint(artifact_dir)
    trained = list(config["train"].get("tasks", []))
    absent = [t for t in tasks if t not in trained]
    if absent:
        raise MemberArtifactError(f"{artifact_dir / 'config.json'}: trained tasks {trained} lack {absent}")
    outputs = {"dev": {t: read_outputs(artifact_dir, t, "dev") for t in tasks}}
    if all((artifact_dir / "outputs" / f"{t}-test.npz").is_file() for t in tasks):
        outputs["test"] = {t: read_outputs(artifact_dir, t, "test") for t in tasks}
    return config, outputs


def is_early_stopped(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.PRUNED or bool(trial.user_attrs.get(TRIAL_EARLY_STOPPED, False))


# Written by search.records: the dev objective of the epoch whose weights the trainer kept.
TRIAL_BEST_VALUE = "best_value"


def trial_objective(trial: FrozenTrial, direction: str) -> float | None:
    """The dev objective of the trial's saved checkpoint: its ``best_value`` attribute, else its value,
    else (an early-stopped trial without either) its best intermediate value. A PRUNED trial's Optuna
    value is its last epoch's, which need not be the epoch whose weights were kept."""
    recorded = trial.user_attrs.get(TRIAL_BEST_VALUE)
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
        return float(recorded)
    if trial.value is not None:
        return float(trial.value)
    steps = [v for v in trial.intermediate_values.values() if v is not None and math.isfinite(v)]
    if not steps:
        return None
    return max(steps) if direction == "maximize" else min(steps)


def study_direction(study: optuna.Study) -> str:
    return "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"


def select_members(
    study_name: str,
    storage_url: str,
    top_k: int,
    include_early_stopped: bool = False,
) -> Selection:
    """The ``top_k`` best usable trials of the study, best first."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, not {top_k}")
    study = load_study(study_name, storage_url)
    return select_from_study(study, top_k, include_early_stopped)


def select_from_study(study: optuna.Study, top_k: int, include_early_stopped: bool = False) -> Selection:
    direction = study_direction(study)
    metric = study.user_attrs.get(STUDY_METRIC)
    if metric is None:
        raise EnsembleError(f"study {study.study_name!r} has no {STUDY_METRIC!r} user attribute; was it made by run_search.py?")
    trials = study.get_trials(deepcopy=False)
    notes: list[str] = []
    candidates: list[tuple[float, FrozenTrial]] = []
    counts = {"failed": 0, "early_stopped": 0, "unfinished": 0, "no_artifacts": 0}
    for trial in trials:
        if trial.state == TrialState.FAIL:
            counts["failed"] += 1
            continue
        if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            counts["unfinished"] += 1
            continue
        if is_early_stopped(trial) and not include_early_stopped:
            counts["early_stopped"] += 1
            continue
        objective = trial_objective(trial, direction)
        if objective is None or not math.isfinite(objective):
            counts["unfinished"] += 1
            continue
        if not trial.user_attrs.get(TRIAL_ARTIFACT_DIR):
            counts["no_artifacts"] += 1
            continue
        candidates.append((objective, trial))
    candidates.sort(key=lambda item: (-item[0] if direction == "maximize" else item[0], item[1].number))
    left_out = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in counts.items() if n)
    if left_out:
        notes.append(f"left out of {len(trials)} trials: {left_out}")
    if counts["early_stopped"]:
        notes.append("early-stopped trials are used only with --include-early-stopped")

    tasks = list(study.user_attrs.get(STUDY_TASKS) or [])
    members: list[Member] = []
    skipped: list[str] = []
    for objective, trial in candidates:
        if len(members) == top_k:
            break
        artifact_dir = Path(trial.user_attrs[TRIAL_ARTIFACT_DIR])
        try:
            if not tasks:  # older studies: the tasks are those of the best trial's config
                tasks = list(check_checkpoint(artifact_dir)["train"]["tasks"])
            config, outputs = load_member_artifacts(artifact_dir, tasks)
        except MemberArtifactError as err:
            reason = f"trial {trial.number} ({artifact_dir}): {err}"
            skipped.append(reason)
            warnings.warn(f"skipping {reason}", MemberSkippedWarning, stacklevel=2)
            continue
        members.append(
            Member(
                trial.number,
                len(members) + 1,
                objective,
                artifact_dir,
                is_early_stopped(trial),
                dict(trial.params),
                config,
                outputs,
            )
        )
    if not members:
        why = f"{len(candidates)} eligible trial(s), all with missing or corrupt artifacts" if candidates else "no eligible trial"
        raise NoUsableTrialError(
            f"study {study.study_name!r} has no usable trial ({why}; {left_out or 'no trials'}). "
            "Run or finish the search first"
            + ("" if include_early_stopped or not counts["early_stopped"] else ", or pass --include-early-stopped")
            + "."
        )
    if len(members) < top_k:
        notes.append(f"--top-k {top_k} asked for, but only {len(members)} usable trial(s) exist: using {len(members)}")
    return Selection(study.study_name, metric, direction, tasks, members, skipped, notes)
