"""The library internals that search/adapters.py relies on still exist: an upgrade of Ray or Optuna
that removes or renames one fails here, by name, instead of corrupting a study's records."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from search.adapters import (
    RAY_TRIALS,
    TRIAL_NUMBER_KEY,
    RecordingOptunaSearch,
    optuna_storage,
    read_study_user_attr,
    storage_trial_id,
    swap_study_user_attr,
)
from search.storage import open_storage


def test_optuna_study_keeps_its_storage_and_id():
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    trial = study.ask()
    study.tell(trial, 1.0)
    assert isinstance(optuna_storage(study), optuna.storages.BaseStorage), "optuna.Study._storage is gone"
    assert isinstance(study._study_id, int), "optuna.Study._study_id is gone"
    assert storage_trial_id(study, 0) == trial._trial_id


def test_ray_optuna_search_keeps_its_trial_table():
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    searcher = OptunaSearch(space=space, metric="m", mode="max")
    config = searcher.suggest("ray-trial-1")
    assert set(config) == {"x"}
    for name, kind in (("_ot_study", optuna.Study), ("_ot_trials", dict), ("_completed_trials", set)):
        assert isinstance(getattr(searcher, name, None), kind), f"ray OptunaSearch.{name} is gone or changed"
    assert searcher._ot_trials["ray-trial-1"].number == 0


@pytest.mark.parametrize("mode,sign", [("max", 1.0), ("min", -1.0)])
def test_ray_asha_keeps_its_rungs(mode, sign):
    asha = ASHAScheduler(metric="m", mode=mode, max_t=9, grace_period=1, reduction_factor=3)
    assert asha._metric_op == sign, "ray ASHAScheduler._metric_op is gone or changed"
    brackets = asha._brackets
    assert brackets, "ray ASHAScheduler._brackets is gone"
    milestones = [milestone for milestone, recorded in brackets[0]._rungs]
    assert sorted(milestones) == [1, 3, 9], "ray ASHA bracket._rungs changed shape"
    assert all(isinstance(recorded, dict) for _, recorded in brackets[0]._rungs)


X = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def new_searcher(tmp_path, max_trials: int, space: dict = X, seed: int = 0, **kwargs) -> RecordingOptunaSearch:
    """A driver's searcher on the study "s" of tmp_path/o.db, with its own connection."""
    return RecordingOptunaSearch(
        space=space,
        metric="m",
        mode="max",
        study_name="s",
        storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"),
        artifacts_root=tmp_path,
        sampler_seed=seed,
        max_trials=max_trials,
        **kwargs,
    )


