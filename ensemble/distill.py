"""``python -m ensemble.distill --ensemble DIR``: distil a built predictor (the teacher: any method of
``ensemble.build``, or one trainer output dir) into one multitask student (MT-DNN-KD, Liu et al. 2019;
AugSBERT, Thakur et al. 2021).

1. The teacher: DIR's predictor, run as ``ensemble.predict`` runs it (members, weights, maps (STS scales, temperatures),
   soups). Every member folder is checked before anything runs.
2. The transfer set, per covered task (``--tasks``, default all): the training rows the student uses
   (its ``train_limit``) and ``--augment`` new unlabelled rows, per task (ensemble.augment). The teacher labels
   them all (a progress bar); no dev or test row is labelled or fitted on.
3. The cache: per task and augmentation, ``<predictor>/teacher-cache/<task>-<digest>.npz`` holds the
   new rows and the teacher's values. The file's name is a digest of the augmentation's settings and
   source files; inside, a digest of the teacher (each member's config and weights, the weights and
   scales of the plan) and the rows. A stale or unreadable cache is said so and computed again.
4. The student: ``model.train.train`` with the student config (the trainer's defaults, one model for
   every covered task; when there are several, each task with its own top third of the layers and
   batches drawn in proportion to the tasks' training rows;
   ``--config FILE.json`` and ``--set KEY=VALUE`` override, e.g. ``--set distill_alpha=0.7 epochs=2``)
   and ``distill_dir`` = ``OUTPUT/transfer`` (model/distill.py says what the trainer does with it).
   ``OUTPUT/student`` is a normal run folder: rerunning resumes it, it is a valid ensemble member, and
   ``ensemble.predict --ensemble OUTPUT/student`` runs it.
5. The report: ``OUTPUT/summary.{md,json}``: per task the usual recipe and the teacher (rows of the
   build's summary when there is one) beside the student: in-sample dev, out-of-selection (its one epoch
   chosen on half A of dev of all its tasks together, as the trainer chose it on all of dev, and
   scored on half B, the build's halves) and the paired gain over the usual
   recipe, passes per example, and the seconds of augmentation, labelling and training.

OUTPUT is ``--output-dir``, by default ``results/<studies>/distill/<method>`` for
``results/<studies>/ensemble/<method>``. ``--label-only`` stops after writing ``OUTPUT/transfer``, for a
study that searches the distillation settings with ``distill_dir`` fixed to it.

Bad input (a missing or half-written predictor, a task it does not cover, a student config the trainer
refuses, non-finite teacher outputs) stops before training with a one-line error, and nothing half-done
is written.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.atomic import atomic_write_text
from data.files import DATA_DIR_ENV, TASKS, DataError, Example, load_examples, resolve_data_dir
from ensemble.augment import AUGMENT_METHOD, base_embedder, pair_rows, sentence_rows, source_files
from ensemble.estimate import DEFAULT_SEED, DEFAULT_SPLITS, halves
from ensemble.members import EnsembleError
from ensemble.output import BASELINE, history_training
from ensemble.predict import Runner, TaskPlan, check_plans, find_predictor, load_plans
from ensemble.report import BASELINE_ROW, MEMBER_ROW, SELECTED_ROW, STUDENT_ROW, Row, write_summary
from ensemble.taskpool import checked_metric, encoder_passes
from model.build import bert_config_for
from model.config import TrainConfig, value_for_task
from model.distill import augment_file, teacher_file
from model.metrics import overall_score
from model.rundir import RunDir, RunFileError, write_npz_outputs

STUDENT_FOLDER = "student"  # the student's run folder inside the distillation's output folder
LABEL_CHUNK = 512  # rows per call of the teacher: the progress bar's step


# ------------------------------------------------------------------------------------------ teacher


def teacher_plans(ensemble: Path) -> tuple[Path, dict[str, TaskPlan]]:
    """The predictor folder and its per-task plans, every member's config and weights checked (finite)
    before anything is labelled or written."""
    predictor = find_predictor(ensemble)
    plans = load_plans(predictor)
    check_plans(plans)
    return predictor, plans


def file_digest(path: Path, digest: hashlib._Hash) -> None:
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)


def plan_digest(plan: TaskPlan) -> str:
    """What the teacher's outputs on one task depend on: its members' configs and weights, and how
    they are combined."""
    loans = [plan.loans] if any(plan.loans or []) else []  # absent without lent members: older caches stay valid
    digest = hashlib.sha256(json.dumps([plan.kind, plan.weights, plan.scales, *loans]).encode())
    for model_dir in plan.model_dirs:
        run = RunDir(model_dir)
        file_digest(run.config_file, digest)
        file_digest(run.weights_file, digest)
    return digest.hexdigest()[:16]


def rows_digest(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update("\0".join((e.id, *e.texts)).encode() + b"\n")
    return digest.hexdigest()[:16]


def label(runner: Runner, plan: TaskPlan, task: str, examples: list[Example]) -> np.ndarray:
    """The teacher's output values on ``examples``, in their order (a progress bar on a terminal)."""
    from model.train import progress_bar

    parts = []
    with progress_bar(total=len(examples), desc=f"teacher labels {task}", unit="row") as bar:
        for start in range(0, len(examples), LABEL_CHUNK):
            chunk = [Example(e.id, e.texts, None) for e in examples[start : start + LABEL_CHUNK]]  # the teacher sees no label
            out = runner.predict(plan, task, chunk)
            if list(out["ids"]) != [e.id for e in chunk]:
                raise EnsembleError(f"teacher {task}: its outputs came back in another row order")
            parts.append(np.asarray(out["values"], dtype=np.float64))
            bar.update(len(chunk))
    print(f"teacher labelled {len(examples)} {task} rows ({len(plan.names)} member(s))", file=sys.stderr, flush=True)
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------- transfer set


