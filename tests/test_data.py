"""data/: tokenisation (against transformers), the token cache, batching, file errors, the real
files' row counts and data.fetch."""

from __future__ import annotations

import os
import random
import shutil
import stat
import time

import pytest
import torch
from tiny_model import DATA_DIR, needs_data

from data import fetch as fetch_module
from data.atomic import atomic_write_text, replace_folder
from data.batching import BatchStream, batch_indices, iterate_batches, make_batch, pad
from data.files import SPLITS, TASKS, DataError, Example, load_examples, read_file
from data.tokenize import EncodedSplit, Tokenizer, cached_encode, swap_pair_order
from model.bert import default_model_path

SENTENCES = [
    "A gorgeous, witty, seductive movie.",
    "The PLOT is nothing but boilerplate clichés -- from start to finish!",
    "Café naïve résumé, 12,000 rupees & $3.50 ... (really?)",
    "don't won't can't   extra   spaces\tand tabs",
    "東京 is in Japan",
]
SECONDS = ["Why?", "How do I learn Python quickly?", "What is the fastest way to learn Python?", "ok", "x " * 40]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(default_model_path(), max_length=128)


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizerFast.from_pretrained(default_model_path())


# ------------------------------------------------------------------------------ tokenisation


def test_single_sentences_match_transformers(tokenizer, reference):
    expected = reference(SENTENCES, truncation=True, max_length=128)
    got = tokenizer.encode(SENTENCES)
    assert [ids for ids, _ in got] == expected["input_ids"]
    assert [types for _, types in got] == expected["token_type_ids"]


def test_pairs_match_transformers(tokenizer, reference):
    expected = reference(SENTENCES, SECONDS, truncation=True, max_length=128)
    got = tokenizer.encode(SENTENCES, SECONDS)
    assert [ids for ids, _ in got] == expected["input_ids"]
    assert [types for _, types in got] == expected["token_type_ids"]


def test_known_ids_and_segments(tokenizer):
    [(ids, types)] = tokenizer.encode(["Hello World!"], ["Second one here."])
    assert ids == [101, 7592, 2088, 999, 102, 2117, 2028, 2182, 1012, 102]  # [CLS] ... [SEP] ... [SEP]
    assert types == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert tokenizer.pad_id == 0


def test_lowercasing(tokenizer):
    assert tokenizer.encode(["HELLO World"]) == tokenizer.encode(["hello world"])
    assert tokenizer.lowercase


def test_truncation_to_max_length(reference):
    short = Tokenizer(default_model_path(), max_length=12)
    long_text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    [(ids, types)] = short.encode([long_text])
    assert len(ids) == 12 and ids[0] == 101 and ids[-1] == 102 and types == [0] * 12
    pairs = short.encode([long_text, "a b"], ["short one", long_text])
    expected = reference([long_text, "a b"], ["short one", long_text], truncation=True, max_length=12)
    assert [ids for ids, _ in pairs] == expected["input_ids"]
    assert all(len(ids) == 12 for ids, _ in pairs)


def test_encode_examples_cross_and_bi(tokenizer):
    examples = [Example("a", ("first one", "second"), 1), Example("b", ("third", "fourth here"), 0)]
    cross = tokenizer.encode_examples(examples, "cross")
    assert len(cross.views) == 1 and cross.ids == ["a", "b"] and cross.labels == [1, 0]
    assert cross.views[0] == tokenizer.encode(["first one", "third"], ["second", "fourth here"])
    bi = tokenizer.encode_examples(examples, "bi")
    assert bi.views == [tokenizer.encode(["first one", "third"]), tokenizer.encode(["second", "fourth here"])]
    unlabelled = tokenizer.encode_examples([Example("c", ("x",), None)])
    assert unlabelled.labels is None
    with pytest.raises(ValueError, match="pair_encoding"):
        tokenizer.encode_examples(examples, "triple")


