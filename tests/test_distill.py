"""Distillation: the soft losses, a student that follows a made-up teacher, and python -m ensemble.distill
(the teacher cache, bad input, kill and rerun) on a tiny teacher trained here."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_model import DATA_DIR, TINY_BERT, needs_data, tiny_config

from data.files import TASKS, Example, load_examples
from ensemble import distill as ensemble_distill
from ensemble import predict as ensemble_predict
from ensemble.taskpool import apply_scale
from model.build import load_trained
from model.config import TrainConfig
from model.distill import SoftTargets, augment_file, distill_digest, distill_loss, soft_loss, teacher_file
from model.evaluation import evaluate_model, predict_values
from model.multitask import task_loss
from model.rundir import RunDir, RunFileError, write_npz_outputs
from model.splits import load_split
from model.train import build_parser, config_from_args, train

ALL = ["sst", "para", "sts"]
STS_SCALE = [0.5, 0.8]  # the teacher's map of its member's STS outputs to the 0-5 scale
STUDENT = ["model_config=" + json.dumps(TINY_BERT), "train_limit=24", "eval_limit=16", "batch_size=8"]
STUDENT += ["epochs=1", "lr=0.001", "threads=1"]


# ----------------------------------------------------------------------------------- the soft losses


def test_soft_loss_of_each_task_type():
    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(4, 5), -1)
    for temperature in (1.0, 2.0):
        # Zero where the student's distribution is the teacher's, and the softened KL times T^2 elsewhere.
        assert soft_loss("sst", teacher.log(), teacher, temperature).abs().max() < 1e-5
        logits = torch.randn(4, 5)
        soft_t, student_t = (teacher.log() / temperature).softmax(-1), (logits / temperature).softmax(-1)
        kl = (soft_t * (soft_t.log() - student_t.log())).sum(-1) * temperature**2
        assert torch.allclose(soft_loss("sst", logits, teacher, temperature), kl, atol=1e-5)
    p, logits = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    expected = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))
    assert torch.allclose(soft_loss("para", logits, p), expected)
    at_teacher = torch.logit(p).requires_grad_()
    soft_loss("para", at_teacher, p).sum().backward()  # its minimum is at the teacher's P(duplicate)
    assert at_teacher.grad.abs().max() < 1e-6
    assert torch.allclose(soft_loss("sts", torch.tensor([1.0, 4.0]), torch.tensor([2.0, 4.5])), torch.tensor([1.0, 0.25]))


def test_distill_loss_mixes_gold_and_soft_rows():
    scores, gold_labels = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 5.0, 1.0, 2.0])
    soft = torch.tensor([1.5, 2.0, 2.0, 3.0])
    all_gold = SoftTargets(soft, torch.ones(4, dtype=torch.bool))
    index = torch.arange(4)

    def loss(targets: SoftTargets, alpha: float, sts_loss: str = "mse") -> torch.Tensor:
        cfg = TrainConfig(tasks=["sts"], distill_dir="x", distill_alpha=alpha, sts_loss=sts_loss)
        return distill_loss("sts", scores, gold_labels, index, targets, cfg)

    assert torch.isclose(loss(all_gold, 0.0), task_loss("sts", scores, gold_labels))  # alpha 0: the gold loss only
    assert torch.isclose(loss(all_gold, 1.0), (scores - soft).pow(2).mean())  # alpha 1: the teacher only
    mixed = 0.3 * (scores - soft).pow(2).mean() + 0.7 * task_loss("sts", scores, gold_labels)
    assert torch.isclose(loss(all_gold, 0.3), mixed)
    # Augmented rows (the last two) carry the soft loss at full weight and never their placeholder label.
    half = SoftTargets(soft, torch.tensor([True, True, False, False]))
    soft_rows = torch.tensor([0.3, 0.3, 1.0, 1.0]) * (scores - soft).pow(2)
    expected = soft_rows.mean() + 0.7 * 2 / 4 * task_loss("sts", scores[:2], gold_labels[:2])
    assert torch.isclose(loss(half, 0.3), expected)
    assert loss(half, 0.3, "cosent") > 0  # CoSENT on the teacher's scores, a ranking loss over the batch
    # Per task: each task's loss takes its own alpha.
    cfg = TrainConfig(tasks=["sst", "sts"], distill_dir="x", distill_alpha={"sst": 1.0, "sts": 0.3})
    assert torch.isclose(distill_loss("sts", scores, gold_labels, index, half, cfg), loss(half, 0.3))
    assert cfg.distill_alpha == {"sst": 1.0, "sts": 0.3} and TrainConfig(distill_alpha=1).distill_alpha == 1.0


def test_distill_settings_are_checked():
    bad_settings = (
        ({"distill_alpha": 1.5}, r"distill_alpha must be in \[0, 1\] or task=number pairs, not 1.5"),
        ({"distill_alpha": {"sst": 1.0, "para": -0.1, "sts": 0.5}}, "distill_alpha must be in"),
        ({"distill_alpha": {"sst": 1.0}}, r"distill_alpha: no value for task\(s\) \['para', 'sts'\]"),
        ({"distill_alpha": True}, "distill_alpha must be in"),
        ({"distill_temperature": 0.0}, "distill_temperature"),
    )
    for bad, match in bad_settings:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**bad)
    args = build_parser().parse_args(["--output-dir", "x", "--distill-alpha", "sst=1", "para=0.5", "sts=0.5"])
    assert config_from_args(args).distill_alpha == {"sst": 1.0, "para": 0.5, "sts": 0.5}
    for bad in (-1, {"sst": 0}, {"sst": 0, "para": 1, "sts": -2}):  # a table covers every task
        with pytest.raises(ValueError, match="augment_limit"):
            TrainConfig(augment_limit=bad)


@needs_data
def test_augment_limit_per_task_caps_each_tasks_new_rows(tmp_path):
    """SST's new sentences can be left out while the pair tasks keep theirs (augment_limit sst=0)."""
    from model.distill import transfer_split

    write_teacher(tmp_path, 24, opposite)
    cfg = TrainConfig(**tiny_config(distill_dir=str(tmp_path), augment_limit={"sst": 0, "para": 3, "sts": 5}))
    for task in ALL:  # new rows: the first 6 dev rows stand in for them, labelled by the made-up teacher too
        new = load_examples(task, "dev", DATA_DIR)[:6]
        lines = ["\t".join(["id", *TASKS[task].text_columns])] + ["\t".join([e.id, *e.texts]) for e in new]
        augment_file(tmp_path, task).write_text("\n".join(lines) + "\n")
        teacher = np.load(teacher_file(tmp_path, task))
        extra = opposite(task, np.array([e.label for e in new], dtype=np.float64))
        ids = np.concatenate([teacher["ids"], [e.id for e in new]])
        write_npz_outputs(teacher_file(tmp_path, task), {"ids": ids, "values": np.concatenate([teacher["values"], extra])})
    sizes = {task: len(transfer_split(cfg, task, load_split(cfg, task, "train", 24))[0].ids) for task in ALL}
    assert sizes == {"sst": 24, "para": 27, "sts": 29}
    args = build_parser().parse_args(["--output-dir", "x", "--augment-limit", "sst=0", "para=3", "sts=5"])
    assert config_from_args(args).augment_limit == {"sst": 0, "para": 3, "sts": 5}
    assert config_from_args(build_parser().parse_args(["--output-dir", "x"])).augment_limit is None
    with pytest.raises(argparse.ArgumentTypeError, match=r"--augment-limit: 'many' is not an integer"):
        config_from_args(build_parser().parse_args(["--output-dir", "x", "--augment-limit", "sst=many"]))