@dataclass
class Transfer:
    """One task's transfer set: the gold training rows then the new ones, and the teacher's values."""

    gold: list[Example]
    augmented: list[Example]
    values: np.ndarray
    seconds: dict[str, float]  # "augment" and "label": when they were computed (also for a cache hit)
    cached: list[str]  # what came from the cache: "augment", "label"

    @property
    def ids(self) -> np.ndarray:
        return np.array([e.id for e in self.gold + self.augmented])


@dataclass
class Settings:
    augment: dict[str, int]  # new rows per task
    seed: int
    pool: int
    neighbours: int
    device: str | None


def cache_file(predictor: Path, task: str, aug_key: str) -> Path:
    """One file per task and set of new rows, so that runs with other ``--augment`` settings (a larger
    transfer set tried beside the first) do not relabel each other's."""
    return predictor / "teacher-cache" / f"{task}-{aug_key}.npz"


def adopt_old_cache(old: Path, path: Path, aug_key: str) -> dict | None:
    """A cache written before there was one file per augmentation (``<task>.npz``) is renamed to its
    new name when it holds the new rows wanted, rather than labelled again; returns its content then."""
    if path.exists() or not old.is_file():
        return None
    cache = read_cache(old)
    if cache is None or cache["augment_key"] != aug_key:
        return None
    os.replace(old, path)
    return cache


