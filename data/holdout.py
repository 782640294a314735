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
other data file of the source. Identical rows (the same texts, a pair's in either order, case and spacing
aside) are held out or kept together, so a held-out row is not also trained on; the count held out is
then the closest to ``--rows`` that whole groups make. Held-out rows that dev or test also have are
counted (and kept). Rows are copied byte for byte, each record whole, in the file's order; both files
are read back and must hold the source's rows. Nothing in ``--dest`` is overwritten.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from data.atomic import atomic_write_text
from data.fetch import data_file_names
from data.files import TASKS, DataError, Example, numbered_rows, read_file, resolve_data_dir


def records(path: Path) -> tuple[str, list[str]]:
    """The header line and each record's exact text (blank lines left out). Only a line feed ends a line, as
    for csv: a CRLF end stays with its record, and U+2028, form feeds and the like stay inside their text."""
    text = path.read_bytes().decode("utf-8")  # no newline translation: the same bytes go out
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    for number, line in enumerate(lines, 1):
        if "\r" in line.removesuffix("\n").removesuffix("\r"):  # read with newline="", csv would end a line there
            raise DataError(
                f"{path}:{number}: a carriage return inside the line; remove it, or end every line with \\n or \\r\\n"
            )
    reader = csv.reader(lines, delimiter="\t")
    next(reader, None)
    header = "".join(lines[: reader.line_num])
    body = ["".join(lines[start - 1 : end]) for start, end, _ in numbered_rows(reader, path)]
    if body and not body[-1].endswith("\n"):  # the last line, unended: it may not stay last
        body[-1] += "\r\n" if header.endswith("\r\n") else "\n"
    return header, body


def taken(path: Path) -> bool:
    """Whether something (a file, a folder, a link, even a broken one) is at ``path``."""
    return path.exists() or path.is_symlink()


def heldout_path(task: str, data_dir: Path) -> Path:
    return data_dir / f"{TASKS[task].stem}-heldout.csv"


def same_texts(example: Example) -> tuple[str, ...]:
    """What identical rows share: their texts, case and spacing aside, a pair's in either order."""
    return tuple(sorted(" ".join(text.lower().split()) for text in example.texts))


def draw_groups(examples: list[Example], rows: int, seed: int) -> set[int]:
    """About ``rows`` row indices drawn at random in whole groups of identical rows: groups in a random order,
    each taken while it fits; then, when short, one more if that comes closer. All groups of one row: the
    first ``rows`` of a shuffled ``range``, as before groups were drawn."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(same_texts(example), []).append(index)
    members = list(groups.values())
    order = list(range(len(members)))
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    for group in order:
        if len(chosen) + len(members[group]) <= rows:
            chosen += members[group]
    picked, short = set(chosen), rows - len(chosen)
    smallest = min((group for group in members if group[0] not in picked), key=len, default=[])
    if short and smallest and len(smallest) - short < short:  # overshooting by less than the shortfall
        picked.update(smallest)
    return picked


def read_back(path: Path, task: str, expected: list[str]) -> None:
    """DataError unless ``path`` reads as the rows of ids ``expected``, in order."""
    found = [e.id for e in read_file(path, TASKS[task], labelled=True, keep_unlabelled=True)]
    if found != expected:
        raise DataError(
            f"{path}: read back as rows {found[:3]}... ({len(found)}), not the source's {expected[:3]}... ({len(expected)}): "
            "records were cut in the wrong places; both files are removed (report this with the source file)"
        )


@dataclass
class Carved:
    """What ``carve`` wrote: the files, the rows held out and how many of them dev or test also have."""

    train: Path
    held: Path
    rows: int
    also_in: dict[str, int]  # split (dev, test: those the source has) -> held-out rows whose texts it has


def carve(task: str, rows: int, source: Path, dest: Path, seed: int = 0) -> Carved:
    """Write ``dest``'s training file (the source's without about ``rows`` random records, in whole groups of
    identical rows) and its held-out file (those records); link every other data file of ``source``."""
    spec = TASKS[task]
    train = spec.path("train", source)
    if not train.is_file():
        raise DataError(f"{train}: file not found; point --source (or $MINBERT_DATA) at the CS224N data")
    examples = read_file(train, spec, labelled=True, keep_unlabelled=True)  # a malformed file fails here, with its line
    header, body = records(train)
    if not 0 < rows < len(body):
        raise DataError(f"{train}: has {len(body)} rows; --rows must be between 1 and {len(body) - 1}, not {rows}")
    new_train, held = spec.path("train", dest), heldout_path(task, dest)
    existing = [p for p in (new_train, held) if taken(p)]
    if existing:
        raise DataError(f"{existing[0]} exists; give --dest an empty folder (nothing there is overwritten)")
    chosen = draw_groups(examples, rows, seed)
    if not 0 < len(chosen) < len(body):
        raise DataError(
            f"{train}: whole groups of identical rows come closest to {rows} row(s) with {len(chosen)} of {len(body)}; "
            "ask for another --rows"
        )
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(held, header + "".join(r for i, r in enumerate(body) if i in chosen))
    atomic_write_text(new_train, header + "".join(r for i, r in enumerate(body) if i not in chosen))
    try:
        read_back(held, task, [e.id for i, e in enumerate(examples) if i in chosen])
        read_back(new_train, task, [e.id for i, e in enumerate(examples) if i not in chosen])
    except DataError:
        new_train.unlink()
        held.unlink()
        raise
    for name in data_file_names():
        other, link = source / name, dest / name
        if other.is_file() and name != new_train.name and not taken(link):
            link.symlink_to(other.resolve())
    return Carved(new_train, held, len(chosen), overlaps(task, source, [examples[i] for i in sorted(chosen)]))


def overlaps(task: str, source: Path, held: list[Example]) -> dict[str, int]:
    """{split: how many ``held`` rows have the texts of one of its rows} for the dev and test files ``source`` has."""
    found = {}
    for split in ("dev", "test"):
        path = TASKS[task].path(split, source)
        if path.is_file():
            texts = {same_texts(e) for e in read_file(path, TASKS[task], labelled=False)}
            found[split] = sum(same_texts(e) in texts for e in held)
    return found


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
        carved = carve(args.task, args.rows, source, args.dest, args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    asked = "" if carved.rows == args.rows else f"; {args.rows} asked for, but identical rows go together"
    print(f"wrote {carved.train} and {carved.held} ({carved.rows} rows held out{asked}); other files linked from {source}")
    if carved.also_in:
        counts = " and ".join(f"{n} in {split}" for split, n in carved.also_in.items())
        print(f"held-out rows also appear in dev or test (same texts; kept, not dropped): {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
