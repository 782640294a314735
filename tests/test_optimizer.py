"""Our AdamW against torch.optim.AdamW, and its two implementations against each other."""

from __future__ import annotations

import io

import pytest
import torch

from model import optimizer as optimizer_module
from model.optimizer import AdamW, _cache_blocks, _Tensors, clip_grad_norm_, decays, param_groups

SHAPES = [(7,), (3, 5), (2, 3, 4), (), (40, 6), (3,)]
EMBEDDING = 4  # gets gradients in rows 0-9 only, like a word embedding: its other rows keep m = v = 0
WHISPER = 5  # values ~1e-12 and gradients 1e-24, whose squares underflow in float32: v = 0 but m != 0


def make_params(seed: int, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(shape, generator=g, dtype=dtype) for shape in SHAPES]
    values[WHISPER] *= 1e-12
    return [torch.nn.Parameter(v) for v in values]


def loss_term(index: int, p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if index == WHISPER:
        return 1e-24 * p.sum()
    if index == EMBEDDING:
        p, target = p[:10], target[:10]
    return ((p - target) ** 2 * (1 + p.abs())).sum()


def make_run(optimizer_class, dtype: torch.dtype = torch.float64, **kwargs):
    """An optimizer over two parameter groups (different lr and weight decay) and a function doing
    one update of a quadratic-ish loss. The last parameter never gets a gradient and params[0] skips
    the odd steps (its grad is None then)."""
    params = make_params(0, dtype)
    frozen = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    groups = [
        {"params": params[:2]},
        {"params": [*params[2:], frozen], "lr": kwargs.get("lr", 1e-3) * 3, "weight_decay": 0.1},
    ]
    optimizer = optimizer_class(groups, **kwargs)
    g = torch.Generator().manual_seed(1)
    targets = [torch.randn(p.shape, generator=g, dtype=dtype) for p in params]
    state = {"step": 0}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        first = 0 if state["step"] % 2 == 0 else 1  # params[0] gets no gradient on odd steps
        sum(loss_term(i, params[i], targets[i]) for i in range(first, len(params))).backward()
        optimizer.step()
        state["step"] += 1

    return [*params, frozen], optimizer, step


def run(optimizer_class, steps: int = 100, dtype: torch.dtype = torch.float64, **kwargs) -> list[torch.Tensor]:
    """The parameters after ``steps`` updates (see ``make_run``)."""
    params, _, step = make_run(optimizer_class, dtype, **kwargs)
    for _ in range(steps):
        step()
    return [p.detach().clone() for p in params]


HYPERPARAMETERS = [
    {"lr": 1e-2, "weight_decay": 0.01},
    {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.3},
]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kwargs", HYPERPARAMETERS)
def test_matches_torch_adamw_over_100_steps(kwargs, foreach):
    ours = run(AdamW, foreach=foreach, **kwargs)
    reference = run(torch.optim.AdamW, **kwargs)
    for got, expected in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    initial = make_params(0, torch.float64)
    assert not torch.allclose(ours[0], initial[0]), "the parameters must have moved"
    # rows without gradient (m = v = 0) only decay, at the second group's lr * 3 and weight decay 0.1
    decay = (1 - 3 * kwargs["lr"] * 0.1) ** 100
    torch.testing.assert_close(ours[EMBEDDING][10:], initial[EMBEDDING][10:] * decay)
    assert not torch.allclose(ours[EMBEDDING][:10], initial[EMBEDDING][:10] * decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_thread", [optimizer_module.CPU_BLOCK_NUMEL_PER_THREAD, 7, 1])
@pytest.mark.parametrize("eps", [1e-8, 1e-30])
def test_foreach_path_equals_the_loop_bit_for_bit(dtype, per_thread, eps, monkeypatch):
    """Small blocks cut the 240-element parameter into pieces and pack the small ones together. With
    eps 1e-8 the foreach path raises v = 0 to the smallest normal number before its sqrt (WHISPER
    checks that this does not change the denominators); 1e-30 is below the bound where it may."""
    monkeypatch.setattr(optimizer_module, "CPU_BLOCK_NUMEL_PER_THREAD", per_thread)
    kwargs = {"lr": 1e-2, "weight_decay": 0.05, "eps": eps, "dtype": dtype}
    foreach, loop = run(AdamW, steps=30, foreach=True, **kwargs), run(AdamW, steps=30, foreach=False, **kwargs)
    for got, expected in zip(foreach, loop, strict=True):
        assert torch.equal(got, expected)


def test_cache_blocks_cut_big_tensors_and_pack_small_ones():
    values = [torch.full(shape, float(i)) for i, shape in enumerate([(10, 10), (3,), (4,), (2, 2), (25,)])]
    values.append(torch.full((10, 3), 5.0).t())  # big but not contiguous: kept whole
    tensors = _Tensors()
    for i, p in enumerate(values):
        tensors.add(p, p.clone(), p.clone(), p.clone(), step_size=float(i), denom_eps=float(i))
    blocks = list(_cache_blocks(tensors, 8))
    # 100 = 12 x 8 + 4 | 4 + 3 | 4 + 4 | 25 = 8 + 8 + 8 + 1 | 30
    assert [b.numel for b in blocks] == [8] * 12 + [7, 8, 8, 8, 8, 1, 30]
    for block in blocks:
        for p, g, m, v, step_size, denom_eps in block.rows():
            assert denom_eps == step_size and all(torch.all(t == step_size) for t in (p, g, m, v))  # its own constants
            p.add_(1.0)
    for i, p in enumerate(values):  # every element in exactly one piece
        assert torch.all(p == i + 1)


def test_parameters_of_several_dtypes_in_one_group():
    def final(optimizer_class, **kwargs) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=dtype)) for dtype in (torch.float32, torch.float64)]
        optimizer = optimizer_class(params, lr=1e-2, **kwargs)
        for _ in range(20):
            optimizer.zero_grad()
            sum((p**3).sum() for p in params).backward()
            optimizer.step()
        return params

    for got, expected in zip(final(AdamW), final(torch.optim.AdamW), strict=True):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("foreach", [True, False])