def read_cache(path: Path) -> dict | None:
    """The cached arrays, or None (saying why when a file exists but cannot be used)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            cache = {key: npz[key] for key in npz.files}
        cache["augment_key"], cache["teacher_key"] = str(cache["augment_key"]), str(cache["teacher_key"])
        if not np.isfinite(cache["values"]).all():
            raise ValueError("non-finite values")
        if len(cache["aug_ids"]) != len(cache["aug_texts"]):
            raise ValueError(f"{len(cache['aug_ids'])} new ids but {len(cache['aug_texts'])} new rows")
        return cache
    except Exception as err:  # a corrupt or foreign file is recomputed, never trusted
        print(f"{path}: unreadable teacher cache ({type(err).__name__}: {err}); computing it again", file=sys.stderr)
        return None


def augment_key(task: str, cfg: TrainConfig, gold: list[Example], settings: Settings) -> str:
    """What the new rows depend on: the settings, the base encoder and the files they are drawn from."""
    used = {"task": task, "augment": settings.augment[task], "seed": settings.seed, "method": AUGMENT_METHOD}
    used |= {"pool": settings.pool, "neighbours": settings.neighbours, "model_path": cfg.model_path}
    used |= {"model_config": cfg.model_config, "max_length": cfg.max_length, "gold": rows_digest(gold)}
    digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode())
    for path in source_files(task, cfg.data_dir):
        file_digest(path, digest)
    return digest.hexdigest()[:16]


def new_rows(task: str, cfg: TrainConfig, gold: list[Example], settings: Settings) -> list[Example]:
    count = settings.augment[task]
    if count == 0:
        return []
    if TASKS[task].is_pair:
        embed = base_embedder(cfg, settings.device)
        # A new pair must not be a dev or test pair (Quora questions recur across its split): the teacher
        # would label a row the student is scored on.
        held_out = {frozenset(e.texts) for split in ("dev", "test") for e in load_examples(task, split, cfg.data_dir)}
        rows = pair_rows(gold, count, settings.seed, embed, settings.pool, settings.neighbours, held_out)
    else:
        rows = sentence_rows(task, count, settings.seed, cfg.data_dir)
    return [Example(f"aug-{task}-{k}", row, None) for k, row in enumerate(rows)]


def transfer_set(task: str, cfg: TrainConfig, predictor: Path, plan: TaskPlan, runner: Runner, settings: Settings) -> Transfer:
    """The task's transfer set, from the cache where it is still valid; the cache is rewritten when not."""
    gold = load_examples(task, "train", cfg.data_dir)[: cfg.train_limit]
    aug_key = augment_key(task, cfg, gold, settings)
    path = cache_file(predictor, task, aug_key)
    cache = adopt_old_cache(predictor / "teacher-cache" / f"{task}.npz", path, aug_key) or read_cache(path)
    cache = cache or {"augment_key": None, "teacher_key": None}
    seconds, cached = {}, []
    if cache["augment_key"] == aug_key:
        augmented = [
            Example(str(i), tuple(map(str, texts)), None) for i, texts in zip(cache["aug_ids"], cache["aug_texts"], strict=True)
        ]
        seconds["augment"], cached = float(cache["augment_seconds"]), ["augment"]
    else:
        started = time.perf_counter()
        augmented = new_rows(task, cfg, gold, settings)
        seconds["augment"] = time.perf_counter() - started
    rows = gold + augmented
    key = hashlib.sha256(f"{plan_digest(plan)}-{rows_digest(rows)}".encode()).hexdigest()[:16]
    if cache["teacher_key"] == key:
        values, seconds["label"] = cache["values"], float(cache["label_seconds"])
        cached.append("label")
    else:
        if cache["teacher_key"] is not None:
            print(f"{path}: stale (the teacher changed); labelling again", file=sys.stderr)
        started = time.perf_counter()
        values = label(runner, plan, task, rows)
        seconds["label"] = time.perf_counter() - started
    transfer = Transfer(gold, augmented, values, seconds, cached)
    if len(cached) < 2:
        write_cache(path, transfer, aug_key, key)
    return transfer


def write_cache(path: Path, transfer: Transfer, aug_key: str, teacher_key: str) -> None:
    columns = len(transfer.augmented[0].texts) if transfer.augmented else 1
    arrays = {
        "augment_key": np.array(aug_key),
        "teacher_key": np.array(teacher_key),
        "aug_ids": np.array([e.id for e in transfer.augmented], dtype=str),
        "aug_texts": np.array([e.texts for e in transfer.augmented], dtype=str).reshape(-1, columns),
        "values": transfer.values,
        "augment_seconds": np.array(transfer.seconds["augment"]),
        "label_seconds": np.array(transfer.seconds["label"]),
    }
    write_npz_outputs(path, arrays)


