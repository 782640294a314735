"""``python -m ensemble.build --study A [--study B ...]``: the final predictor, chosen per task from every
usable trial of the given studies (one Optuna storage).

Members: every trial with saved dev outputs, early-stopped (PRUNED) ones included unless
``--exclude-early-stopped``; never FAIL trials. A member is named ``<study>/trial <n>``. One with
non-finite weights or outputs is skipped with a warning; a corrupt file stops the build (ensemble.members).

Selection is per task (sst, para, sts, cfimdb): the pool of a task is the members whose config trains
it, and the criterion is the task's own dev metric (accuracy, or Pearson r for sts). Methods
(``--method``, several allowed; default caruana top-k uniform-soup; ``all`` adds greedy-soup):
  caruana       Caruana et al. 2004 ensemble selection with replacement (the default logit method),
                maximising the gold labels' log-likelihood for SST and paraphrase (``--caruana-criterion``)
                and Pearson r for STS: sorted initialisation with the best ``--caruana-init`` members, ``--caruana-rounds``
                greedy additions, the best prefix kept; weights = selection counts / ensemble size.
  caruana-bagged  Caruana's bagged ensemble selection: the same on ``--caruana-bags`` random halves of
                the pool, the bags' weights averaged (less fitted to dev's noise; more members to run).
  top-k         the mean of the ``--top-k`` best members' saved outputs (``logits`` is an alias).
  fitted        (also added by ``--fit-weights``) the top-k members with weights fitted on dev, kept
                only when they beat uniform weights in ``--folds``-fold cross-validation within dev.
  uniform-soup  one model: the mean of the weights of the members that can be averaged with the task's
                best member (same architecture, heads and initial weights; ensemble.soup).
  greedy-soup   Wortsman et al. 2022: those members by dev score, each kept only if the soup's dev
                score strictly improves.
Logit methods need no model run, except on test for members that saved no test outputs (their
checkpoint is run). Soups are run on dev once per member set and cached (``--no-cache`` to turn off).

Honest estimates (ensemble.estimate): every dev-selected predictor (the best single trial and each
method) is reported with its in-sample dev score and an out-of-selection estimate: the same procedure
run on half A of ``--splits`` seeded random halves of dev, scored on half B (mean ± sd over the
halves). Every dev-dependent choice is inside the procedure: each member's epoch, for STS each
member's map to the 0-5 scale, with ``--calibrate`` each SST, CFIMDB or paraphrase member's
temperature (ensemble.taskpool), and with ``--cross-task`` each lent member's logistic map. The
baseline of each task is its usual single-task recipe (ensemble.baselines; ``--baseline
[TASK=]STUDY/N`` names another); it and the uniform average of its seed runs ("usual recipe x k
seeds") are not selected, and every row shows its paired gain over
the baseline on the same halves, and over that seed average. Each row also gives its inference cost:
encoder passes per example (1 per single-sentence or cross-encoded member, 2 per bi-encoded pair
member, summed over the distinct members of a logit ensemble; a soup costs one model's), and the
training it took: trial-epochs and minutes of training steps (a dev-selected row needed the whole pool).

``--cross-task`` (ensemble.lend): the paraphrase pool also takes every STS member of the given studies
(one that does not train paraphrase itself), its similarity score on the question pairs mapped to
P(duplicate); named ``<study>/trial <n> (sts head)``. Each is run once on paraphrase dev (cached), and
the chosen ones on test.

Outputs, under ``--output-dir`` (default ``<results-dir>/<study>[+<study>...]/ensemble/``):
  summary.md, summary.json        per task: baseline, best single, each method, each member
  <task>_dev_vs_size.png          dev score against ensemble size (top-n, Caruana, greedy soup)
  <method>/predictor/manifest.json   per task: method, members, weights (and soup-<n>/ model folders),
                                  and the baseline and seed average it was compared with;
                                  ``python -m ensemble.predict`` runs it (``--compare``: beside those)
  <method>/predictions/<task>-<split>-out.csv   leaderboard CSVs for dev and test
  <method>/summary.md, summary.json, sts_dev_scatter.png
Everything is computed before anything is written, and each file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from data.files import DATA_DIR_ENV
from ensemble.baselines import seed_runs, task_baselines
from ensemble.caruana import DEFAULT_BAGS, DEFAULT_INIT_SIZE, DEFAULT_ROUNDS
from ensemble.estimate import DEFAULT_SEED, DEFAULT_SPLITS, out_of_selection
from ensemble.lend import LENDERS, lent_members, lent_test_outputs
from ensemble.members import EnsembleError, Member, Pool, load_pool
from ensemble.output import SEED_AVERAGE, TaskResult, write_build
from ensemble.selection import METHODS, Choice, Selector, Settings
from ensemble.soup import SoupEvaluator
from ensemble.taskpool import TaskPool, align_to, apply_scale, task_pools
from model.rundir import TaskOutputs
from search.storage import DEFAULT_STORAGE_URL, StorageError

# The greedy soup runs a candidate soup on dev per member, most of a build's time, and has never beaten
# the uniform soup out of selection here (README, "Measured results"): it is built on request.
DEFAULT_METHODS = ("caruana", "top-k", "uniform-soup")
ALL_METHODS = (*DEFAULT_METHODS, "greedy-soup")
# The search's results folder (search.tune's defaults; not imported from there because that pulls in Ray).
RESULTS_DIR_ENV = "MINBERT_RESULTS"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def chosen_methods(args: argparse.Namespace) -> tuple[str, ...]:
    groups = {"all": ALL_METHODS, "default": DEFAULT_METHODS, "logits": ("top-k",)}
    methods = {name for asked in args.method for name in groups.get(asked, (asked,))}
    if args.fit_weights:
        methods.add("fitted")
    return tuple(m for m in METHODS if m in methods)


def run_task(
    pool: TaskPool, methods: tuple[str, ...], selector: Selector, seeds: list[Member], args: argparse.Namespace
) -> TaskResult:
    """Every procedure on all of dev (the predictors) and on the halves (their estimates). ``seeds``:
    the baseline first, then its recipe's other seed runs ([] without a baseline)."""
    full = np.arange(len(pool.labels))
    procedures = selector.procedures(methods)
    choices: dict[str, Choice] = {}
    refused: dict[str, str] = {}
    for name, procedure in procedures.items():
        choice = procedure(full)
        if choice.kind == "soup" and len(selector.soup_pool(full)[0]) < 2:
            reasons = "; ".join(choice.details["refused"]) or "it is the only member"
            refused[name] = f"no member can be averaged with {pool.members[choice.members[0]].name}: {reasons}"
            continue
        choices[name] = choice
    kept = {name: procedures[name] for name in choices}
    # Not selected on dev: the baseline, and the uniform average of its seed runs.
    indexes = [pool.index(m) for m in seeds]
    fixed = {SEED_AVERAGE: selector.fixed(indexes, SEED_AVERAGE)} if len(indexes) > 1 else {}
    baseline = selector.fixed(indexes[:1], "baseline") if indexes else None
    reference = SEED_AVERAGE if fixed else None  # every row is also paired with the seed average
    estimates = out_of_selection(pool, kept | fixed, baseline, splits=args.splits, seed=args.seed, reference=reference)
    fixed_choices = {name: procedure(full) for name, procedure in fixed.items()}
    baseline_choice = None if baseline is None else baseline(full)
    return TaskResult(
        pool, choices, refused, estimates, indexes[0] if indexes else None, fixed=fixed_choices, baseline_choice=baseline_choice
    )


