"""The end of a run: the study's trials ranked by the dev score of their saved epoch, printed with
their states; Ray's best result with errored trials left out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import storage as names
from search.adapters import TRIAL_NUMBER_KEY
from search.paths import StudyPaths
from search.spec import StudySpec
from search.storage import masked_url, open_storage

EXIT_OK, EXIT_NO_SUCCESS, EXIT_REFUSED, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class Outcome:
    exit_code: int
    study: optuna.Study | None = None
    ranked: list[FrozenTrial] = field(default_factory=list)


def best_ray_result(grid: Any, metric: str, mode: str) -> Any:
    """The best Ray result by its best epoch, errored trials left out (Ray's get_best_result can pick them)."""
    best, best_value = None, None
    for result in grid:
        if result.error is not None or result.metrics_dataframe is None or metric not in result.metrics_dataframe:
            continue
        values = [v for v in result.metrics_dataframe[metric].tolist() if isinstance(v, (int, float)) and math.isfinite(v)]
        if not values:
            continue
        value = max(values) if mode == "max" else min(values)
        if best_value is None or (value > best_value if mode == "max" else value < best_value):
            best, best_value = result, value
    return best


def ray_disagreement(grid: Any, metric: str, mode: str, ranked: list[FrozenTrial]) -> str | None:
    """A note when Ray's own results pick another best trial than the Optuna records, errored trials left
    out; None when they agree, or when Ray's results do not hold the recorded best (a resume that had to
    start a new Ray experiment holds only the trials run since)."""
    held = {(result.config or {}).get(TRIAL_NUMBER_KEY) for result in grid}  # an errored result may have no config
    if not ranked or ranked[0].number not in held:
        return None
    best = best_ray_result(grid, metric, mode)
    best_number = None if best is None else best.config.get(TRIAL_NUMBER_KEY)
    if best_number == ranked[0].number:
        return None
    return f"Note: by Ray's results the best non-errored trial is {best_number}, not {ranked[0].number}."


def ranked_trials(ot_study: optuna.Study) -> list[FrozenTrial]:
    """Trials that trained (COMPLETE, and PRUNED = stopped early), best first by the dev score of their saved epoch."""
    usable = [
        t
        for t in ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        if t.user_attrs.get(names.TRIAL_BEST_VALUE) is not None
    ]
    return sorted(usable, key=lambda t: (-t.user_attrs[names.TRIAL_BEST_VALUE], t.number))


def summarize(study: StudySpec, url: str, paths: StudyPaths, top: int) -> Outcome:
    """Print the top trials and the counts by state; exit code 1 when no trial succeeded."""
    ot_study = optuna.load_study(study_name=study.name, storage=open_storage(url))
    trials = ot_study.get_trials(deepcopy=False)
    ranked = ranked_trials(ot_study)
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    for_time = sum(t.state == TrialState.PRUNED and bool(t.user_attrs.get(names.TRIAL_STOPPED_FOR_TIME)) for t in trials)
    stopped = f"{counts['PRUNED'] - for_time} stopped early by ASHA (PRUNED)"
    if for_time:
        stopped += f", {for_time} stopped by the time budget (PRUNED)"
    # Start points are queued in Optuna before they run: a run that ends early (time budget) leaves them WAITING.
    waiting = f", {counts['WAITING']} queued start point(s) not started (WAITING)" if counts["WAITING"] else ""
    print(
        f"\nStudy {study.name!r}: {len(trials)} trials: {counts['COMPLETE']} complete, "
        f"{stopped}, {counts['FAIL']} failed, {counts['RUNNING']} running{waiting}"
    )
    if ranked:
        print(f"Top {min(top, len(ranked))} by dev {study.metric} of the saved (best) epoch:")
        for rank, t in enumerate(ranked[:top], 1):
            attrs = t.user_attrs
            params = ", ".join(f"{k}={format_value(v)}" for k, v in sorted(t.params.items()))
            print(
                f"  {rank}. trial {t.number}  {study.metric}={attrs[names.TRIAL_BEST_VALUE]:.4f}"
                f" (epoch {attrs.get(names.TRIAL_BEST_EPOCH)})"
                f"  epochs run {attrs.get(names.TRIAL_EPOCHS_RUN)}  {t.state.name}\n"
                f"     {params}\n     artifacts: {attrs.get(names.TRIAL_ARTIFACT_DIR)}"
            )
    for t in trials:
        if t.state == TrialState.FAIL:
            print(f"  failed: trial {t.number}: {t.user_attrs.get(names.TRIAL_ERROR, '(no message)')}")
    print(f"Dashboard: optuna-dashboard {masked_url(url)}   (then open http://127.0.0.1:8080)")
    return Outcome(EXIT_OK if ranked else EXIT_NO_SUCCESS, ot_study, ranked)


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
