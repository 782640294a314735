"""Loading the CS224N data files, with errors that name the file and line.

Files are tab-separated with a header and CSV-style quoting; they are read the way the
handout's ``datasets.py`` reads them (``csv.DictReader(fp, delimiter='\\t')``).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "MINBERT_DATA"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "datasets"


@dataclass(frozen=True)
class Task:
    """What a task is: its files (the stem of their names, text and label columns), one sentence or a
    pair, what its labels are, how it is scored and its leaderboard column. Code that treats tasks
    differently asks this table (``TASKS[task].label_kind``, ``.is_pair``), never a task's name."""

    stem: str
    text_columns: tuple[str, ...]
    label_column: str
    label_kind: str  # "class" (integers 0..num_classes-1), "binary" (0/1 floats), "score" (0..5 float)
    prediction_column: str  # the leaderboard CSV's header
    num_classes: int = 0
    domain: str = ""  # where its texts come from: unlabelled text of the same domain suits it best

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def metric_name(self) -> str:
        """Accuracy for class and binary labels, Pearson r for scores."""
        return "Pearson r" if self.label_kind == "score" else "accuracy"

    def path(self, split: str, data_dir: str | Path | None = None) -> Path:
        suffix = "test-student" if split == "test" else split
        return resolve_data_dir(data_dir) / f"{self.stem}-{suffix}.csv"


TASKS = {
    "sst": Task("ids-sst", ("sentence",), "sentiment", "class", "Predicted_Sentiment", 5, "movie reviews"),
    "para": Task("quora", ("sentence1", "sentence2"), "is_duplicate", "binary", "Predicted_Is_Paraphrase", 0, "Quora questions"),
    "sts": Task("sts", ("sentence1", "sentence2"), "similarity", "score", "Predicted_Similarity", 0, "captions, news, forums"),
    "cfimdb": Task("ids-cfimdb", ("sentence",), "sentiment", "class", "Predicted_Sentiment", 2, "movie reviews"),
}
SPLITS = ("train", "dev", "test")


@dataclass
class Example:
    id: str
    texts: tuple[str, ...]  # one sentence, or a pair
    label: float | int | None  # None on the unlabelled test split


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The explicit argument, else $MINBERT_DATA, else ./datasets in the project."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def load_examples(task: str, split: str, data_dir: str | Path | None = None) -> list[Example]:
    """Read one split of one task. ``split`` is train, dev or test (the test-student file)."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; known splits: {SPLITS}")
    spec = TASKS[task]
    return read_file(spec.path(split, data_dir), spec, labelled=split != "test")


def read_file(path: str | Path, spec: Task, labelled: bool) -> list[Example]:
    """Parse one file. Unlabelled files may still have a label column; it is then ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found. Put the CS224N data files in {path.parent} "
            f"(`python -m data.fetch --source DIR`), or point --data-dir / ${DATA_DIR_ENV} at them."
        )
    try:
        with open(path, newline="", encoding="utf-8") as fp:
            reader = csv.DictReader(fp, delimiter="\t")
            header = reader.fieldnames or []
            needed = ("id", *spec.text_columns) + ((spec.label_column,) if labelled else ())
            missing = [c for c in needed if c not in header]
            if not header:
                raise DataError(f"{path}: the file is empty; expected a header with columns {list(needed)}")
            if missing:
                raise DataError(f"{path}:1: missing column(s) {missing}; the header has {header}")
            examples, skipped = [], 0
            for row in reader:
                line = reader.line_num
                if None in row or any(row.get(c) is None for c in needed):
                    raise DataError(f"{path}:{line}: the row has the wrong number of fields")
                label = None
                if labelled:
                    raw = row[spec.label_column].strip()
                    if raw == "":  # the handout's loader skips these too; they are counted below
                        skipped += 1
                        continue
                    label = parse_label(raw, spec, f"{path}:{line}")
                texts = tuple(row[c].strip() for c in spec.text_columns)
                examples.append(Example(row["id"].strip(), texts, label))
    except UnicodeDecodeError as err:
        raise DataError(f"{undecodable_position(path)}: not valid UTF-8 text ({err.reason}); re-save the file as UTF-8") from err
    if not examples:
        raise DataError(f"{path}: no data rows after the header")
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} row(s) with an empty {spec.label_column!r}", stacklevel=2)
    return examples


def undecodable_position(path: Path) -> str:
    """``path:line:column`` of the first byte that is not UTF-8. The decoder's own offset counts
    from the start of its read buffer, not of the file, so the file is scanned again line by line."""
    with open(path, "rb") as fp:
        for line_number, raw in enumerate(fp, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(raw[: err.start].decode("utf-8")) + 1
                return f"{path}:{line_number}:{column} (byte {raw[err.start]:#04x})"
    return str(path)  # only a multi-line sequence fails, which a line-by-line decode cannot place


def parse_label(raw: str, spec: Task, where: str) -> float | int:
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"{where}: {spec.label_column} {raw!r} is not a number") from None
    if not math.isfinite(value):  # float() accepts "nan" and "inf"
        raise DataError(f"{where}: {spec.label_column} {raw!r} is not a finite number")
    if spec.label_kind == "class":
        if value != int(value) or not 0 <= value < spec.num_classes:
            raise DataError(f"{where}: {spec.label_column} {raw!r} is not a class in 0..{spec.num_classes - 1}")
        return int(value)
    if spec.label_kind == "binary":
        if value not in (0.0, 1.0):
            raise DataError(f"{where}: {spec.label_column} {raw!r} must be 0 or 1")
        return int(value)
    if not 0.0 <= value <= 5.0:
        raise DataError(f"{where}: {spec.label_column} {raw!r} is outside 0..5")
    return value
