"""The folder of one training run (a search trial's artifact dir): the one place that knows its layout.

  config.json                          {"train": TrainConfig fields, "bert": BertConfig fields}
  model.safetensors                    the best epoch's weights
  last.pt                              the resume state (weights, optimizer, data streams, RNGs)
  metrics.json                         {"best_epoch", "best", "history"}
  outputs/<task>-<split>.npz           ids, values[, labels]: the raw outputs that ensembles average
  outputs/epochs/<task>-dev-<e>.npz    the same for the dev set after every epoch e (1, 2, ...), so that
                                       an ensemble can choose the epoch on part of dev only
  predictions/<task>-<split>-out.csv   the same outputs in the leaderboard format

The trainer writes these, and the ensembles and the predictor read them, only through ``RunDir``.
Every file is written atomically (data.atomic): a crash never leaves half a file that a reader trusts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from data.atomic import atomic_write, atomic_write_text
from model.metrics import write_predictions

# One task's saved outputs: ids (N,), values (N,) or (N, C), and labels (N,), None on an unlabelled split.
TaskOutputs = dict[str, np.ndarray | None]


class RunFileError(ValueError):
    """A run folder's file is missing, unreadable or malformed; the message names the file."""


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        # --- the layout
        self.config_file = self.path / "config.json"
        self.weights_file = self.path / "model.safetensors"
        self.state_file = self.path / "last.pt"
        self.metrics_file = self.path / "metrics.json"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def outputs_file(self, task: str, split: str) -> Path:
        return self.path / "outputs" / f"{task}-{split}.npz"

    def epoch_outputs_file(self, task: str, epoch: int) -> Path:
        return self.path / "outputs" / "epochs" / f"{task}-dev-{epoch}.npz"

    def predictions_file(self, task: str, split: str) -> Path:
        return self.path / "predictions" / f"{task}-{split}-out.csv"

    def has_outputs(self, tasks: list[str], split: str) -> bool:
        return all(self.outputs_file(task, split).is_file() for task in tasks)

    # --- writing

    def write_json(self, path: Path, data: dict) -> None:
        atomic_write_text(path, json.dumps(data, indent=2) + "\n")

    def write_config(self, train: dict, bert: dict) -> None:
        self.write_json(self.config_file, {"train": train, "bert": bert})

    def write_metrics(self, summary: dict) -> None:
        self.write_json(self.metrics_file, summary)

    def save_weights(self, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(self.weights_file, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def save_state(self, state: dict) -> None:
        atomic_write(self.state_file, lambda tmp: torch.save(state, tmp))

    def write_outputs(self, split: str, outputs: dict[str, TaskOutputs]) -> None:
        """outputs/<task>-<split>.npz and predictions/<task>-<split>-out.csv for each task."""
        for task, out in outputs.items():
            write_npz_outputs(self.outputs_file(task, split), out)
            write_predictions(self.predictions_file(task, split), task, out["ids"], out["values"])

    def write_epoch_outputs(self, epoch: int, outputs: dict[str, TaskOutputs]) -> None:
        """outputs/epochs/<task>-dev-<epoch>.npz for each task: the dev outputs after that epoch."""
        for task, out in outputs.items():
            write_npz_outputs(self.epoch_outputs_file(task, epoch), out)

    def clear_run_files(self) -> None:
        """Delete the per-epoch dev outputs and the test outputs of a run that was here before: a new run
        overwrites the weights, metrics and dev outputs at its first epoch, but writes test outputs last, so
        a run stopped before them and resumed would find the old run's and pass them off as its own."""
        for pattern in ("outputs/epochs/*.npz", "outputs/*-test.npz", "predictions/*-test-out.csv"):
            for path in self.path.glob(pattern):
                path.unlink()

    # --- reading

    def read_json(self, path: Path) -> dict:
        if not path.is_file():
            raise RunFileError(f"{path}: not found; is {self.path} the folder of a training run?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise RunFileError(f"{path}: unreadable ({err})") from err
        if not isinstance(data, dict):
            raise RunFileError(f"{path}: expected a JSON object")
        return data

    def read_config(self) -> dict:
        """config.json, checked to hold a "train" and a "bert" section."""
        config = self.read_json(self.config_file)
        if not isinstance(config.get("train"), dict) or not isinstance(config.get("bert"), dict):
            raise RunFileError(f"{self.config_file}: expected an object with 'train' and 'bert' sections")
        return config

    def read_metrics(self) -> dict:
        return self.read_json(self.metrics_file)

    def load_weights(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if not self.weights_file.is_file():
            raise RunFileError(f"{self.weights_file}: not found; is {self.path} the folder of a training run?")
        return load_file(str(self.weights_file), device=str(device))

    def load_state(self, device: str | torch.device) -> dict:
        """last.pt, loaded without unpickling code (weights_only)."""
        try:
            return torch.load(self.state_file, map_location=device, weights_only=True)
        except Exception as err:
            raise RunFileError(f"{self.state_file}: cannot read the checkpoint ({err})") from err

    def read_outputs(self, task: str, split: str) -> TaskOutputs:
        """outputs/<task>-<split>.npz (no pickles), with its shapes checked; labels None when absent."""
        return read_npz_outputs(self.outputs_file(task, split))

    def output_epochs(self, task: str) -> list[int]:
        """The epochs whose dev outputs of ``task`` were kept (outputs/epochs/), in order; [] for a run
        written before they were."""
        found = self.path.glob(f"outputs/epochs/{task}-dev-*.npz")
        return sorted(int(e) for e in (p.name.removesuffix(".npz").rpartition("-")[2] for p in found) if e.isdigit())

    def read_epoch_outputs(self, task: str, epoch: int) -> TaskOutputs:
        return read_npz_outputs(self.epoch_outputs_file(task, epoch))


def write_npz_outputs(path: Path, outputs: TaskOutputs) -> None:
    arrays = {k: np.asarray(v) for k, v in outputs.items() if v is not None}
    atomic_write(path, lambda tmp: save_npz(tmp, arrays))


def read_npz_outputs(path: Path) -> TaskOutputs:
    """One outputs .npz (no pickles), with its shapes checked; labels None when absent."""
    if not path.is_file():
        raise RunFileError(f"{path}: missing")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as err:  # zip, header and dtype errors all mean the same thing here
        raise RunFileError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    for key in ("ids", "values"):
        if key not in arrays:
            raise RunFileError(f"{path}: no {key!r} array (it has {sorted(arrays)})")
    ids, values, labels = arrays["ids"].astype(str), arrays["values"], arrays.get("labels")
    if len(ids) == 0 or len(values) != len(ids) or (labels is not None and len(labels) != len(ids)):
        raise RunFileError(f"{path}: {len(ids)} ids, {len(values)} values, labels {None if labels is None else len(labels)}")
    return {"ids": ids, "values": values, "labels": labels}


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fp:  # a file object: np.savez would add ".npz" to a bare name
        np.savez(fp, **arrays)