def test_restore_adopts_a_trial_that_ray_saw_end_and_optuna_never_heard_of(tmp_path):
    """The driver died after Ray's checkpoint noted a trial's end but before Optuna was told: the trial
    is handed out again under its own number and params (its folder resumes), not failed and replaced."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    first = new_searcher(tmp_path, max_trials=3)
    ended, running = first.suggest("ray-a"), first.suggest("ray-b")
    first.on_trial_complete("ray-a", {"m": 0.5})  # in Ray's list as ended; Optuna still says RUNNING
    first.save(str(tmp_path / "searcher.pkl"))

    resumed = restored_searcher(tmp_path, ray_resumes={1}, max_trials=3)  # Ray continues ray-b, not ray-a
    study = optuna.load_study(study_name="s", storage=url)
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.RUNNING]  # nothing failed
    assert resumed.suggest("ray-c") == ended  # the same Optuna trial: number and params
    new = resumed.suggest("ray-d")
    assert new[TRIAL_NUMBER_KEY] == 2 and new != running
    assert resumed.suggest("ray-e") == Searcher.FINISHED  # the budget counts the adopted trial once
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 3


def test_a_restored_search_generator_counts_and_limits_by_rays_trial_list(tmp_path):
    """The search generator's state (its count, the concurrency limiter's live trials) saved newer than
    Ray's trial list holds a trial Ray lost: the limiter would wait for it to end forever. Saved older,
    it lacks a trial Ray continues, whose end would then never reach the searcher. Restored, both follow
    Ray's list: the lost trial is adopted at once, and the continued trial's end is heard."""
    from ray.tune.search import ConcurrencyLimiter

    from search.adapters import ResumableSearchGenerator

    def generator() -> ResumableSearchGenerator:
        return ResumableSearchGenerator(ConcurrencyLimiter(new_searcher(tmp_path, max_trials=3), max_concurrent=1))

    first = generator()
    assert first.searcher.suggest("ray-a")[TRIAL_NUMBER_KEY] == 0  # live in the limiter
    first.save_to_dir(str(tmp_path), session_str="s")

    RAY_TRIALS.update(count=0, resumed={})  # Ray's list lost ray-a
    newer = generator()
    newer.restore_from_dir(str(tmp_path))
    assert newer._counter == 0 and newer.searcher.live_trials == set()
    assert newer.searcher.suggest("ray-b")[TRIAL_NUMBER_KEY] == 0  # adopted, not blocked by ray-a

    RAY_TRIALS.update(count=2, resumed={"ray-x": 0})  # Ray continues ray-x, which the checkpoint never saw
    older = generator()
    older.restore_from_dir(str(tmp_path))
    assert older._counter == 2 and older.searcher.live_trials == {"ray-x"}
    older.searcher.on_trial_complete("ray-x", {"m": 0.5})
    assert "ray-x" in older.searcher.searcher._completed_trials


def test_asha_never_stops_a_start_point_early(tmp_path):
    """Trial 0 (a start point: the usual recipe, every ensemble's baseline) trains to the end even when
    ASHA ranks it below the cut; trial 2, as bad, is stopped at the same rung."""
    from types import SimpleNamespace

    from search.adapters import ResumableASHA

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=open_storage(url))
    scheduler = ResumableASHA(
        storage_url=url, study_name="s", protected_trials=1, time_attr="epoch", metric="m", mode="max",
        max_t=4, grace_period=1, reduction_factor=2,
    )  # fmt: skip
    trials = [SimpleNamespace(trial_id=f"t{n}", config={TRIAL_NUMBER_KEY: n}) for n in range(3)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trials[1], {"epoch": 1, "m": 0.9}) == scheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials[0], {"epoch": 1, "m": 0.1}) == scheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials[2], {"epoch": 1, "m": 0.1}) == scheduler.STOP
    assert scheduler.on_trial_result(None, trials[0], {"epoch": 4, "m": 0.2}) == scheduler.STOP  # its end


@pytest.mark.parametrize("start_point", [{"x": 0.25}, None], ids=["start-point", "sampled"])
def test_a_trial_killed_before_its_params_were_recorded_is_re_asked(tmp_path, start_point):
    """The driver died inside Optuna's ask: the trial is RUNNING with no params (only a start point's
    fixed params, if it was one). A new driver's searcher hands it out again with the start point's
    params, or freshly sampled ones, under its own number; nothing is failed or counted twice."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=open_storage(url), direction="maximize")
    if start_point:
        study.enqueue_trial(start_point)
    asked = study.ask()  # RUNNING, no params: what the kill left
    assert asked.params == {} and study.trials[0].state == TrialState.RUNNING

    searcher = new_searcher(tmp_path, max_trials=2, seed=1, adopt=[0])  # a new driver's connection
    config = searcher.suggest("ray-a")
    assert config[TRIAL_NUMBER_KEY] == 0 and (start_point is None or config["x"] == start_point["x"])
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert len(trials) == 1 and trials[0].params == {"x": config["x"]}