def member_test_outputs(member: Member, task: str, evaluate: SoupEvaluator, notes: list[str]) -> TaskOutputs:
    if member.head is not None:  # lent: its head run on the task's test rows (cached)
        return lent_test_outputs(member, task, evaluate)
    if not member.has_split("test", task):  # e.g. an early-stopped trial: its test outputs were never written
        missing = [t for t in member.tasks if not member.has_split("test", t)]
        notes.append(f"{member.name} saved no test outputs for {', '.join(missing)}: ran its checkpoint on test")
        member.outputs["test"].update({t: out for t, out in evaluate([member], "test").items() if t in missing})
    return member.outputs["test"][task]


def choice_test_outputs(result: TaskResult, choice: Choice, evaluate: SoupEvaluator, notes: list[str]) -> TaskOutputs:
    """The chosen predictor run on test: a soup's model, or its members' test outputs averaged."""
    pool, task = result.pool, result.pool.task
    members = [pool.members[i] for i in choice.members]
    if choice.kind == "soup":
        out = dict(evaluate(members, "test")[task])
        out["values"] = apply_scale(out["values"], choice.scales[0] if choice.scales else None, task)
    else:
        first = member_test_outputs(members[0], task, evaluate, notes)
        where = [
            f"{m.name} ({m.outputs_file(task, 'test') if m.head is None else f'its {m.head} head run on {task} test'})"
            for m in members
        ]
        outs = [
            align_to(first, member_test_outputs(m, task, evaluate, notes), w, where[0])
            for m, w in zip(members, where, strict=True)
        ]
        scales = choice.scales or [None] * len(outs)
        stacked = np.stack([apply_scale(o["values"], scale, task) for o, scale in zip(outs, scales, strict=True)])
        values = np.tensordot(np.asarray(choice.weights), stacked, axes=1)
        out = {"ids": first["ids"], "values": values, "labels": None}
    if not np.isfinite(out["values"]).all():
        raise EnsembleError(f"{task} {choice.method}: test outputs contain NaN or inf")
    return out