# ------------------------------------------------------------------------- a student and its teacher


def write_teacher(directory: Path, rows: int, values_of) -> None:
    """A made-up teacher: ``values_of(task, gold labels)`` for the first ``rows`` training rows of each task."""
    for task in ALL:
        examples = load_examples(task, "train", DATA_DIR)[:rows]
        labels = np.array([e.label for e in examples], dtype=np.float64)
        ids = np.array([e.id for e in examples])
        write_npz_outputs(teacher_file(directory, task), {"ids": ids, "values": values_of(task, labels)})


def opposite(task: str, labels: np.ndarray) -> np.ndarray:
    """The opposite of the gold label: class 4 - y, 1 - is_duplicate, 5 - similarity."""
    if TASKS[task].label_kind == "class":
        values = np.full((len(labels), 5), 0.025)
        values[np.arange(len(labels)), 4 - labels.astype(int)] = 0.9
        return values
    return 1.0 - labels if TASKS[task].label_kind == "binary" else 5.0 - labels


@needs_data
def test_as_alpha_goes_to_one_the_student_follows_the_teacher_not_the_gold_labels(tmp_path):
    rows = 32
    write_teacher(tmp_path / "teacher", rows, opposite)
    toward_teacher = {}
    for alpha in (0.0, 1.0):
        config = tiny_config(distill_dir=str(tmp_path / "teacher"), distill_alpha=alpha, train_limit=rows, eval_limit=8)
        train(config | {"epochs": 4, "lr": 3e-3, "predict_test": False}, tmp_path / f"alpha{alpha}")
        model, cfg = load_trained(tmp_path / f"alpha{alpha}")
        for task in ALL:
            gold = np.array(load_split(cfg, task, "train", rows).labels, dtype=np.float64)
            values = predict_values(model, task, load_split(cfg, task, "train", rows))
            if TASKS[task].label_kind == "class":  # probability of the teacher's class minus that of the gold one
                y = gold.astype(int)
                toward_teacher[task, alpha] = float((values[np.arange(rows), 4 - y] - values[np.arange(rows), y]).mean())
            else:  # distance to the gold labels minus distance to the teacher's values
                teacher = opposite(task, gold)
                toward_teacher[task, alpha] = float(np.abs(values - gold).mean() - np.abs(values - teacher).mean())
    for task in ALL:
        assert toward_teacher[task, 1.0] > 0 > toward_teacher[task, 0.0], (task, toward_teacher)


