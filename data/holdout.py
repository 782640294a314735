"""Carve a labelled held-out set out of a task's training file, to check a predictor on rows that no
member trained on and no selection saw.

    python -m data.holdout --task para --rows 2000 --dest ../heldout-data     # from $MINBERT_DATA
    MINBERT_DATA=../heldout-data python run_search.py --study para-diverse --name para-heldout
    MINBERT_DATA=../heldout-data python -m ensemble.build --study para-heldout
    python -m ensemble.predict --ensemble results/para-heldout/ensemble/caruana \
        --input ../heldout-data/quora-heldout.csv --compare   # beside the usual recipe and its seeds

The dev set has been looked at by every selection and every design choice, so its out-of-selection
estimates can still flatter; a held-out set is the check that does not. ``--dest`` gets the training
file without ``--rows`` rows drawn at random (``--seed``), those rows as ``<stem>-heldout.csv`` (the
same format, labels included: ``ensemble.predict --input`` prints the metric on it), and a link to each
other data file of the source. Rows are copied byte for byte, each record whole (a quoted field may
span lines), in the file's order. Nothing in ``--dest`` is overwritten.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
from pathlib import Path

from data.atomic import atomic_write_text
from data.fetch import data_file_names
from data.files import TASKS, DataError, resolve_data_dir


def records(path: Path) -> tuple[str, list[str]]:
    """The header line and each record's exact text (one or more lines), as csv reads the file."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    reader = csv.reader(io.StringIO(text), delimiter="\t")
    next(reader, None)
    ends = [reader.line_num for _ in reader]  # the physical line each record ends on (1-based)
    starts = [1, *ends[:-1]]
    return lines[0] if lines else "", ["".join(lines[s:e]) for s, e in zip(starts, ends, strict=True)]


def taken(path: Path) -> bool:
    """Whether something (a file, a folder, a link, even a broken one) is at ``path``."""
    return path.exists() or path.is_symlink()


def heldout_path(task: str, data_dir: Path) -> Path:
    return data_dir / f"{TASKS[task].stem}-heldout.csv"


def carve(task: str, rows: int, source: Path, dest: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``dest``'s training file (the source's without ``rows`` random records) and its held-out
    file (those records); link every other data file of ``source``. Returns both paths."""
    spec = TASKS[task]
    train = spec.path("train", source)
    if not train.is_file():
        raise DataError(f"{train}: file not found; point --source (or $MINBERT_DATA) at the CS224N data")
    header, body = records(train)
    if not 0 < rows < len(body):
        raise DataError(f"{train}: has {len(body)} rows; --rows must be between 1 and {len(body) - 1}, not {rows}")
    new_train, held = spec.path("train", dest), heldout_path(task, dest)
    existing = [p for p in (new_train, held) if taken(p)]
    if existing:
        raise DataError(f"{existing[0]} exists; give --dest an empty folder (nothing there is overwritten)")
    order = list(range(len(body)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:rows])
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(held, header + "".join(r for i, r in enumerate(body) if i in chosen))
    atomic_write_text(new_train, header + "".join(r for i, r in enumerate(body) if i not in chosen))
    for name in data_file_names():
        other, link = source / name, dest / name
        if other.is_file() and name != new_train.name and not taken(link):
            link.symlink_to(other.resolve())
    return new_train, held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.holdout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--rows", type=int, required=True, help="training rows to hold out")
    parser.add_argument("--dest", type=Path, required=True, help="the new data folder (empty, or without these files)")
    parser.add_argument("--source", type=Path, help="the CS224N data folder (default: $MINBERT_DATA, else ./datasets)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    args = parser.parse_args(argv)
    source = resolve_data_dir(args.source)
    try:
        train, held = carve(args.task, args.rows, source, args.dest, args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {train} and {held} ({args.rows} rows held out); other files linked from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
