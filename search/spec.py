"""What a study is, once its file is read (search/study.py reads and checks the file): the tasks,
the objective, the search space (fields, per-task fields and variants), the budget and the fixed
settings, and how one trial's sampled parameters become the trainer's config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from model.config import TrainConfig, applies_to
from search.timebudget import START_RULES

# Every dev metric (accuracy, Pearson r, overall) is higher-is-better: studies only maximise.
OPTUNA_DIRECTION, RAY_MODE = "maximize", "max"
# Every TrainConfig field's default (a per-task field's default may be a {task: value} table).
TRAIN_DEFAULTS = TrainConfig().to_dict()


class StudyError(ValueError):
    """A study file is missing or invalid; the message names the file and the key."""


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
    # Wall-clock limit of one run of the study, in seconds (search.timebudget); None: none.
    time_s: float | None = None
    # Under a time budget, which trials may still start (search.timebudget.START_RULES).
    start_rule: str = "finish"


def check_budget(budget: Budget, where: str) -> None:
    checks = [
        ("trials", budget.trials >= 1, "at least 1"),
        ("max_epochs", budget.max_epochs >= 1, "at least 1"),
        ("grace_period", 1 <= budget.grace_period <= budget.max_epochs, f"between 1 and max_epochs ({budget.max_epochs})"),
        ("reduction_factor", budget.reduction_factor > 1, "greater than 1"),
        ("max_concurrent", budget.max_concurrent >= 1, "at least 1"),
        ("cpus_per_trial", budget.cpus_per_trial > 0, "greater than 0"),
        ("gpus_per_trial", budget.gpus_per_trial >= 0, "at least 0"),
        ("startup_trials", budget.startup_trials >= 0, "at least 0"),
        ("time", budget.time_s is None or budget.time_s > 0, "a positive duration"),
        ("start_rule", budget.start_rule in START_RULES, f"one of {sorted(START_RULES)}"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise StudyError(f"{where}: budget.{key}: must be {rule}, not {getattr(budget, key)!r}")


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

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (a start point's value, say)."""
        if self.kind == "categorical":
            return any(type(value) is type(choice) and value == choice for choice in self.choices)
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        steps = (value - self.low) / self.step
        return abs(steps - round(steps)) < 1e-9

    def corner_values(self) -> list:
        """Values to check against TrainConfig: the choices, or both ends of the range."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


@dataclass
class StudySpec:
    name: str
    path: Path
    tasks: list[str]
    metric: str
    budget: Budget
    space: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    start_points: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    variants: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # name -> choice -> settings

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        variants = {name: optuna.distributions.CategoricalDistribution(list(v)) for name, v in self.variants.items()}
        return {**{name: param.distribution() for name, param in self.space.items()}, **variants}

    def train_config(self, params: dict[str, Any], trial_number: int = 0) -> dict[str, Any]:
        """The trainer's config for one trial: fixed settings, then the sampled params (a variant's
        settings for its chosen name; a per-task param "field.task" into that field's task table),
        and the trial's own seed with budget.trial_seeds."""
        config = {**self.fixed, "tasks": list(self.tasks), "epochs": self.budget.max_epochs}
        per_task = {}
        for name, value in params.items():
            if name in self.variants:
                config.update(self.variants[name][value])
            elif "." in name:
                per_task[name] = value
            else:
                config[name] = value
        for name, value in per_task.items():
            field_name, task = name.split(".", 1)
            current = config.get(field_name, TRAIN_DEFAULTS[field_name])
            if not isinstance(current, dict):
                current = {t: current for t in self.tasks if applies_to(field_name, t)}
            config[field_name] = {**current, task: value}
        if self.budget.trial_seeds:
            config["seed"] = self.budget.seed + trial_number
        return config

    def with_fixed(self, **settings: Any) -> StudySpec:
        """A copy whose fixed trainer settings take ``settings`` (command-line overrides such as model_path)."""
        return dataclasses.replace(self, fixed={**self.fixed, **settings})

    def with_budget(self, **overrides: Any) -> StudySpec:
        """A copy with budget fields replaced (command-line overrides); None values are ignored."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return self
        budget = dataclasses.replace(self.budget, **given)
        check_budget(budget, f"{self.path} (command line)")
        return dataclasses.replace(self, budget=budget)
