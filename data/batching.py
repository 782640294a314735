"""Length-bucketed batches with dynamic padding.

Training batches group sequences of similar length (so little compute goes to padding) but
stay random: the data is shuffled, cut into pools of ``pool_batches`` batches, each pool is
sorted by length and cut into batches, and the batches are shuffled again.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from data.tokenize import EncodedSplit


@dataclass
class Batch:
    """``views``: one (input_ids, attention_mask, token_type_ids) triple per encoder input."""

    index: torch.Tensor  # positions of the examples in their split
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    labels: torch.Tensor | None

    def to(self, device: torch.device | str) -> Batch:
        views = [tuple(t.to(device, non_blocking=True) for t in view) for view in self.views]
        labels = None if self.labels is None else self.labels.to(device, non_blocking=True)
        return Batch(self.index, views, labels)

    def __len__(self) -> int:
        return len(self.index)


def pad(seqs: list[tuple[list[int], list[int]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Batches are built on the host (device="cpu" said, not assumed) and moved by Batch.to.
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device="cpu")
    types = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device="cpu")
    for row, (ids, type_ids) in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids, device="cpu")
        types[row, : len(ids)] = torch.tensor(type_ids, device="cpu")
        mask[row, : len(ids)] = 1
    return input_ids, mask, types


def make_batch(split: EncodedSplit, index: list[int], pad_id: int = 0) -> Batch:
    views = [pad([view[i] for i in index], pad_id) for view in split.views]
    labels = None
    if split.labels is not None:
        values = [split.labels[i] for i in index]
        dtype = torch.long if isinstance(values[0], int) else torch.float
        labels = torch.tensor(values, dtype=dtype, device="cpu")
    return Batch(torch.tensor(index, device="cpu"), views, labels)


def length(split: EncodedSplit, i: int) -> int:
    return max(len(view[i][0]) for view in split.views)


def batch_indices(
    split: EncodedSplit,
    batch_size: int,
    shuffle: bool,
    rng: random.Random | None = None,
    pool_batches: int = 50,
) -> list[list[int]]:
    """Index lists of the batches of one pass over ``split``. Without ``shuffle`` (evaluation)
    the whole split is sorted by length, which is the fastest order to run it in."""
    order = list(range(len(split)))
    if not shuffle:
        order.sort(key=lambda i: length(split, i))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = rng or random.Random(0)
    rng.shuffle(order)
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: length(split, i))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def iterate_batches(
    split: EncodedSplit,
    batch_size: int,
    shuffle: bool = False,
    rng: random.Random | None = None,
    pad_id: int = 0,
) -> Iterator[Batch]:
    for index in batch_indices(split, batch_size, shuffle, rng):
        yield make_batch(split, index, pad_id)


class BatchStream:
    """An endless stream of training batches of one split, reshuffled at each pass.
    Its position (pass and batch) is part of a checkpoint, so a resumed run sees the same data.

    ``other_order``: the same rows with each pair's sentences the other way round. Each pass then
    reads a random half of the rows in the other order and the next pass the other half, so that
    every two passes show each pair once in each order, at the cost of one order's steps."""

    def __init__(self, split: EncodedSplit, batch_size: int, seed: int, pad_id: int = 0, other_order: EncodedSplit | None = None):
        if other_order is not None and (other_order.ids != split.ids or len(other_order.views) != len(split.views)):
            raise ValueError("other_order must hold the same rows as split, encoded the same way")
        self.split, self.batch_size, self.seed, self.pad_id = split, batch_size, seed, pad_id
        self.other_order = other_order
        self.passes, self.position = 0, 0
        self._batches = self._plan()

    def _plan(self) -> list[list[int]]:
        self._pass_split = self.split if self.other_order is None else self._orders_of_pass()
        return batch_indices(self._pass_split, self.batch_size, True, random.Random(f"{self.seed}-{self.passes}"))

    def _orders_of_pass(self) -> EncodedSplit:
        """The split as this pass reads it: passes 2k and 2k + 1 swap complementary random halves."""
        draw = random.Random(f"{self.seed}-orders-{self.passes // 2}")
        swap = [draw.random() < 0.5 for _ in range(len(self.split))]
        if self.passes % 2:
            swap = [not s for s in swap]
        views = [
            [other if s else given for given, other, s in zip(view, other_view, swap, strict=True)]
            for view, other_view in zip(self.split.views, self.other_order.views, strict=True)
        ]
        return EncodedSplit(self.split.ids, views, self.split.labels)

    def next(self) -> Batch:
        if self.position >= len(self._batches):
            self.passes, self.position = self.passes + 1, 0
            self._batches = self._plan()
        index = self._batches[self.position]
        self.position += 1
        return make_batch(self._pass_split, index, self.pad_id)

    def state_dict(self) -> dict:
        return {"passes": self.passes, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.passes, self.position = state["passes"], state["position"]
        self._batches = self._plan()
