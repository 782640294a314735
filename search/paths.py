"""Layout under the results folder (``results/<study>/``):
  ray/            Ray Tune's experiment (``storage_path`` = results/<study>, name "ray"); Tuner.restore reads it
  trials/<n>/     output_dir of the trainer for Optuna trial n (config.json, model.safetensors, last.pt, ...)
  ray-tmp/        Ray's temp/session dir for a local cluster (a short /tmp path when this one is too long)
  study.toml      the study file as the run started; a resumed run uses this copy
  finished.json   written when every trial of the budget ended; a rerun without --resume/--fresh then stops
  threads.json    torch threads per running trial while cores are spare (search.spare; local runs only)
The Optuna study (named after the study) lives in the storage (default: SQLite studies/optuna.db).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from search.storage import PROJECT_ROOT

DEFAULT_RESULTS_DIR = PROJECT_ROOT / "results"
EXPERIMENT_NAME = "ray"
# AF_UNIX socket paths hold 107 bytes; Ray puts "session_<date>_<time>_<pid>/sockets/plasma_store" (~64) under its temp dir.
MAX_RAY_TEMP_DIR_CHARS = 40


@dataclass
class StudyPaths:
    root: Path
    experiment: Path = field(init=False)  # the layout above, derived from root
    trials: Path = field(init=False)
    snapshot: Path = field(init=False)
    finished: Path = field(init=False)
    threads: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.experiment = self.root / EXPERIMENT_NAME
        self.trials = self.root / "trials"
        self.snapshot = self.root / "study.toml"
        self.finished = self.root / "finished.json"
        self.threads = self.root / "threads.json"

    def has_run(self) -> bool:
        """Whether a run started here (Ray's temp dir alone, left by a refused start, does not count)."""
        return any(path.exists() for path in (self.snapshot, self.trials, self.experiment, self.finished))

    def ray_temp_dir(self) -> Path:
        preferred = self.root / "ray-tmp"
        if len(str(preferred)) <= MAX_RAY_TEMP_DIR_CHARS:
            return preferred
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:8]
        return Path(tempfile.gettempdir()) / f"ray-{digest}"