@needs_data
def test_the_trainer_refuses_a_bad_teacher_file_naming_it(tmp_path):
    write_teacher(tmp_path / "short", 8, opposite)  # outputs for 8 rows; the student trains on 24
    with pytest.raises(ValueError, match=r"sst-teacher.npz: no teacher output for 16 of the 24 sst training rows"):
        train(tiny_config(distill_dir=str(tmp_path / "short"), train_limit=24), tmp_path / "a")
    write_teacher(tmp_path / "nan", 24, lambda task, y: opposite(task, y) * np.nan)
    with pytest.raises(RunFileError, match=r"nan/para-teacher.npz: 24 teacher value\(s\) are NaN"):
        train(tiny_config(distill_dir=str(tmp_path / "nan"), train_limit=24), tmp_path / "b")


# ------------------------------------------------------------------------------ python -m ensemble.distill


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(tiny_config(train_limit=32, eval_limit=16), run)
    return run


def make_predictor(root: Path, member: Path, tasks: list[str] = ALL, scale: list[float] = STS_SCALE) -> Path:
    """A built predictor's folder (results/<study>/ensemble/caruana) with one member per task."""
    method = root / "results" / "tiny" / "ensemble" / "caruana"
    entries = {}
    for task in tasks:
        described = {"name": "tiny/trial 0", "study": "tiny", "trial": 0, "artifact_dir": str(member), "weight": 1.0}
        if task == "sts":
            described["scale"] = scale
        entries[task] = {"method": "caruana", "kind": "logits", "members": [described], "inference_cost": 1, "dev": 0.5}
    manifest = {"format": 3, "method": "caruana", "studies": ["tiny"], "tasks": entries}
    (method / "predictor").mkdir(parents=True, exist_ok=True)
    (method / "predictor" / "manifest.json").write_text(json.dumps(manifest))
    return method


def run_distill(method: Path, out: Path | None, *extra: str, report=None) -> dict:
    argv = ["--ensemble", str(method), "--augment", "6", "--data-dir", str(DATA_DIR), "--set", *STUDENT, *extra]
    argv += ["--output-dir", str(out)] if out is not None else []
    return ensemble_distill.distill(ensemble_distill.build_parser().parse_args(argv), report=report)


def write_build_summary(method: Path, gains: dict[str, float]) -> None:
    """What ensemble.build writes beside the predictor and the report reads: the usual recipe's and the
    method's rows (their out-of-selection scores on 20 halves) and the dev rows' ids."""
    rows = []
    for task in ALL:
        ids = [e.id for e in load_examples(task, "dev", DATA_DIR)[:16]]
        (method / "predictions").mkdir(exist_ok=True)
        (method / "predictions" / f"{task}-dev-out.csv").write_text("id,value\n" + "".join(f"{i},0\n" for i in ids))
        for name, kind, gain in (("baseline (usual recipe)", "baseline", None), ("caruana", "selected", gains[task])):
            estimate = {"mean": 0.2, "sd": 0.0, "gain_mean": gain, "gain_sd": None, "splits": 20, "scores": [0.2] * 20}
            rows.append(
                {"task": task, "name": name, "kind": kind, "members": ["tiny/trial 0"], "cost": 1, "dev": 0.2}
                | {"estimate": estimate}
            )
    (method / "summary.json").write_text(json.dumps({"settings": {"splits": 20, "seed": 0}, "rows": rows}))


