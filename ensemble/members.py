"""The member pool: every usable trial of one or more studies in one Optuna storage.

A trial is a member when it is COMPLETE, or PRUNED (early-stopped; left out with
``include_early_stopped=False``), names its artifact dir, and has saved dev outputs for every task its
config trains. FAIL trials never are. Members are named ``<study>/trial <n>``.

What happens to a trial that is not usable:
- no artifact dir, or no saved dev outputs (killed before its first evaluation): skipped with a warning;
- non-finite weights or outputs (a diverged trial): skipped with a warning naming it;
- a corrupt file (unreadable outputs, config or checkpoint): the build stops with an error naming the
  study, the trial and the file, since something broke that the user must look at.
A study name that the storage does not hold, or a study left with no member, also stops the build.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from data.files import TASKS
from model.rundir import RunDir, RunFileError, TaskOutputs
from search.storage import TRIAL_ARTIFACT_DIR, TRIAL_BEST_VALUE, TRIAL_EARLY_STOPPED, load_optuna_study


class EnsembleError(RuntimeError):
    """Base of the errors that stop an ensemble build with a message for the user."""


class NoUsableTrialError(EnsembleError):
    """A study has no trial that can be an ensemble member."""


class MemberArtifactError(EnsembleError):
    """A trial's artifacts (checkpoint, config, saved outputs) are corrupt: the build stops."""


class UnusableMemberError(MemberArtifactError):
    """A trial's artifacts are absent or non-finite: the trial is skipped with a warning."""


class MemberSkippedWarning(UserWarning):
    """A trial was passed over because its artifacts are missing or non-finite."""


