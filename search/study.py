"""Study files: one TOML file per study in studies/, parsed and checked before anything starts.

A study file names the tasks, the objective, the search space, the budget and fixed trainer settings::

    description = "free text"
    tasks = ["sts"]

    [objective]
    metric = "sts"            # a trained task's dev metric, or "overall"
    direction = "maximize"

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

    [search]                  # TrainConfig fields; floats/ints take low/high (log, step), any field takes choices
    lr = { low = 1e-5, high = 3e-4, log = true }
    pooling = { choices = ["mean", "cls"] }

    [fixed]                   # any other TrainConfig field
    steps_per_epoch = 40

    [[start_points]]          # optional: trials to run first, with these values (others sampled)
    lr = 5e-5

Every problem (unknown key, wrong type, bad range, unknown task, surgery or other choice) raises
StudyError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import tomllib

from model.train import TASKS, TrainConfig

STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"

# TrainConfig fields that a study may not set: the runner sets them, or they are run options.
RUNNER_FIELDS = {
    "tasks": "set the top-level `tasks` list",
    "epochs": "set budget.max_epochs",
    "data_dir": "pass --data-dir or set $MINBERT_DATA",
}
# Fields that change how a run executes, not what it computes: fixed only, never searched.
NOT_SEARCHABLE = {"threads", "device", "predict_test", "cache_dir", "model_path", "model_config"}

TOP_KEYS = {"description", "tasks", "objective", "budget", "search", "fixed", "start_points"}
OBJECTIVE_KEYS = {"metric", "direction"}
PARAM_KEYS = {"low", "high", "log", "step", "choices"}


@dataclass(frozen=True)
class Budget:
    trials: int
    max_epochs: int
    grace_period: int
    reduction_factor: float = 2
    max_concurrent: int = 1
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    seed: int = 0
    startup_trials: int = 10
    # Each trial trains with its own seed (budget.seed + its trial number) instead of the fixed or
    # default one: its data order and dropout masks differ, so ensembles of the top trials gain more.
    trial_seeds: bool = False


BUDGET_REQUIRED = ("trials", "max_epochs", "grace_period")


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field: a float/int range or a list of choices."""

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def corner_values(self) -> list:
        """Values to check against TrainConfig: the choices, or both ends of the range."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


@dataclass
class Study:
    name: str
    path: Path
    tasks: list[str]
    metric: str
    direction: str
    budget: Budget
    space: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    start_points: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""

    @property
    def mode(self) -> str:
        """Ray Tune's name for the direction."""
        return "max" if self.direction == "maximize" else "min"

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {name: param.distribution() for name, param in self.space.items()}

    def train_config(self, params: dict[str, Any], trial_number: int = 0) -> dict[str, Any]:
        """The trainer's config for one trial: fixed settings, then the sampled params (and the
        trial's own seed with budget.trial_seeds)."""
        config = {**self.fixed, **params, "tasks": list(self.tasks), "epochs": self.budget.max_epochs}
        if self.budget.trial_seeds:
            config["seed"] = self.budget.seed + trial_number
        return config

    def with_budget(self, **overrides: Any) -> Study:
        """A copy with budget fields replaced (command-line overrides); None values are ignored."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        budget = dataclasses.replace(self.budget, **given)
        _check_budget(budget, f"{self.path} (command line)")
        return dataclasses.replace(self, budget=budget)


class StudyError(ValueError):
    """A study file is missing or invalid; the message names the file and the key."""


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


def load_study_file(name_or_path: str | Path, studies_dir: Path = STUDIES_DIR) -> Study:
    """Parse and check a study file; StudyError names the file and the key of any problem."""
    path = study_path(name_or_path, studies_dir)
    try:
        with open(path, "rb") as fp:
            raw = tomllib.load(fp)
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file; studies available: {available_studies(studies_dir)}") from None
    except tomllib.TOMLDecodeError as error:
        raise StudyError(f"{path}: not valid TOML: {error}") from None
    return parse_study(raw, path)


def parse_study(raw: dict[str, Any], path: Path) -> Study:
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
    for key in OBJECTIVE_KEYS:
        if key not in objective:
            raise StudyError(f"{where}: objective.{key}: missing")
    metric = _typed(objective["metric"], str, where, "objective.metric")
    direction = _typed(objective["direction"], str, where, "objective.direction")
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
    space = _parse_space(_typed(raw["search"], dict, where, "search"), where)
    _check_fields(fixed, space, tasks, where)
    if budget.trial_seeds and ("seed" in fixed or "seed" in space):
        place = "fixed" if "seed" in fixed else "search"
        raise StudyError(f"{where}: budget.trial_seeds: gives each trial its own seed; remove {place}.seed, or the option")
    start_points = _parse_start_points(raw.get("start_points", []), space, where)
    return Study(
        name=path.stem,
        path=path,
        tasks=list(tasks),
        metric=metric,
        direction=direction,
        budget=budget,
        space=space,
        fixed=fixed,
        start_points=start_points,
        description=description,
    )


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
    known = {f.name for f in dataclasses.fields(Budget)}
    _check_keys(table, known, where, "budget.")
    for key in BUDGET_REQUIRED:
        if key not in table:
            raise StudyError(f"{where}: budget.{key}: missing")
    values = {}
    for f in dataclasses.fields(Budget):
        if f.name in table:
            kind = {"int": (int,), "bool": (bool,)}.get(str(f.type), (int, float))
            values[f.name] = _typed(table[f.name], kind, where, f"budget.{f.name}")
    budget = Budget(**values)
    _check_budget(budget, where)
    return budget


def _check_budget(budget: Budget, where: str) -> None:
    checks = [
        ("trials", budget.trials >= 1, "at least 1"),
        ("max_epochs", budget.max_epochs >= 1, "at least 1"),
        ("grace_period", 1 <= budget.grace_period <= budget.max_epochs, f"between 1 and max_epochs ({budget.max_epochs})"),
        ("reduction_factor", budget.reduction_factor > 1, "greater than 1"),
        ("max_concurrent", budget.max_concurrent >= 1, "at least 1"),
        ("cpus_per_trial", budget.cpus_per_trial > 0, "greater than 0"),
        ("gpus_per_trial", budget.gpus_per_trial >= 0, "at least 0"),
        ("startup_trials", budget.startup_trials >= 0, "at least 0"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise StudyError(f"{where}: budget.{key}: must be {rule}, not {getattr(budget, key)!r}")


def _train_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _param_kind(name: str, where: str) -> str:
    """float/int/categorical from the field's default; fields without a plain default cannot be searched."""
    fields_ = _train_fields()
    key = f"search.{name}"
    if name in RUNNER_FIELDS:
        raise StudyError(f"{where}: {key}: not searchable: {RUNNER_FIELDS[name]}")
    if name not in fields_:
        raise StudyError(f"{where}: {key}: unknown TrainConfig field; known: {sorted(fields_)}")
    default = fields_[name].default
    if name in NOT_SEARCHABLE or isinstance(default, type(dataclasses.MISSING)) or default is None:
        raise StudyError(f"{where}: {key}: this field cannot be searched; set it under [fixed]")
    if isinstance(default, bool) or isinstance(default, str):
        return "categorical"
    return "int" if isinstance(default, int) else "float"