def write_transfer(directory: Path, transfers: dict[str, Transfer]) -> None:
    """The student's distill_dir (model/distill.py's layout), each file written atomically."""
    for task, transfer in transfers.items():
        write_npz_outputs(teacher_file(directory, task), {"ids": transfer.ids, "values": transfer.values})
        text = io.StringIO()
        writer = csv.writer(text, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", *TASKS[task].text_columns])
        writer.writerows([e.id, *e.texts] for e in transfer.augmented)
        if transfer.augmented:
            atomic_write_text(augment_file(directory, task), text.getvalue())
        else:  # no new rows (--augment 0, or too few sentences): no file, as model/distill.py expects
            augment_file(directory, task).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ student


# A student of several tasks gives each its own top third of the encoder's layers unless told otherwise
# (2 of MiniLM's 6): on the AMD EPYC (2026-12-02, an SST + STS student, same teacher and labels) that beat
# one shared encoder by +0.0051 ± 0.0023 r on STS and +0.0070 ± 0.0100 on SST out of selection, at the
# same cost per step.
STUDENT_TASK_LAYER_SHARE = 1 / 3
# ... and draws its tasks in proportion to their training rows (the trainer's default is round robin):
# on the AMD EPYC (2026-12-03, three-task students with 12,000 new paraphrase pairs, two seeds) that
# kept 86% and 87% of the teacher's paraphrase gain against 1% and none, paired +0.0060 ± 0.0086 and
# +0.0071 ± 0.0051, with SST and STS no worse, at the same training time.
STUDENT_SCHEDULE = "proportional"
# ... for 6 epochs (the trainer's default is 3): on the AMD EPYC (2026-12-03, the proportional three-task
# student, two seeds) 6 epochs against 4 kept 77% and 65% of the teacher's STS gain against 60% and 42%
# (paired +0.0015 ± 0.0011 and +0.0020 ± 0.0020), SST +0.0088 and +0.0033, paraphrase +0.0010 and
# -0.0033; 39 min of training on 2 cores.
STUDENT_EPOCHS = 6


def teacher_data_dir(plans: dict[str, TaskPlan]) -> Path | None:
    """The data folder the teacher's models trained on, when their configs record one and agree."""
    found = set()
    for plan in plans.values():
        for model_dir in plan.model_dirs:
            recorded = RunDir(model_dir).read_config().get("train", {}).get("data_dir")
            if recorded:
                found.add(Path(recorded).resolve())
    return found.pop() if len(found) == 1 else None


def student_data_dir(args: argparse.Namespace, values: dict, trained_on: Path | None) -> Path:
    """Where the student's rows come from: --data-dir, --config's or --set's data_dir, $MINBERT_DATA, else
    the teacher's own folder. Another folder than the teacher's is refused unless --other-data-dir says
    so: after ``data.holdout`` the full folder holds the held-out rows, which the student would then
    train on, gold labels and all, and the held-out check would no longer be one."""
    given = args.data_dir or values.get("data_dir") or os.environ.get(DATA_DIR_ENV)
    if given is None:
        return trained_on or resolve_data_dir(None)
    chosen = Path(given).resolve()
    if trained_on is not None and chosen != trained_on and not getattr(args, "other_data_dir", False):
        raise ValueError(
            f"the teacher's models trained on {trained_on}, but the student would train on {chosen} (--data-dir, "
            f"data_dir or ${DATA_DIR_ENV}): give --data-dir {trained_on}, or add --other-data-dir if that is meant"
        )
    return chosen


def student_config(
    args: argparse.Namespace, covered: list[str], distill_dir: Path, trained_on: Path | None = None
) -> TrainConfig:
    """The trainer's defaults for one model of every covered task (when there are several: each task's own
    top layers, STUDENT_TASK_LAYER_SHARE of them, STUDENT_SCHEDULE and STUDENT_EPOCHS), then --config,
    --tasks and --set, on the teacher's data folder unless told (student_data_dir); refused (ValueError)
    when a task is not covered or the trainer would refuse it."""
    values: dict = {"tasks": covered}
    if args.config is not None:
        try:
            values |= json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{args.config}: not a readable JSON object of TrainConfig fields ({err})") from err
    if args.tasks:
        values["tasks"] = args.tasks
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            values[key] = json.loads(text)
        except ValueError:
            values[key] = text  # a bare string: --set pooling=cls
    data_dir = str(student_data_dir(args, values, trained_on))
    cfg = TrainConfig.from_dict(values | {"distill_dir": str(distill_dir), "data_dir": data_dir, "distill_digest": None})
    if len(cfg.tasks) > 1:
        several = {
            "schedule": STUDENT_SCHEDULE,
            "epochs": STUDENT_EPOCHS,
            "task_layers": int(bert_config_for(cfg).num_hidden_layers * STUDENT_TASK_LAYER_SHARE),
        }
        cfg = dataclasses.replace(cfg, **{key: value for key, value in several.items() if key not in values})
    missing = [t for t in cfg.tasks if t not in covered]
    if missing:
        raise ValueError(f"the teacher covers {covered}, not {missing}")
    return cfg


def default_output_dir(predictor: Path) -> Path:
    """results/<studies>/distill/<method> for the predictor results/<studies>/ensemble/<method>/predictor."""
    if predictor.name == "predictor" and predictor.parent.parent.name == "ensemble":
        return predictor.parent.parent.parent / "distill" / predictor.parent.name
    return predictor / "distill"


# ------------------------------------------------------------------------------------------- report


def student_estimates(run: RunDir, splits: int, seed: int) -> dict[str, tuple[list[float], list[str]]]:
    """A trained run's out-of-selection scores, per task it kept dev outputs of: on each of the halves
    (A, B), the epoch best on A, scored on B; and the dev ids, in the order the halves index.

    One model serves all of a run's tasks with the weights of one epoch, which the trainer chose by the
    mean score over its tasks ("overall"). So the epoch is chosen the same way here: on the i-th halves
    of every task together (a per-task choice would score a model that does not exist, each task at
    its own epoch)."""
    kept = {t: run.output_epochs(t) for t in run.read_config()["train"]["tasks"]}
    tasks = [t for t, epochs in kept.items() if epochs]
    epochs = sorted(set.intersection(*(set(kept[t]) for t in tasks)))
    outputs = {t: [run.read_epoch_outputs(t, e) for e in epochs] for t in tasks}
    task_halves = {t: halves(len(outputs[t][0]["labels"]), splits, seed) for t in tasks}

    def score(t: str, epoch_index: int, rows: np.ndarray) -> float:
        out = outputs[t][epoch_index]
        return checked_metric(t, out["values"][rows], out["labels"][rows], f"{run.path} {t} epoch {epochs[epoch_index]}")

    scores: dict[str, list[float]] = {t: [] for t in tasks}
    for i in range(splits):
        on_a = [overall_score({t: score(t, e, task_halves[t][i][0]) for t in tasks}, tasks) for e in range(len(epochs))]
        chosen = int(np.argmax(on_a))  # the first of equals, as the trainer
        for t in tasks:
            scores[t].append(score(t, chosen, task_halves[t][i][1]))
    return {t: (scores[t], list(outputs[t][0]["ids"])) for t in tasks}


def build_rows(predictor: Path, task: str) -> tuple[list[Row], dict]:
    """The usual recipe's and the teacher's rows of the build's summary.json beside the predictor (none
    when it is a single run or the summary is missing), and the build's settings."""
    summary_file = predictor.parent / "summary.json"
    if predictor.name != "predictor" or not summary_file.is_file():
        return [], {}
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    wanted = (BASELINE, predictor.parent.name)  # the method folder's name is its method's
    rows = [Row(**r) for r in summary.get("rows", []) if r["task"] == task and r["name"] in wanted]
    return rows, summary.get("settings", {})


def teacher_row(predictor: Path, plan: TaskPlan, task: str) -> Row:
    """The teacher's row from the manifest (dev in-sample, passes), or from a single run's metrics."""
    manifest_file = predictor / "manifest.json"
    if manifest_file.is_file():
        entry = json.loads(manifest_file.read_text(encoding="utf-8"))["tasks"]
        entry = entry.get(task, {}) if isinstance(entry, dict) else {}  # an older manifest has no per-task entry
        name = f"teacher ({entry.get('method', 'ensemble')})"
        cost, dev = entry.get("inference_cost", 0), entry.get("dev", float("nan"))
        return Row(task, name, SELECTED_ROW, plan.names, cost, dev, None, plan.weights)
    run = RunDir(predictor)
    best = run.read_metrics()["best"]
    return Row(task, "teacher (one run)", MEMBER_ROW, plan.names, encoder_passes(run.read_config(), task), best[task])


def run_row(
    run: RunDir,
    task: str,
    baseline: Row | None,
    teacher_ids: list[str] | None,
    settings: dict,
    label: str,
    name: str = "student (distilled)",
    estimated: dict | None = None,
) -> tuple[Row, list[str]]:
    """A trained run's row (the student, or a run compared with it; ``label`` names its folder),
    estimated as the student is, and the dev ids its estimate indexes. ``estimated`` keeps each run's
    estimates of all its tasks, so that a report of several tasks computes them once per run."""
    metrics = run.read_metrics()
    history = metrics["history"]
    splits, seed = settings.get("splits", DEFAULT_SPLITS), settings.get("seed", DEFAULT_SEED)
    estimated = {} if estimated is None else estimated
    key = (run.path, splits, seed)
    if key not in estimated:
        estimated[key] = student_estimates(run, splits, seed)
    scores, ids = estimated[key][task]
    estimate = {"mean": float(np.mean(scores)), "sd": float(np.std(scores, ddof=1)), "splits": splits, "scores": scores}
    note = "epoch chosen on half A of dev (of all its tasks together: one model), scored on half B"
    base = (baseline.estimate or {}).get("scores") if baseline else None
    if base and teacher_ids == list(ids) and len(base) == len(scores):
        gains = [s - s0 for s, s0 in zip(scores, base, strict=True)]
        estimate |= {"gain_mean": float(np.mean(gains)), "gain_sd": float(np.std(gains, ddof=1)), "gains": gains}
    elif baseline:
        note += "; no paired gain: this run's dev rows are not the build's"
    training = history_training(history)
    passes = encoder_passes(run.read_config(), task)
    dev = metrics["best"][task]
    row = Row(task, name, STUDENT_ROW, [label], passes, dev, estimate, None, note, training=training)
    return row, list(ids)


def run_labels(paths: list[Path]) -> list[str]:
    """How a report names run folders: each by the fewest trailing parts of its full path, two at least
    (a bare trial number says little), that no other folder's path ends with (two distillations'
    students: ``student3-tl0/student``, ``student3-tl2/student``)."""
    parts = [path.resolve().parts for path in paths]
    labels = []
    for i, mine in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != i]
        count = next((k for k in range(2, len(mine)) if all(p[-k:] != mine[-k:] for p in others)), len(mine))
        labels.append(str(Path(*mine[-count:])))
    return labels