@pytest.fixture
def count_labelling(monkeypatch) -> list[str]:
    """The tasks the teacher labels, in order."""
    labelled, label = [], ensemble_distill.label

    def counting(runner, plan, task, examples):
        labelled.append(task)
        return label(runner, plan, task, examples)

    monkeypatch.setattr(ensemble_distill, "label", counting)
    return labelled


@needs_data
def test_teacher_outputs_are_cached_and_recomputed_when_the_predictor_changes(tmp_path, teacher_run, count_labelling, capsys):
    method = make_predictor(tmp_path, teacher_run)
    out = tmp_path / "out"
    assert run_distill(method, out, "--label-only") == {}
    assert count_labelling == ALL
    transfer = out / "transfer"
    # The teacher's values are its member's outputs, the STS ones through the manifest's scale.
    values = np.load(teacher_file(transfer, "sts"))["values"]
    examples = load_examples("sts", "train", DATA_DIR)[:24]
    model, cfg = load_trained(teacher_run)
    _, outputs = evaluate_model(model, cfg, "test", examples={"sts": [Example(e.id, e.texts, None) for e in examples]})
    assert np.allclose(values[:24], apply_scale(outputs["sts"]["values"], STS_SCALE, "sts"), atol=1e-5)
    assert len(values) == 24 + 6 and len(load_examples("sts", "train", DATA_DIR)) > 24
    digest = distill_digest(transfer, ALL)

    run_distill(method, out, "--label-only")  # everything from the cache: the same transfer set
    assert count_labelling == ALL and distill_digest(transfer, ALL) == digest

    make_predictor(tmp_path, teacher_run, scale=[0.0, 1.0])  # the STS plan changed: only STS is labelled again
    capsys.readouterr()
    run_distill(method, out, "--label-only")
    assert count_labelling == [*ALL, "sts"] and re.search(r"sts-\w+\.npz: stale \(the teacher changed\)", capsys.readouterr().err)
    assert distill_digest(transfer, ALL) != digest
    digest = distill_digest(transfer, ALL)

    # Another number of new rows is another cache file: going back to the first labels nothing again.
    cache_dir = method / "predictor" / "teacher-cache"
    (sst_cache,) = cache_dir.glob("sst-*.npz")  # --augment 6's
    run_distill(method, out, "--label-only", "--augment", "4")
    assert count_labelling == [*ALL, "sts", *ALL] and len(list(cache_dir.glob("sst-*.npz"))) == 2
    run_distill(method, out, "--label-only")
    assert count_labelling == [*ALL, "sts", *ALL] and distill_digest(transfer, ALL) == digest
    run_distill(method, out, "--label-only", "--augment", "sst=6", "para=6", "sts=6")  # the same, spelled per task
    assert count_labelling == [*ALL, "sts", *ALL] and distill_digest(transfer, ALL) == digest
    run_distill(method, out, "--label-only", "--augment", "sst=0", "para=6", "sts=6")  # no new SST rows: SST alone
    assert count_labelling == [*ALL, "sts", *ALL, "sst"] and not augment_file(transfer, "sst").exists()
    assert augment_file(transfer, "para").exists()
    run_distill(method, out, "--label-only")
    assert count_labelling == [*ALL, "sts", *ALL, "sst"] and distill_digest(transfer, ALL) == digest

    # A cache file of the older layout (one per task) with the wanted rows is taken over, not relabelled.
    sst_cache.rename(cache_dir / "sst.npz")
    run_distill(method, out, "--label-only")
    assert count_labelling == [*ALL, "sts", *ALL, "sst"] and sst_cache.is_file() and not (cache_dir / "sst.npz").exists()

    sst_cache.write_bytes(b"not a zip file")
    run_distill(method, out, "--label-only")
    err = capsys.readouterr().err
    assert count_labelling == [*ALL, "sts", *ALL, "sst", "sst"] and f"{sst_cache.name}: unreadable teacher cache" in err


def copy_member(source: Path, target: Path, nan_in: str | None = None, weights: bool = True) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("last.pt", "outputs", "teacher-cache", "distill"))
    if not weights:
        (target / "model.safetensors").unlink()
    elif nan_in is not None:
        state = load_file(target / "model.safetensors")
        state = {k: v.fill_(float("nan")) if k.startswith(f"heads.{nan_in}.") else v for k, v in state.items()}
        save_file(state, target / "model.safetensors")
    return target


def half_written_manifest(tmp: Path, run: Path) -> Path:
    method = make_predictor(tmp, run)
    (method / "predictor" / "manifest.json").write_text('{"format": 2, "tas')
    return method


