"""Idle cores at a study's end go to the trials still running (search.spare), and the trainer follows."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from tiny_model import needs_data, tiny_config

import model.train
from model.train import train
from search.adapters import SEARCH_FINISHED, TRIAL_NUMBER_KEY
from search.spare import SpareCores, share_cores, threads_for, trial_threads
from search.spec import Budget


def test_the_last_trial_gets_every_core_once_no_trial_will_start():
    # 2 cores, 2 trials at a time, one thread each: nothing spare while trials may still start.
    assert share_cores(2, 1, 2, running=[12, 13], finished=False) == {}
    assert share_cores(2, 1, 2, running=[13], finished=False) == {}  # between trials: the next takes the core
    assert share_cores(2, 1, 2, running=[13], finished=True) == {13: 2}
    assert share_cores(2, 1, 2, running=[12, 13], finished=True) == {}
    assert share_cores(2, 1, 2, running=[], finished=True) == {}


def test_spare_cores_spread_evenly_and_never_below_a_trials_reservation():
    assert share_cores(5, 1, 2, running=[4, 2], finished=True) == {2: 3, 4: 2}
    assert share_cores(8, 2, 4, running=[1], finished=True) == {1: 8}
    # Fewer trials at once than the machine holds: the cores no trial can claim are spare from the start.
    assert share_cores(4, 1, 1, running=[0], finished=False) == {0: 4}
    assert share_cores(4, 2, 2, running=[0, 1], finished=False) == {}
    # A trial created but not started yet keeps its cores.
    assert share_cores(2, 1, 2, running=[12], finished=True, pending=1) == {}


def test_a_trial_reserves_at_least_one_thread():
    assert trial_threads(Budget(trials=1, max_epochs=1, grace_period=1, cpus_per_trial=0.5)) == 1
    assert trial_threads(Budget(trials=1, max_epochs=1, grace_period=1, cpus_per_trial=2)) == 2


def test_a_trial_reads_its_share_or_keeps_its_own_threads(tmp_path):
    path = tmp_path / "threads.json"
    assert threads_for(path, 3, 1) == 1  # no file: no spare cores so far
    path.write_text('{"3": 2}')
    assert threads_for(path, 3, 1) == 2
    assert threads_for(path, 4, 1) == 1
    assert threads_for(path, 3, 4) == 4  # a share below the trial's reservation is not taken
    path.write_text("{not json")
    assert threads_for(path, 3, 1) == 1


def test_the_callback_writes_the_share_when_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "threads.json"
    writes = []
    monkeypatch.setattr("search.spare.atomic_write_text", lambda p, text: (writes.append(text), p.write_text(text)))
    trial = lambda number, status: SimpleNamespace(status=status, config={TRIAL_NUMBER_KEY: number})  # noqa: E731
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 2.0})
    callback = SpareCores(path, Budget(trials=14, max_epochs=2, grace_period=1, max_concurrent=2, cpus_per_trial=1))
    SEARCH_FINISHED.clear()
    try:
        callback.setup()
        callback.on_step_end(1, [trial(12, "TERMINATED"), trial(13, "RUNNING")])
        assert json.loads(path.read_text()) == {}
        SEARCH_FINISHED.set()
        callback.on_step_end(2, [trial(12, "TERMINATED"), trial(13, "RUNNING")])
        callback.on_step_end(3, [trial(12, "TERMINATED"), trial(13, "RUNNING")])
        assert json.loads(path.read_text()) == {"13": 2}
        callback.on_step_end(4, [trial(12, "TERMINATED"), trial(13, "TERMINATED")])
        assert json.loads(path.read_text()) == {}
        assert len(writes) == 3  # setup, the share, nothing running: not once per loop step
    finally:
        SEARCH_FINISHED.clear()


@needs_data
def test_the_trainer_takes_the_thread_count_it_is_given(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(model.train, "THREADS_POLL_SECONDS", 0.0)
    asked = []

    def threads() -> int:
        asked.append(len(asked))
        return 1 if len(asked) < 3 else 2  # the share arrives after two steps

    try:
        train(tiny_config(epochs=1, tasks=["sts"], threads=1, steps_per_epoch=4, predict_test=False), tmp_path, threads=threads)
        assert torch.get_num_threads() == 2
        assert len(asked) >= 4  # before every step, and before the evaluation
    finally:
        torch.set_num_threads(before)


def test_the_search_is_seen_finished_when_rays_count_is_reached_as_on_a_restored_run():
    """A restored run whose trial count already reached num_samples never asks the searcher again: the
    generator's is_finished, which Ray's loop asks, is where the end of the search must be seen."""
    from ray.tune.search import Searcher

    from search.adapters import ResumableSearchGenerator

    generator = ResumableSearchGenerator(Searcher(metric="sts", mode="max"))
    SEARCH_FINISHED.clear()
    try:
        generator._total_samples, generator._counter = 14, 13  # Ray's own state (what set_state restores)
        assert not generator.is_finished() and not SEARCH_FINISHED.is_set()
        generator._counter = 14
        assert generator.is_finished() and SEARCH_FINISHED.is_set()
    finally:
        SEARCH_FINISHED.clear()