def kept_gain(teacher: Row, student: Row) -> str:
    """The share of the teacher's out-of-selection gain over the usual recipe that the student keeps."""
    gains = [(row.estimate or {}).get("gain_mean") for row in (teacher, student)]
    if None in gains or gains[0] <= 0:
        return ""
    spread = (teacher.estimate or {}).get("gain_sd") or 0.0
    if gains[0] <= spread:  # a share of a gain within noise (e.g. -3060% of +0.0005 ± 0.0129) says nothing
        return "; the teacher's own gain is within its spread: no share of it to keep"
    if gains[1] <= 0:  # below the usual recipe: "keeps -48%" would read as a share
        return "; keeps none of the teacher's gain (below the usual recipe)"
    return f"; keeps {gains[1] / gains[0]:.0%} of the teacher's gain"


def paired_difference(student: Row, student_ids: list[str], other: Row, other_ids: list[str]) -> dict | None:
    """The student's out-of-selection score minus a compared run's, paired on the same halves (the
    difference the two runs' own spreads over the halves would hide): None when the two runs' dev rows
    differ, as the same halves would then hold different examples."""
    if student_ids != other_ids:
        return None
    differences = np.subtract(student.estimate["scores"], other.estimate["scores"])
    return {"student_minus_mean": float(differences.mean()), "student_minus_sd": float(differences.std(ddof=1))}