# case: (make the predictor, extra arguments, what the error says)
BAD_INPUTS = {
    "missing predictor": (lambda tmp, run: tmp / "nowhere", [], "nowhere: no ensemble here"),
    "half-written manifest": (half_written_manifest, [], r"caruana/predictor: unreadable ensemble description \(JSONDecodeError"),
    "member without weights": (
        lambda tmp, run: make_predictor(tmp, copy_member(run, tmp / "member", weights=False)),
        [],
        "member tiny/trial 0: .*member/model.safetensors: missing",
    ),
    "task not covered": (
        lambda tmp, run: make_predictor(tmp, run, ["sst", "para"]),
        ["--tasks", "sts"],
        r"covers \['sst', 'para'\], not \['sts'\]",
    ),
    "refused student": (lambda tmp, run: make_predictor(tmp, run), ["--set", "pair_encoding=cross"], "sts_head 'cosine' needs"),
    "compared run not trained": (
        lambda tmp, run: make_predictor(tmp, run),
        ["--compare", "/no-run"],
        "--compare /no-run: no metrics",
    ),
    "new rows for a task not distilled": (
        lambda tmp, run: make_predictor(tmp, run),
        ["--augment", "sst=2", "para=2", "cfimdb=2"],
        r"--augment: \['cfimdb'\] not distilled",
    ),
    "new rows missing for a task": (
        lambda tmp, run: make_predictor(tmp, run),
        ["--augment", "sst=2"],
        r"no value for \['para', 'sts'\]",
    ),
    "negative new rows": (lambda tmp, run: make_predictor(tmp, run), ["--augment", "sst=2", "para=-1", "sts=2"], "must be >= 0"),
    "non-finite teacher": (
        lambda tmp, run: make_predictor(tmp, copy_member(run, tmp / "member", nan_in="sst")),
        [],
        r"member tiny/trial 0: .*member/model.safetensors: non-finite weights",  # checked before any labelling
    ),
}


@needs_data
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_before_training_with_one_line_and_writes_nothing(tmp_path, teacher_run, case, capsys):
    make, extra, message = BAD_INPUTS[case]
    method = make(tmp_path, teacher_run)
    out = tmp_path / "out"
    argv = ["--ensemble", str(method), "--output-dir", str(out), "--augment", "6", "--data-dir", str(DATA_DIR)]
    assert ensemble_distill.main([*argv, "--set", *STUDENT, *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists() and not (method / "predictor" / "teacher-cache").exists()


@needs_data
def test_a_killed_distillation_resumes_and_its_student_is_a_normal_run(tmp_path, teacher_run, count_labelling, capsys):
    method = make_predictor(tmp_path, teacher_run)
    write_build_summary(method, {"sst": 0.1, "para": 0.1, "sts": 0.1})
    seen = []

    def killed_after_epoch_1(metrics: dict) -> None:
        seen.append(metrics["epoch"])
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(method, None, "--set", "epochs=2", report=killed_after_epoch_1)
    out = tmp_path / "results" / "tiny" / "distill" / "caruana"  # the default output folder
    metrics = run_distill(method, None, "--set", "epochs=2", report=lambda m: seen.append(m["epoch"]))
    assert seen == [1, 2] and len(metrics["history"]) == 2  # epoch 1 was not trained again
    assert count_labelling == ALL  # nor was anything labelled again
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["task"], r["name"]): r for r in summary["rows"]}
    assert {(t, n) for t in ALL for n in ("student (distilled)", "caruana", "baseline (usual recipe)")} == set(rows)
    for task in ALL:  # paired with the usual recipe on the build's halves, and set against the teacher's gain
        student = rows[task, "student (distilled)"]
        gains = np.array(student["estimate"]["scores"]) - 0.2
        assert student["estimate"]["gain_mean"] == pytest.approx(gains.mean())
        assert f"keeps {gains.mean() / 0.1:.0%} of the teacher's gain" in student["note"]
    transfer = {"gold_rows": 24, "augmented_rows": 6, "student_augmented_rows": 6}
    assert summary["transfer"]["sts"] == summary["transfer"]["sts"] | transfer
    for task in ALL:  # the student's leaderboard CSVs, written by the trainer
        assert (out / "student" / "predictions" / f"{task}-test-out.csv").is_file()
    capsys.readouterr()
    assert ensemble_predict.main(["--ensemble", str(out / "student"), "--input", str(DATA_DIR / "sts-dev.csv")]) == 0
    assert "Pearson r" in capsys.readouterr().out
    # Rerun with --compare: nothing is trained or labelled again, and the compared run gets the
    # student's kind of row (its epoch chosen on half A, paired with the usual recipe).
    run_distill(method, None, "--set", "epochs=2", "--compare", str(teacher_run), report=lambda m: seen.append(m["epoch"]))
    assert seen == [1, 2] and count_labelling == ALL
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compared"] == [str(teacher_run)]
    compared = {r["task"]: r for r in summary["rows"] if r["name"].endswith("/run (compared)")}
    assert set(compared) == set(ALL)
    for task, row in compared.items():
        scores = ensemble_distill.student_estimates(RunDir(teacher_run), 20, 0)[task][0]
        assert row["estimate"]["scores"] == pytest.approx(scores)
        assert row["estimate"]["gain_mean"] == pytest.approx(np.mean(scores) - 0.2)
        student = next(r for r in summary["rows"] if r["task"] == task and r["name"] == "student (distilled)")
        differences = np.subtract(student["estimate"]["scores"], scores)
        assert row["estimate"]["student_minus_mean"] == pytest.approx(differences.mean())
        assert f"the student minus this run, paired: {differences.mean():+.4f} ± {differences.std(ddof=1):.4f}" in row["note"]
    # A changed teacher is a changed config: the student's folder is not silently resumed with it.
    make_predictor(tmp_path, teacher_run, scale=[0.0, 1.0])
    argv = ["--ensemble", str(method), "--augment", "6", "--data-dir", str(DATA_DIR), "--set", *STUDENT, "epochs=2"]
    assert ensemble_distill.main(argv) == 1
    assert "different config (distill_digest" in capsys.readouterr().err