def _parse_space(table: dict, where: str) -> dict[str, Param]:
    if not table:
        raise StudyError(f"{where}: search: empty; a study searches at least one TrainConfig field")
    return {name: _parse_param(name, spec, where) for name, spec in table.items()}


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


def _check_fields(fixed: dict, space: dict[str, Param], tasks: list[str], where: str) -> None:
    """Fixed settings and every end of every searched range must make a valid TrainConfig."""
    fields_ = _train_fields()
    for name in fixed:
        if name in RUNNER_FIELDS:
            raise StudyError(f"{where}: fixed.{name}: not allowed here: {RUNNER_FIELDS[name]}")
        if name not in fields_:
            raise StudyError(f"{where}: fixed.{name}: unknown TrainConfig field; known: {sorted(fields_)}")
        if name in space:
            raise StudyError(f"{where}: fixed.{name}: also under [search]; a field is either fixed or searched")
    single_task = len(tasks) == 1
    if single_task and fixed.get("surgery", "none") != "none":
        raise StudyError(f"{where}: fixed.surgery: gradient surgery combines several tasks' gradients; {tasks} is one task")
    if single_task and "surgery" in space:
        raise StudyError(f"{where}: search.surgery: gradient surgery combines several tasks' gradients; {tasks} is one task")
    # Searched fields take their first value in the base, so that a fixed setting that needs one of them is valid.
    base = {**fixed, **{name: param.corner_values()[0] for name, param in space.items()}, "tasks": list(tasks)}
    try:
        TrainConfig.from_dict(base)
    except (ValueError, TypeError) as error:
        context = " (with the first value of each searched field)" if space else ""
        raise StudyError(f"{where}: fixed: {error}{context}") from None
    for name, param in space.items():
        for value in param.corner_values():
            try:
                TrainConfig.from_dict({**base, name: value})
            except (ValueError, TypeError) as error:
                raise StudyError(f"{where}: search.{name}: value {value!r} is not a valid setting: {error}") from None


def _parse_start_points(points: Any, space: dict[str, Param], where: str) -> list[dict[str, Any]]:
    points = _typed(points, list, where, "start_points")
    parsed = []
    for i, point in enumerate(points):
        key = f"start_points[{i}]"
        point = _typed(point, dict, where, key)
        for name, value in point.items():
            if name not in space:
                raise StudyError(f"{where}: {key}.{name}: not a searched field; searched: {sorted(space)}")
            distribution = space[name].distribution()
            try:
                inside = distribution._contains(distribution.to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
            if isinstance(value, bool) and space[name].kind != "categorical":
                inside = False
            if not inside:
                raise StudyError(f"{where}: {key}.{name}: {value!r} lies outside search.{name}")
        parsed.append(dict(point))
    return parsed