def test_swapping_a_cross_encoded_pair_is_tokenising_it_the_other_way_round(tokenizer):
    examples = [Example(str(i), (a, b), 1) for i, (a, b) in enumerate(zip(SENTENCES, SECONDS, strict=True))]
    swapped_examples = [Example(e.id, (e.texts[1], e.texts[0]), e.label) for e in examples]
    split = tokenizer.encode_examples(examples, "cross")
    swapped = swap_pair_order(split)
    assert swapped.views == tokenizer.encode_examples(swapped_examples, "cross").views
    assert swapped.ids == split.ids and swapped.labels == split.labels
    assert swap_pair_order(swapped).views == split.views
    with pytest.raises(ValueError, match="cross-encoded split"):
        swap_pair_order(tokenizer.encode_examples(examples, "bi"))
    with pytest.raises(ValueError, match="second segment"):
        swap_pair_order(tokenizer.encode_examples([Example("s", (SENTENCES[0],), 1)]))


def test_missing_vocab_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        Tokenizer(tmp_path)


def test_token_cache_round_trips_and_is_keyed_by_file_content(tokenizer, tmp_path, monkeypatch):
    source = tmp_path / "ids-sst-train.csv"
    write_file(source, ["", "id", "sentence", "sentiment"], [["0", "a", "good film", "4"], ["1", "b", "bad film", "0"]])
    examples = load_examples("sst", "train", tmp_path)
    cache = tmp_path / "cache"
    first = cached_encode(tokenizer, source, examples, "cross", cache)
    [entry] = list(cache.iterdir())
    assert not list(cache.glob("*.tmp"))

    def must_not_encode(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenise again")

    with monkeypatch.context() as patch:
        patch.setattr(tokenizer, "encode_examples", must_not_encode)
        again = cached_encode(tokenizer, source, examples, "cross", cache)
    assert again == first

    # New bytes in the file: a new cache entry and a fresh encoding.
    write_file(source, ["", "id", "sentence", "sentiment"], [["0", "a", "great film", "4"], ["1", "b", "bad film", "0"]])
    changed = cached_encode(tokenizer, source, load_examples("sst", "train", tmp_path), "cross", cache)
    assert changed.views[0][0] == tokenizer.encode(["great film"])[0]
    assert len(list(cache.iterdir())) == 2

    # Back to the first bytes with a corrupt entry: it is rebuilt rather than trusted.
    entry.write_bytes(b"not a pickle")
    write_file(source, ["", "id", "sentence", "sentiment"], [["0", "a", "good film", "4"], ["1", "b", "bad film", "0"]])
    assert cached_encode(tokenizer, source, examples, "cross", cache) == first
    assert cached_encode(tokenizer, source, examples, "cross", None) == first  # no cache dir: plain encoding


# ---------------------------------------------------------------------------------- batching


def toy_split(lengths: list[int], labels: list | None = None, two_views: bool = False) -> EncodedSplit:
    view = [(list(range(100, 100 + n)), [0] * n) for n in lengths]
    views = [view, [(ids[:2], types[:2]) for ids, types in view]] if two_views else [view]
    return EncodedSplit([f"id{i}" for i in range(len(lengths))], views, labels)


def test_pad_builds_ids_masks_and_segments():
    input_ids, mask, types = pad([([5, 6, 7], [0, 0, 1]), ([8], [0])], pad_id=3)
    assert input_ids.tolist() == [[5, 6, 7], [8, 3, 3]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert types.tolist() == [[0, 0, 1], [0, 0, 0]]
    assert input_ids.dtype == mask.dtype == types.dtype == torch.long


def test_make_batch_keeps_positions_and_label_types():
    split = toy_split([3, 5, 2], labels=[1, 0, 4], two_views=True)
    batch = make_batch(split, [2, 0])
    assert batch.index.tolist() == [2, 0] and len(batch) == 2
    assert batch.labels.tolist() == [4, 1] and batch.labels.dtype == torch.long
    assert len(batch.views) == 2 and batch.views[0][0].shape == (2, 3) and batch.views[1][0].shape == (2, 2)
    scores = make_batch(toy_split([3, 5], labels=[0.5, 4.2]), [0, 1]).labels
    assert scores.dtype == torch.float and scores.tolist() == pytest.approx([0.5, 4.2])
    assert make_batch(toy_split([3]), [0]).labels is None
    assert make_batch(split, [0]).to("cpu").views[0][0].device.type == "cpu"


def test_shuffled_batches_cover_every_example_once():
    rng = random.Random(0)
    split = toy_split([rng.randint(1, 60) for _ in range(1003)])
    batches = batch_indices(split, 16, shuffle=True, rng=random.Random(5), pool_batches=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1003))
    assert all(1 <= len(b) <= 16 for b in batches)
    # Bucketing: within a batch the lengths are close (each pool of 64 is sorted before cutting).
    spread = sum(max(len(split.views[0][i][0]) for i in b) - min(len(split.views[0][i][0]) for i in b) for b in batches)
    assert spread / len(batches) < 15
    assert batch_indices(split, 16, shuffle=True, rng=random.Random(6), pool_batches=4) != batches


def test_eval_batches_cover_all_in_length_order():
    split = toy_split([7, 3, 9, 1, 5, 5, 2], labels=list(range(7)))
    batches = list(iterate_batches(split, 3))
    order = [i for b in batches for i in b.index.tolist()]
    assert sorted(order) == list(range(7))
    lengths = [len(split.views[0][i][0]) for i in order]
    assert lengths == sorted(lengths)
    for batch in batches:  # every row is the example at its position, padded on the right
        for row, i in enumerate(batch.index.tolist()):
            ids = split.views[0][i][0]
            assert batch.views[0][0][row, : len(ids)].tolist() == ids
            assert batch.views[0][1][row].sum().item() == len(ids)
            assert batch.labels[row].item() == i


def test_batch_stream_reshuffles_each_pass_and_resumes_from_its_state():
    split = toy_split(list(range(1, 24)))
    stream = BatchStream(split, batch_size=5, seed=3)
    first_pass = [stream.next().index.tolist() for _ in range(5)]  # 23 examples: 5 batches a pass
    assert sorted(i for b in first_pass for i in b) == list(range(23))
    for _ in range(2):
        stream.next()
    state = stream.state_dict()
    assert state == {"passes": 1, "position": 2}
    expected = [stream.next().index.tolist() for _ in range(6)]
    resumed = BatchStream(split, batch_size=5, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next().index.tolist() for _ in range(6)] == expected
    assert BatchStream(split, 5, seed=3).next().index.tolist() == first_pass[0], "the same seed gives the same stream"
    second_pass = BatchStream(split, 5, seed=3)
    second_pass.load_state_dict({"passes": 1, "position": 0})
    second = [second_pass.next().index.tolist() for _ in range(5)]
    assert sorted(i for b in second for i in b) == list(range(23)) and second != first_pass


def test_batch_stream_shows_each_pair_once_in_each_order_every_two_passes():
    split = toy_split(list(range(1, 24)))
    other = EncodedSplit(split.ids, [[([-i for i in ids], types) for ids, types in split.views[0]]], split.labels)
    stream = BatchStream(split, batch_size=5, seed=3, other_order=other)
    plain = BatchStream(split, batch_size=5, seed=3)
    seen = {i: [] for i in range(23)}
    for _ in range(10):  # two passes
        batch, plain_batch = stream.next(), plain.next()
        assert batch.index.tolist() == plain_batch.index.tolist(), "the same rows in the same batches, at no extra steps"
        for row, i in enumerate(batch.index.tolist()):
            seen[i].append("other" if batch.views[0][0][row, 0].item() < 0 else "given")
    assert all(sorted(orders) == ["given", "other"] for orders in seen.values())
    first_pass = [orders[0] for orders in seen.values()]
    assert 0 < first_pass.count("other") < 23, "each pass mixes both orders"
    resumed = BatchStream(split, batch_size=5, seed=3, other_order=other)
    resumed.load_state_dict({"passes": 1, "position": 0})
    stream.load_state_dict({"passes": 1, "position": 0})
    assert all(torch.equal(resumed.next().views[0][0], stream.next().views[0][0]) for _ in range(5))
    with pytest.raises(ValueError, match="same rows"):
        BatchStream(split, 5, seed=3, other_order=toy_split(list(range(1, 23))))


# --------------------------------------------------------------------------------- data files

SST_HEADER = ["", "id", "sentence", "sentiment"]


def write_file(path, header: list[str], rows: list[list[str]]) -> None:
    path.write_text("\n".join("\t".join(fields) for fields in [header, *rows]) + "\n", encoding="utf-8")


def sst_train(tmp_path, rows: list[list[str]], header: list[str] = SST_HEADER):
    write_file(tmp_path / "ids-sst-train.csv", header, rows)
    return tmp_path


def test_reads_quoted_fields_and_strips_text(tmp_path):
    write_file(
        tmp_path / "quora-train.csv",
        ["", "id", "sentence1", "sentence2", "is_duplicate"],
        [["1", "p1", '"""Quoted"" question?"', " What now? ", "1.0"], ["2", "p2", "a", "b", "0.0"]],
    )
    examples = load_examples("para", "train", tmp_path)
    assert examples == [Example("p1", ('"Quoted" question?', "What now?"), 1), Example("p2", ("a", "b"), 0)]
    assert isinstance(examples[0].label, int)


def test_test_split_needs_no_label(tmp_path):
    write_file(tmp_path / "ids-sst-test-student.csv", ["0", "", "id", "sentence"], [["1", "0.0", "t1", "Nice ."]])
    assert load_examples("sst", "test", tmp_path) == [Example("t1", ("Nice .",), None)]


def test_sts_scores_are_floats(tmp_path):
    write_file(tmp_path / "sts-dev.csv", ["", "id", "sentence1", "sentence2", "similarity"], [["0", "s", "a", "b", "3.8"]])
    assert load_examples("sts", "dev", tmp_path)[0].label == pytest.approx(3.8)


def test_missing_file_says_where_it_looked_and_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError) as err:
        load_examples("sst", "dev", tmp_path)
    message = str(err.value)
    assert str(tmp_path / "ids-sst-dev.csv") in message
    assert "python -m data.fetch" in message and "MINBERT_DATA" in message and "--data-dir" in message