def test_state_dict_round_trip_mid_run_continues_identically(foreach):
    params, optimizer, step = make_run(AdamW, foreach=foreach, lr=1e-2)
    for _ in range(40):
        step()
    saved = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, saved)
    for _ in range(30):
        step()
    uninterrupted = [p.detach().clone() for p in params]

    resumed_params, resumed, resumed_step = make_run(AdamW, foreach=foreach, lr=1e-2)
    checkpoint = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    with torch.no_grad():
        for p, saved_p in zip(resumed_params, checkpoint["params"], strict=True):
            p.copy_(saved_p)
    resumed.load_state_dict(checkpoint["optimizer"])
    state = resumed.state[resumed_params[1]]
    assert state["step"] == 40 and set(state) == {"step", "exp_avg", "exp_avg_sq"}
    for _ in range(30):
        resumed_step()
    for got, expected in zip(resumed_params, uninterrupted, strict=True):
        assert torch.equal(got, expected)


def test_state_dict_saved_before_the_foreach_flag_loads():
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    optimizer.step()
    old = optimizer.state_dict()
    for group in old["param_groups"]:
        del group["foreach"]
    resumed = AdamW([p], lr=0.1)
    resumed.load_state_dict(old)
    resumed.step()
    assert resumed.state[p]["step"] == 2 and resumed.param_groups[0]["foreach"] is True


def test_params_without_grad_are_untouched_even_with_weight_decay():
    frozen = run(AdamW, lr=1e-2, weight_decay=0.5)[-1]
    torch.testing.assert_close(frozen, torch.ones(4, dtype=torch.float64))


