"""One trial, as Ray Tune runs it: the function trainable that trains one sampled config with
model.train and reports each epoch's dev metrics."""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.atomic import DISK_FULL_ERRNOS
from model.train import train
from search.adapters import TRIAL_NUMBER_KEY, artifact_dir_for
from search.reaper import die_with_parent
from search.records import DiskFullError
from search.spare import threads_for, trial_threads
from search.spec import StudySpec
from search.storage import TRIAL_STOPPED_FOR_TIME
from search.timebudget import next_epoch_fits


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs besides its sampled params (sent to the Ray workers)."""

    study: StudySpec
    artifacts_root: str
    data_dir: str | None = None
    # Optuna trials that had already ended when this driver started: Ray may restart some of them
    # (they ended after its last experiment checkpoint), and they must not train again.
    ended_trials: frozenset[int] = frozenset()
    # time.time() by which the run must end (search.timebudget); None: no time budget.
    deadline: float | None = None
    # Where the driver shares out spare cores (search.spare); None: each trial keeps its own threads.
    threads_file: str | None = None


class OutOfTime(Exception):
    """Raised from a trial's report to end its training: the next epoch would end past the deadline."""


def run_trial(config: dict[str, Any], job: TrialJob) -> None:
    """Ray Tune function trainable: train one sampled config, reporting each epoch's dev metrics."""
    from ray import tune

    die_with_parent()  # this worker ends with its raylet, which ends with the driver
    number = config[TRIAL_NUMBER_KEY]
    output_dir = artifact_dir_for(job.artifacts_root, number)
    history = read_history(output_dir / "metrics.json")
    if number in job.ended_trials:
        # Its record in Optuna is final (e.g. PRUNED after 1 epoch): training on would contradict it.
        # One last report, because Ray refuses a trial that ends without the metric it ranks by.
        tune.report(dict(history[-1]) if history else {"epoch": 0, job.study.metric: float("nan")})
        return
    params = {k: v for k, v in config.items() if k != TRIAL_NUMBER_KEY}
    train_config = job.study.train_config(params, number)
    train_config.setdefault("threads", trial_threads(job.study.budget))
    if job.study.budget.gpus_per_trial > 0:
        # Given a GPU, train on it or fail saying why CUDA is unusable (resolve_device), never
        # quietly on the CPU: a CPU-only torch in the venv and a broken driver look alike otherwise.
        train_config.setdefault("device", "cuda")
    threads = None
    if job.threads_file is not None:
        threads = functools.partial(threads_for, job.threads_file, number, train_config["threads"])
    reported: set[int] = set()

    def replay(record: dict) -> None:
        reported.add(int(record["epoch"]))
        tune.report(dict(record))

    # A trial resumed after an interrupted driver first reports again the epochs its checkpoint holds:
    # an epoch checkpointed but not yet reported when the driver died is not lost (repeats are harmless).
    # The final epoch waits until train() has written the test outputs: a scheduler stops a trial as
    # soon as it sees its final epoch, which would leave a COMPLETE trial without them.
    final = [record for record in history if int(record["epoch"]) >= job.study.budget.max_epochs]
    for record in history:
        if record not in final:
            replay(record)
    last_report = [time.time()]

    def report(metrics: dict) -> None:
        """An epoch just trained: report it with its wall time, and stop when the next would not fit."""
        epoch, now = int(metrics["epoch"]), time.time()
        reported.add(epoch)
        # Evaluation included (the first epoch: the model's load too).
        metrics = {**metrics, "epoch_seconds": round(now - last_report[0], 2)}
        last_report[0] = now
        stop = epoch < job.study.budget.max_epochs and not next_epoch_fits(job.deadline, metrics["epoch_seconds"], now)
        if stop:
            metrics[TRIAL_STOPPED_FOR_TIME] = True
        tune.report(metrics)
        if stop:
            raise OutOfTime(f"trial {number}: no time left for epoch {epoch + 1}")

    try:
        train(train_config, output_dir, report=report, data_dir=job.data_dir, threads=threads)
    except OutOfTime:
        return  # its epochs are reported and checkpointed; the recorder marks it PRUNED (stopped early)
    except OSError as error:
        if error.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(f"trial {number} cannot write its files in {output_dir}: {os.strerror(error.errno)}") from None
        raise
    for record in final:
        if int(record["epoch"]) not in reported:
            replay(record)


def read_history(metrics_file: Path) -> list[dict]:
    """The per-epoch records of a trial's metrics.json ([] when there is none yet)."""
    if not metrics_file.is_file():
        return []
    return list(json.loads(metrics_file.read_text(encoding="utf-8")).get("history", []))


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.config.get(TRIAL_NUMBER_KEY, trial.trial_id)}"