def header_of(pool: Pool, args: argparse.Namespace, methods: tuple[str, ...], notes: list[str], refused: dict) -> dict:
    """What summary.json says besides the rows: where the members come from and how they were chosen."""
    return {
        "studies": pool.studies,
        "methods": list(methods),
        "settings": {
            "top_k": args.top_k,
            "caruana_init": args.caruana_init,
            "caruana_rounds": args.caruana_rounds,
            "caruana_criterion": args.caruana_criterion,
            "caruana_bags": args.caruana_bags,
            "calibrate": args.calibrate,
            "cross_task": args.cross_task,
            "folds": args.folds,
            "splits": args.splits,
            "seed": args.seed,
            "include_early_stopped": not args.exclude_early_stopped,
        },
        "members": [
            {
                "name": m.name,
                "study": m.study,
                "trial": m.trial_number,
                "tasks": m.tasks,
                "study_value": m.value,
                "artifact_dir": str(m.artifact_dir),
                "early_stopped": m.early_stopped,
                "params": m.params,
            }
            for m in pool.members
        ],
        "skipped": pool.skipped,
        "notes": pool.notes + notes,
        "refused": refused,
    }


def cache_dir(args: argparse.Namespace, results_dir: Path) -> Path:
    """Where model runs (soups, lent heads) are cached: RESULTS_DIR/.ensemble-cache, shared by every build
    of that results folder (runs are keyed by the checkpoints', config's and data files' identities,
    the device and the precision, so one study's runs serve every combination it is built in); with
    --output-dir, OUTPUT/.cache."""
    return args.output_dir / ".cache" if args.output_dir else results_dir / ".ensemble-cache"


