"""The usual recipe of each task: the baseline every ensemble row is compared with, and its seed runs.

A user's real alternative to the harness is to fine-tune on the one task with the usual settings, maybe
with a few seeds. So, per task, the baseline is by default trial 0 of the first given study that
trains that task alone (a single-task study, whose first start point is the usual recipe by
convention); only when no such study is given is it trial 0 of the first study that trains the task
(a multitask trial, said in the notes). ``--baseline [TASK=]STUDY/N`` names another: with TASK for
that task, without for every task the member trains.

The seed runs are the members of the baseline's study that ran the same config to the end with
another seed (the diverse studies start with the usual recipe three times): their uniform average is
the "usual recipe x k seeds" row, which involves no selection on dev.
"""

from __future__ import annotations

from data.files import TASKS
from ensemble.members import EnsembleError, Member, Pool, parse_member_ref
from model.config import RUNTIME_FIELDS, with_defaults


def parse_baseline_refs(texts: list[str] | None) -> dict[str | None, tuple[str, int]]:
    """``[TASK=]STUDY/N`` options as {task (None: every task the member trains): (study, n)}."""
    refs: dict[str | None, tuple[str, int]] = {}
    for text in texts or []:
        task, sep, ref = text.partition("=")
        if not sep:
            task, ref = None, text
        elif task not in TASKS:
            raise EnsembleError(f"--baseline {text}: unknown task {task!r}; known tasks: {list(TASKS)}")
        if task in refs:
            raise EnsembleError(f"--baseline {text}: a baseline for {task or 'every task'} is given twice")
        refs[task] = parse_member_ref(ref)
    return refs


def trains_only(pool: Pool, study: str, task: str) -> bool:
    members = [m for m in pool.members if m.study == study]
    return bool(members) and all(m.tasks == [task] for m in members)


def default_baseline(pool: Pool, task: str) -> tuple[Member | None, str]:
    """Trial 0 of the first single-task study of ``task``, else of the first study that trains it."""
    single = [s for s in pool.studies if trains_only(pool, s, task)]
    trained = [s for s in pool.studies if any(task in m.tasks for m in pool.members if m.study == s)]
    for study in single or trained:
        member = pool.find(study, 0)
        if member is not None and task in member.tasks:
            kind = "the usual single-task recipe" if single else "a multitask trial: no single-task study of this task was given"
            return member, f"{task} baseline: {member.name} ({kind}; not selected)"
    return None, f"{task}: no baseline (trial 0 of {single or trained} is not a usable member); pass --baseline {task}=STUDY/N"


def task_baselines(pool: Pool, texts: list[str] | None) -> tuple[dict[str, Member | None], list[str]]:
    """Each task's baseline member (None where there is none) and a note per task saying which."""
    refs = parse_baseline_refs(texts)
    named: dict[str | None, Member] = {}
    for task, (study, trial) in refs.items():
        member = pool.find(study, trial)
        if member is None:
            raise EnsembleError(f"--baseline: {study}/trial {trial} is not a usable member of the studies {pool.studies}")
        if task is not None and task not in member.tasks:
            raise EnsembleError(f"--baseline {task}={study}/{trial}: {member.name} trains {member.tasks}, not {task}")
        if task is None and not set(member.tasks) & set(pool.tasks):
            raise EnsembleError(f"--baseline {study}/{trial}: {member.name} trains none of the tasks {pool.tasks}")
        named[task] = member
    baselines, notes = {}, []
    for task in pool.tasks:
        given = named.get(task) or (named[None] if None in named and task in named[None].tasks else None)
        if given is not None:
            baselines[task] = given
            notes.append(f"{task} baseline: {given.name} (--baseline; not selected)")
        else:
            baselines[task], note = default_baseline(pool, task)
            notes.append(note)
    return baselines, notes


def recipe(member: Member) -> dict:
    """What a member's config computes, its seed aside; fields added to the trainer since a member ran
    count at their defaults (what it ran with), so that an older seed run still matches."""
    train = with_defaults(member.config["train"])
    return {k: v for k, v in train.items() if k not in RUNTIME_FIELDS and k != "seed"}


def seed_runs(pool: Pool, baseline: Member) -> list[Member]:
    """The baseline first, then every member of its study that ran the same recipe to the end with another seed."""
    others = [m for m in pool.members if m.study == baseline.study and m is not baseline and not m.early_stopped]
    return [baseline, *(m for m in others if recipe(m) == recipe(baseline))]