@needs_data
def test_distillation_without_new_rows_trains_on_the_training_rows_alone(tmp_path, teacher_run):
    """--augment 0: no augment file is written (an empty one would be an error), and the student trains."""
    method = make_predictor(tmp_path, teacher_run, tasks=["sts"])
    out = tmp_path / "out"
    argv = ["--ensemble", str(method), "--augment", "0", "--data-dir", str(DATA_DIR), "--output-dir", str(out)]
    assert ensemble_distill.main([*argv, "--set", *STUDENT]) == 0
    assert not augment_file(out / "transfer", "sts").exists()
    assert len(np.load(teacher_file(out / "transfer", "sts"))["values"]) == 24
    assert RunDir(out / "student").weights_file.is_file()


def test_new_pairs_are_never_training_or_held_out_pairs():
    from ensemble.augment import pair_rows

    examples = [Example(str(i), (f"s{i}", f"s{i + 1}"), 1.0) for i in range(6)]
    held_out = {frozenset((f"s{i}", f"s{j}")) for i in range(7) for j in range(7) if (i + j) % 2}
    rows = pair_rows(examples, 10, seed=0, embed=lambda texts: np.eye(len(texts)), exclude=held_out)
    assert rows and all(frozenset(row) not in held_out | {frozenset(e.texts) for e in examples} for row in rows)


def test_new_sentences_come_from_the_tasks_domain_first_and_never_from_its_files(tmp_path):
    """SST's new rows are sentences split out of the CFIMDB reviews (at sentence ends and at their HTML
    line breaks; movie reviews, like SST) before any Quora question or STS sentence; none is a sentence
    of SST's own train, dev or test file."""
    from ensemble.augment import sentence_rows

    def write(name: str, columns: list[str], rows: list[list[str]]) -> None:
        lines = ["\t".join(columns)] + ["\t".join(row) for row in rows]
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")

    sst = ["id", "sentence", "sentiment"]
    write("ids-sst-train.csv", sst, [["a1", "a fine film with a great cast .", "4"]])
    write("ids-sst-dev.csv", sst, [["a2", "The plot is thin and the jokes are old .", "1"]])
    write("ids-sst-test-student.csv", ["id", "sentence"], [["a3", "an hour too long for its own good ."]])
    reviews = [
        ["c1", "I loved every minute of this one . The plot is thin and the jokes are old . Go !", "1"],
        ["c2", "What a waste of two hours !<br /><br />The lead is wooden and the music is worse", "0"],
    ]
    write("ids-cfimdb-train.csv", sst, reviews)
    write(
        "quora-train.csv",
        ["id", "sentence1", "sentence2", "is_duplicate"],
        [["q1", "How do I learn to cook rice ?", "What is the best rice cooker ?", "0"]],
    )
    write(
        "sts-train.csv",
        ["id", "sentence1", "sentence2", "similarity"],
        [["s1", "A man is playing a guitar .", "A man plays the guitar on stage .", "4.2"]],
    )

    in_domain = {
        "I loved every minute of this one .",
        "What a waste of two hours !",
        "The lead is wooden and the music is worse .",
    }
    first = sentence_rows("sst", 3, seed=0, data_dir=str(tmp_path))
    assert {row[0] for row in first} == in_domain  # split at sentence ends; SST's dev sentence and "Go !" left out
    every = sentence_rows("sst", 100, seed=0, data_dir=str(tmp_path))
    assert {row[0] for row in every[:3]} == in_domain and len(every) == 3 + 4  # then the questions and STS sentences
    assert sentence_rows("sst", 100, seed=0, data_dir=str(tmp_path)) == every  # seeded
    assert not {row[0] for row in every} & {"The plot is thin and the jokes are old ."}


