"""The multitask model: one shared BERT encoder (``bert``) and one head per task (``heads[task]``).

Sentence tasks (sst, cfimdb) read one pooled vector. Pair tasks (para, sts) are either
cross-encoded (one view: ``[CLS] s1 [SEP] s2 [SEP]``, one pooled vector) or bi-encoded (two views,
each sentence alone, pooled to u and v and combined as [u, v, |u-v|, u*v]); bi-encoded STS can
instead be 5 * cos(u, v), which has no parameters.

Outputs (the "raw" values that losses and ensembles use): class logits (B, C) for sentiment, one
logit (B,) for paraphrase, the similarity (B,) on the 0-5 scale for STS.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from data.files import TASKS
from model.bert import BertModel
from model.config import PAIR_ENCODINGS, POOLINGS, SST_HEADS, SST_LOSSES, STS_HEADS, STS_LOSSES

View = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, token_type_ids


def pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad a (B, T) id/mask/type tensor with zeros (masked out) to ``width`` columns."""
    return x if x.shape[1] == width else F.pad(x, (0, width - x.shape[1]))


def stack_views(first: View, second: View) -> View:
    """The two views of a bi-encoded batch as one batch of 2B rows, the narrower padded to the wider:
    one encoder call (fewer, larger matrix products). The padding costs attention only, as the
    encoder's other work skips it (model.bert.Packing)."""
    width = max(first[0].shape[1], second[0].shape[1])
    return tuple(torch.cat([pad_to(a, width), pad_to(b, width)]) for a, b in zip(first, second, strict=True))


def combine_pair(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sentence-BERT's pair features [u, v, |u-v|, u*v]."""
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


class SentenceHead(nn.Module):
    """Dropout + linear, or dropout + hidden layer (GELU) + dropout + linear."""

    def __init__(self, hidden: int, num_classes: int, dropout: float, kind: str):
        super().__init__()
        if kind == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        elif kind == "hidden":
            self.net = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
            )
        else:
            raise ValueError(f"sst_head must be one of {SST_HEADS}, not {kind!r}")

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return self.net(pooled[0])


class PairHead(nn.Module):
    """One output per pair from the cross-encoded vector or the bi-encoded [u, v, |u-v|, u*v]."""

    def __init__(self, hidden: int, dropout: float, bi: bool, bias: float = 0.0):
        super().__init__()
        self.bi = bi
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(4 * hidden if bi else hidden, 1)
        with torch.no_grad():
            self.linear.bias.fill_(bias)

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        features = combine_pair(pooled[0], pooled[1]) if self.bi else pooled[0]
        return self.linear(self.dropout(features)).squeeze(-1)


