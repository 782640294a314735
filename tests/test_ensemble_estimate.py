"""Out-of-selection estimates (ensemble.estimate) on made-up member outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ensemble.estimate import halves, out_of_selection, paired_bootstrap
from ensemble.members import Member
from ensemble.selection import Selector, Settings
from ensemble.taskpool import TaskPool

ROWS = 600


def sts_pool(values: list[np.ndarray], gold: np.ndarray) -> TaskPool:
    config = {"train": {"tasks": ["sts"], "pair_encoding": "bi"}, "bert": {}}
    members = [Member("made-up", n, None, Path(f"/nowhere/{n}"), False, {}, config) for n in range(len(values))]
    ids = np.array([f"id{i}" for i in range(ROWS)])
    return TaskPool("sts", members, ids, gold, np.stack(values))


def test_halves_partition_the_rows_reproducibly():
    pairs = halves(11, splits=20, seed=3)
    assert len(pairs) == 20
    for a, b in pairs:
        assert len(a) == 5 and len(b) == 6 and sorted(np.concatenate([a, b]).tolist()) == list(range(11))
    again = halves(11, splits=20, seed=3)
    assert all(np.array_equal(a, a2) for (a, _), (a2, _) in zip(pairs, again, strict=True))
    assert not all(np.array_equal(a, a2) for (a, _), (a2, _) in zip(pairs, halves(11, 20, seed=4), strict=True))
    with pytest.raises(ValueError, match="too few"):
        halves(3)


def test_a_predictor_not_selected_on_dev_is_estimated_at_its_dev_score():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, ROWS)
    pool = sts_pool([gold + rng.normal(0, 1.0, ROWS), gold + rng.normal(0, 1.5, ROWS)], gold)
    selector = Selector(pool, None, Settings())
    estimates = out_of_selection(pool, {"fixed 1": selector.fixed([1])}, selector.fixed([0]), splits=40)
    for name, index in (("baseline", 0), ("fixed 1", 1)):
        dev = pool.score(pool.values[index])
        estimate = estimates[name]
        assert len(estimate.scores) == 40
        # The mean of B-half scores is the full dev score up to the splits' noise.
        assert abs(estimate.mean - dev) < 3 * estimate.sd / np.sqrt(40) + 1e-3
    assert estimates["baseline"].gain_mean == 0.0 and estimates["baseline"].gain_sd == 0.0
    # Paired gains: member 1 is worse than the baseline on every half.
    assert estimates["fixed 1"].gain_mean < 0 and max(estimates["fixed 1"].gains) < 0


def test_a_pure_noise_pool_shows_no_out_of_selection_gain():
    rng = np.random.default_rng(1)
    gold = rng.uniform(0, 5, ROWS)
    pool = sts_pool([rng.uniform(0, 5, ROWS) for _ in range(12)], gold)
    selector = Selector(pool, None, Settings(top_k=3))
    full = np.arange(ROWS)
    procedures = selector.procedures(("caruana", "top-k"))
    estimates = out_of_selection(pool, procedures, selector.fixed([0]), splits=20)
    assert pool.score(procedures["caruana"](full).values) > 0.08  # selection on dev finds "signal" in noise...
    for name, procedure in procedures.items():
        in_sample = pool.score(procedure(full).values)
        estimate = estimates[name]
        assert estimate.mean < in_sample - 0.02  # ...which does not carry over to the other half
        assert abs(estimate.mean) < 0.06  # chance level
        assert estimate.gain_mean < 0.02  # no gain over the (equally noisy) baseline


def test_a_real_signal_survives_out_of_selection():
    rng = np.random.default_rng(2)
    gold = rng.uniform(0, 5, ROWS)
    d = rng.normal(0, 1.5, ROWS)
    # The baseline is a fair member; two others err in opposite directions and cancel when averaged.
    pool = sts_pool([gold + rng.normal(0, 1.0, ROWS), gold + d, gold - d, rng.uniform(0, 5, ROWS)], gold)
    selector = Selector(pool, None, Settings(top_k=2, caruana_init=1))
    estimates = out_of_selection(pool, selector.procedures(("caruana",)), selector.fixed([0]), splits=20)
    caruana = estimates["caruana"]
    assert caruana.gain_mean > 0.1 and min(caruana.gains) > 0
    assert estimates["best single"].gain_mean == pytest.approx(0.0, abs=1e-9)  # the baseline is the best single


def test_every_procedure_is_also_paired_with_the_reference():
    """The seed average is a user's other cheap choice: each row's gain over it, on the same halves."""
    rng = np.random.default_rng(1)
    gold = rng.uniform(0, 5, ROWS)
    pool = sts_pool([gold + rng.normal(0, s, ROWS) for s in (1.5, 1.0, 0.7)], gold)
    selector = Selector(pool, None, Settings())
    procedures = {"seeds": selector.fixed([0, 1]), "better": selector.fixed([2])}
    estimates = out_of_selection(pool, procedures, selector.fixed([0]), splits=10, reference="seeds")
    better, seeds = estimates["better"], estimates["seeds"]
    assert better.reference_gains == pytest.approx([b - s for b, s in zip(better.scores, seeds.scores, strict=True)])
    assert min(better.reference_gains) > 0  # the least noisy member beats the two noisier ones averaged on every half
    assert seeds.reference_gains is None and seeds.to_dict()["reference_gain_mean"] is None
    assert estimates["baseline"].to_dict()["reference_gain_mean"] == pytest.approx(-seeds.gain_mean)
    with pytest.raises(ValueError, match="'nope' is not one of the procedures"):
        out_of_selection(pool, procedures, splits=2, reference="nope")


def test_a_paired_bootstrap_gives_the_standard_error_of_a_difference_on_the_same_rows():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 2000).astype(float)
    right = rng.random(2000) < 0.8
    other_right = np.where(rng.random(2000) < 0.9, right, ~right)  # agrees with the first on 90% of rows
    values = np.where(right, labels, 1 - labels) * 0.8 + 0.1  # P(duplicate): right on `right`
    other = np.where(other_right, labels, 1 - labels) * 0.8 + 0.1
    difference, error = paired_bootstrap("para", values, other, labels, resamples=1000, seed=1)
    assert difference == pytest.approx(right.mean() - other_right.mean(), abs=1e-12)
    paired = (right.astype(float) - other_right).std() / np.sqrt(2000)  # the analytic standard error, paired
    assert error == pytest.approx(paired, rel=0.1)
    unpaired = np.sqrt(right.var() / 2000 + other_right.var() / 2000)  # what scoring each on other rows would give
    assert error < 0.6 * unpaired  # independent draws for each would give about `unpaired`
    assert paired_bootstrap("para", values, other, labels, resamples=1000, seed=1) == (difference, error)  # seeded
    with pytest.raises(ValueError, match="1999 outputs for 2000 labels"):
        paired_bootstrap("para", values, other[:-1], labels)