def test_closure_is_evaluated_and_returned():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = AdamW([p], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == pytest.approx(1.0)
    assert p.item() < 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "learning rate"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.01}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdamW([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def lazy_embedding_run(foreach: bool, steps: int = 20) -> tuple[torch.nn.Embedding, torch.nn.Parameter, AdamW]:
    """An embedding with sparse gradients and a dense 4-row twin of its rows 0-3. Rows 0-3 are in
    every batch (row 1 twice), rows 4-5 in even steps only, rows 6-9 never; the twin gets the same
    gradient as rows 0-3 and is updated by our dense path."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    twin = torch.nn.Parameter(embedding.weight.detach()[:4].clone())
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "foreach": foreach}
    lazy, dense = AdamW(embedding.parameters(), **kwargs), AdamW([twin], **kwargs)
    for step in range(steps):
        lazy.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        ids = torch.tensor([0, 1, 1, 2, 3] + ([4, 5] if step % 2 == 0 else []))
        (embedding(ids) ** 2).sum().backward()
        before = embedding.weight.detach().clone()
        twin_ids = torch.tensor([0, 1, 1, 2, 3])
        (twin[twin_ids] ** 2).sum().backward()
        lazy.step()
        dense.step()
        if step % 2 == 1:  # rows 4-5 were not in the batch: not moved, not decayed
            assert torch.equal(embedding.weight[4:6], before[4:6])
    return embedding, twin, lazy


@pytest.mark.parametrize("foreach", [True, False])
def test_a_sparse_gradient_updates_only_its_rows_as_dense_adamw_would(foreach):
    initial = lazy_embedding_run(foreach, steps=0)[0].weight.detach().clone()
    embedding, twin, optimizer = lazy_embedding_run(foreach)
    weight = embedding.weight.detach()
    assert torch.equal(weight[:4], twin.detach())  # rows in every batch: the dense update, bit for bit
    assert not torch.allclose(weight[4:6], initial[4:6])  # rows in some batches moved
    assert torch.equal(weight[6:], initial[6:])  # rows never in a batch: untouched, no weight decay either
    state = optimizer.state[embedding.weight]
    assert state["step"] == 20 and not state["exp_avg"][6:].any() and not state["exp_avg_sq"][6:].any()


def test_a_sparse_gradient_of_whole_entries_is_refused():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 2]]), torch.ones(2), (3, 3), check_invariants=True)  # sparse_dim 2
    with pytest.raises(RuntimeError, match="sparse_dim 1"):
        AdamW([p]).step()


def test_clip_grad_norm_is_torchs_on_dense_gradients_and_takes_sparse_ones():
    torch.manual_seed(0)
    dense = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in dense]
    for p, q in zip(dense, copies, strict=True):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(copies, 0.5)
    assert torch.equal(clip_grad_norm_(dense, 0.5), expected)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(dense, copies, strict=True))
    # a sparse gradient with a repeated row (uncoalesced, as a sparse embedding's backward leaves it)
    embedding = torch.nn.Parameter(torch.zeros(5, 3))
    embedding.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3, 1]]), torch.randn(3, 3), (5, 3), check_invariants=True)
    as_dense = embedding.grad.to_dense()
    reference = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5, 3))]
    reference[0].grad, reference[1].grad = dense[0].grad.clone(), as_dense.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, 0.1)
    total = clip_grad_norm_([dense[0], embedding], 0.1)
    torch.testing.assert_close(total, expected)
    assert embedding.grad.is_sparse and embedding.grad.is_coalesced()
    torch.testing.assert_close(embedding.grad.to_dense(), reference[1].grad)
    torch.testing.assert_close(dense[0].grad, reference[0].grad)


def test_param_groups_exclude_biases_and_layer_norm_weights_of_the_embedded_model():
    from model.bert import BertModel, default_model_path

    model = BertModel.from_pretrained(default_model_path())
    model.pooler.requires_grad_(False)  # frozen: in no group
    groups = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    for name in (
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.attention.output.dense.weight",
        "encoder.layer.5.intermediate.dense.weight",
        "encoder.layer.5.output.dense.weight",
    ):
        assert name in decay
    for name in (
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.query.bias",
        "encoder.layer.0.attention.output.LayerNorm.weight",
        "encoder.layer.0.attention.output.LayerNorm.bias",
        "encoder.layer.5.output.LayerNorm.weight",
        "encoder.layer.5.output.dense.bias",
    ):
        assert name in no_decay
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(decay + no_decay) == sorted(trainable) and not any(n.startswith("pooler") for n in trainable)
    assert all(n.endswith(".weight") and "LayerNorm" not in n for n in decay)
    assert all(n.endswith(".bias") or n.endswith("LayerNorm.weight") for n in no_decay)
    # named_parameters order within each group
    assert decay == [n for n in trainable if n in set(decay)] and no_decay == [n for n in trainable if n in set(no_decay)]


def test_layer_wise_decay_scales_each_layers_rate_below_the_heads():
    """Heads at the full rate, the top of L layers at decay, layer i at decay^(L - i), the
    embeddings at decay^(L + 1); weight decay still only on the weight matrices; the schedule's rate
    is multiplied by each group's scale."""
    from model.bert import BertConfig, BertModel
    from model.config import TrainConfig
    from model.multitask import MultitaskBert
    from model.schedules import learning_rate, set_learning_rate

    bert_config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    model = MultitaskBert(BertModel(bert_config), ["sst", "sts"])
    groups = param_groups(model, 0.01, layer_lr_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    scale_of = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert sorted(scale_of) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert scale_of["bert.encoder.layer.2.output.dense.weight"] == 0.5
    assert scale_of["bert.encoder.layer.0.attention.self.query.weight"] == 0.5**3
    assert scale_of["bert.embeddings.word_embeddings.weight"] == 0.5**4
    assert all(scale == 1.0 for name, scale in scale_of.items() if name.startswith("heads."))
    assert decay_of["bert.encoder.layer.0.attention.self.query.bias"] == 0.0
    assert decay_of["bert.embeddings.word_embeddings.weight"] == 0.01
    assert [g["lr_scale"] for g in param_groups(model, 0.01)] == [1.0, 1.0]  # no decay: the usual two groups
    # A task's own top layer sits where the shared one it copies sat.
    split = MultitaskBert(BertModel(bert_config), ["sst", "sts"], task_layers=1)
    split_names = {id(p): n for n, p in split.named_parameters()}
    split_scale = {split_names[id(p)]: g["lr_scale"] for g in param_groups(split, 0.01, 0.5) for p in g["params"]}
    assert split_scale["task_layers.sts.0.output.dense.weight"] == split_scale["task_layers.sst.0.output.dense.weight"] == 0.5
    assert split_scale["bert.encoder.layer.1.output.dense.weight"] == 0.5**2
    assert split_scale["bert.embeddings.word_embeddings.weight"] == 0.5**4

    cfg = TrainConfig(tasks=["sst"], lr=1e-3, layer_lr_decay=0.5)
    optimizer = AdamW(groups, lr=cfg.lr)
    set_learning_rate(optimizer, cfg, step=50, total_steps=100)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(learning_rate(cfg, 50, 100) * group["lr_scale"])


def test_decay_by_parameter_name():
    assert decays("heads.sst.net.1.weight") and decays("encoder.layer.0.attention.self.key.weight")
    assert not decays("heads.sts.linear.bias")
    assert not decays("decoder.layer_norm.weight") and not decays("final_norm.weight") and not decays("ln.LayerNorm.weight")
    empty = torch.nn.Linear(3, 2, bias=False)
    assert [g["weight_decay"] for g in param_groups(empty, 0.1)] == [0.1]  # no empty no-decay group


@pytest.mark.parametrize("foreach", [True, False])
def test_param_groups_match_torch_adamw_and_leave_no_decay_params_undecayed(foreach):
    def trained(optimizer_class, **kwargs) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        optimizer = optimizer_class(param_groups(model, 0.5), lr=1e-2, weight_decay=0.01, **kwargs)
        g = torch.Generator().manual_seed(1)
        for _ in range(30):
            optimizer.zero_grad(set_to_none=True)
            model(torch.randn(16, 6, generator=g)).pow(2).mean().backward()
            optimizer.step()
        return model

    ours, reference = trained(AdamW, foreach=foreach), trained(torch.optim.AdamW)
    for got, expected in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)

    # A LayerNorm weight without gradient keeps its value; a weight matrix without gradient decays.
    norm, linear = torch.nn.LayerNorm(4), torch.nn.Linear(4, 4)
    holder = torch.nn.ModuleDict({"norm": norm, "linear": linear})
    optimizer = AdamW(param_groups(holder, 0.5), lr=0.1, foreach=foreach)
    before = linear.weight.detach().clone()
    for p in holder.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.bias, torch.zeros(4))
    torch.testing.assert_close(linear.weight, before * (1 - 0.1 * 0.5))
