"""Study files: one TOML file per study in studies/, parsed into a StudySpec and checked before anything starts.

A study file names the tasks, the objective, the search space, the budget and fixed trainer settings::

    description = "free text"
    tasks = ["sts"]

    [objective]
    metric = "sts"            # a trained task's dev metric, or "overall"
    direction = "maximize"    # optional; every dev metric is higher-is-better, so studies only maximise

    [budget]
    trials = 8                # Optuna/Ray trials
    max_epochs = 3            # epochs of a trial that ASHA never stops
    grace_period = 1          # ASHA: epochs before a trial can be stopped
    reduction_factor = 2      # ASHA: keep the top 1/reduction_factor at each rung
    max_concurrent = 2        # trials at once
    cpus_per_trial = 1        # also the trainer's torch threads
    gpus_per_trial = 0
    seed = 0                  # TPE sampler seed
    startup_trials = 4        # random trials before TPE models the results
    trial_seeds = false       # true: trial n trains with seed = seed + n (more diverse ensemble members)
    time = "20m"              # optional: wall-clock budget of a run (90s, 15m, 1.5h); --time-budget overrides
    start_rule = "finish"     # under a time budget, start a trial only if it can finish; "first_rung": if it
                              # can reach ASHA's first rung (more, cheaper members); --start-rule overrides

    [search]                  # TrainConfig fields; floats/ints take low/high (log, step), any field takes choices
    lr = { low = 1e-5, high = 3e-4, log = true }
    pooling = { choices = ["mean", "cls"] }
    pair_encoding.sts = { choices = ["bi", "cross"] }   # a per-task field (batch_size, pair_encoding,
                                                        # pooling, augment_limit, loss_weight) searched for one task

    [variants.encoder]        # one searched choice that sets several fields at once, for settings
    bi_cosine = { pair_encoding = "bi", sts_head = "cosine" }   # that only go together
    cross = { pair_encoding = "cross", sts_head = "regression", max_length = 128 }

    [fixed]                   # any other TrainConfig field
    steps_per_epoch = 40

    [[start_points]]          # optional: trials to run first, with these values (others sampled); ASHA never
    lr = 5e-5                 # stops them early: by convention the first is the usual recipe, every ensemble's baseline
    encoder = "bi_cosine"     # a variant by its choice's name

Every problem (unknown key, wrong type, bad range, unknown task, surgery or other choice, a
combination the trainer refuses such as a cosine STS head on a cross-encoder) raises StudyError
naming the file and the key, before anything starts.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import tomllib

from data.files import TASKS
from model.config import NUMBER_PER_TASK_FIELDS, PER_TASK_FIELDS, TrainConfig, applies_to
from search.spec import TRAIN_DEFAULTS, Budget, Param, StudyError, StudySpec, check_budget
from search.timebudget import parse_duration

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"

# TrainConfig fields that a study may not set: the runner sets them, or they are run options.
RUNNER_FIELDS = {
    "tasks": "set the top-level `tasks` list",
    "epochs": "set budget.max_epochs",
    "data_dir": "pass --data-dir or set $MINBERT_DATA",
}
# Fields that change how a run executes, not what it computes: fixed only, never searched.
NOT_SEARCHABLE = {"threads", "device", "predict_test", "cache_dir", "model_path", "model_config"}

TOP_KEYS = {"description", "tasks", "objective", "budget", "search", "variants", "fixed", "start_points"}
OBJECTIVE_KEYS = {"metric", "direction"}
PARAM_KEYS = {"low", "high", "log", "step", "choices"}


BUDGET_REQUIRED = ("trials", "max_epochs", "grace_period")


def available_studies(studies_dir: Path = STUDIES_DIR) -> list[str]:
    return sorted(p.stem for p in studies_dir.glob("*.toml"))


def study_path(name_or_path: str | Path, studies_dir: Path = STUDIES_DIR) -> Path:
    """studies/<name>.toml for a bare name; a path ending in .toml (or an existing file) as it is."""
    text = str(name_or_path)
    if text.endswith(".toml") or Path(text).is_file():
        return Path(text).resolve()
    path = studies_dir / f"{text}.toml"
    if not path.is_file():
        raise StudyError(f"{path}: no such study file; studies available: {available_studies(studies_dir)}")
    return path


def load_spec(name_or_path: str | Path, studies_dir: Path = STUDIES_DIR) -> StudySpec:
    """Parse and check a study file; StudyError names the file and the key of any problem."""
    path = study_path(name_or_path, studies_dir)
    try:
        with open(path, "rb") as fp:
            raw = tomllib.load(fp)
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file; studies available: {available_studies(studies_dir)}") from None
    except tomllib.TOMLDecodeError as error:
        raise StudyError(f"{path}: not valid TOML: {error}") from None
    return parse_spec(raw, path)


def parse_spec(raw: dict[str, Any], path: Path) -> StudySpec:
    where = str(path)
    _check_keys(raw, TOP_KEYS, where, "")
    for key in ("tasks", "objective", "budget", "search"):
        if key not in raw:
            raise StudyError(f"{where}: {key}: missing (every study names tasks, objective, budget and search)")
    description = _typed(raw.get("description", ""), str, where, "description")

    tasks = _typed(raw["tasks"], list, where, "tasks")
    if not tasks or len(set(map(str, tasks))) != len(tasks):
        raise StudyError(f"{where}: tasks: must be a non-empty list of distinct task names, got {tasks!r}")
    for task in tasks:
        if task not in TASKS:
            raise StudyError(f"{where}: tasks: unknown task {task!r}; known tasks: {list(TASKS)}")

    objective = _typed(raw["objective"], dict, where, "objective")
    _check_keys(objective, OBJECTIVE_KEYS, where, "objective.")
    if "metric" not in objective:
        raise StudyError(f"{where}: objective.metric: missing")
    metric = _typed(objective["metric"], str, where, "objective.metric")
    direction = _typed(objective.get("direction", "maximize"), str, where, "objective.direction")  # optional: always maximize
    if metric not in [*tasks, "overall"]:
        known = [*tasks, "overall"]
        raise StudyError(f"{where}: objective.metric: {metric!r} is not a trained task's metric; use one of {known}")
    if len(tasks) > 1 and metric != "overall":
        # The trainer keeps the epoch with the best "overall"; the objective must rank epochs the same way.
        raise StudyError(f"{where}: objective.metric: a study of several tasks optimises 'overall', not {metric!r}")
    if direction not in ("maximize", "minimize"):
        raise StudyError(f"{where}: objective.direction: must be 'maximize' or 'minimize', not {direction!r}")
    if direction != "maximize":
        raise StudyError(f"{where}: objective.direction: every dev metric ({metric!r} too) is higher-is-better; use 'maximize'")

    budget = _parse_budget(_typed(raw["budget"], dict, where, "budget"), where)
    fixed = dict(_typed(raw.get("fixed", {}), dict, where, "fixed"))
    space = _parse_space(_typed(raw["search"], dict, where, "search"), tasks, where)
    variants = _parse_variants(_typed(raw.get("variants", {}), dict, where, "variants"), space, fixed, where)
    for name, table in (("fixed", fixed), *((f"variants.{v}", c) for v, choices in variants.items() for c in choices.values())):
        _check_set_fields(table, space, name, where)
    if budget.trial_seeds and ("seed" in fixed or "seed" in space):
        place = "fixed" if "seed" in fixed else "search"
        raise StudyError(f"{where}: budget.trial_seeds: gives each trial its own seed; remove {place}.seed, or the option")
    study = StudySpec(
        name=path.stem,
        path=path,
        tasks=list(tasks),
        metric=metric,
        budget=budget,
        space=space,
        fixed=fixed,
        description=description,
        variants=variants,
    )
    _check_combinations(study, where)
    study.start_points = _parse_start_points(raw.get("start_points", []), study, where)
    return study


# ------------------------------------------------------------------------------------------ parts


def _check_keys(table: dict, allowed: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise StudyError(f"{where}: {prefix}{unknown[0]}: unknown key; allowed here: {sorted(allowed)}")


def _typed(value: Any, kind: type | tuple[type, ...], where: str, key: str) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # TOML booleans are Python bools, which are also ints: never accept one where a number is meant.
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join(TOML_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise StudyError(f"{where}: {key}: must be {names}, not {value!r}")
    return value


TOML_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list", dict: "a table"}


def _parse_budget(table: dict, where: str) -> Budget:
    # The time budget is written as a duration ("15m"), the field holds seconds.
    known = {f.name for f in dataclasses.fields(Budget)} - {"time_s"} | {"time"}
    _check_keys(table, known, where, "budget.")
    table = dict(table)
    if "time" in table:
        try:
            table["time_s"] = parse_duration(_typed(table.pop("time"), (str, int, float), where, "budget.time"))
        except ValueError as err:
            raise StudyError(f"{where}: budget.time: {err}") from None
    for key in BUDGET_REQUIRED:
        if key not in table:
            raise StudyError(f"{where}: budget.{key}: missing")
    values = {}
    for f in dataclasses.fields(Budget):
        if f.name in table:
            kind = {"int": (int,), "bool": (bool,), "str": (str,)}.get(str(f.type), (int, float))
            values[f.name] = _typed(table[f.name], kind, where, f"budget.{f.name}")
    budget = Budget(**values)
    check_budget(budget, where)
    return budget


def _train_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _param_kind(name: str, where: str) -> str:
    """float/int/categorical from the field's default; fields without a plain default cannot be searched.
    ``name`` is a field, or "field.task" for one task's value of a per-task field."""
    fields_ = _train_fields()
    key = f"search.{name}"
    name = name.split(".", 1)[0]
    if name in RUNNER_FIELDS:
        raise StudyError(f"{where}: {key}: not searchable: {RUNNER_FIELDS[name]}")
    if name not in fields_:
        raise StudyError(f"{where}: {key}: unknown TrainConfig field; known: {sorted(fields_)}")
    if name in NUMBER_PER_TASK_FIELDS:  # augment_limit's default is None: the kind is the trainer's
        return "int" if NUMBER_PER_TASK_FIELDS[name] is int else "float"
    default = TRAIN_DEFAULTS[name]
    if isinstance(default, dict):  # a per-task field's default table: its values' kind
        default = next(iter(default.values()))
    if name in NOT_SEARCHABLE or default is None or isinstance(default, list):
        raise StudyError(f"{where}: {key}: this field cannot be searched; set it under [fixed]")
    if isinstance(default, bool) or isinstance(default, str):
        return "categorical"
    return "int" if isinstance(default, int) else "float"


