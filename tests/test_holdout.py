"""data.holdout: a labelled held-out set carved out of a training file, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from data import holdout
from data.files import TASKS, DataError, load_examples
from data.holdout import carve, main, records

HEADER = "\tid\tsentence1\tsentence2\tsimilarity\n"
# Record 3 holds a quoted field: it must move whole, quotes and all.
RECORDS = [f"{i}\tid{i}\tA man plays {i}.\tSomeone plays {i}.\t{i % 6}.0\n" for i in range(9)]
RECORDS[3] = '3\tid3\t"a ""quoted"" line"\tother\t3.0\n'


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "sts-train.csv").write_text(HEADER + "".join(RECORDS), encoding="utf-8")
    (folder / "sts-dev.csv").write_text(HEADER + RECORDS[0], encoding="utf-8")
    return folder


def test_held_out_rows_leave_the_training_file_whole_and_byte_for_byte(source, tmp_path):
    dest = tmp_path / "heldout"
    carved = carve("sts", 3, source, dest, seed=5)
    train, held = carved.train, carved.held
    assert carved.rows == 3 and carved.also_in == {"dev": 0}  # no test file in the source
    kept, out = train.read_text(encoding="utf-8"), held.read_text(encoding="utf-8")
    assert kept.startswith(HEADER) and out.startswith(HEADER)
    kept_records = [r for r in RECORDS if r in kept]
    held_records = [r for r in RECORDS if r in out]
    assert len(held_records) == 3 and len(kept_records) == 6  # every record in exactly one file, whole
    assert kept == HEADER + "".join(kept_records) and out == HEADER + "".join(held_records)  # in the file's order
    assert [e.id for e in load_examples("sts", "train", dest)] == [r.split("\t")[1] for r in kept_records]
    assert (dest / "sts-dev.csv").resolve() == (source / "sts-dev.csv").resolve()  # the other files are links
    again = carve("sts", 3, source, tmp_path / "again", seed=5).held.read_text(encoding="utf-8")
    assert again == out  # the draw is the seed's
    assert carve("sts", 3, source, tmp_path / "other", seed=6).held.read_text(encoding="utf-8") != out
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


SST_HEADER = "\tid\tsentence\tsentiment\r\n"
# CRLF line ends, and in the texts characters that str.splitlines takes for line breaks and csv does not.
SST_RECORDS = [f"{i}\ts{i}\tline {i}\u2028separator\x85next\x0cfeed\x0b\x1c\x1d\x1e end\t{i % 5}\r\n" for i in range(8)]
SST_RECORDS[2] = '2\ts2\t"a ""quoted"" one"\t2\r\n'


def test_only_line_feeds_end_records_and_crlf_files_come_out_byte_for_byte(tmp_path):
    source = tmp_path / "data"
    source.mkdir()
    (source / "ids-sst-train.csv").write_bytes((SST_HEADER + "".join(SST_RECORDS)).encode("utf-8"))
    carved = carve("sst", 3, source, tmp_path / "heldout", seed=1)
    kept, out = carved.train.read_bytes().decode("utf-8"), carved.held.read_bytes().decode("utf-8")
    held_records = [r for r in SST_RECORDS if r in out]
    kept_records = [r for r in SST_RECORDS if r in kept]
    assert len(held_records) == 3 and len(kept_records) == 5
    assert out == SST_HEADER + "".join(held_records) and kept == SST_HEADER + "".join(kept_records)
    assert [e.id for e in load_examples("sst", "train", carved.train.parent)] == [r.split("\t")[1] for r in kept_records]
    assert load_examples("sst", "train", source)[0].texts == ("line 0\u2028separator\x85next\x0cfeed\x0b\x1c\x1d\x1e end",)


def test_a_lone_carriage_return_is_refused_with_its_line(tmp_path):
    source = tmp_path / "data"
    source.mkdir()
    records = [f"{i}\ts{i}\ttext {i}\t1\n" for i in range(5)]
    records[2] = "2\ts2\thalf\t1\r5\ts5\tway\t2\n"  # csv, reading as read_file does, sees two good rows
    (source / "ids-sst-train.csv").write_bytes((SST_HEADER.replace("\r", "") + "".join(records)).encode("utf-8"))
    with pytest.raises(DataError, match=r"ids-sst-train.csv:4: a carriage return inside the line"):
        carve("sst", 2, source, tmp_path / "heldout")
    assert not (tmp_path / "heldout" / "ids-sst-train.csv").exists()


def test_files_that_do_not_read_back_as_the_source_rows_are_refused_and_removed(source, tmp_path, monkeypatch):
    def shifted(path):  # records out of step with the rows, as cutting at other characters than line feeds left them
        header, body = records(path)
        return header, [*body[1:], body[0]]

    monkeypatch.setattr(holdout, "records", shifted)
    dest = tmp_path / "heldout"
    with pytest.raises(DataError, match=r"read back as rows .* not the source's"):
        carve("sts", 3, source, dest, seed=5)
    assert not (dest / "sts-train.csv").exists() and not (dest / "sts-heldout.csv").exists()


# Texts of 14 rows: row 0's pair is repeated twice (its order swapped, other case and spacing), row 3's once.
PAIRS = [(f"Text {i} here.", f"Other {i}.") for i in range(14)]
PAIRS[5] = ("other 0.", "  TEXT 0   here.")
PAIRS[9] = PAIRS[0]
PAIRS[11] = ("text 3 HERE.", "Other 3.")


def sts_source(folder: Path, pairs: list[tuple[str, str]]) -> Path:
    folder.mkdir()
    rows = [f"{i}\tid{i}\t{a}\t{b}\t{i % 6}.0\n" for i, (a, b) in enumerate(pairs)]
    (folder / "sts-train.csv").write_text(HEADER + "".join(rows), encoding="utf-8")
    return folder


def held_rows(path: Path) -> set[int]:
    """The row numbers (ids ``id<N>``) in a held-out file."""
    return {int(line.split("\t")[1][2:]) for line in path.read_text(encoding="utf-8").splitlines()[1:]}


def test_identical_rows_are_held_out_or_kept_together_and_overlaps_with_dev_and_test_are_counted(tmp_path, capsys):
    source = sts_source(tmp_path / "data", PAIRS)
    (source / "sts-dev.csv").write_text(HEADER + "0\td0\tother 3.\tText 3 here.\t1.0\n", encoding="utf-8")
    (source / "sts-test-student.csv").write_text("\tid\tsentence1\tsentence2\n0\tt0\tText 7 here.\tOther 7.\n", encoding="utf-8")
    groups, seen_in_dev = [{0, 5, 9}, {3, 11}], set()
    for seed in range(12):
        carved = carve("sts", 4, source, tmp_path / f"seed{seed}", seed=seed)
        held = held_rows(carved.held)
        assert all(group <= held or not group & held for group in groups), (seed, held)
        assert carved.rows == len(held) == 4  # single rows fill the count exactly
        assert carved.also_in == {"dev": len(held & {3, 11}), "test": int(7 in held)}
        seen_in_dev.add(carved.also_in["dev"])
    assert seen_in_dev == {0, 2}  # some draws held out the pair that dev has too
    argv = ["--task", "sts", "--rows", "4", "--source", str(source), "--seed", "3"]
    assert main([*argv, "--dest", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "(4 rows held out)" in printed and "held-out rows also appear in dev" in printed


def test_only_whole_groups_go_so_the_count_held_out_is_the_closest_one_possible(tmp_path, capsys):
    source = sts_source(tmp_path / "data", [(f"Text {i % 4}.", "Same.") for i in range(12)])  # 4 groups of 3 rows
    carved = carve("sts", 2, source, tmp_path / "two")
    assert carved.rows == 3 and len(held_rows(carved.held)) == 3  # 3 is closer to 2 than 0 is
    assert carve("sts", 7, source, tmp_path / "seven").rows == 6
    with pytest.raises(DataError, match=r"sts-train.csv: whole groups of identical rows come closest to 1 row\(s\) with 0 of 12"):
        carve("sts", 1, source, tmp_path / "one")
    assert main(["--task", "sts", "--rows", "2", "--source", str(source), "--dest", str(tmp_path / "cli")]) == 0
    assert "(3 rows held out; 2 asked for" in capsys.readouterr().out