def test_data_dir_comes_from_the_environment(tmp_path, monkeypatch):
    sst_train(tmp_path, [["0", "a", "fine", "2"]])
    monkeypatch.setenv("MINBERT_DATA", str(tmp_path))
    assert load_examples("sst", "train")[0].id == "a"


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (["", "id", "sentence"], [["0", "a", "x"]], r"ids-sst-train.csv:1: missing column\(s\) \['sentiment'\]"),
        (SST_HEADER, [["0", "a", "x", "2"], ["1", "b", "y", "good"]], r"ids-sst-train.csv:3: sentiment 'good' is not a number"),
        (SST_HEADER, [["0", "a", "x", "5"]], r"ids-sst-train.csv:2: sentiment '5' is not a class in 0..4"),
        (SST_HEADER, [["0", "a", "x", "-1"]], r"ids-sst-train.csv:2: sentiment '-1' is not a class"),
        (SST_HEADER, [["0", "a", "x", "2.5"]], r"ids-sst-train.csv:2: sentiment '2.5' is not a class"),
        (SST_HEADER, [["0", "a", "x", "nan"]], r"ids-sst-train.csv:2: sentiment 'nan' is not a finite number"),
        (SST_HEADER, [["0", "a", "x", "inf"]], r"ids-sst-train.csv:2: sentiment 'inf' is not a finite number"),
        (SST_HEADER, [["0", "a", "x", "2", "extra"]], r"ids-sst-train.csv:2: the row has 5 fields; the header has 4"),
        (SST_HEADER, [["0", "a", "x", "1"], ["1", "b"]], r"ids-sst-train.csv:3: the row has 2 fields; the header has 4"),
        (SST_HEADER, [], r"ids-sst-train.csv: no data rows after the header"),
        (SST_HEADER, [["0", "a", "x", "1"], ["1", "", "y", "2"]], r"ids-sst-train.csv:3: the id is empty; give every row"),
        (
            SST_HEADER,
            [["0", "a", "x", "1"], ["1", "b", "y", "2"], ["2", " a", "z", "3"]],
            r"ids-sst-train.csv:4: id 'a' is repeated \(first on line 2\); give every row its own id",
        ),
    ],
)
def test_bad_sst_files_name_the_file_and_line(tmp_path, header, rows, message):
    with pytest.raises(DataError, match=message):
        load_examples("sst", "train", sst_train(tmp_path, rows, header))


