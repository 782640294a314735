"""Hyperparameter search of the multitask BERT: ``python run_search.py --study sts``.

Ray Tune runs the trials, Optuna (TPE) samples them and records everything in an Optuna study
(watch it live: ``optuna-dashboard sqlite:///studies/optuna.db``), ASHA stops weak trials early.
A study is a file studies/<name>.toml; see search/study.py for its format.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

# Only the standard library above: the project's imports (Optuna, Ray, torch) take seconds, and a Ctrl-C
# during them must end in one line, not a traceback (see the end of this file).


def duration(text: str) -> float:
    from search.timebudget import parse_duration

    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    from search.storage import DEFAULT_STORAGE_URL, RESULTS_DIR_ENV
    from search.timebudget import START_RULES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="sts", help="study name (studies/<name>.toml) or path to a .toml file (default: sts)")
    parser.add_argument(
        "--storage",
        default=DEFAULT_STORAGE_URL,
        help="Optuna storage: any SQLAlchemy URL (default: %(default)s)",
    )
    parser.add_argument("--results-dir", type=Path, help=f"results folder (default: ${RESULTS_DIR_ENV}, else ./results)")
    parser.add_argument("--data-dir", help="CS224N data directory (default: $MINBERT_DATA, else ./datasets)")
    parser.add_argument(
        "--address",
        help="connect to this running Ray cluster (HOST:PORT of `ray start --head`) instead of starting a local one; "
        "with a Ray token on this machine (~/.ray/auth_token or $RAY_AUTH_TOKEN) it joins with RAY_AUTH_MODE=token",
    )
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--trials", type=int, help="override the study's budget.trials")
    parser.add_argument("--max-concurrent", type=int, help="override budget.max_concurrent")
    parser.add_argument("--cpus-per-trial", type=float, help="override budget.cpus_per_trial")
    parser.add_argument("--gpus-per-trial", type=float, help="override budget.gpus_per_trial")
    parser.add_argument(
        "--time-budget",
        type=duration,
        metavar="DURATION",
        help="wall-clock budget of this run, e.g. 15m or 1.5h (overrides budget.time): no trial starts that cannot "
        "finish (see --start-rule), trials stop in time (recorded as early-stopped); --resume continues with a new budget",
    )
    parser.add_argument(
        "--start-rule",
        choices=sorted(START_RULES),
        help="under a time budget, start a trial only if it can finish (finish, the default), or if it can reach "
        "ASHA's first rung (first_rung: more, cheaper members in the budget's tail); overrides budget.start_rule",
    )
    parser.add_argument(
        "--model-path",
        metavar="DIR",
        help="a local Hugging Face-format BERT directory to search with (overrides the study's fixed model_path; "
        "default: the embedded all-MiniLM-L6-v2); a resumed run keeps the model it started with",
    )
    parser.add_argument("--name", help="name of the Optuna study and results folder (default: the study file's name)")
    parser.add_argument(
        "--no-early-stopping",
        dest="early_stopping",
        action="store_false",
        help="no ASHA: every trial runs budget.max_epochs (to measure what early stopping saves; use with --name)",
    )
    parser.add_argument("--top", type=int, default=5, help="how many of the best trials to print (default: 5)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run of this study")
    again.add_argument("--fresh", action="store_true", help="delete this study's Optuna records and results, then start over")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    from search.cluster import prepare_token_auth

    # Ray reads RAY_AUTH_MODE once, at import: decide it before search.tune imports Ray.
    prepare_token_auth(args["address"])
    from search.tune import SearchOptions, main_exit

    return main_exit(SearchOptions(**args))  # it handles a Ctrl-C from here on


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # during the imports, before anything was read or written
        print("\nInterrupted while starting; nothing was run.", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)  # the shell's code for Ctrl-C, as search.summary.EXIT_INTERRUPTED