def _parse_space(table: dict, tasks: list[str], where: str) -> dict[str, Param]:
    if not table:
        raise StudyError(f"{where}: search: empty; a study searches at least one TrainConfig field")
    space = {}
    for name, spec in table.items():
        if name in PER_TASK_FIELDS and isinstance(spec, dict) and spec and not set(spec) & PARAM_KEYS:
            # pair_encoding.sts = {...}: TOML reads the dotted key as a table of tasks
            for task, task_spec in spec.items():
                if task not in tasks or not applies_to(name, task):
                    usable = [t for t in tasks if applies_to(name, t)]
                    raise StudyError(
                        f"{where}: search.{name}.{task}: not a task this study trains that {name} applies to; use {usable}"
                    )
                space[f"{name}.{task}"] = _parse_param(f"{name}.{task}", task_spec, where)
        else:
            space[name] = _parse_param(name, spec, where)
    return space


def _parse_variants(table: dict, space: dict[str, Param], fixed: dict, where: str) -> dict[str, dict[str, dict[str, Any]]]:
    """[variants.NAME] tables: each choice sets several TrainConfig fields at once."""
    variants: dict[str, dict[str, dict[str, Any]]] = {}
    fields_ = _train_fields()
    for name, choices in table.items():
        key = f"variants.{name}"
        if name in fields_ or name in space:
            raise StudyError(f"{where}: {key}: the name of a variant must not be a TrainConfig field or a searched key")
        choices = _typed(choices, dict, where, key)
        if len(choices) < 2:
            raise StudyError(f"{where}: {key}: give at least two choices, each a table of settings")
        variants[name] = {}
        for choice, settings in choices.items():
            settings = _typed(settings, dict, where, f"{key}.{choice}")
            for field_name in settings:
                taken = "fixed" if field_name in fixed else "search" if field_name in space else None
                others = (v for v, c in variants.items() if v != name and field_name in next(iter(c.values())))
                taken = taken or next((f"variants.{v}" for v in others), None)
                if taken:
                    raise StudyError(f"{where}: {key}.{choice}.{field_name}: also set by [{taken}]; a field has one owner")
            variants[name][choice] = dict(settings)
    return variants