def prediction_ids(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fp:
        return [row[0].strip() for row in list(csv.reader(fp))[1:]]


def compared_runs(paths: list[Path], tasks: list[str]) -> list[RunDir]:
    """The runs of ``--compare``, checked before anything is trained: each has finished epochs with dev
    outputs for every distilled task (RunFileError naming the folder otherwise)."""
    runs = []
    for path in paths:
        run = RunDir(path)
        if not run.metrics_file.is_file():
            raise RunFileError(f"--compare {path}: no metrics.json (not a trained run folder)")
        missing = [task for task in tasks if not run.output_epochs(task)]
        if missing:
            raise RunFileError(f"--compare {path}: no per-epoch dev outputs for {missing} (train it on those tasks)")
        runs.append(run)
    return runs


def write_report(
    output_dir: Path,
    predictor: Path,
    plans: dict[str, TaskPlan],
    transfers: dict[str, Transfer],
    seconds: float,
    compared: Sequence[RunDir] = (),
) -> str:
    run = RunDir(output_dir / STUDENT_FOLDER)
    config = run.read_config()["train"]
    rows, header_transfer = [], {}
    labels = run_labels([run.path, *(other.path for other in compared)])
    estimated: dict = {}  # (run folder, splits, seed) -> its tasks' out-of-selection scores
    for task, transfer in transfers.items():
        built, settings = build_rows(predictor, task)
        baseline = next((r for r in built if r.kind == BASELINE_ROW), None)
        if not any(r.kind == SELECTED_ROW for r in built):
            built.append(teacher_row(predictor, plans[task], task))
        teacher_ids = prediction_ids(predictor.parent / "predictions" / f"{task}-dev-out.csv")
        student, student_ids = run_row(run, task, baseline, teacher_ids, settings, labels[0], estimated=estimated)
        teacher = next(r for r in built if r.kind != BASELINE_ROW)
        student.note += kept_gain(teacher, student)
        others = []
        for other_run, label in zip(compared, labels[1:], strict=True):
            other, other_ids = run_row(other_run, task, baseline, teacher_ids, settings, label, f"{label} (compared)", estimated)
            difference = paired_difference(student, student_ids, other, other_ids)
            if difference is None:
                other.note += "; not paired with the student: their dev rows differ"
            else:
                other.estimate |= difference
                other.note += (
                    f"; the student minus this run, paired: {difference['student_minus_mean']:+.4f} "
                    f"± {difference['student_minus_sd']:.4f}"
                )
            others.append(other)
        rows += [*built, student, *others]
        limit = value_for_task(config["augment_limit"], task)
        header_transfer[task] = {
            "gold_rows": len(transfer.gold),
            "augmented_rows": len(transfer.augmented),
            "student_augmented_rows": len(transfer.augmented) if limit is None else min(limit, len(transfer.augmented)),
            "augment_seconds": round(transfer.seconds["augment"], 1),
            "label_seconds": round(transfer.seconds["label"], 1),
            "cached": transfer.cached,
        }
    header = {"teacher": str(predictor), "student": str(run.path), "config": config, "transfer": header_transfer}
    header["compared"] = [str(other.path) for other in compared]
    header["seconds"] = {"this_run_wall": round(seconds, 1)}
    lines = [
        f"- {task}: {t['gold_rows']} gold + {t['augmented_rows']} new rows (the student uses {t['student_augmented_rows']}); "
        f"augmentation {t['augment_seconds']:.0f} s, "
        f"teacher labelling {t['label_seconds']:.0f} s" + (f" (cached: {', '.join(t['cached'])})" if t["cached"] else "")
        for task, t in header_transfer.items()
    ]
    preamble = (
        f"Teacher: {predictor}. Student: {run.path} (alpha {config['distill_alpha']}, temperature "
        f"{config['distill_temperature']}, augment_limit {config['augment_limit']}). Teacher and usual-recipe rows are the "
        "build's (out-of-selection as there); the student's out-of-selection score chooses its one epoch on half A of "
        "each of the build's halves of dev (of all its tasks together, by their mean score, as the trainer chose it "
        "on all of dev) and scores it on half B; its gain is paired with the usual recipe on the same "
        "halves. Said plainly: the teacher (its members, weights, epochs and STS scales) was chosen on all of dev by "
        "ensemble.build, and the student learns from it, so the student's dev scores inherit that choice; its estimate "
        "corrects only for its own epoch choice.\n\n" + "\n".join(lines) + f"\n- this run's wall time: {seconds:.0f} s\n\n"
    )
    return write_summary(output_dir, "Distilled student beside its teacher", header, rows, preamble)


# ---------------------------------------------------------------------------------------------- CLI


def augment_counts(values: list[str], tasks: list[str]) -> dict[str, int]:
    """``--augment N`` (every task) or ``TASK=N ...`` (every distilled task named) as new rows per task."""
    from model.train import parse_per_task

    try:
        given = parse_per_task("augment", values, int)
    except argparse.ArgumentTypeError as err:
        raise ValueError(str(err)) from None
    counts = {task: value_for_task(given, task) for task in tasks}
    extra = sorted(set(given) - set(tasks)) if isinstance(given, dict) else []
    missing = [task for task, n in counts.items() if n is None]
    if extra or missing:
        what = f"{extra} not distilled (distilled: {tasks})" if extra else f"no value for {missing}"
        raise ValueError(f"--augment: {what}; give N for every task or TASK=N for each of {tasks}")
    negative = {task: n for task, n in counts.items() if n < 0}
    if negative:
        raise ValueError(f"--augment must be >= 0, not {negative}")
    return counts


def distill(args: argparse.Namespace, report: Callable[[dict], None] | None = None) -> dict:
    """Check everything, label (or reuse) the transfer sets, write them, train (or resume) the student,
    write the report. Returns the trainer's metrics ({} with --label-only)."""
    from model.train import train

    started = time.perf_counter()
    predictor, plans = teacher_plans(args.ensemble)
    output_dir = (args.output_dir or default_output_dir(predictor)).resolve()  # absolute: a study's trials run elsewhere
    cfg = student_config(args, list(plans), output_dir / "transfer", teacher_data_dir(plans))
    compared = compared_runs(args.compare or [], cfg.tasks)
    settings = Settings(augment_counts(args.augment, cfg.tasks), args.seed, args.neighbour_pool, args.neighbours, args.device)
    runner = Runner(args.device)
    transfers = {task: transfer_set(task, cfg, predictor, plans[task], runner, settings) for task in cfg.tasks}
    write_transfer(output_dir / "transfer", transfers)
    if args.label_only:
        print(f"wrote {output_dir / 'transfer'} (a study's distill_dir)", file=sys.stderr)
        return {}
    metrics = train(cfg, output_dir / STUDENT_FOLDER, report=report, fresh=args.fresh, progress=True)
    print(write_report(output_dir, predictor, plans, transfers, time.perf_counter() - started, compared))
    print(f"wrote {output_dir} (the student: {output_dir / STUDENT_FOLDER})", file=sys.stderr)
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ensemble", type=Path, required=True, help="method folder of ensemble.build, its predictor/, or a run")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), help="tasks to distil (default: every covered task)")
    parser.add_argument(
        "--augment",
        nargs="+",
        default=["2000"],
        metavar="N|TASK=N",
        help="new unlabelled rows: N for every task, or TASK=N for each distilled task (default 2000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the new rows (default %(default)s)")
    parser.add_argument(
        "--neighbour-pool", type=int, default=4000, help="pair tasks: sentences embedded to find neighbours (default %(default)s)"
    )
    parser.add_argument(
        "--neighbours", type=int, default=3, help="pair tasks: nearest neighbours per sentence (default %(default)s)"
    )
    parser.add_argument("--config", type=Path, help="JSON object of TrainConfig fields for the student")
    parser.add_argument(
        "--set", nargs="+", action="extend", metavar="KEY=VALUE", help="student TrainConfig fields (VALUE as JSON, else a string)"
    )
    parser.add_argument("--output-dir", type=Path, help="default: results/<studies>/distill/<method>")
    parser.add_argument(
        "--data-dir", help=f"CS224N data directory (default: ${DATA_DIR_ENV}, else the one the teacher's models trained on)"
    )
    parser.add_argument(
        "--other-data-dir",
        action="store_true",
        help="let the student train on another data directory than the teacher's models did (refused otherwise)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N for the teacher and the embeddings (default: cuda when available)")
    parser.add_argument(
        "--fresh", action="store_true", help="train the student from scratch even if OUTPUT/student holds last.pt"
    )
    parser.add_argument("--label-only", action="store_true", help="stop after writing OUTPUT/transfer")
    parser.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        action="extend",
        metavar="RUN",
        help="trained run folders reported beside the student, estimated as it is (e.g. the multitask usual recipe)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        distill(args)
    except (EnsembleError, DataError, RunFileError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
