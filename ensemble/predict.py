"""``python -m ensemble.predict --ensemble DIR --input FILE.csv``: run a built ensemble on a new file.

DIR is a method folder written by ``python -m ensemble.build`` (``results/<study>/ensemble/<method>``),
its ``predictor/`` folder, or any trainer output dir. A soup (config.json + model.safetensors) is one
model run; a logit ensemble (manifest.json) runs each member model and averages their outputs with
the manifest's weights.

FILE.csv is in the CS224N format (tab-separated, header with ``id`` and the text columns; a label
column is optional and, when present, the metric is printed). The task comes from the columns
(``sentence`` vs ``sentence1``/``sentence2``; ``similarity`` / ``is_duplicate``), then from the file name
(sst, cfimdb, quora/para, sts), then from the ensemble's tasks; ``--task`` overrides.

The leaderboard CSV goes to ``--output``, by default to ``<DIR>/predict/<input name>-<task>-out.csv``
(next to the ensemble, since the input's folder, e.g. the shared data, may be read-only).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

from data.files import TASK_FILES, DataError, Example, read_file
from ensemble.logits import Outputs, align_outputs, average_outputs
from ensemble.members import EnsembleError
from ensemble.soup import as_numpy_outputs
from model.metrics import task_metric, write_predictions

# Words in a file name that point to a task.
NAME_HINTS = {"sst": "sst", "cfimdb": "cfimdb", "quora": "para", "para": "para", "paraphrase": "para", "sts": "sts"}


def find_predictor(directory: Path) -> Path:
    """The folder holding manifest.json (logit ensemble) or config.json + model.safetensors (soup)."""
    for candidate in (directory, directory / "predictor"):
        if (candidate / "manifest.json").is_file() or (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(
        f"{directory}: no ensemble here; expected manifest.json, or config.json and model.safetensors, "
        f"in it or in {directory / 'predictor'}"
    )


def predictor_tasks(predictor: Path) -> tuple[dict | None, list[str]]:
    """The logit manifest (None for a soup) and the tasks the predictor can do."""
    manifest_file = predictor / "manifest.json"
    try:
        if manifest_file.is_file():
            manifest = json.loads(manifest_file.read_text())
            return manifest, list(manifest["tasks"])
        return None, list(json.loads((predictor / "config.json").read_text())["train"]["tasks"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EnsembleError(f"{predictor}: unreadable ensemble description ({type(err).__name__}: {err})") from err


def read_header(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as fp:
        return next(csv.reader(fp, delimiter="\t"), [])


def infer_task(path: Path, header: list[str], available: list[str]) -> str:
    """The task of a CS224N-format file; an error lists what remains ambiguous."""
    candidates = [t for t, spec in TASK_FILES.items() if all(c in header for c in spec.text_columns)]
    if "sentence2" in header:  # a pair file also has no "sentence" column, but be explicit
        candidates = [t for t in candidates if len(TASK_FILES[t].text_columns) == 2]
    if not candidates:
        raise DataError(f"{path}:1: no task has the columns {header}; expected 'sentence' or 'sentence1' and 'sentence2'")
    labelled = [t for t in candidates if TASK_FILES[t].label_column in header]
    if len({TASK_FILES[t].label_column for t in labelled}) == 1 and len(labelled) < len(candidates):
        candidates = labelled
    words = set(re.split(r"[^a-z0-9]+", path.name.lower()))
    named = [t for t in candidates if any(NAME_HINTS.get(w) == t for w in words)]
    if named:
        candidates = named
    if len(candidates) > 1:
        candidates = [t for t in candidates if t in available] or candidates
    if len(candidates) != 1:
        raise DataError(f"{path}: cannot tell the task from the columns and name (could be {candidates}); pass --task")
    return candidates[0]


def predict_outputs(predictor: Path, manifest: dict | None, task: str, examples: list[Example], device: str | None) -> Outputs:
    """Run the soup, or every member of a logit ensemble (averaged with the manifest's weights)."""
    from model.train import evaluate_model, load_trained

    def run(model_dir: Path) -> Outputs:
        model, cfg = load_trained(model_dir, device=device)
        _, outputs = evaluate_model(model, cfg, "test", examples={task: examples})
        return as_numpy_outputs(outputs)

    if manifest is None:
        return run(predictor)
    members = manifest["members"]
    names = [f"trial {m['trial']}" for m in members]
    outputs = align_outputs(names, [run(Path(m["artifact_dir"])) for m in members], "input")
    return average_outputs(outputs, [float(m["weight"]) for m in members])


def default_output(ensemble_dir: Path, input_path: Path, task: str) -> Path:
    return ensemble_dir / "predict" / f"{input_path.stem}-{task}-out.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ensemble", type=Path, required=True, help="method folder of ensemble.build, or its predictor/")
    parser.add_argument("--input", type=Path, required=True, help="CS224N-format file (tab-separated)")
    parser.add_argument(
        "--output", type=Path, help="leaderboard CSV to write (default: <ENSEMBLE>/predict/<input>-<task>-out.csv)"
    )
    parser.add_argument("--task", choices=sorted(TASK_FILES), help="task of the input file (default: inferred)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    return parser


def predict(args: argparse.Namespace) -> tuple[Path, str, float | None]:
    """Write the predictions; returns their path, the task, and its metric when the file has labels."""
    predictor = find_predictor(args.ensemble)
    manifest, tasks = predictor_tasks(predictor)
    header = read_header(args.input)
    task = args.task or infer_task(args.input, header, tasks)
    if task not in tasks:
        raise EnsembleError(f"the ensemble in {predictor} predicts {tasks}, not {task!r} (the task of {args.input})")
    spec = TASK_FILES[task]
    labelled = spec.label_column in header
    examples = read_file(args.input, spec, labelled=labelled)
    outputs = predict_outputs(predictor, manifest, task, examples, args.device)[task]
    output = args.output or default_output(args.ensemble, args.input, task)
    write_predictions(output, task, outputs["ids"], outputs["values"])
    score = task_metric(task, outputs["values"], [e.label for e in examples]) if labelled else None
    return output, task, score


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output, task, score = predict(args)
    except (EnsembleError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {output}"
        + ("" if score is None else f" ({'Pearson r' if task == 'sts' else 'accuracy'} on the file's labels: {score:.4f})")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