def test_a_study_user_attribute_can_be_compared_and_set(tmp_path):
    """Optuna's study_user_attributes table, written as Optuna reads it (the driver lease's compare-and-set)."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    storage = open_storage(url)
    optuna.create_study(study_name="s", storage=storage)
    assert swap_study_user_attr(storage, "s", "k", None, {"a": 1}) == '{"a": 1}'
    assert swap_study_user_attr(storage, "s", "k", None, 2) is None  # already there
    assert swap_study_user_attr(storage, "s", "k", "2", 3) is None  # not what was read
    assert swap_study_user_attr(storage, "s", "k", '{"a": 1}', 3) == "3"
    assert read_study_user_attr(storage, "s", "k") == "3" and read_study_user_attr(storage, "s", "absent") is None
    assert optuna.load_study(study_name="s", storage=url).user_attrs == {"k": 3}


def restored_searcher(tmp_path, ray_resumes: set[int], **kwargs) -> RecordingOptunaSearch:
    """A new driver's searcher restored from tmp_path/searcher.pkl, Ray's saved trial list continuing
    the Optuna trials ``ray_resumes`` (what search.tuner reads from it before Tuner.restore)."""
    RAY_TRIALS.update(count=len(ray_resumes), resumed={f"ray-{n}": n for n in ray_resumes})
    searcher = new_searcher(tmp_path, **kwargs)
    searcher.restore(str(tmp_path / "searcher.pkl"))
    return searcher


XY = {**X, "y": optuna.distributions.IntDistribution(0, 1000)}


def params(config: dict) -> dict:
    return {name: config[name] for name in XY}


def test_a_trial_draws_the_same_params_however_the_drivers_before_it_ended(tmp_path):
    """Ray's checkpoint saw two trials asked; a third was asked and ended before the driver died. The
    restored searcher (one random stream would be in its state before that third draw) draws for each later number
    what a study run straight through draws: never the params of a trial already in the study."""
    (tmp_path / "straight").mkdir()
    straight = new_searcher(tmp_path / "straight", max_trials=6, space=XY)
    uninterrupted = [params(straight.suggest(f"ray-{n}")) for n in range(6)]
    assert len({tuple(p.values()) for p in uninterrupted}) == 6

    url = f"sqlite:///{tmp_path / 'o.db'}"
    first = new_searcher(tmp_path, max_trials=6, space=XY)
    first.suggest("ray-a"), first.suggest("ray-b")
    first.save(str(tmp_path / "searcher.pkl"))
    after_checkpoint = first.suggest("ray-c")
    study = optuna.load_study(study_name="s", storage=url)
    study.tell(after_checkpoint[TRIAL_NUMBER_KEY], 0.5)  # it ended; Ray's checkpoint never heard of it

    resumed = restored_searcher(tmp_path, ray_resumes={0, 1}, max_trials=6, space=XY)
    drawn = [resumed.suggest(f"ray-{n}") for n in range(3)]
    assert [d[TRIAL_NUMBER_KEY] for d in drawn] == [3, 4, 5]
    assert [params(d) for d in drawn] == uninterrupted[3:]
    assert [t.params for t in optuna.load_study(study_name="s", storage=url).trials] == uninterrupted


def test_a_searcher_checkpoint_older_or_newer_than_rays_trial_list(tmp_path):
    """Ray uploads its trial list and the searcher's checkpoint as separate files: a driver killed in
    between leaves either one the newer. A trial Ray continues is not handed out a second time although
    the searcher's checkpoint never saw it asked; a trial the checkpoint saw asked but Ray's list does
    not hold is handed out again, under its own number."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    first = new_searcher(tmp_path, max_trials=4)
    first.suggest("ray-a")
    first.save(str(tmp_path / "searcher.pkl"))
    first.suggest("ray-b")  # asked after the searcher's checkpoint; Ray's trial list holds it
    older = restored_searcher(tmp_path, ray_resumes={0, 1}, max_trials=4)
    assert older.suggest("ray-c")[TRIAL_NUMBER_KEY] == 2  # a new trial, not trial 1 again

    # Now the checkpoint knows trials 0 and 1, Ray's list only 0; trial 2 (the last driver's) is in neither.
    first.save(str(tmp_path / "searcher.pkl"))
    newer = restored_searcher(tmp_path, ray_resumes={0}, max_trials=4)
    assert [newer.suggest(f"ray-{n}")[TRIAL_NUMBER_KEY] for n in "de"] == [1, 2]  # adopted, not lost
    assert newer.suggest("ray-f")[TRIAL_NUMBER_KEY] == 3
    assert newer.suggest("ray-g") == Searcher.FINISHED
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 4