@dataclass
class Member:
    """One usable trial: where it comes from, its config and its saved outputs."""

    study: str
    trial_number: int
    value: float | None  # the study's objective for the trial's kept weights (for information)
    artifact_dir: Path
    early_stopped: bool
    params: dict
    config: dict  # the trainer's config.json: {"train": ..., "bert": ...}
    outputs: dict[str, dict[str, TaskOutputs]] = field(default_factory=dict)  # split -> task -> outputs
    # task -> epoch -> dev outputs after that epoch ({} for a run that kept none: model.rundir)
    epoch_outputs: dict[str, dict[int, TaskOutputs]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # metrics.json's per-epoch records
    best_epoch: int | None = None  # the epoch whose weights and outputs were saved
    # A lent member (ensemble.lend) speaks in another task's pool with the head of ``head``, its own task;
    # ``standardize`` (mean, sd) is that head's score on the borrowing task's dev rows.
    head: str | None = None
    standardize: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        trial = f"{self.study}/trial {self.trial_number}"
        return trial if self.head is None else f"{trial} ({self.head} head)"

    @property
    def tasks(self) -> list[str]:
        return list(self.config["train"]["tasks"])

    def has_split(self, split: str, task: str) -> bool:
        return task in self.outputs.get(split, {})

    @property
    def run(self) -> RunDir:
        return RunDir(self.artifact_dir)

    def outputs_file(self, task: str, split: str) -> Path:
        return self.run.outputs_file(task, split)


@dataclass
class Pool:
    studies: list[str]
    members: list[Member]
    skipped: list[str]  # "study/trial N (dir): reason"
    notes: list[str]  # things the user should be told (early-stopped trials left out, ...)

    @property
    def tasks(self) -> list[str]:
        """Every task some member trains, in the trainer's task order."""
        trained = {t for m in self.members for t in m.tasks}
        return [t for t in TASKS if t in trained]

    def find(self, study: str, trial: int) -> Member | None:
        return next((m for m in self.members if m.study == study and m.trial_number == trial), None)


def read_outputs(artifact_dir: Path, task: str, split: str) -> TaskOutputs:
    """A member's saved outputs (model.rundir reads and checks the file), checked for finiteness: a
    missing or non-finite file makes the member unusable, an unreadable one is an error."""
    run = RunDir(artifact_dir)
    path = run.outputs_file(task, split)
    if not path.is_file():
        raise UnusableMemberError(f"{path}: missing")
    try:
        outputs = run.read_outputs(task, split)
    except RunFileError as err:
        raise MemberArtifactError(str(err)) from err
    values = outputs["values"]
    if not np.issubdtype(values.dtype, np.number):
        raise MemberArtifactError(f"{path}: values of dtype {values.dtype}, expected numbers")
    if not np.isfinite(values).all():
        raise UnusableMemberError(f"{path}: values contain NaN or inf")
    if split == "dev" and outputs["labels"] is None:
        raise MemberArtifactError(f"{path}: dev outputs have no 'labels' array")
    return outputs


def read_config(artifact_dir: Path) -> dict:
    """The trainer's config.json, checked for its 'train' (with tasks) and 'bert' sections."""
    run = RunDir(artifact_dir)
    if not run.config_file.is_file():
        raise UnusableMemberError(f"{run.config_file}: missing")
    try:
        config = run.read_config()
    except RunFileError as err:
        raise MemberArtifactError(str(err)) from err
    tasks = config["train"].get("tasks")
    if not isinstance(tasks, list) or not tasks or any(t not in TASKS for t in tasks):
        raise MemberArtifactError(f"{run.config_file}: train.tasks must list tasks from {sorted(TASKS)}, not {tasks!r}")
    return config


def check_checkpoint(artifact_dir: Path) -> dict:
    """Validate config.json and model.safetensors (header, size, finite weights) and return the config."""
    config = read_config(artifact_dir)
    weights = RunDir(artifact_dir).weights_file
    if not weights.is_file():
        raise UnusableMemberError(f"{weights}: missing")
    from safetensors import safe_open

    try:  # safe_open checks that the header parses and the file covers every tensor it declares
        with safe_open(str(weights), "pt") as checkpoint:
            keys = list(checkpoint.keys())
            # A diverged run can save NaN weights whose header is fine (issue 13).
            non_finite = [k for k in keys if not checkpoint.get_tensor(k).float().isfinite().all()]
    except Exception as err:
        raise MemberArtifactError(f"{weights}: corrupt ({err})") from err
    if not keys:
        raise MemberArtifactError(f"{weights}: holds no tensors")
    if non_finite:
        raise UnusableMemberError(f"{weights}: non-finite weights in {len(non_finite)} tensor(s), e.g. {non_finite[0]}")
    return config


def read_epoch_outputs(artifact_dir: Path, task: str, epochs: list[int]) -> dict[int, TaskOutputs]:
    """A member's dev outputs after each of ``epochs`` (its history's), where the trainer kept them. An
    unreadable file is an error; an epoch with non-finite outputs is left out (its weights were never
    a candidate either: the trainer stops on a non-finite loss)."""
    run, kept = RunDir(artifact_dir), {}
    for epoch in sorted(set(run.output_epochs(task)) & set(epochs)):
        try:
            outputs = run.read_epoch_outputs(task, epoch)
        except RunFileError as err:
            raise MemberArtifactError(str(err)) from err
        if outputs["labels"] is None:
            raise MemberArtifactError(f"{run.epoch_outputs_file(task, epoch)}: dev outputs have no 'labels' array")
        if np.issubdtype(outputs["values"].dtype, np.number) and np.isfinite(outputs["values"]).all():
            kept[epoch] = outputs
    return kept


def load_member(study: str, trial: FrozenTrial, artifact_dir: Path) -> Member:
    """One trial as a member: config, saved outputs and history. Dev outputs are required; test outputs
    are kept where present (the build runs the checkpoint on test where they are not)."""
    if not artifact_dir.is_dir():
        raise UnusableMemberError(f"{artifact_dir}: artifact directory missing")
    config, run = check_checkpoint(artifact_dir), RunDir(artifact_dir)
    tasks = config["train"]["tasks"]
    outputs = {"dev": {t: read_outputs(artifact_dir, t, "dev") for t in tasks}, "test": {}}
    for task in tasks:
        if run.has_outputs([task], "test"):
            outputs["test"][task] = read_outputs(artifact_dir, task, "test")
    try:
        metrics = run.read_metrics() if run.metrics_file.is_file() else {}
    except RunFileError as err:
        raise MemberArtifactError(str(err)) from err
    history = list(metrics.get("history", []))
    return Member(
        study,
        trial.number,
        trial_objective(trial),
        artifact_dir,
        is_early_stopped(trial),
        dict(trial.params),
        config,
        outputs,
        epoch_outputs={t: read_epoch_outputs(artifact_dir, t, [int(r["epoch"]) for r in history]) for t in tasks},
        history=history,
        best_epoch=metrics.get("best_epoch"),
    )


def is_early_stopped(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.PRUNED or bool(trial.user_attrs.get(TRIAL_EARLY_STOPPED, False))


def trial_objective(trial: FrozenTrial) -> float | None:
    """The study objective of the trial's saved checkpoint: its ``best_value`` attribute, else its value.
    Only reported: members are ranked per task by their own dev outputs."""
    recorded = trial.user_attrs.get(TRIAL_BEST_VALUE, trial.value)
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and math.isfinite(recorded):
        return float(recorded)
    return None


def open_study(name: str, storage_url: str) -> optuna.Study:
    try:
        return load_optuna_study(name, storage_url)
    except KeyError as err:
        raise EnsembleError(err.args[0] if err.args else f"no study named {name!r} in {storage_url}") from err


def study_members(study: optuna.Study, include_early_stopped: bool) -> tuple[list[Member], list[str], list[str]]:
    """The usable trials of one study, by trial number; the skipped ones; notes for the user."""
    name = study.study_name
    counts = {"failed": 0, "early-stopped (excluded)": 0, "unfinished": 0, "without artifact dir": 0}
    members: list[Member] = []
    skipped: list[str] = []
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    for trial in trials:
        if trial.state == TrialState.FAIL:
            counts["failed"] += 1
        elif trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
            counts["unfinished"] += 1
        elif is_early_stopped(trial) and not include_early_stopped:
            counts["early-stopped (excluded)"] += 1
        elif not trial.user_attrs.get(TRIAL_ARTIFACT_DIR):
            counts["without artifact dir"] += 1
        else:
            artifact_dir = Path(trial.user_attrs[TRIAL_ARTIFACT_DIR])
            try:
                members.append(load_member(name, trial, artifact_dir))
            except UnusableMemberError as err:
                reason = f"{name}/trial {trial.number} ({artifact_dir}): {err}"
                skipped.append(reason)
                warnings.warn(f"skipping {reason}", MemberSkippedWarning, stacklevel=3)
            except MemberArtifactError as err:
                raise MemberArtifactError(f"study {name!r}, trial {trial.number}: {err}") from err
    left_out = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    notes = [f"study {name!r}: left out of {len(trials)} trials: {left_out}"] if left_out else []
    if not members:
        raise NoUsableTrialError(
            f"study {name!r} has no usable trial ({len(trials)} trial(s); {left_out or 'none left out'}; "
            f"{len(skipped)} skipped for missing or non-finite artifacts). Run or finish the search first"
            + (", or drop --exclude-early-stopped." if counts["early-stopped (excluded)"] else ".")
        )
    return members, skipped, notes


def load_pool(studies: list[str], storage_url: str, include_early_stopped: bool = True) -> Pool:
    """Every usable trial of ``studies`` (in that order, each by trial number)."""
    if not studies:
        raise EnsembleError("no study given")
    if len(set(studies)) != len(studies):
        raise EnsembleError(f"a study is named twice: {studies}")
    members: list[Member] = []
    skipped: list[str] = []
    notes: list[str] = []
    for name in studies:
        found, passed_over, said = study_members(open_study(name, storage_url), include_early_stopped)
        members += found
        skipped += passed_over
        notes += said
    return Pool(list(studies), members, skipped, notes)


def parse_member_ref(text: str) -> tuple[str, int]:
    """``STUDY/N`` (or ``STUDY/trial N``) -> (study, N)."""
    study, _, trial = text.rpartition("/")
    trial = trial.removeprefix("trial").strip()
    if not study or not trial.isdigit():
        raise EnsembleError(f"a member is named STUDY/N (e.g. sts/0), not {text!r}")
    return study, int(trial)