def test_no_share_of_a_teacher_gain_within_noise_is_claimed():
    from ensemble.distill import kept_gain
    from ensemble.report import Row

    def row(kind: str, gain: float, sd: float) -> Row:
        return Row("sst", kind, kind, [], 1, 0.5, {"gain_mean": gain, "gain_sd": sd})

    assert kept_gain(row("selected", 0.0096, 0.0050), row("student", 0.0030, 0.0104)) == "; keeps 31% of the teacher's gain"
    assert "within its spread" in kept_gain(row("selected", 0.0005, 0.0129), row("student", -0.0139, 0.0135))
    assert kept_gain(row("selected", -0.002, 0.001), row("student", 0.001, 0.001)) == ""
    assert "keeps none" in kept_gain(row("selected", 0.0070, 0.0038), row("student", -0.0034, 0.0062))


def test_a_compared_run_is_paired_with_the_student_only_on_the_same_dev_rows():
    from ensemble.distill import paired_difference, run_labels
    from ensemble.report import Row

    def row(scores: list[float]) -> Row:
        return Row("sts", "r", "student", [], 2, 0.8, {"scores": scores})

    student, other = row([0.80, 0.82, 0.81]), row([0.79, 0.80, 0.80])
    difference = paired_difference(student, ["a", "b"], other, ["a", "b"])
    assert difference["student_minus_mean"] == pytest.approx(np.mean([0.01, 0.02, 0.01]))
    assert difference["student_minus_sd"] == pytest.approx(np.std([0.01, 0.02, 0.01], ddof=1))
    assert paired_difference(student, ["a", "b"], other, ["b", "a"]) is None  # same rows, another order
    assert paired_difference(student, ["a", "b"], other, ["a", "c"]) is None
    # Runs are named by the fewest trailing parts of their paths that tell them apart.
    students = [Path("/r/distill/student3-tl2/student"), Path("/r/distill/student3-tl0/student")]
    assert run_labels(students) == ["student3-tl2/student", "student3-tl0/student"]
    trials = [Path("/r/x/student"), Path("/r/sts-diverse/trials/3"), Path("/r/sst-diverse/trials/3"), Path("/r/mt/trials/0")]
    assert run_labels(trials) == ["x/student", "sts-diverse/trials/3", "sst-diverse/trials/3", "trials/0"]
    assert run_labels([Path("/r/a"), Path("/r/a")]) == ["/r/a", "/r/a"]


def test_a_multitask_runs_estimate_chooses_one_epoch_for_all_its_tasks(tmp_path):
    """A student is one model: its estimate scores every task at the epoch best on the halves A of all
    its tasks together (the trainer's "overall"), not each task at its own best epoch."""
    from ensemble.distill import student_estimates
    from ensemble.estimate import halves

    rows, rng = 40, np.random.default_rng(0)
    sst_labels, sts_labels = rng.integers(0, 5, rows), rng.uniform(0, 5, rows)
    right = np.eye(5)[sst_labels]
    sst_epochs = [right, np.roll(right, 1, axis=1)]  # epoch 1 right, epoch 2 wrong on every sentence
    sts_epochs = [sts_labels + rng.normal(0, 2, rows), sts_labels]  # epoch 2 perfect, epoch 1 noisy
    ids = {t: [f"{t}{i}" for i in range(rows)] for t in ("sst", "sts")}

    def run_of(tasks: list[str]) -> RunDir:
        run = RunDir(tmp_path / "+".join(tasks))
        run.write_config({"tasks": tasks}, {})
        for epoch in (1, 2):
            outputs = {"sts": {"ids": ids["sts"], "values": sts_epochs[epoch - 1], "labels": sts_labels}}
            if "sst" in tasks:
                outputs["sst"] = {"ids": ids["sst"], "values": sst_epochs[epoch - 1], "labels": sst_labels}
            run.write_epoch_outputs(epoch, outputs)
        return run

    at_epoch_1 = [np.corrcoef(sts_epochs[0][b], sts_labels[b])[0, 1] for _, b in halves(rows, 5, 0)]
    scores, got_ids = student_estimates(run_of(["sst", "sts"]), 5, 0)["sts"]
    assert scores == pytest.approx(at_epoch_1) and list(got_ids) == ids["sts"]  # SST's epoch 1 wins "overall"
    assert max(at_epoch_1) < 0.9
    assert student_estimates(run_of(["sts"]), 5, 0)["sts"][0] == pytest.approx([1.0] * 5)  # alone: its own best