def _parse_param(name: str, spec: Any, where: str) -> Param:
    key = f"search.{name}"
    kind = _param_kind(name, where)
    spec = _typed(spec, dict, where, key)
    _check_keys(spec, PARAM_KEYS, where, f"{key}.")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise StudyError(f"{where}: {key}.{extra[0]}: not allowed together with choices")
        choices = _typed(spec["choices"], list, where, f"{key}.choices")
        if not choices:
            raise StudyError(f"{where}: {key}.choices: empty; list at least one value")
        if len(set(map(repr, choices))) != len(choices):
            raise StudyError(f"{where}: {key}.choices: repeated values in {choices!r}")
        element = {"categorical": (str, bool), "int": (int,), "float": (int, float)}[kind]
        for i, choice in enumerate(choices):
            _typed(choice, element, where, f"{key}.choices[{i}]")
        return Param(name, "categorical", choices=tuple(choices))
    if kind == "categorical":
        raise StudyError(f"{where}: {key}: a {name} is a name, not a number: give choices = [...]")
    for bound in ("low", "high"):
        if bound not in spec:
            raise StudyError(f"{where}: {key}.{bound}: missing (give low and high, or choices)")
    number = (int,) if kind == "int" else (int, float)
    low = _typed(spec["low"], number, where, f"{key}.low")
    high = _typed(spec["high"], number, where, f"{key}.high")
    log = _typed(spec.get("log", False), bool, where, f"{key}.log")
    step = spec.get("step")
    if step is not None:
        step = _typed(step, number, where, f"{key}.step")
        if step <= 0:
            raise StudyError(f"{where}: {key}.step: must be greater than 0, not {step!r}")
        if log:
            raise StudyError(f"{where}: {key}.step: cannot be combined with log = true")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise StudyError(f"{where}: {key}: low and high must be finite, not {low!r}, {high!r}")
    if low >= high:
        raise StudyError(f"{where}: {key}: low ({low!r}) must be less than high ({high!r})")
    if log and low <= 0:
        raise StudyError(f"{where}: {key}.low: a log-scale range needs low > 0, not {low!r}")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _check_set_fields(table: dict, space: dict[str, Param], place: str, where: str) -> None:
    """Fields set outright (under [fixed] or by a variant) exist, may be set, and are not also searched."""
    fields_ = _train_fields()
    for name in table:
        if name in RUNNER_FIELDS:
            raise StudyError(f"{where}: {place}.{name}: not allowed here: {RUNNER_FIELDS[name]}")
        if name not in fields_:
            raise StudyError(f"{where}: {place}.{name}: unknown TrainConfig field; known: {sorted(fields_)}")
        if name in space or any(key.startswith(f"{name}.") for key in space):
            setter = "fixed" if place == "fixed" else "set by a variant"
            raise StudyError(f"{where}: {place}.{name}: also under [search]; a field is either {setter} or searched")


