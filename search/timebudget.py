"""A study's time budget (``--time-budget 15m``, or ``[budget] time = "15m"``): a wall-clock limit on
one run of the study, measured from the driver's start.

- A trial starts only if it can get far enough before the deadline, estimated from the slowest epoch
  seen so far (evaluation included). Under ``start_rule = "finish"`` (the default) max_epochs of it
  must fit: no trial starts that cannot finish. Under ``"first_rung"`` (``--start-rule first_rung``)
  grace_period epochs must fit: a trial starts if it can reach ASHA's first rung, where ASHA stops the
  weaker sampled trials anyway, so the budget's tail trains more, cheaper members. A trial that goes
  on past that rung (promoted by ASHA, or a start point, which ASHA never stops) is cut by the rule
  below.
- Running trials stop in time: after each epoch, a trial whose next epoch would end past the deadline
  stops there. It ends with fewer epochs than max_epochs and is recorded PRUNED, as an early-stopped
  trial, with its epochs (and ``stopped_for_time``); its folder is a usable ensemble member.
- Once no trial runs and none can start, the searcher says it has finished and the run ends (a
  restored run may start trials again: search.adapters.ResumableSearchGenerator). The study is then
  unfinished, not failed:
  ``--resume`` (with a new ``--time-budget``, or the same) continues it with the trials left.

The deadline can be overrun by as much as a trial's epoch takes longer than its epoch before (each
trial decides from its own last epoch; the driver starts trials from the slowest epoch seen).
The driver's side (the searcher, search.adapters) reads the process-wide ``TIME_BUDGET``, because Ray
restores the searcher from its saved experiment on resume: only a module-level object reaches the
restored copy. Ray-free, so that study files parse without Ray.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field

UNITS = {"s": 1, "m": 60, "h": 3600}
# budget.start_rule -> what a new trial must have time to do before the deadline (the run's end
# message says it: "no other could <this> in time").
START_RULES = {"finish": "finish", "first_rung": "reach its first rung"}
# Ray's start, the trial's actor and the model's load come before a trial's first epoch.
TRIAL_START_SECONDS = 20.0


def parse_duration(text: str | float | int) -> float:
    """Seconds in "90", "90s", "15m", "1.5h" or "1h30m"; ValueError naming the text otherwise."""
    number = r"(\d+(?:\.\d+)?)"
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    elif re.fullmatch(rf"\s*{number}\s*", str(text)):
        seconds = float(text)  # a bare number: seconds
    else:  # every part with its unit: "1h30" is refused rather than guessed
        parts = re.fullmatch(rf"\s*(?:{number}\s*h)?\s*(?:{number}\s*m)?\s*(?:{number}\s*s)?\s*", str(text))
        if not parts or not any(parts.groups()):
            raise ValueError(f"{text!r} is not a duration; write it as 90s, 15m, 1.5h or 1h30m")
        hours, minutes, seconds_part = (float(g) if g else 0.0 for g in parts.groups())
        seconds = hours * 3600 + minutes * 60 + seconds_part
    if not seconds > 0:
        raise ValueError(f"a time budget must be positive, not {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds % 60 == 0 else f"{seconds:g}s"


def next_epoch_fits(deadline: float | None, epoch_seconds: float, now: float | None = None) -> bool:
    """Whether one more epoch as long as the last one ends before ``deadline`` (time.time())."""
    return deadline is None or (now or time.time()) + epoch_seconds <= deadline


@dataclass
class TimeBudget:
    """The driver's view: the deadline, the epochs measured so far, the trials it let run."""

    deadline: float | None = None  # time.time() at which the run must have ended; None: no budget
    start_epochs: int = 1  # the epochs a new trial must have time for: max_epochs, or grace_period (first_rung)
    start_rule: str = "finish"
    epoch_seconds: list[float] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    refused: bool = False  # a trial was not started for lack of time

    def start(self, seconds: float | None, max_epochs: int, grace_period: int = 1, start_rule: str = "finish") -> None:
        if start_rule not in START_RULES:
            raise ValueError(f"start_rule: {start_rule!r} is not one of {sorted(START_RULES)}")
        self.deadline = None if seconds is None else time.time() + seconds
        self.refused, self.start_rule = False, start_rule
        self.start_epochs = max_epochs if start_rule == "finish" else grace_period
        self.epoch_seconds.clear()
        self.running.clear()

    def start_seconds(self) -> float:
        """A pessimistic time from a trial's start to where the start rule needs it to get (the end, or
        the first rung): its start and that many of the slowest epoch seen (its start alone before any)."""
        return TRIAL_START_SECONDS + self.start_epochs * max(self.epoch_seconds, default=0.0)

    def sizing(self) -> str:
        """What a trial is estimated to take here, for a message that helps size the next budget ("" before
        any epoch was measured)."""
        if not self.epoch_seconds:
            return ""
        seconds = self.start_seconds()
        took = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
        goal = "" if self.start_rule == "finish" else f" to {self.goal}"
        return f" (a trial takes about {took}{goal} here, estimated as its start and {self.start_epochs} x the slowest epoch)"

    @property
    def goal(self) -> str:
        """What a trial must have time for to start: "finish" or "reach its first rung"."""
        return START_RULES[self.start_rule]

    def may_start_trial(self, now: float | None = None) -> bool:
        if self.deadline is None:
            return True
        fits = (now or time.time()) + self.start_seconds() <= self.deadline
        self.refused = self.refused or not fits
        return fits

    def started(self, trial_id: str) -> None:
        self.running.add(trial_id)

    def ended(self, trial_id: str) -> None:
        self.running.discard(trial_id)

    def observe(self, result: dict) -> None:
        if isinstance(result.get("epoch_seconds"), (int, float)):
            self.epoch_seconds.append(float(result["epoch_seconds"]))

    @property
    def spent(self) -> bool:
        """The run ends here: a trial was refused for lack of time and none runs any more."""
        return self.deadline is not None and self.refused and not self.running

    def median_epoch(self) -> float | None:
        return statistics.median(self.epoch_seconds) if self.epoch_seconds else None


TIME_BUDGET = TimeBudget()