@pytest.mark.parametrize(
    ("task", "file", "header", "value", "message"),
    [
        ("para", "quora-dev.csv", ["", "id", "sentence1", "sentence2", "is_duplicate"], "0.5", "must be 0 or 1"),
        ("sts", "sts-dev.csv", ["", "id", "sentence1", "sentence2", "similarity"], "5.5", "outside 0..5"),
        ("cfimdb", "ids-cfimdb-dev.csv", SST_HEADER[:3] + ["sentiment"], "2", "not a class in 0..1"),
    ],
)
def test_out_of_range_labels_of_other_tasks(tmp_path, task, file, header, value, message):
    texts = ["s1", "s2"][: len(header) - 3]
    write_file(tmp_path / file, header, [["0", "a", *texts, value]])
    with pytest.raises(DataError, match=f"{file}:2: .*{message}"):
        load_examples(task, "dev", tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "ids-sst-train.csv").write_text("")
    with pytest.raises(DataError, match="ids-sst-train.csv: the file is empty"):
        load_examples("sst", "train", tmp_path)


def test_undecodable_bytes(tmp_path):
    (tmp_path / "ids-sst-train.csv").write_bytes(b"\tid\tsentence\tsentiment\n0\ta\tna\xefve \xff\t2\n")
    with pytest.raises(DataError, match=r"ids-sst-train.csv:2:7 \(byte 0xef\): not valid UTF-8"):
        load_examples("sst", "train", tmp_path)


