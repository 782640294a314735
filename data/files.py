"""Loading the CS224N data files, with errors that name the file and line.

Files are tab-separated with a header and CSV-style quoting; they are read the way the
handout's ``datasets.py`` reads them (``csv.DictReader(fp, delimiter='\\t')``).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Iterator
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


# What a tab or line break inside a field, or a field too large for csv, means in these files.
UNBALANCED_QUOTE = 'an unbalanced quote? Double it ("") or quote the whole field'


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


def read_file(path: str | Path, spec: Task, labelled: bool, keep_unlabelled: bool = False) -> list[Example]:
    """Parse one file. Unlabelled files may still have a label column; it is then ignored. In a labelled file
    a row whose label is empty is skipped, as the handout's loader skips it, or with ``keep_unlabelled``
    kept with the label None (a file to predict: every row needs a prediction)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: file not found. Put the CS224N data files in {path.parent} "
            f"(`python -m data.fetch --source DIR`), or point --data-dir / ${DATA_DIR_ENV} at them."
        )
    needed = ("id", *spec.text_columns) + ((spec.label_column,) if labelled else ())
    try:
        with open(path, newline="", encoding="utf-8-sig") as fp:  # -sig: a byte order mark is not part of the header
            reader = csv.reader(fp, delimiter="\t")
            header = next(reader, [])
            if not header:
                raise DataError(f"{path}: the file is empty; expected a header with columns {list(needed)}")
            check_header(path, header, needed)
            examples, skipped, first_line = [], 0, {}
            for start, end, row in numbered_rows(reader, path):
                where = f"{path}:{start}"
                check_fields(where, header, row, end if end > start else None)
                fields = dict(zip(header, row, strict=True))
                row_id = fields["id"].strip()
                if not row_id:
                    raise DataError(f"{where}: the id is empty; give every row an id of its own")
                if row_id in first_line:  # outputs are matched to rows by id
                    raise DataError(
                        f"{where}: id {row_id!r} is repeated (first on line {first_line[row_id]}); give every row its own id"
                    )
                first_line[row_id] = start
                label = None
                if labelled:
                    raw = fields[spec.label_column].strip()
                    if raw == "" and not keep_unlabelled:  # the handout's loader skips these too; they are counted below
                        skipped += 1
                        continue
                    label = parse_label(raw, spec, where) if raw else None
                examples.append(Example(row_id, tuple(fields[c].strip() for c in spec.text_columns), label))
    except UnicodeDecodeError as err:
        raise DataError(f"{undecodable_position(path)}: not valid UTF-8 text ({err.reason}); re-save the file as UTF-8") from err
    if skipped and not examples:
        raise DataError(f"{path}: all {skipped} rows have an empty {spec.label_column!r}; fill in the labels, or drop the column")
    if not examples:
        raise DataError(f"{path}: no data rows after the header")
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} row(s) with an empty {spec.label_column!r}", stacklevel=2)
    return examples


def numbered_rows(reader: Iterator[list[str]], path: Path) -> Iterator[tuple[int, int, list[str]]]:
    """Each record of a csv reader after the header, with its first and last line (1-based; a quoted field
    may run on over several lines); blank lines are skipped, as csv.DictReader skips them."""
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader, None)
        except csv.Error as err:  # e.g. a field over csv's size limit: a quote left open swallows the rest of the file
            raise DataError(f"{path}:{start}: {err}: {UNBALANCED_QUOTE}") from None
        if row is None:
            return
        if row:
            yield start, reader.line_num, row


def check_header(path: Path, header: list[str], needed: tuple[str, ...]) -> None:
    """DataError unless ``header`` (the first line, split at tabs) names every column in ``needed``."""
    if len(header) == 1 and "," in header[0]:
        raise DataError(
            f"{path}:1: the header is one field with commas ({header[0]!r}): the file must be tab-separated; "
            "re-save it with tabs between the columns"
        )
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {missing}; the header has {header}")


def check_fields(where: str, header: list[str], row: list[str], last_line: int | None) -> None:
    """DataError unless the record read at ``where`` (``path:line``, its first line; ``last_line`` when it
    runs on over more lines) has one field per column and no tab or line break in a field. No CS224N text
    holds one: there it is a quote left open, which makes csv take the following rows (tabs and line ends
    included) into one field."""
    runs_on = f" (the record runs to line {last_line})" if last_line else ""
    for index, field in enumerate(row):
        if "\t" in field or "\n" in field or "\r" in field:
            column = repr(header[index]) if index < len(header) else f"field {index + 1}"
            raise DataError(f"{where}: {column} holds a tab or a line break{runs_on}: {UNBALANCED_QUOTE}")
    if len(row) != len(header):
        raise DataError(
            f"{where}: the row has {len(row)} fields; the header has {len(header)}{runs_on}: put one tab between fields"
        )


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
