"""The tokenised data splits of a run: each CS224N file encoded as the config's tasks need it
(pairs cross- or bi-encoded), cached on disk by data.tokenize and in memory per process."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from data.files import TASKS, read_file
from data.tokenize import EncodedSplit, Tokenizer, cached_encode
from model.bert import default_model_path
from model.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = REPO_ROOT / "cache" / "tokens"


def model_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.model_path) if cfg.model_path else default_model_path()


@lru_cache(maxsize=4)
def _tokenizer(path: str, max_length: int) -> Tokenizer:
    return Tokenizer(path, max_length)


def get_tokenizer(cfg: TrainConfig) -> Tokenizer:
    return _tokenizer(str(model_dir(cfg)), cfg.max_length)


def encoding_for(task: str, cfg: TrainConfig) -> str:
    # Single sentences encode the same either way; one cache entry serves both.
    return cfg.task_value("pair_encoding", task) if TASKS[task].is_pair else "cross"


def cache_dir_for(cfg: TrainConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else DEFAULT_CACHE_DIR


def limit_split(split: EncodedSplit, limit: int | None) -> EncodedSplit:
    if limit is None or limit >= len(split):
        return split
    labels = None if split.labels is None else split.labels[:limit]
    return EncodedSplit(split.ids[:limit], [view[:limit] for view in split.views], labels)


def load_split(
    cfg: TrainConfig, task: str, split: str, limit: int | None = None, pair_encoding: str | None = None
) -> EncodedSplit:
    """Tokenised rows of one split of the task's CS224N files (see ``load_file``)."""
    return load_file(cfg, task, TASKS[task].path(split, cfg.data_dir), split != "test", limit, pair_encoding)


def load_file(
    cfg: TrainConfig, task: str, source: Path, labelled: bool, limit: int | None = None, pair_encoding: str | None = None
) -> EncodedSplit:
    """Tokenised rows of one CS224N-format file of ``task``, from the token cache when possible (the
    whole file is cached, then the first ``limit`` rows kept, so limits never invalidate the cache)."""
    try:
        stat = source.stat()
    except OSError:
        read_file(source, TASKS[task], labelled)  # raises the DataError that explains what is missing
        raise
    key = (str(source), stat.st_mtime_ns, stat.st_size)
    encoding = pair_encoding or encoding_for(task, cfg)
    encoded = _encoded_file(task, labelled, key, str(model_dir(cfg)), cfg.max_length, encoding, str(cache_dir_for(cfg)))
    return limit_split(encoded, limit)


@lru_cache(maxsize=32)
def _encoded_file(
    task: str, labelled: bool, key: tuple, tokenizer_dir: str, max_length: int, encoding: str, cache_dir: str
) -> EncodedSplit:
    """In-process memo over the disk cache: trials and tests in one process parse each file once.
    ``key`` (path, mtime, size) makes an edited file a new entry. Callers never mutate the result."""
    path = Path(key[0])
    examples = read_file(path, TASKS[task], labelled)
    return cached_encode(_tokenizer(tokenizer_dir, max_length), path, examples, encoding, cache_dir)