def test_neighbours_are_found_with_the_whole_base_encoder_whatever_the_students_task_layers():
    """A student with its own top layers per task still picks neighbour pairs with every base layer."""
    from ensemble.augment import base_embedder

    sentences = ["a cat sits on the mat", "stocks fell sharply today", "the film was a delight"]
    config = tiny_config(model_config=TINY_BERT | {"num_hidden_layers": 3}, tasks=["sst", "sts"])
    whole = base_embedder(TrainConfig.from_dict(config), progress=False)(sentences)
    split = base_embedder(TrainConfig.from_dict(config | {"task_layers": 2}), progress=False)(sentences)
    np.testing.assert_array_equal(split, whole)


def test_a_student_of_several_tasks_gets_own_top_layers_proportional_sampling_and_six_epochs_by_default(tmp_path):
    def config(tasks: list[str], *sets: str) -> TrainConfig:
        args = argparse.Namespace(config=None, tasks=tasks, set=list(sets), data_dir=str(DATA_DIR))
        return ensemble_distill.student_config(args, ["sst", "para", "sts"], tmp_path)

    six = json.dumps(TINY_BERT | {"num_hidden_layers": 6})
    assert config(["sst", "sts"], f"model_config={six}").task_layers == 2  # a third of 6 layers
    assert config(["sts"], f"model_config={six}").task_layers == 0  # one task: nothing to split
    assert config(["sst", "sts"], f"model_config={six}", "task_layers=0").task_layers == 0  # as told
    assert config(["sst", "sts"], f"model_config={json.dumps(TINY_BERT)}").task_layers == 0  # 2 layers: none
    assert config(["sst", "sts"]).schedule == "proportional"  # tasks drawn in proportion to their rows
    assert config(["sts"]).schedule == "round_robin"  # one task: the trainer's default
    assert config(["sst", "sts"], "schedule=round_robin").schedule == "round_robin"  # as told
    assert config(["sst", "sts"]).epochs == ensemble_distill.STUDENT_EPOCHS == 6
    assert config(["sts"]).epochs == TrainConfig().epochs  # one task: the trainer's default
    assert config(["sst", "sts"], "epochs=2").epochs == 2  # as told


def test_the_student_trains_on_the_teachers_data_folder_unless_told_otherwise(tmp_path, monkeypatch):
    """After data.holdout, $MINBERT_DATA or ./datasets may be the full folder, held-out rows included: the
    student takes the folder its teacher's models trained on, and another one only when told so."""
    from ensemble.predict import TaskPlan
    from model.rundir import RunDir

    held_out, full = tmp_path / "heldout-data", tmp_path / "data"
    members = [tmp_path / "m0", tmp_path / "m1"]
    for member in members:
        RunDir(member).write_config({"tasks": ["sst"], "data_dir": str(held_out)}, {})
    plans = {"sst": TaskPlan("logits", members, [0.5, 0.5], ["m0", "m1"])}
    trained_on = ensemble_distill.teacher_data_dir(plans)
    assert trained_on == held_out.resolve()
    monkeypatch.delenv("MINBERT_DATA", raising=False)
    args = argparse.Namespace(data_dir=None, other_data_dir=False)
    assert ensemble_distill.student_data_dir(args, {}, trained_on) == held_out.resolve()
    monkeypatch.setenv("MINBERT_DATA", str(full))
    with pytest.raises(ValueError, match=rf"trained on {held_out.resolve()}, but the student would train on {full.resolve()}"):
        ensemble_distill.student_data_dir(args, {}, trained_on)
    args.other_data_dir = True
    assert ensemble_distill.student_data_dir(args, {}, trained_on) == full.resolve()
    args = argparse.Namespace(data_dir=str(held_out), other_data_dir=False)
    assert ensemble_distill.student_data_dir(args, {}, trained_on) == held_out.resolve()
    RunDir(members[1]).write_config({"tasks": ["sst"], "data_dir": str(full)}, {})
    assert ensemble_distill.teacher_data_dir(plans) is None  # members disagree: nothing to go by
