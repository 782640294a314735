"""data.holdout: a labelled held-out set carved out of a training file, byte for byte."""

from __future__ import annotations

import pytest

from data.files import TASKS, DataError, load_examples
from data.holdout import carve, main

HEADER = "\tid\tsentence1\tsentence2\tsimilarity\n"
# Record 3 holds a quoted field that spans two lines: it must move whole.
RECORDS = [f"{i}\tid{i}\tA man plays {i}.\tSomeone plays {i}.\t{i % 6}.0\n" for i in range(9)]
RECORDS[3] = '3\tid3\t"a ""quoted""\nline"\tother\t3.0\n'


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "sts-train.csv").write_text(HEADER + "".join(RECORDS), encoding="utf-8")
    (folder / "sts-dev.csv").write_text(HEADER + RECORDS[0], encoding="utf-8")
    return folder


def test_held_out_rows_leave_the_training_file_whole_and_byte_for_byte(source, tmp_path):
    dest = tmp_path / "heldout"
    train, held = carve("sts", 3, source, dest, seed=5)
    kept, out = train.read_text(encoding="utf-8"), held.read_text(encoding="utf-8")
    assert kept.startswith(HEADER) and out.startswith(HEADER)
    kept_records = [r for r in RECORDS if r in kept]
    held_records = [r for r in RECORDS if r in out]
    assert len(held_records) == 3 and len(kept_records) == 6  # every record in exactly one file, whole
    assert kept == HEADER + "".join(kept_records) and out == HEADER + "".join(held_records)  # in the file's order
    assert [e.id for e in load_examples("sts", "train", dest)] == [r.split("\t")[1] for r in kept_records]
    assert (dest / "sts-dev.csv").resolve() == (source / "sts-dev.csv").resolve()  # the other files are links
    again = carve("sts", 3, source, tmp_path / "again", seed=5)[1].read_text(encoding="utf-8")
    assert again == out  # the draw is the seed's
    assert carve("sts", 3, source, tmp_path / "other", seed=6)[1].read_text(encoding="utf-8") != out
    assert held.name == f"{TASKS['sts'].stem}-heldout.csv"


def test_bad_requests_are_refused_and_nothing_is_overwritten(source, tmp_path, capsys):
    dest = tmp_path / "heldout"
    carve("sts", 2, source, dest)
    before = (dest / "sts-train.csv").read_text(encoding="utf-8")
    with pytest.raises(DataError, match="sts-train.csv exists; give --dest an empty folder"):
        carve("sts", 2, source, dest)
    assert (dest / "sts-train.csv").read_text(encoding="utf-8") == before
    with pytest.raises(DataError, match=r"has 9 rows; --rows must be between 1 and 8, not 9"):
        carve("sts", 9, source, tmp_path / "too-many")
    assert main(["--task", "para", "--rows", "1", "--source", str(source), "--dest", str(tmp_path / "x")]) == 1
    assert "quora-train.csv: file not found" in capsys.readouterr().err