def test_rows_with_an_empty_label_are_skipped_and_counted(tmp_path):
    rows = [["0", "a", "x", "1"], ["1", "b", "y", ""], ["2", "c", "z", "3"], ["3", "d", "w", " "]]
    with pytest.warns(UserWarning, match=r"ids-sst-train.csv: skipped 2 row\(s\) with an empty 'sentiment'"):
        examples = load_examples("sst", "train", sst_train(tmp_path, rows))
    assert [e.id for e in examples] == ["a", "c"]


def test_every_row_with_an_empty_label_is_an_error_that_says_so(tmp_path):
    rows = [["0", "a", "x", ""], ["1", "b", "y", " "]]
    with pytest.raises(DataError, match=r"ids-sst-train.csv: all 2 rows have an empty 'sentiment'"):
        load_examples("sst", "train", sst_train(tmp_path, rows))


def test_rows_with_an_empty_label_can_be_kept_unlabelled(tmp_path):
    rows = [["0", "a", "x", "1"], ["1", "b", "y", ""]]
    examples = read_file(sst_train(tmp_path, rows) / "ids-sst-train.csv", TASKS["sst"], True, keep_unlabelled=True)
    assert examples == [Example("a", ("x",), 1), Example("b", ("y",), None)]


@pytest.mark.parametrize(
    ("file", "header", "rows", "message"),
    [
        # The sentence is the last column: the open quote swallows the next rows and the field count stays right.
        (
            "ids-sst-test-student.csv",
            ["0", "", "id", "sentence"],
            [["1", "0.0", "t1", '"Nice .'], ["2", "1.0", "t2", "ok"]],
            r"ids-sst-test-student.csv:2: 'sentence' holds a tab or a line break \(the record runs to line 3\)",
        ),
        (
            "ids-sst-train.csv",
            SST_HEADER,
            [["0", "a", "x", "1"], ["1", "b", '"y', "2"], ["2", "c", "z", "3"], ["3", "d", 'w"', "0"]],
            r"ids-sst-train.csv:3: 'sentence' holds a tab or a line break \(the record runs to line 5\)",
        ),
        (
            "ids-sst-train.csv",
            SST_HEADER,
            [["0", "a", '"x', "1"], ["1", "b", "y", "2"]],
            r"ids-sst-train.csv:2: 'sentence' holds a tab or a line break \(the record runs to line 3\)",
        ),
    ],
)
def test_an_unbalanced_quote_names_the_line_its_record_started_on(tmp_path, file, header, rows, message):
    write_file(tmp_path / file, header, rows)
    split = "test" if "test" in file else "train"
    with pytest.raises(DataError, match=message + r': an unbalanced quote\? Double it \(""\) or quote the whole field'):
        load_examples("sst", split, tmp_path)


def test_a_byte_order_mark_is_ignored_and_commas_are_not_tabs(tmp_path):
    text = "id\tsentence\tsentiment\na\tfine\t2\n"
    (tmp_path / "ids-sst-train.csv").write_text("\ufeff" + text, encoding="utf-8")
    assert load_examples("sst", "train", tmp_path) == [Example("a", ("fine",), 2)]
    (tmp_path / "ids-sst-train.csv").write_text(text.replace("\t", ","), encoding="utf-8")
    with pytest.raises(DataError, match=r"ids-sst-train.csv:1: the header is one field with commas .*must be tab-separated"):
        load_examples("sst", "train", tmp_path)


