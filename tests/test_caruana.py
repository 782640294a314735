"""Caruana ensemble selection on made-up member outputs whose best ensemble is known."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble.caruana import bagged_caruana_select, caruana_select
from model.metrics import task_metric

ROWS = 400
rng = np.random.default_rng(0)
GOLD = rng.uniform(0, 5, ROWS)
ALL = np.arange(ROWS)


def pearson_score(values: np.ndarray, rows: np.ndarray) -> float:
    return task_metric("sts", values[rows], GOLD[rows])


def noisy(sd: float, seed: int) -> np.ndarray:
    return GOLD + np.random.default_rng(seed).normal(0, sd, ROWS)


def test_a_duplicate_of_the_best_member_gets_no_second_slot():
    best, other = noisy(1.0, 1), noisy(1.3, 2)
    result = caruana_select(np.stack([best, best.copy(), other]), pearson_score, ALL, init_size=3, rounds=30)
    assert result.counts[1] == 0  # the copy never adds anything the original does not
    assert result.counts[0] >= 1 and result.counts[2] >= 1  # independent errors: mixing helps
    single = pearson_score(best, ALL)
    assert result.score > single


def test_a_better_pair_beats_the_best_single_member():
    # b and c err in opposite directions: each is worse than a alone, their mean is exact.
    d = np.random.default_rng(3).normal(0, 1.5, ROWS)
    a, b, c = noisy(1.0, 4), GOLD + d, GOLD - d
    values = np.stack([a, b, c])
    assert pearson_score(a, ALL) > max(pearson_score(b, ALL), pearson_score(c, ALL))
    result = caruana_select(values, pearson_score, ALL, init_size=1, rounds=10)
    assert result.counts[1] == result.counts[2] >= 1
    assert result.score > pearson_score(a, ALL)
    weights = result.weights
    assert weights[0] < weights[1] and sum(weights) == pytest.approx(1.0)


def test_selects_with_replacement_when_a_second_slot_helps():
    # Optimal weights are inversely proportional to the error variances: 2/3 on a (var 1), 1/3 on b (var 2).
    a, b = noisy(1.0, 5), noisy(np.sqrt(2.0), 6)
    result = caruana_select(np.stack([a, b]), pearson_score, ALL, init_size=1, rounds=30)
    assert result.counts[0] > result.counts[1] >= 1
    assert result.counts[0] >= 2  # the same member, selected again
    assert result.weights[0] == pytest.approx(2 / 3, abs=0.15)


def test_ties_are_broken_towards_fewer_members():
    same = noisy(1.0, 7)
    result = caruana_select(np.stack([same, same, same]), pearson_score, ALL, init_size=3, rounds=5)
    assert result.counts == [1, 0, 0]  # no addition ever strictly improves: the first prefix is kept
    assert result.history[0] == result.score


def test_selection_looks_only_at_the_given_rows():
    a, b = noisy(1.0, 8), noisy(1.0, 9)
    first_half, second_half = ALL[: ROWS // 2], ALL[ROWS // 2 :]
    b[first_half] = GOLD[first_half]  # b is perfect on the first half only
    on_first = caruana_select(np.stack([a, b]), pearson_score, first_half, init_size=1, rounds=3)
    assert on_first.counts == [0, 1] and on_first.score == pytest.approx(1.0)
    on_second = caruana_select(np.stack([a, b]), pearson_score, second_half, init_size=1, rounds=0)
    assert sum(on_second.counts) == 1


def test_classification_accuracy_criterion():
    labels = rng.integers(0, 5, ROWS)
    onehot = np.eye(5)[labels]
    good = 0.6 * onehot + 0.4 * np.random.default_rng(10).dirichlet(np.ones(5), ROWS)
    noise = np.random.default_rng(11).dirichlet(np.ones(5), ROWS)

    def accuracy(values: np.ndarray, rows: np.ndarray) -> float:
        return task_metric("sst", values[rows], labels[rows])

    result = caruana_select(np.stack([noise, good]), accuracy, ALL, init_size=2, rounds=5)
    assert result.counts == [0, 1] and result.score == accuracy(good, ALL)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty pool"):
        caruana_select(np.zeros((0, 3)), pearson_score, ALL)
    with pytest.raises(ValueError, match="init_size"):
        caruana_select(np.stack([GOLD]), pearson_score, ALL, init_size=0)


def test_bagging_averages_each_bags_selection():
    # Member 0 is exact; the others are offset from the gold by constants, so any bag holding member 0
    # selects it alone (by mean squared error) and every other bag selects from the offsets only.
    offsets = np.stack([GOLD, GOLD + 1.0, GOLD - 2.0, GOLD + 3.0, GOLD - 4.0, GOLD + 5.0])

    def neg_mse(values: np.ndarray, rows: np.ndarray) -> float:
        return -float(np.mean((values[rows] - GOLD[rows]) ** 2))

    result = bagged_caruana_select(offsets, neg_mse, ALL, bags=4, fraction=0.5, seed=0)
    assert len(result.bags) == 4 and all(len(bag) == 3 for bag in result.bags)
    with_exact = [bag for bag in result.bags if 0 in bag]
    assert 0 < len(with_exact) < 4  # the seed draws both kinds of bag
    assert result.weights[0] == pytest.approx(len(with_exact) / 4)
    assert sum(result.weights) == pytest.approx(1.0)
    never_drawn = set(range(6)) - {m for bag in result.bags for m in bag}
    assert never_drawn and all(result.weights[m] == 0 for m in never_drawn)
    # Half of an odd pool rounds up; a pool of one is its own bag.
    assert all(len(bag) == 3 for bag in bagged_caruana_select(offsets[:5], neg_mse, ALL, bags=3).bags)
    assert bagged_caruana_select(offsets[:1], neg_mse, ALL, bags=2).weights == [1.0]
    # Every bag of the whole pool is plain Caruana.
    whole = bagged_caruana_select(offsets, neg_mse, ALL, bags=3, fraction=1.0)
    assert whole.weights == pytest.approx(caruana_select(offsets, neg_mse, ALL).weights)


def test_bagging_is_seeded_and_checks_its_arguments():
    values = np.stack([noisy(1.0, s) for s in range(8)])
    first = bagged_caruana_select(values, pearson_score, ALL, bags=5, seed=1)
    assert bagged_caruana_select(values, pearson_score, ALL, bags=5, seed=1) == first
    assert bagged_caruana_select(values, pearson_score, ALL, bags=5, seed=2).bags != first.bags
    with pytest.raises(ValueError, match="bags"):
        bagged_caruana_select(values, pearson_score, ALL, bags=0)
    with pytest.raises(ValueError, match="fraction"):
        bagged_caruana_select(values, pearson_score, ALL, fraction=0.0)
