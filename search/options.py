"""What a run of a study was started with, and the command line that repeats it."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from search.paths import DEFAULT_RESULTS_DIR
from search.storage import DEFAULT_STORAGE_URL, RESULTS_DIR_ENV, masked_url


@dataclass
class SearchOptions:
    study: str = "sts"
    storage: str = DEFAULT_STORAGE_URL
    results_dir: Path | None = None  # default: $MINBERT_RESULTS, else <project>/results
    data_dir: str | None = None
    address: str | None = None
    num_cpus: int | None = None  # local cluster only; default: all cores
    trials: int | None = None
    max_concurrent: int | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    resume: bool = False
    fresh: bool = False
    name: str | None = None  # Optuna study and results folder name; default: the study file's name
    early_stopping: bool = True  # False: no ASHA, every trial runs max_epochs (to measure what ASHA saves)
    time_budget: float | None = None  # seconds; overrides budget.time, on a resumed run too
    start_rule: str | None = None  # overrides budget.start_rule, on a resumed run too
    model_path: str | None = None  # overrides fixed.model_path when a run starts; a resumed run keeps its model
    top: int = 5


def results_root(options: SearchOptions) -> Path:
    return Path(options.results_dir or os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR).resolve()


def command_line(options: SearchOptions, flag: str) -> str:
    """The run_search.py command for this study with ``flag``, repeating every option that says where
    things are (a resumed run must find the same storage, results, data and cluster). A password in
    the storage URL is masked: give it through ~/.pgpass or $PGPASSWORD instead."""
    words = ["python", "run_search.py", "--study", options.study, flag]
    if options.storage != DEFAULT_STORAGE_URL:
        words += ["--storage", masked_url(options.storage)]
    for option, value in (
        ("--results-dir", options.results_dir),
        ("--data-dir", options.data_dir),
        ("--address", options.address),
        ("--num-cpus", options.num_cpus),
        ("--name", options.name),
    ):
        if value is not None:
            words += [option, str(value)]
    if not options.early_stopping:
        words.append("--no-early-stopping")
    return " ".join(shlex.quote(word) for word in words)