def test_unknown_task_or_split(tmp_path):
    with pytest.raises(KeyError, match="unknown task"):
        load_examples("mnli", "train", tmp_path)
    with pytest.raises(KeyError, match="unknown split"):
        load_examples("sst", "validation", tmp_path)


ROW_COUNTS = {
    ("sst", "train"): 8544,
    ("sst", "dev"): 1101,
    ("sst", "test"): 2210,
    ("cfimdb", "train"): 1707,
    ("cfimdb", "dev"): 245,
    ("cfimdb", "test"): 488,
    ("para", "train"): 14212,
    ("para", "dev"): 3000,
    ("para", "test"): 3000,
    ("sts", "train"): 6040,
    ("sts", "dev"): 863,
    ("sts", "test"): 1725,
}


@needs_data
def test_real_files_load_with_the_documented_row_counts():
    started = time.perf_counter()
    counts = {key: load_examples(*key, DATA_DIR) for key in ROW_COUNTS}
    elapsed = time.perf_counter() - started
    assert {key: len(rows) for key, rows in counts.items()} == ROW_COUNTS
    assert elapsed < 10, f"loading every file took {elapsed:.1f} s"
    sst = counts[("sst", "train")]
    assert sst[0].id == "32a4f146782cbde1b7fa65799" and sst[0].texts[0].startswith("The Rock is destined")
    assert {e.label for e in sst} == {0, 1, 2, 3, 4}
    assert all(e.label is None for e in counts[("sts", "test")])
    assert all(0 <= e.label <= 5 for e in counts[("sts", "train")])
    for key, rows in counts.items():
        assert len({e.id for e in rows}) == len(rows), f"{key}: ids are unique"


# ------------------------------------------------------------------------------------- fetch


def test_fetch_copies_from_a_local_folder_and_reports_missing_files(tmp_path, capsys):
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    names = fetch_module.data_file_names()
    assert len(names) == len(TASKS) * len(SPLITS)
    for i, name in enumerate(names[:-2]):
        (source / name).write_bytes(f"file {i}\n".encode())
    missing = fetch_module.fetch(dest, source)
    assert missing == names[-2:]
    assert sorted(p.name for p in dest.iterdir()) == sorted(names[:-2])  # no temp files left behind
    assert all((dest / n).read_bytes() == (source / n).read_bytes() for n in names[:-2])
    assert fetch_module.main(["--source", str(source), "--dest", str(dest)]) == 1
    assert "missing: " + ", ".join(names[-2:]) in capsys.readouterr().out
    for name in names[-2:]:
        (source / name).write_text("late\n")
    assert fetch_module.main(["--source", str(source), "--dest", str(dest)]) == 0


def test_interrupted_fetch_leaves_no_partial_file(tmp_path, monkeypatch):
    source, dest = tmp_path / "source", tmp_path / "dest"
    source.mkdir()
    for name in fetch_module.data_file_names():
        (source / name).write_text("content\n")

    def fail_midway(src, out):
        out.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        fetch_module.fetch(dest, source)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    """Not the temporary file's 0600: other nodes of a cluster read the results over NFS."""
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    """replace_folder: the new folder's files only (nothing of the old one left), the mode a plain mkdir
    gives under the umask; a fill that fails leaves the old folder as it was and no staging folder."""
    target = tmp_path / "predictor"
    target.mkdir()
    (target / "soup-2").mkdir()
    (target / "manifest.json").write_text("old")

    def fill(folder):
        (folder / "manifest.json").write_text("new")
        (folder / "soup-1").mkdir()

    previous = os.umask(0o022)
    try:
        replace_folder(target, fill)
    finally:
        os.umask(previous)
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "soup-1"]
    assert (target / "manifest.json").read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o755

    def fail_midway(folder):
        (folder / "manifest.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_folder(target, fail_midway)
    assert (target / "manifest.json").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["predictor"]
    replace_folder(tmp_path / "fresh", fill)  # no old folder to put aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "predictor"]
