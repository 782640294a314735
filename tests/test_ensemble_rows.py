"""Every dev-dependent choice is made on the selection rows only (TaskPool.prepared): each member's
epoch, for STS each member's map to the labels' scale, and in a calibrated pool each SST or paraphrase
member's temperature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import pearsonr

from ensemble.estimate import halves, out_of_selection
from ensemble.members import Member
from ensemble.selection import Selector, Settings
from ensemble.taskpool import TaskPool, apply_scale, epoch_chosen_on_rows, fit_scale, from_log_odds

ROWS = 200
rng = np.random.default_rng(0)


def pool_of(
    task: str,
    labels: np.ndarray,
    values: list[np.ndarray],
    epochs: list[np.ndarray | None] | None = None,
    calibrate: bool = False,
) -> TaskPool:
    config = {"train": {"tasks": [task], "pair_encoding": "bi"}, "bert": {}}
    members = [Member("made-up", n, None, Path(f"/nowhere/{n}"), False, {}, config) for n in range(len(values))]
    ids = np.array([f"id{i}" for i in range(len(labels))])
    return TaskPool(task, members, ids, labels, np.stack(values), epochs or [None] * len(values), calibrate=calibrate)


def one_hot(classes: np.ndarray) -> np.ndarray:
    return np.eye(5)[classes]


def test_a_members_epoch_is_chosen_on_the_selection_rows():
    labels = rng.integers(0, 5, ROWS)
    first_half, second_half = np.arange(ROWS // 2), np.arange(ROWS // 2, ROWS)
    wrong = (labels + 1) % 5
    # Epoch 1: right on the first half only (50% overall); epoch 2: right on 70% of all rows (kept by the trainer).
    epoch1 = one_hot(np.where(np.arange(ROWS) < ROWS // 2, labels, wrong))
    epoch2 = one_hot(np.where(rng.random(ROWS) < 0.7, labels, wrong))
    pool = pool_of("sst", labels, [epoch2], [np.stack([epoch1, epoch2])])
    np.testing.assert_array_equal(pool.prepared(np.arange(ROWS)).values[0], epoch2)  # all of dev: the saved epoch
    np.testing.assert_array_equal(pool.prepared(first_half).values[0], epoch1)  # this half prefers epoch 1
    np.testing.assert_array_equal(pool.prepared(second_half).values[0], epoch2)
    # The baseline's estimate picks its epoch on each half A and is scored on B.
    selector = Selector(pool, None, Settings())
    estimate = out_of_selection(pool, {}, selector.fixed([0]), splits=10)["baseline"]
    by_hand = []
    for a, b in halves(ROWS, 10):
        best = max((epoch1, epoch2), key=lambda v: (v[a].argmax(1) == labels[a]).mean())
        by_hand.append((best[b].argmax(1) == labels[b]).mean())
    np.testing.assert_allclose(estimate.scores, by_hand)


def test_a_member_without_epoch_outputs_keeps_its_saved_epoch():
    labels = rng.integers(0, 5, ROWS)
    saved = one_hot(labels)
    pool = pool_of("sst", labels, [saved], [None])
    np.testing.assert_array_equal(pool.prepared(np.arange(10)).values[0], saved)


def test_sts_members_are_put_on_the_labels_scale_before_averaging():
    gold = rng.uniform(0, 5, ROWS)
    member = gold + rng.normal(0, 1.0, ROWS)
    flipped = 10.0 - 2.0 * member  # the same predictions on another, reversed scale (say, a distance)
    pool = pool_of("sts", gold, [member, flipped])
    alone = pearsonr(member, gold)[0]
    # Unaligned, the average is 5 - member / 2: the order reversed. Aligned, it is the member itself.
    assert pearsonr((member + flipped) / 2, gold)[0] < 0
    selector = Selector(pool, None, Settings())
    both = selector.fixed([0, 1])(np.arange(ROWS))
    assert abs(pearsonr(both.values, gold)[0] - alone) < 1e-9
    # On the labels' 0-5 scale: the least-squares line, fitted on the selection rows only.
    rows = np.arange(ROWS // 2)
    prepared = pool.prepared(rows)
    slope, offset = np.polyfit(flipped[rows], gold[rows], 1)
    np.testing.assert_allclose(prepared.scales[1], (offset, slope))
    np.testing.assert_allclose(prepared.values[1], offset + slope * flipped)
    assert not np.allclose(prepared.scales[1], pool.prepared(np.arange(ROWS)).scales[1])
    assert selector.fixed([0, 1])(rows).scales == prepared.scales


def noisy_sentiment(labels: np.ndarray, temperature: float) -> np.ndarray:
    """Class probabilities of a member right on about 60% of rows, at this temperature."""
    logits = rng.normal(0, 1, (len(labels), 5))
    logits[np.arange(len(labels)), labels] += 1.5
    return from_log_odds(logits / temperature, "sst")


def test_classification_members_are_not_rescaled_unless_calibrated():
    labels = rng.integers(0, 5, ROWS)
    member = noisy_sentiment(labels, 0.5)
    assert pool_of("sst", labels, [member]).prepared(np.arange(ROWS // 2)).scales is None
    calibrated = pool_of("sst", labels, [member], calibrate=True).prepared(np.arange(ROWS // 2))
    assert calibrated.scales[0][1] < 1.0 and not np.allclose(calibrated.values[0], member)  # a sure member is softened


def test_a_member_right_on_every_row_keeps_its_confidence():
    """Its likelihood grows without bound as it sharpens: no temperature is fitted to it."""
    labels = rng.integers(0, 5, ROWS)
    perfect = 0.6 * one_hot(labels) + 0.1  # right on every row, at 0.7 against 0.075 for each other class
    assert fit_scale(perfect, labels, "sst") == (0.0, 1.0)
    binary = (labels > 2).astype(float)
    assert fit_scale(np.where(binary > 0.5, 0.8, 0.3), binary, "para") == (0.0, 1.0)


def test_a_temperature_fitted_on_the_selection_rows_keeps_each_members_predictions():
    labels = rng.integers(0, 5, ROWS)
    calibrated = noisy_sentiment(labels, 1.0)
    overconfident = from_log_odds(np.log(calibrated) * 4.0, "sst")  # the same member, four times as sure
    rows = np.arange(ROWS // 2)
    pool = pool_of("sst", labels, [calibrated, overconfident], calibrate=True)
    prepared = pool.prepared(rows)
    # Each member's own predictions are unchanged; the overconfident one's temperature undoes the 4x.
    for before, after in zip((calibrated, overconfident), prepared.values, strict=True):
        np.testing.assert_array_equal(before.argmax(1), after.argmax(1))
    assert prepared.scales[1][1] < 0.5 * prepared.scales[0][1]
    np.testing.assert_allclose(prepared.values[1], prepared.values[0], atol=0.02)
    # Fitted on the selection rows only: the same fit as on those rows alone, not on all of dev.
    assert prepared.scales == [fit_scale(v[rows], labels[rows], "sst") for v in (calibrated, overconfident)]
    assert prepared.scales != pool.prepared(np.arange(ROWS)).scales
    # A predictor built from the prepared pool carries the maps that ensemble.predict applies again.
    choice = Selector(pool, None, Settings()).fixed([0, 1])(rows)
    again = (apply_scale(calibrated, choice.scales[0], "sst") + apply_scale(overconfident, choice.scales[1], "sst")) / 2
    np.testing.assert_allclose(choice.values, again)


def test_a_paraphrase_members_temperature_keeps_its_side_of_one_half():
    labels = rng.integers(0, 2, ROWS).astype(float)
    logits = np.where(labels > 0.5, 1.0, -1.0) + rng.normal(0, 1.2, ROWS)
    overconfident = from_log_odds(5.0 * logits, "para")
    scale = fit_scale(overconfident, labels, "para")
    assert scale[0] == 0.0 and 0.1 < scale[1] < 0.4  # about 1/5: the logits' own scale
    np.testing.assert_array_equal(apply_scale(overconfident, scale, "para") > 0.5, overconfident > 0.5)
    # Probabilities of exactly 0 and 1 (float32 saturates) map to finite values.
    assert np.isfinite(apply_scale(np.array([0.0, 1.0, 0.5]), scale, "para")).all()


def test_only_a_single_task_members_epoch_is_chosen_on_the_rows():
    """The trainer chose a multitask member's epoch on all its tasks together; no weights exist for a
    per-task choice, so the halves keep its saved epoch rather than simulate one the build cannot use."""

    def member(tasks: list[str], best_epoch: int | None, epochs: list[int]) -> Member:
        config = {"train": {"tasks": tasks}, "bert": {}}
        kept = {task: {e: {} for e in epochs} for task in tasks}
        return Member("made-up", 0, None, Path("/nowhere"), False, {}, config, epoch_outputs=kept, best_epoch=best_epoch)

    assert epoch_chosen_on_rows(member(["sst"], 2, [1, 2, 3]), "sst")
    assert not epoch_chosen_on_rows(member(["sst", "sts"], 2, [1, 2, 3]), "sst")
    assert not epoch_chosen_on_rows(member(["sst"], 2, [1, 3]), "sst")  # the saved epoch's outputs are missing
    assert not epoch_chosen_on_rows(member(["sst"], None, []), "sst")  # a run that kept no epochs


def test_a_manifest_newer_than_the_code_is_refused(tmp_path):
    import json

    import pytest

    from ensemble.members import EnsembleError
    from ensemble.output import MANIFEST_FORMAT
    from ensemble.predict import load_plans

    (tmp_path / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT + 1, "tasks": {}}))
    with pytest.raises(EnsembleError, match="newer than this code reads"):
        load_plans(tmp_path)


def test_caruana_on_likelihood_tells_apart_what_accuracy_cannot():
    """Two members right on every row, one barely (p = 0.21 on the gold class), one surely (0.9):
    accuracy ties them, the log-likelihood prefers the sure one. STS keeps Pearson r."""
    labels = rng.integers(0, 5, ROWS)
    barely = np.full((ROWS, 5), 0.1975)
    barely[np.arange(ROWS), labels] = 0.21
    surely = np.full((ROWS, 5), 0.025)
    surely[np.arange(ROWS), labels] = 0.9
    pool = pool_of("sst", labels, [barely, surely])
    rows = np.arange(ROWS)
    assert pool.log_likelihood(surely, rows) == np.mean(np.log(np.full(ROWS, 0.9)))
    by_metric = Selector(pool, None, Settings(caruana_criterion="metric")).procedures(("caruana",))["caruana"](rows)
    by_likelihood = Selector(pool, None, Settings()).procedures(("caruana",))["caruana"](rows)
    assert by_metric.members == [0] and by_likelihood.members == [1]
    gold = rng.uniform(0, 5, ROWS)
    sts = pool_of("sts", gold, [gold])
    assert sts.selection_scorer("likelihood", "x")(gold, rows) == 1.0  # Pearson r


def test_a_soup_of_several_sts_members_is_mapped_on_the_selection_rows_and_runs_as_its_first_member():
    """A soup is one more model: its own line to the labels, fitted on the selection rows as a member's
    is (not its raw outputs, which a CoSENT member leaves on no particular scale); and it runs with its
    first member's config (max_length, precision...), as on test and in the saved predictor."""
    gold = rng.uniform(0, 5, ROWS)
    raw = 3.0 * gold + rng.normal(0, 1, ROWS) - 7.0
    pool = pool_of("sts", gold, [gold, gold, gold])
    ran_with = []

    def evaluate(members, split):
        ran_with.append([m.trial_number for m in members])
        return {"sts": {"ids": pool.ids, "values": raw, "labels": None}}

    selector = Selector(pool, evaluate, Settings())
    rows = np.arange(ROWS // 2)
    soup = selector.soup("uniform-soup", [2, 0, 1], rows)
    assert ran_with == [[2, 0, 1]]
    slope, offset = np.polyfit(raw[rows], gold[rows], 1)
    np.testing.assert_allclose(soup.scales[0], (offset, slope))
    np.testing.assert_allclose(soup.values, offset + slope * raw)
    selector.soup("uniform-soup", [2, 1, 0], rows)  # the same soup: run once
    assert ran_with == [[2, 0, 1]]