def build(args: argparse.Namespace) -> dict[str, TaskResult]:
    """Choose every task's predictors and estimate them; then (only then) write everything."""
    methods = chosen_methods(args)
    for name in ("top_k", "caruana_init", "caruana_bags", "splits"):
        if getattr(args, name) < 1:
            raise EnsembleError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    pool = load_pool(args.study, args.storage, include_early_stopped=not args.exclude_early_stopped)
    baselines, notes = task_baselines(pool, args.baseline)
    results_dir = Path(args.results_dir or os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR)
    root = args.output_dir or results_dir / "+".join(pool.studies) / "ensemble"
    # Where the members were trained is the best guess when neither --data-dir nor $MINBERT_DATA says.
    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV) or pool.members[0].config["train"].get("data_dir")
    evaluate = SoupEvaluator(data_dir, args.device, None if args.no_cache else cache_dir(args, results_dir))
    settings = Settings(
        args.top_k, args.caruana_init, args.caruana_rounds, args.folds, args.caruana_criterion, caruana_bags=args.caruana_bags
    )
    lent = lent_members(pool, evaluate) if args.cross_task else {}
    for task, members in lent.items():
        print(f"{task}: lent {len(members)} {LENDERS[task]} member(s), each run on {task} dev", file=sys.stderr)
    results: dict[str, TaskResult] = {}
    for task, task_pool in task_pools(pool, calibrate=args.calibrate, lent=lent).items():
        print(f"{task}: selecting from {len(task_pool.members)} member(s)", file=sys.stderr)
        baseline = baselines[task]
        seeds = [] if baseline is None else seed_runs(pool, baseline)
        results[task] = run_task(task_pool, methods, Selector(task_pool, evaluate, settings), seeds, args)
        for method, choice in results[task].choices.items():
            # a soup's left-out members, said once per task in the notes (the table only counts them)
            notes += [f"{task} soups: {why}" for why in choice.details.get("refused", [])]
            if method in methods:
                results[task].test[method] = choice_test_outputs(results[task], choice, evaluate, notes)
    refused = {task: r.refused for task, r in results.items() if r.refused}
    unbuilt = [m for m in methods if not any(m in r.choices for r in results.values())]
    if len(unbuilt) == len(methods):  # nothing to write: an error, not an empty folder
        reasons = [f"{task} {m}: {why}" for task, r in refused.items() for m, why in r.items()]
        raise EnsembleError("no method could be built for any task:\n  " + "\n  ".join(reasons))
    notes += [f"{m}: not built for any task" for m in unbuilt]
    header = header_of(pool, args, methods, list(dict.fromkeys(notes)), refused)
    print(write_build(root, methods, results, header))
    print(f"wrote {root} (final predictors in {root}/<method>/predictor)", file=sys.stderr)
    return results


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", action="append", required=True, help="Optuna study name; repeat for several studies")
    parser.add_argument(
        "--method",
        nargs="+",
        choices=[*METHODS, "logits", "default", "all"],
        default=["default"],
        help=f"what to build (default: {' '.join(DEFAULT_METHODS)}; all: {' '.join(ALL_METHODS)})",
    )
    parser.add_argument("--top-k", type=int, default=5, help="top-k and fitted: members per task (default 5)")
    parser.add_argument(
        "--caruana-init",
        type=int,
        default=DEFAULT_INIT_SIZE,
        help=f"Caruana: sorted initialisation size (default {DEFAULT_INIT_SIZE})",
    )
    parser.add_argument(
        "--caruana-rounds", type=int, default=DEFAULT_ROUNDS, help=f"Caruana: greedy additions (default {DEFAULT_ROUNDS})"
    )
    parser.add_argument(
        "--caruana-criterion",
        choices=("likelihood", "metric"),
        default="likelihood",
        help="what Caruana's greedy steps maximise for SST and paraphrase: the gold labels' log-likelihood (default: "
        "smooth, harder to overfit on part of dev) or the task's accuracy; STS always uses Pearson r",
    )
    parser.add_argument(
        "--caruana-bags",
        type=int,
        default=DEFAULT_BAGS,
        help=f"caruana-bagged: bags of half the pool, the same bags in every selection (default {DEFAULT_BAGS})",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="SST, CFIMDB and paraphrase: temperature-scale each member on the selection rows before any averaging "
        "(a member's own predictions do not change; see ensemble.taskpool.fit_scale)",
    )
    parser.add_argument(
        "--cross-task",
        action="store_true",
        help="the paraphrase pool also takes the STS members: each one's similarity score on the question pairs, "
        "mapped to P(duplicate) by a logistic line fitted on the selection rows (ensemble.lend; runs each STS "
        "member on paraphrase dev, and the chosen ones on test)",
    )
    parser.add_argument("--fit-weights", action="store_true", help="also build 'fitted' (top-k with CV-guarded fitted weights)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds of the fitted weights (default 5)")
    parser.add_argument("--exclude-early-stopped", action="store_true", help="leave out trials that ASHA stopped early")
    parser.add_argument(
        "--baseline",
        action="append",
        metavar="[TASK=]STUDY/N",
        help="the usual recipe of TASK (without TASK: of every task the member trains); repeat per task "
        "(default per task: trial 0 of the first study that trains that task alone, else of the first that trains it)",
    )
    parser.add_argument(
        "--splits", type=int, default=DEFAULT_SPLITS, help=f"random halves of dev for the estimates (default {DEFAULT_SPLITS})"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the halves (default %(default)s)")
    parser.add_argument("--storage", default=DEFAULT_STORAGE_URL, help="Optuna storage URL (default: %(default)s)")
    parser.add_argument(
        "--results-dir",
        type=Path,
        help=f"outputs go to RESULTS_DIR/<studies>/ensemble/ (default: ${RESULTS_DIR_ENV}, else ./results)",
    )
    parser.add_argument("--output-dir", type=Path, help="outputs go to OUTPUT_DIR/ instead")
    parser.add_argument(
        "--data-dir",
        help="CS224N data directory for running models (default: $MINBERT_DATA, else the first member's data_dir)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N for running models (default: cuda when available)")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="do not cache model runs on disk (default cache: RESULTS_DIR/.ensemble-cache, shared by its builds; "
        "with --output-dir, OUTPUT/.cache)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        build(args)
    except (EnsembleError, StorageError, ValueError, FileNotFoundError) as err:  # StorageError: one line, password masked
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