def _check_combinations(study: StudySpec, where: str) -> None:
    """The fixed settings, every variant's choices and every end of every searched range must make
    valid trainer configs. Each variant choice and each searched value is tried against the first
    value of everything else, and every variant choice against every searched value, so that a
    combination the trainer would refuse (a cosine head on a cross-encoder, say) fails here."""
    if len(study.tasks) == 1:
        why = f"gradient surgery combines several tasks' gradients; {study.tasks} is one task"
        tables = [("fixed", study.fixed), *((f"variants.{v}.{c}", s) for v, cs in study.variants.items() for c, s in cs.items())]
        for place, table in tables:
            if table.get("surgery", "none") != "none":
                raise StudyError(f"{where}: {place}.surgery: {why}")
        if "surgery" in study.space:
            raise StudyError(f"{where}: search.surgery: {why}")
        weighted = [f"search.{name}" for name in study.space if name.split(".")[0] == "loss_weight"]
        weighted += [f"variants.{v}" for v, cs in study.variants.items() if any("loss_weight" in s for s in cs.values())]
        if weighted:  # one task's weight only rescales its gradient, which AdamW undoes: trials wasted
            raise StudyError(f"{where}: {weighted[0]}: loss weights are relative between tasks; {study.tasks} is one task")
    if "loss_weight" in study.space:  # the same weight for every task: a rescaled loss, nothing searched
        why = "one weight for every task only rescales the loss; search one task's, loss_weight.TASK"
        raise StudyError(f"{where}: search.loss_weight: {why}")
    first = {name: param.corner_values()[0] for name, param in study.space.items()}
    first.update({name: next(iter(choices)) for name, choices in study.variants.items()})

    def check(point: dict[str, Any], key: str, value: Any) -> None:
        try:
            TrainConfig.from_dict(study.train_config(point))
        except (ValueError, TypeError) as error:
            raise StudyError(f"{where}: {key}: value {value!r} is not a valid setting: {error}") from None

    try:
        TrainConfig.from_dict(study.train_config(first))
    except (ValueError, TypeError) as error:
        context = " (with the first value of each searched field and variant)" if first else ""
        raise StudyError(f"{where}: fixed: {error}{context}") from None
    for variant, choices in study.variants.items():
        for choice in choices:
            check({**first, variant: choice}, f"variants.{variant}.{choice}", choice)
    for name, param in study.space.items():
        for value in param.corner_values():
            check({**first, name: value}, f"search.{name}", value)
            for variant, choices in study.variants.items():
                for choice in choices:
                    where_key = f"variants.{variant}.{choice}"
                    check({**first, name: value, variant: choice}, where_key, f"{choice} with {name}={value!r}")


def _flatten_point(point: dict[str, Any]) -> dict[str, Any]:
    """pair_encoding.sts = "bi" in a start point reads as {"pair_encoding": {"sts": "bi"}}: flatten it."""
    flat = {}
    for name, value in point.items():
        if name in PER_TASK_FIELDS and isinstance(value, dict):
            flat.update({f"{name}.{task}": v for task, v in value.items()})
        else:
            flat[name] = value
    return flat


def _parse_start_points(points: Any, study: StudySpec, where: str) -> list[dict[str, Any]]:
    points = _typed(points, list, where, "start_points")
    variants = {name: Param(name, "categorical", choices=tuple(choices)) for name, choices in study.variants.items()}
    space = {**study.space, **variants}
    parsed = []
    for i, point in enumerate(points):
        key = f"start_points[{i}]"
        point = _flatten_point(_typed(point, dict, where, key))
        for name, value in point.items():
            if name not in space:
                raise StudyError(f"{where}: {key}.{name}: not a searched field or variant; searched: {sorted(space)}")
            if not space[name].contains(value):
                raise StudyError(f"{where}: {key}.{name}: {value!r} lies outside search.{name}")
        parsed.append(dict(point))
    return parsed
