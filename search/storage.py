"""Where the Optuna records of the searches live, and how to open them safely.

The default is one SQLite file under ``studies/``; ``--storage`` takes any SQLAlchemy URL (PostgreSQL for
several machines). Names of the attributes written on studies and trials are defined here so that readers
(the ensemble builder, reports) and the writer (search.tune) agree.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from pathlib import Path

import optuna
import sqlalchemy

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB_PATH = PROJECT_ROOT / "studies" / "optuna.db"
DEFAULT_STORAGE_URL = f"sqlite:///{DEFAULT_DB_PATH}"
RESULTS_DIR_ENV = "MINBERT_RESULTS"  # where run_search.py writes results (default: <project>/results)

# A dashboard (or another reader) holding the SQLite lock briefly must make a writer wait, not fail.
SQLITE_BUSY_TIMEOUT_S = 60
# Seconds to reach a database server before giving up with an error.
CONNECT_TIMEOUT_S = 10

# Study-level user attributes.
STUDY_METRIC = "metric"  # trainer metric key of the objective, e.g. "sts" or "overall"
STUDY_TASKS = "tasks"  # list of task names that train
STUDY_FILE = "study_file"  # absolute path of the studies/*.toml file
STUDY_MODEL_PATH = "model_path"  # absolute path of the BERT directory the run started with (None: the embedded one)

# Trial-level user attributes.
TRIAL_ARTIFACT_DIR = "artifact_dir"  # absolute path of the trainer output_dir of the trial
TRIAL_EPOCHS_RUN = "epochs_run"  # number of epochs that reported a dev evaluation
TRIAL_EARLY_STOPPED = "early_stopped"  # True when ASHA stopped the trial (the trial is then PRUNED)
TRIAL_BEST_EPOCH = "best_epoch"  # the epoch whose weights the trainer kept (model.safetensors)
TRIAL_BEST_VALUE = "best_value"  # the objective's dev value at that epoch (= value of a COMPLETE trial)
TRIAL_ERROR = "error"  # error message of a FAIL trial
TRIAL_RAY_ID = "ray_trial_id"
# True when the trial stopped early because its next epoch would have ended past the time budget
# (also the key of the trial's last report that says so).
TRIAL_STOPPED_FOR_TIME = "stopped_for_time"


class StorageError(RuntimeError):
    """The Optuna storage cannot be used; the message is one line naming the URL, its password masked."""


def masked_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable: mask whatever sits between "user:" and "@"
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def sqlite_file(url: str) -> Path | None:
    """The database file of a sqlite:/// URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def storage_exists(url: str) -> bool:
    """False only when the URL names a SQLite file that does not exist yet (a server is assumed to)."""
    path = sqlite_file(url)
    return path is None or path.is_file()


def describe_error(url: str, error: BaseException) -> str:
    """One line: the masked URL and the driver's own reason, without SQLAlchemy's SQL, links or the password."""
    reason = getattr(error, "orig", None) or error
    text = " ".join(line.strip() for line in str(reason).splitlines() if line.strip())
    password = None
    with contextlib.suppress(Exception):
        password = sqlalchemy.engine.make_url(url).password
    if password:
        text = text.replace(str(password), "***")
    return f"{masked_url(url)}: {type(reason).__name__}: {text}" if text else f"{masked_url(url)}: {type(reason).__name__}"


def storage_failure(error: BaseException) -> BaseException | None:
    """The database error behind ``error`` (Ray Tune re-raises a callback's exception as a TuneError
    whose context is the original), or None when the storage is not the cause."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, sqlalchemy.exc.SQLAlchemyError):
            return current
        todo += [current.__cause__, current.__context__]
    return None


def check_sqlite_folder(url: str, path: Path) -> None:
    """The folder of a SQLite database must exist: only the default storage's is created (a typo in a
    path the user typed must not become a tree of new folders, even for root)."""
    folder = path.parent
    if folder.is_dir():
        return
    if folder.exists():
        raise StorageError(f"{masked_url(url)}: {folder} is not a folder")
    if path.resolve() != DEFAULT_DB_PATH.resolve():
        raise StorageError(f"{masked_url(url)}: the folder {folder} does not exist; create it first, or give another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(f"{masked_url(url)}: cannot create its folder: {error}") from None


def check_storage(url: str) -> None:
    """StorageError now, before a run starts Ray or writes anything, when the storage cannot be opened,
    or (a SQLite file not there yet) created; the file itself is not created."""
    path = sqlite_file(url)
    if path is None or path.is_file():
        open_storage(url, create=False)
        return
    check_sqlite_folder(url, path)
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise StorageError(f"{masked_url(url)}: cannot create a file in {path.parent}: {error.strerror}") from None


def open_storage(url: str = DEFAULT_STORAGE_URL, create: bool = True) -> optuna.storages.RDBStorage:
    """Open the Optuna RDB storage at a SQLAlchemy URL; ``create=False`` never creates a SQLite file.

    Every failure (bad URL, missing driver, unreachable server, wrong credentials) is a StorageError
    whose message is one line naming the URL with its password masked."""
    engine_kwargs: dict = {}
    path = sqlite_file(url)
    if path is not None:
        if not create and not path.is_file():
            raise StorageError(f"{masked_url(url)}: no such database file")
        check_sqlite_folder(url, path)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    elif url.startswith(("postgresql", "postgres")):
        # An unreachable server must fail within seconds, not after the OS's TCP timeout.
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError as error:
        hint = (
            ' (pip install -e ".[postgres]" installs psycopg 3, the driver of postgresql:// URLs)'
            if url.startswith("postgres")
            else ""
        )
        cause = error.__cause__ or error
        raise StorageError(f"{masked_url(url)}: the database driver is not installed: {cause}{hint}") from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError) as error:
        raise StorageError(f"cannot open the Optuna storage {describe_error(url, error)}") from None


def study_in_storage(name: str, url: str) -> bool:
    """Whether the storage holds a study of this name, without creating a SQLite file that is not there."""
    if not storage_exists(url):
        return False
    return name in optuna.study.get_all_study_names(open_storage(url, create=False))


def load_optuna_study(name: str, url: str = DEFAULT_STORAGE_URL) -> optuna.Study:
    """Load an existing study by name; KeyError naming the study and storage when it does not exist."""
    if not storage_exists(url):
        raise KeyError(f"no study named {name!r} in {masked_url(url)} (the database file does not exist)")
    storage = open_storage(url, create=False)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError as error:
        known = optuna.study.get_all_study_names(storage)
        raise KeyError(f"no study named {name!r} in {masked_url(url)} (studies there: {known})") from error