class CosineHead(nn.Module):
    """5 * cos(u, v): similarity on the STS scale straight from the sentence embeddings."""

    def forward(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return 5.0 * F.cosine_similarity(pooled[0].float(), pooled[1].float(), dim=-1)


def per_task(value: str | dict[str, str], tasks: list[str], name: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """One setting for every task, or a {task: value} table, as a table over ``tasks``."""
    table = dict(value) if isinstance(value, dict) else {task: value for task in tasks}
    for task in tasks:
        if table.get(task) not in allowed:
            raise ValueError(f"{name} for {task} must be one of {allowed}, not {table.get(task)!r}")
    return {task: table[task] for task in tasks}


class MultitaskBert(nn.Module):
    """``pair_encoding`` and ``pooling`` are one setting for all tasks or a {task: value} table, so
    that one model can cross-encode paraphrase and bi-encode STS over the same encoder.

    ``task_layers`` > 0 gives each task its own copy of the encoder's top layers (``task_layers[task]``,
    started from the same weights), run after the shared lower ones (``bert.encoder.layer``): the tasks
    stop pulling the top of one encoder different ways, and an example still costs one encoder pass."""

    def __init__(
        self,
        bert: BertModel,
        tasks: list[str],
        pair_encoding: str | dict[str, str] = "cross",
        pooling: str | dict[str, str] = "mean",
        sst_head: str = "linear",
        sts_head: str = "regression",
        dropout: float = 0.1,
        freeze_layers: int = 0,
        freeze_word_embeddings: bool = False,
        lazy_word_embeddings: bool = False,
        task_layers: int = 0,
    ):
        super().__init__()
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known tasks: {list(TASKS)}")
        pair_tasks = [t for t in tasks if TASKS[t].is_pair]
        self.pooling = per_task(pooling, tasks, "pooling", POOLINGS)
        self.pair_encoding = per_task(pair_encoding, pair_tasks, "pair_encoding", PAIR_ENCODINGS)
        if sts_head not in STS_HEADS:
            raise ValueError(f"sts_head must be one of {STS_HEADS}, not {sts_head!r}")
        if sts_head == "cosine" and self.pair_encoding.get("sts", "bi") != "bi":
            raise ValueError("sts_head 'cosine' needs pair_encoding 'bi' (a cross-encoder has no separate sentence vectors)")
        self.bert = bert
        hidden = bert.config.hidden_size
        heads = {}
        for task in tasks:
            bi = self.pair_encoding.get(task) == "bi"
            kind = TASKS[task].label_kind
            if kind == "class":
                heads[task] = SentenceHead(hidden, TASKS[task].num_classes, dropout, sst_head)
            elif kind == "binary":
                heads[task] = PairHead(hidden, dropout, bi)
            else:  # a score: start regression at the middle of the 0-5 scale rather than at 0
                heads[task] = CosineHead() if sts_head == "cosine" else PairHead(hidden, dropout, bi, bias=2.5)
        self.heads = nn.ModuleDict(heads)
        self.task_layers = self.split_top_layers(tasks, task_layers)
        self.freeze(freeze_layers)
        if freeze_word_embeddings:
            self.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        # A sparse gradient: the rows of the batch's tokens only, which AdamW then updates lazily
        # (model/optimizer.py), instead of a dense 30522 x hidden matrix of mostly zeros each step.
        self.bert.embeddings.word_embeddings.sparse = lazy_word_embeddings
        if "pooler" not in self.pooling.values():
            # Unused: no gradient, and no weight decay or surgery work spent on it.
            self.bert.pooler.requires_grad_(False)

    def split_top_layers(self, tasks: list[str], count: int) -> nn.ModuleDict:
        """Take the top ``count`` layers off the shared encoder and give every task a copy of them."""
        total = len(self.bert.encoder.layer)
        if not 0 <= count < total:
            raise ValueError(f"task_layers must be in 0..{total - 1} for this {total}-layer model, not {count}")
        if count == 0:
            return nn.ModuleDict()
        top = self.bert.encoder.layer[total - count :]
        copies = nn.ModuleDict({task: copy.deepcopy(top) for task in tasks})
        del self.bert.encoder.layer[total - count :]
        return copies

    def freeze(self, layers: int) -> None:
        """Freeze the embeddings and the lowest ``layers`` transformer layers (0 = train everything)."""
        total = len(self.bert.encoder.layer)
        if not 0 <= layers <= total:
            raise ValueError(f"freeze_layers must be in 0..{total} for this {total}-layer model, not {layers}")
        frozen = [self.bert.embeddings, *self.bert.encoder.layer[:layers]] if layers else []
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The shared, trainable parameters (what gradient surgery operates on)."""
        return [p for p in self.bert.parameters() if p.requires_grad]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The trainable parameters only ``task`` uses: its head and its own top layers."""
        own = [self.heads[task], *([self.task_layers[task]] if self.task_layers else [])]
        return [p for module in own for p in module.parameters() if p.requires_grad]

    def pool(self, out: dict[str, torch.Tensor], attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
        if pooling == "cls":
            return out["last_hidden_state"][:, 0]
        if pooling == "pooler":
            return out["pooler_output"]
        hidden = out["last_hidden_state"]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def pooling_for(self, task: str | None) -> str:
        """The task's pooling; ``task`` may be None when every task pools the same way."""
        if task is not None:
            return self.pooling[task]
        if len(set(self.pooling.values())) != 1:
            raise ValueError(f"the tasks pool differently ({self.pooling}); name the task")
        return next(iter(self.pooling.values()))

    def top_layers_for(self, task: str | None) -> nn.ModuleList | None:
        """The task's own top layers (None when every layer is shared); ``task`` may be None when the
        model has one task."""
        if not self.task_layers:
            return None
        if task is None:
            if len(self.task_layers) != 1:
                raise ValueError(f"each task has its own top layers ({list(self.task_layers)}); name the task")
            task = next(iter(self.task_layers))
        return self.task_layers[task]

    def embed(self, view: View, inputs_embeds: torch.Tensor | None = None, task: str | None = None) -> torch.Tensor:
        """Pooled encoder output of one view (encoded and pooled as ``task`` does); ``inputs_embeds``
        replaces the word embeddings (SMART)."""
        input_ids, attention_mask, token_type_ids = view
        top_layers = self.top_layers_for(task)
        out = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds=inputs_embeds, top_layers=top_layers)
        return self.pool(out, attention_mask, self.pooling_for(task))

    def word_embeddings(self, view: View) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings(view[0])

    def forward(self, task: str, views: list[View], inputs_embeds: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Raw output of ``task``'s head (logits or STS score) for a batch of one or two views."""
        if inputs_embeds is None:
            inputs_embeds = [None] * len(views)
        pooled = self.encode_views(task, views, inputs_embeds)
        return self.heads[task](pooled)

    def encode_views(self, task: str, views: list[View], inputs_embeds: list[torch.Tensor | None]) -> list[torch.Tensor]:
        if len(views) == 2 and inputs_embeds[0] is None and inputs_embeds[1] is None:
            return list(self.embed(stack_views(*views), task=task).chunk(2))
        return [self.embed(view, emb, task) for view, emb in zip(views, inputs_embeds, strict=True)]


def task_loss(task: str, output: torch.Tensor, labels: torch.Tensor, sts_loss: str = "mse", sst_loss: str = "ce") -> torch.Tensor:
    """Sentiment: cross-entropy, label-smoothed, or with a squared-EMD term (``sst_loss``); paraphrase:
    binary cross-entropy with logits; STS: MSE or CoSENT (``sts_loss``)."""
    output = output.float()
    kind = TASKS[task].label_kind
    if kind == "class":
        if sst_loss not in SST_LOSSES:
            raise ValueError(f"sst_loss must be one of {SST_LOSSES}, not {sst_loss!r}")
        loss = F.cross_entropy(output, labels, label_smoothing=0.1 if sst_loss == "smoothed" else 0.0)
        return loss + squared_emd(output, labels) if sst_loss == "emd" else loss
    if kind == "binary":
        return F.binary_cross_entropy_with_logits(output, labels.float())
    if sts_loss == "cosent":
        return cosent_loss(output, labels.float())
    if sts_loss != "mse":
        raise ValueError(f"sts_loss must be one of {STS_LOSSES}, not {sts_loss!r}")
    return F.mse_loss(output, labels.float())


def squared_emd(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hou, Yu and Samaras 2016: the squared earth mover's distance between the predicted and the gold
    class distributions, sum_k (CDF_pred(k) - CDF_gold(k))^2, batch mean. For ordered classes: putting
    mass two classes away from the gold one costs more than one class away, unlike cross-entropy."""
    predicted = logits.softmax(-1).cumsum(-1)
    gold = F.one_hot(labels, logits.shape[-1]).to(predicted.dtype).cumsum(-1)
    return (predicted - gold).pow(2).sum(-1).mean()


def cosent_loss(scores: torch.Tensor, labels: torch.Tensor, scale: float = 4.0) -> torch.Tensor:
    """CoSENT (Su 2022): for every pair of batch rows with gold labels y_i > y_j, penalise the
    model when its score s_j comes near or above s_i: log(1 + sum exp(scale * (s_j - s_i))).
    Only the order of the scores matters, as for the Pearson/Spearman evaluation, not their
    distance from the 0-5 labels. STS scores are 5 * cos here, so scale 4 is CoSENT's usual
    20 on the cosine."""
    diff = scale * (scores[None, :] - scores[:, None])  # diff[i, j] = scale * (s_j - s_i)
    ordered = labels[:, None] > labels[None, :]
    terms = diff[ordered]
    # The leading 0 is the "1 +" inside the log; logsumexp keeps it stable.
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), dim=0)


def output_values(task: str, output: torch.Tensor) -> torch.Tensor:
    """What is saved and ensembled: class probabilities, P(duplicate), or the STS score."""
    output = output.float()
    kind = TASKS[task].label_kind
    if kind == "class":
        return output.softmax(-1)
    if kind == "binary":
        return torch.sigmoid(output)
    return output


def multiple_negatives_ranking_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Henderson et al. 2017 / Sentence-BERT's MNRL: for each anchor u_i, its paraphrase v_i must
    score higher (scaled cosine) than every other v_j of the batch (in-batch negatives)."""
    scores = scale * F.cosine_similarity(anchors.float()[:, None], positives.float()[None], dim=-1)
    return F.cross_entropy(scores, torch.arange(len(anchors), device=anchors.device))
