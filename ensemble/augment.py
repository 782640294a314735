"""New, unlabelled transfer rows for distillation (ensemble.distill). The teacher labels them; the student
learns the teacher's judgement where no member saw a gold label (on their own training rows the members'
outputs are over-confident).

Pair tasks (AugSBERT, Thakur et al. 2021): pairs of the task's training sentences, half random (mostly
unrelated: low scores, non-duplicates) and half nearest neighbours by the cosine of the base encoder's
mean-pooled embeddings (related pairs, which random sampling almost never draws). Pairs of the training
file (in either order) and pairs of one sentence with itself are left out.

Single sentences (SST): sentences of the other tasks' training files (their multi-sentence texts, the
CFIMDB reviews, split at sentence ends), deduplicated, none of them in any of the task's own files
(train, dev, test), so no dev or test row is ever labelled by the teacher. Sentences of the task's own
domain come first (``Task.domain``: for SST the 14.5k sentences of the CFIMDB movie reviews, as long
as SST's), then the rest: a sentiment teacher says little that is useful about a Quora question.

Every choice is seeded, and the rows come out shuffled, so any prefix (``augment_limit``) mixes both kinds.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable

import numpy as np
import torch

from data.batching import iterate_batches
from data.files import SPLITS, TASKS, Example, load_examples
from data.tokenize import EncodedSplit
from model.config import TrainConfig

Row = tuple[str, ...]  # the texts of one new row: one sentence, or a pair
# The way new rows are drawn, in the teacher cache's key: bump it when that changes, so that a cache of
# rows drawn the old way is stale. 2: sentences split out of reviews, the task's own domain first;
# 3: <br /> ends a sentence.
AUGMENT_METHOD = 3
# A sentence ends at ., ! or ? followed by a space (the CS224N files are tokenised: " . " between sentences).
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MIN_SENTENCE_WORDS = 4
LINE_BREAK = re.compile(r"\s*<br\s*/?>\s*", re.IGNORECASE)
Embed = Callable[[list[str]], np.ndarray]


def nearest_pairs(embeddings: np.ndarray, k: int, chunk: int = 1024) -> list[tuple[int, int]]:
    """(i, j) for each row i and each of its ``k`` nearest other rows j by cosine similarity; the
    similarity matrix is computed ``chunk`` rows at a time."""
    x = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=-1)
    k = min(k, len(x) - 1)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(x), chunk):
        rows = torch.arange(start, min(start + chunk, len(x)))
        similarity = x[rows] @ x.T
        similarity[torch.arange(len(rows)), rows] = -float("inf")  # not oneself
        top = similarity.topk(k, dim=1).indices
        pairs += [(int(i), int(j)) for i, near in zip(rows, top, strict=True) for j in near]
    return pairs


def pair_rows(
    examples: list[Example],
    count: int,
    seed: int,
    embed: Embed,
    pool: int = 4000,
    neighbours: int = 3,
    exclude: set[frozenset] | frozenset = frozenset(),
) -> list[Row]:
    """``count`` new pairs of the sentences of ``examples``: half nearest neighbours among ``pool``
    sentences drawn at random (each with its ``neighbours`` nearest), the rest random pairs; never a
    pair of ``examples`` or of ``exclude`` (e.g. the dev and test pairs)."""
    sentences = list(dict.fromkeys(text for e in examples for text in e.texts))
    if len(sentences) < 2 or count < 1:
        return []
    known = {frozenset(e.texts) for e in examples} | set(exclude)
    chosen: dict[frozenset, Row] = {}
    rng = random.Random(seed)

    def add(a: str, b: str) -> None:
        key = frozenset((a, b))
        if a != b and key not in known and key not in chosen:
            chosen[key] = (a, b)

    sample = rng.sample(sentences, min(pool, len(sentences)))
    candidates = nearest_pairs(embed(sample), neighbours) if count // 2 else []
    rng.shuffle(candidates)
    for i, j in candidates:
        if len(chosen) >= count // 2:
            break
        add(sample[i], sample[j])
    for _ in range(20 * count):  # random pairs; the bound only matters for tiny sentence sets
        if len(chosen) >= count:
            break
        add(*rng.sample(sentences, 2))
    rows = list(chosen.values())
    rng.shuffle(rows)
    return rows


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def sentences(text: str) -> list[str]:
    """The sentences of a text of at least MIN_SENTENCE_WORDS words (a question or caption is one);
    the IMDb reviews' HTML line breaks (``<br />``) end a sentence too."""
    text = LINE_BREAK.sub(" . ", text)
    parts = (part.strip(" .") for part in SENTENCE_END.split(text))
    return [part + " ." if part and part[-1] not in ".!?" else part for part in parts if len(part.split()) >= MIN_SENTENCE_WORDS]


def sentence_rows(task: str, count: int, seed: int, data_dir: str | None) -> list[Row]:
    """``count`` sentences of the other tasks' training files that appear in none of ``task``'s files:
    those of ``task``'s domain first, each group in a seeded random order."""
    own = {normalised(t) for split in SPLITS for e in load_examples(task, split, data_dir) for t in e.texts}
    others = sorted(t for t in TASKS if t != task and TASKS[t].path("train", data_dir).is_file())
    rng = random.Random(seed)
    rows: list[Row] = []
    seen = set(own)
    for same_domain in (True, False):
        group: list[str] = []
        for other in others:
            if (TASKS[other].domain == TASKS[task].domain) != same_domain:
                continue
            for example in load_examples(other, "train", data_dir):
                for sentence in (s for text in example.texts for s in sentences(text)):
                    key = normalised(sentence)
                    if key not in seen:
                        seen.add(key)
                        group.append(sentence)
        rows += [(text,) for text in rng.sample(group, min(count - len(rows), len(group)))]
    return rows


def source_files(task: str, data_dir: str | None) -> list:
    """The data files the new rows of ``task`` are drawn from (what a cache of them depends on)."""
    if TASKS[task].is_pair:
        return [TASKS[task].path("train", data_dir)]
    files = [TASKS[task].path(split, data_dir) for split in SPLITS]
    return files + [TASKS[t].path("train", data_dir) for t in TASKS if t != task and TASKS[t].path("train", data_dir).is_file()]


def base_embedder(cfg: TrainConfig, device: str | None = None, batch_size: int = 64, progress: bool = True) -> Embed:
    """Mean-pooled sentence embeddings of the student's encoder before fine-tuning (the embedded model,
    ``model_path``, or a seeded random one of ``model_config``'s size)."""
    from model.build import build_model
    from model.runtime import resolve_device
    from model.splits import get_tokenizer
    from model.train import progress_bar

    torch.manual_seed(cfg.seed)
    where = resolve_device(device)
    model = build_model(dataclasses.replace(cfg, task_layers=0)).to(where).eval()  # the whole base encoder
    tokenizer = get_tokenizer(cfg)

    @torch.inference_mode()
    def embed(sentences: list[str]) -> np.ndarray:
        split = EncodedSplit([str(i) for i in range(len(sentences))], [tokenizer.encode(sentences)], None)
        out = torch.empty((len(sentences), model.bert.config.hidden_size))
        batches = iterate_batches(split, batch_size)
        total = -(-len(sentences) // batch_size)
        for batch in progress_bar(batches, total=total, desc="embedding sentences for neighbours", enabled=progress):
            ids, mask, types = batch.to(where).views[0]
            out[batch.index] = model.pool(model.bert(ids, mask, types), mask, "mean").float().cpu()
        return out.numpy()

    return embed
