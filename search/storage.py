"""Where the Optuna records of the searches live, and how to open them safely.

The default is one SQLite file under ``studies/``; ``--storage`` takes any SQLAlchemy URL (PostgreSQL for
several machines). Names of the attributes written on studies and trials are defined here so that readers
(the ensemble builder, reports) and the writer (search.tune) agree.
"""

from __future__ import annotations

from pathlib import Path

import optuna

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB_PATH = PROJECT_ROOT / "studies" / "optuna.db"
DEFAULT_STORAGE_URL = f"sqlite:///{DEFAULT_DB_PATH}"

# A dashboard (or another reader) holding the SQLite lock briefly must make a writer wait, not fail.
SQLITE_BUSY_TIMEOUT_S = 60

# Study-level user attributes.
STUDY_METRIC = "metric"  # trainer metric key of the objective, e.g. "sts" or "overall"
STUDY_DIRECTION = "direction"  # "maximize" or "minimize"
STUDY_TASKS = "tasks"  # list of task names that train
STUDY_FILE = "study_file"  # absolute path of the studies/*.toml file

# Trial-level user attributes.
TRIAL_ARTIFACT_DIR = "artifact_dir"  # absolute path of the trainer output_dir of the trial
TRIAL_EPOCHS_RUN = "epochs_run"  # number of epochs that reported a dev evaluation
TRIAL_EARLY_STOPPED = "early_stopped"  # True when ASHA stopped the trial (the trial is then PRUNED)
TRIAL_BEST_EPOCH = "best_epoch"  # the epoch whose weights the trainer kept (model.safetensors)
TRIAL_BEST_VALUE = "best_value"  # the objective's dev value at that epoch (= value of a COMPLETE trial)
TRIAL_ERROR = "error"  # error message of a FAIL trial
TRIAL_RAY_ID = "ray_trial_id"


def open_storage(url: str = DEFAULT_STORAGE_URL) -> optuna.storages.RDBStorage:
    """Open (creating if needed) the Optuna RDB storage at a SQLAlchemy URL."""
    engine_kwargs: dict = {}
    if url.startswith("sqlite:///"):
        db_path = Path(url[len("sqlite:///") :])
        if str(db_path) not in ("", ":memory:"):
            db_path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def load_study(name: str, url: str = DEFAULT_STORAGE_URL) -> optuna.Study:
    """Load an existing study by name; KeyError naming the study and storage when it does not exist."""
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError as error:
        known = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
        raise KeyError(f"no study named {name!r} in {url} (studies there: {known})") from error
