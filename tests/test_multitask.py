"""The multitask model: every head / pooling / pair-encoding combination, freezing, SMART, MNRL
and the task schedules."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
import torch
from tiny_model import needs_data, tiny_config

from model.bert import BertConfig, BertModel
from model.config import TrainConfig
from model.multitask import MultitaskBert, combine_pair, cosent_loss, multiple_negatives_ranking_loss, task_loss
from model.schedules import default_steps_per_epoch, step_tasks, task_probabilities
from model.smart import divergence, smart_loss
from model.train import train

TINY = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
LABELS = {"sst": torch.tensor([0, 4, 2]), "para": torch.tensor([1, 0, 1]), "sts": torch.tensor([0.5, 4.0, 2.5])}


def view(batch: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY.vocab_size, (batch, width), generator=g)
    mask = torch.ones(batch, width, dtype=torch.long)
    mask[0, width - 2 :] = 0  # one padded row
    ids[0, width - 2 :] = 0
    return ids, mask, torch.zeros_like(ids)


def views_for(task: str, pair_encoding: str) -> list:
    if task != "sst" and pair_encoding == "bi":
        return [view(3, 7, 1), view(3, 5, 2)]  # different widths: the narrower one is padded
    return [view(3, 7, 1)]


def make_model(**kwargs) -> MultitaskBert:
    torch.manual_seed(0)
    return MultitaskBert(BertModel(TINY), ["sst", "para", "sts"], **kwargs)


COMBINATIONS = [
    (enc, pool, sst_head, sts_head)
    for enc, pool, sst_head, sts_head in itertools.product(
        ["cross", "bi"], ["mean", "cls", "pooler"], ["linear", "hidden"], ["regression", "cosine"]
    )
    if not (sts_head == "cosine" and enc == "cross")
]


@pytest.mark.parametrize("pair_encoding,pooling,sst_head,sts_head", COMBINATIONS)
def test_every_combination_builds_and_takes_a_step(pair_encoding, pooling, sst_head, sts_head):
    model = make_model(pair_encoding=pair_encoding, pooling=pooling, sst_head=sst_head, sts_head=sts_head)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    total = 0.0
    for task, labels in LABELS.items():
        out = model(task, views_for(task, pair_encoding))
        assert out.shape == ((3, 5) if task == "sst" else (3,))
        loss = task_loss(task, out, labels)
        assert torch.isfinite(loss)
        loss.backward()
        total += loss.item()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("bert.encoder.layer.0.") for k in changed)
    assert any(k.startswith("heads.sst.") for k in changed) and any(k.startswith("heads.para.") for k in changed)
    assert any(k.startswith("bert.pooler.") for k in changed) == (pooling == "pooler")
    if sts_head == "cosine":
        assert list(model.heads["sts"].parameters()) == []
        out = model.eval()("sts", views_for("sts", "bi"))
        assert (out.abs() <= 5 + 1e-5).all()  # 5 cos(u, v), up to rounding


def test_task_layers_give_each_task_its_own_copy_of_the_top_layers():
    shared, split = make_model(), make_model(task_layers=1)
    assert len(split.bert.encoder.layer) == 1 and set(split.task_layers) == {"sst", "para", "sts"}
    # Copies of the same pretrained layer: before training, every task's output is the shared model's.
    split.load_state_dict(
        {k: v for k, v in shared.state_dict().items() if not k.startswith("bert.encoder.layer.1.")}
        | {f"task_layers.{t}.0.{k}": v for t in split.task_layers for k, v in shared.bert.encoder.layer[1].state_dict().items()}
    )
    shared.eval(), split.eval()
    for task in LABELS:
        torch.testing.assert_close(split(task, views_for(task, "cross")), shared(task, views_for(task, "cross")))
    # A step on SST's loss moves SST's top layer and the shared layer, not the other tasks' top layers.
    split.train()
    before = {k: v.clone() for k, v in split.state_dict().items()}
    optimizer = torch.optim.SGD(split.parameters(), lr=0.1)
    task_loss("sst", split("sst", views_for("sst", "cross")), LABELS["sst"]).backward()
    optimizer.step()
    changed = [k for k, v in split.state_dict().items() if not torch.equal(v, before[k])]
    assert {k.split(".")[0] for k in changed} == {"bert", "heads", "task_layers"}
    assert {k.split(".")[1] for k in changed if k.startswith("task_layers.")} == {"sst"}
    own = [*split.heads["sst"].parameters(), *split.task_layers["sst"].parameters()]
    assert {id(p) for p in split.task_parameters("sst")} == {id(p) for p in own}
    assert not {id(p) for p in split.encoder_parameters()} & {id(p) for p in split.task_layers.parameters()}
    with pytest.raises(ValueError, match="task_layers must be in 0..1"):
        make_model(task_layers=2)


def test_cosent_loss_matches_its_definition_and_only_sees_the_order():
    scores = torch.tensor([1.0, 3.0, 2.0, 4.5])
    labels = torch.tensor([0.5, 2.0, 2.0, 5.0])  # a tie (rows 1, 2) contributes no term
    expected = math.log(
        1 + sum(math.exp(4.0 * (scores[j] - scores[i])) for i in range(4) for j in range(4) if labels[i] > labels[j])
    )
    assert cosent_loss(scores, labels).item() == pytest.approx(expected, rel=1e-6)
    assert task_loss("sts", scores, labels, "cosent").item() == pytest.approx(expected, rel=1e-6)
    # Shifting every score changes the MSE but not the ranking loss.
    assert cosent_loss(scores + 2.0, labels).item() == pytest.approx(expected, rel=1e-6)
    assert task_loss("sts", scores + 2.0, labels).item() != pytest.approx(task_loss("sts", scores, labels).item())
    # The right order with wide margins costs almost nothing; the reverse order costs a lot.
    assert cosent_loss(labels * 3, labels).item() < 1e-3
    assert cosent_loss(-labels, labels).item() > 10
    with pytest.raises(ValueError, match="sts_loss"):
        task_loss("sts", scores, labels, "huber")


def test_cosine_head_needs_bi_encoding():
    with pytest.raises(ValueError, match="cosine.*bi"):
        make_model(pair_encoding="cross", sts_head="cosine")
    with pytest.raises(ValueError, match="pooling"):
        make_model(pooling="max")


def test_bi_encoding_in_one_batch_equals_encoding_each_sentence_alone():
    model = make_model(pair_encoding="bi").eval()
    first, second = view(3, 7, 1), view(3, 5, 2)
    u, v = model.encode_views("sts", [first, second], [None, None])
    torch.testing.assert_close(u, model.embed(first), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, model.embed(second), atol=1e-5, rtol=1e-5)
    assert combine_pair(u, v).shape == (3, 4 * TINY.hidden_size)


def test_per_task_encoding_and_pooling_in_one_model():
    model = make_model(pair_encoding={"para": "cross", "sts": "bi"}, pooling={"sst": "cls", "para": "cls", "sts": "mean"})
    model.eval()
    assert not model.heads["para"].bi and model.heads["sts"].bi
    ids, mask, types = view(3, 7, 1)
    hidden = model.bert(ids, mask, types)["last_hidden_state"]
    torch.testing.assert_close(model.embed((ids, mask, types), task="sst"), hidden[:, 0])
    assert model(task="para", views=[(ids, mask, types)]).shape == (3,)
    assert model(task="sts", views=[view(3, 7, 1), view(3, 5, 2)]).shape == (3,)
    with pytest.raises(ValueError, match="name the task"):
        model.embed((ids, mask, types))
    with pytest.raises(ValueError, match="pooling for sts"):
        make_model(pooling={"sst": "cls", "para": "cls"})


def test_mean_pooling_ignores_padding():
    model = make_model(pooling="mean").eval()
    ids, mask, types = view(3, 7, 1)
    wider = tuple(torch.nn.functional.pad(x, (0, 3)) for x in (ids, mask, types))
    torch.testing.assert_close(model.embed((ids, mask, types)), model.embed(wider), atol=1e-5, rtol=1e-5)


def test_freezing_stops_the_lower_layers_and_embeddings():
    model = make_model(freeze_layers=1)
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert not any(p.requires_grad for p in model.bert.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in model.bert.encoder.layer[1].parameters())
    trainable = {id(p) for p in model.encoder_parameters()}
    assert trainable == {id(p) for p in model.bert.encoder.layer[1].parameters()}
    with pytest.raises(ValueError, match="freeze_layers must be in 0..2"):
        make_model(freeze_layers=3)


@pytest.mark.parametrize("task", ["sst", "para", "sts"])
def test_smart_loss_is_a_small_positive_differentiable_penalty(task):
    model = make_model(pair_encoding="bi")
    views = views_for(task, "bi")
    clean = model(task, views)
    penalty = smart_loss(model, task, views, clean)
    assert penalty.item() >= 0 and torch.isfinite(penalty)
    penalty.backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_divergence_is_a_symmetric_kl_for_classifiers_and_mse_for_sts():
    p, q = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum() + (lq.exp() * (lq - lp)).sum()
    assert divergence("sst", p, q).item() == pytest.approx(kl.item())
    assert divergence("sst", p, p).item() == pytest.approx(0.0, abs=1e-7)
    # Paraphrase: the Bernoulli of sigmoid(logit).
    a, b = torch.sigmoid(torch.tensor(1.0)), torch.sigmoid(torch.tensor(-0.5))
    bern = (a - b) * (torch.log(a / b)) + ((1 - a) - (1 - b)) * torch.log((1 - a) / (1 - b))
    assert divergence("para", torch.tensor([1.0]), torch.tensor([-0.5])).item() == pytest.approx(bern.item(), rel=1e-5)
    assert divergence("sts", torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])).item() == pytest.approx(0.5)


def test_multiple_negatives_ranking_loss_prefers_matching_pairs():
    anchors = torch.eye(3)
    assert multiple_negatives_ranking_loss(anchors, anchors).item() < 1e-6
    assert multiple_negatives_ranking_loss(anchors, anchors.flip(0)).item() > 10


def test_schedules_and_step_budget():
    sizes = {"sst": 800, "para": 3200, "sts": 100}
    cfg = TrainConfig(tasks=["sst", "para", "sts"], batch_size={"sst": 32, "para": 32, "sts": 10}, epochs=3)
    assert default_steps_per_epoch(cfg, sizes) == 100  # one pass over the largest task
    assert step_tasks(cfg, {}, random.Random(0)) == ["sst", "para", "sts"]
    prop = TrainConfig(tasks=["sst", "para", "sts"], schedule="proportional", batch_size=cfg.batch_size)
    assert default_steps_per_epoch(prop, sizes) == (25 + 100 + 10 + 2) // 3  # ceil(135 / 3) = 45
    # epoch_fraction: that share of the pass, whatever the batch size (rounded up)
    assert default_steps_per_epoch(dataclasses.replace(cfg, epoch_fraction=0.5), sizes) == 50
    halves = dataclasses.replace(cfg, epoch_fraction=0.5, batch_size={"sst": 32, "para": 16, "sts": 10})
    assert default_steps_per_epoch(halves, sizes) == 100  # half of 200 batches of 16
    assert default_steps_per_epoch(dataclasses.replace(prop, epoch_fraction=0.25), sizes) == 12  # ceil(45.67 / 4)
    for bad in (0.0, 1.5, "half"):
        with pytest.raises(ValueError, match="epoch_fraction must be in"):
            TrainConfig(tasks=["sts"], epoch_fraction=bad)
    assert task_probabilities(prop, sizes, 1) == pytest.approx({"sst": 0.195122, "para": 0.780488, "sts": 0.024390}, abs=1e-6)
    drawn = [t for _ in range(3000) for t in step_tasks(prop, task_probabilities(prop, sizes, 1), random.Random(_))]
    assert drawn.count("para") / len(drawn) == pytest.approx(0.78, abs=0.02)
    annealed = TrainConfig(tasks=["sst", "para", "sts"], schedule="annealed", epochs=3)
    first, last = task_probabilities(annealed, sizes, 1), task_probabilities(annealed, sizes, 3)
    assert first == pytest.approx(task_probabilities(prop, sizes, 1))  # alpha = 1 at the start
    weights = {t: n**0.5 for t, n in sizes.items()}  # alpha = 0.5 at the last epoch
    assert last == pytest.approx({t: w / sum(weights.values()) for t, w in weights.items()})


@needs_data
@pytest.mark.parametrize(
    "schedule,surgery,extra",
    [
        ("round_robin", "none", {"pair_encoding": "bi", "sts_head": "cosine", "mnrl_weight": 0.5}),
        ("proportional", "pcgrad", {"smart_weight": 1.0, "mnrl_weight": 0.5}),
        (
            "annealed",
            "gradvac",
            {"pair_encoding": "bi", "pooling": "cls", "sst_head": "hidden", "freeze_layers": 1, "precision": "fp32"},
        ),
        ("round_robin", "pcgrad", {"pair_encoding": "bi", "task_layers": 1, "smart_weight": 1.0}),
    ],
)
def test_each_schedule_and_surgery_trains(tmp_path, schedule, surgery, extra):
    config = tiny_config(schedule=schedule, surgery=surgery, steps_per_epoch=3, epochs=2, predict_test=False, **extra)
    summary = train(config, tmp_path)
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    assert all(r["train_loss"] > 0 for r in summary["history"])


@needs_data
def test_single_task_training_reports_only_that_task(tmp_path):
    reports = []
    train(tiny_config(tasks=["sts"], steps_per_epoch=2, surgery="pcgrad", predict_test=False), tmp_path, report=reports.append)
    assert set(reports[0]) == {"epoch", "train_loss", "sts", "overall", "train_seconds"}
    assert reports[0]["overall"] == pytest.approx((reports[0]["sts"] + 1) / 2)


@pytest.mark.parametrize("task", ["para", "sts"])
def test_bi_encoded_evaluation_encodes_each_sentence_once_with_the_same_outputs(task):
    from data.tokenize import EncodedSplit
    from model.evaluation import predict_values
    from model.multitask import output_values

    model = make_model(pair_encoding="bi").eval()
    g = torch.Generator().manual_seed(3)
    sentences = [(torch.randint(1, 50, (n,), generator=g).tolist(), [0] * n) for n in (3, 9, 5, 4)]
    pairs = [(0, 1), (1, 2), (2, 0), (3, 3), (0, 1)]  # repeated sentences and a repeated pair
    split = EncodedSplit([f"p{i}" for i in range(5)], [[sentences[a] for a, _ in pairs], [sentences[b] for _, b in pairs]], None)
    calls = []
    model.bert.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    values = predict_values(model, task, split, batch_size=2)
    assert sum(calls) == 4  # four distinct sentences
    for row, (a, b) in enumerate(pairs):
        one = [tuple(torch.tensor([x]) for x in (sentences[i][0], [1] * len(sentences[i][0]), sentences[i][1])) for i in (a, b)]
        expected = output_values(task, model(task, one))
        torch.testing.assert_close(torch.tensor(values[row]), expected[0], atol=1e-5, rtol=1e-4)


def test_sentiment_losses():
    from model.multitask import squared_emd

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0], [0.0, 0.0, 3.0, 0.0, 0.0]])
    labels = torch.tensor([0, 4])
    probs = logits.softmax(-1)
    by_hand = ((probs.cumsum(-1) - torch.nn.functional.one_hot(labels, 5).float().cumsum(-1)) ** 2).sum(-1).mean()
    assert squared_emd(logits, labels) == pytest.approx(by_hand.item())
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert task_loss("sst", logits, labels, sst_loss="ce") == pytest.approx(ce.item())
    assert task_loss("sst", logits, labels, sst_loss="emd") == pytest.approx(ce.item() + by_hand.item())
    smoothed = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert task_loss("sst", logits, labels, sst_loss="smoothed") == pytest.approx(smoothed.item())
    # For ordered classes: all mass one class off the gold one costs less than two classes off (CE: the same).
    gold = torch.tensor([2])
    near, far = torch.full((1, 5), -20.0), torch.full((1, 5), -20.0)
    near[0, 3], far[0, 4] = 20.0, 20.0
    assert squared_emd(near, gold) < squared_emd(far, gold)
    with pytest.raises(ValueError, match="sst_loss"):
        task_loss("sst", logits, labels, sst_loss="hinge")
