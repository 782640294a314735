"""minBERT: exactness against Hugging Face transformers, fused vs plain attention, strict and safe
loading, config errors."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from model.bert import BertConfig, BertModel, Dropout, Packing, default_model_path, load_bert_state_dict

TINY = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def tiny_model(seed: int = 0, **overrides) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(dataclasses.replace(TINY, **overrides)).eval()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four rows of width 9; rows 1-3 padded; rows 2-3 are pairs (segment ids 1 after the middle)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY.vocab_size, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, width in ((1, 5), (2, 7), (3, 3)):
        mask[row, width:] = 0
        ids[row, width:] = 0
    types = torch.zeros_like(ids)
    types[2, 4:7] = 1
    types[3, 2:3] = 1
    return ids, mask, types


def save_checkpoint(model: BertModel, directory, state: dict | None = None, torch_bin: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    state = {k: v.contiguous() for k, v in (state if state is not None else model.state_dict()).items()}
    if torch_bin:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, str(directory / "model.safetensors"))


def test_matches_transformers_on_the_embedded_model():
    """The one test that runs the real embedded weights: a padded batch of sentences and pairs."""
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    tokenizer = transformers.BertTokenizerFast.from_pretrained(path)
    reference = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    ours = BertModel.from_pretrained(path).eval()
    first = ["A gorgeous, witty, seductive movie.", "The plot is nothing but boilerplate clichés from start to finish,", "Why?"]
    second = ["How do I learn Python quickly?", "What is the fastest way to learn Python?", "A man is playing a guitar."]
    for encoded in (
        tokenizer(first, padding=True, return_tensors="pt"),
        tokenizer(first, second, padding=True, return_tensors="pt"),
    ):
        assert (encoded["attention_mask"] == 0).any(), "the batch must contain padding"
        with torch.no_grad():
            expected = reference(**encoded)
            got = ours(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"])
        real = encoded["attention_mask"].bool()
        hidden_diff = (got["last_hidden_state"][real] - expected.last_hidden_state[real]).abs().max().item()
        pooler_diff = (got["pooler_output"] - expected.pooler_output).abs().max().item()
        assert hidden_diff <= 1e-4 and pooler_diff <= 1e-4, (hidden_diff, pooler_diff)
        # The encoder skips padding (model.bert.Packing): it comes back as zeros, not as transformers' values.
        assert got["last_hidden_state"][~real].abs().max().item() == 0.0


def test_fused_and_plain_attention_agree():
    model = tiny_model()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        fused = model(ids, mask, types)
        model.set_fused_attention(False)
        plain = model(ids, mask, types)
    for key in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(fused[key], plain[key], atol=1e-5, rtol=1e-5)


def test_cpu_training_with_dropout_takes_the_plain_attention_path():
    """torch's CPU attention kernels take no dropout (its fallback draws a mask of doubles): training
    on CPU uses the plain path and our Dropout, so the same seed gives the same output either way."""
    model = tiny_model().train()
    ids, mask, types = padded_batch()
    torch.manual_seed(0)
    default = model(ids, mask, types)["last_hidden_state"]
    model.set_fused_attention(False)
    torch.manual_seed(0)
    plain = model(ids, mask, types)["last_hidden_state"]
    assert torch.equal(default, plain)


def test_padding_does_not_change_real_tokens():
    model = tiny_model()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        padded = model(ids[1:2], mask[1:2], types[1:2])["last_hidden_state"][0, :5]
        alone = model(ids[1:2, :5], mask[1:2, :5], types[1:2, :5])["last_hidden_state"][0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_a_padded_batch_trains_as_its_rows_alone():
    """The encoder packs the real tokens (model.bert.Packing): the gradients of a padded batch are those
    of its rows run one by one without padding, so skipping the padding changes nothing learnt."""
    ids, mask, types = padded_batch()
    weights = torch.randn(ids.shape[1], TINY.hidden_size, generator=torch.Generator().manual_seed(1))

    def gradients(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        model = tiny_model()
        for row_ids, row_mask, row_types in rows:
            out = model(row_ids, row_mask, row_types)
            real = row_mask[..., None].to(out["last_hidden_state"].dtype)
            width = row_ids.shape[1]
            ((out["last_hidden_state"] * real * weights[:width]).sum() + out["pooler_output"].sum()).backward()
        return {name: param.grad for name, param in model.named_parameters() if param.grad is not None}

    batched = gradients([(ids, mask, types)])
    widths = mask.sum(1).tolist()
    alone = gradients([(ids[r : r + 1, :w], mask[r : r + 1, :w], types[r : r + 1, :w]) for r, w in enumerate(widths)])
    assert batched.keys() == alone.keys() and "encoder.layer.0.attention.self.query.weight" in batched
    for name in batched:
        torch.testing.assert_close(batched[name], alone[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packing_keeps_the_padded_layout_off_the_cpu():
    """Finding the real tokens reads the mask: on a CPU that is free, on a GPU a wait for the device at
    every forward, so there the encoder keeps the padded layout (here a mask on the meta device)."""
    _, mask, _ = padded_batch()
    hidden = torch.randn(*mask.shape, 8)
    on_cpu = Packing(mask)
    assert on_cpu.pack(hidden).shape == (int(mask.sum()), 8)
    assert torch.equal(on_cpu.unpack(on_cpu.pack(hidden)), hidden * mask[..., None])
    elsewhere = Packing(mask.to("meta"))
    on_meta = hidden.to("meta")
    assert elsewhere.pack(on_meta) is on_meta and elsewhere.unpack(on_meta) is on_meta


def test_dropout_only_in_training_mode():
    model = tiny_model()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        first, second = model(ids, mask, types), model(ids, mask, types)
        torch.testing.assert_close(first["last_hidden_state"], second["last_hidden_state"])
        model.train()
        noisy = model(ids, mask, types)
    assert not torch.allclose(first["last_hidden_state"], noisy["last_hidden_state"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_mask_keeps_1_minus_p_and_scales_like_torch(dtype):
    dropout = Dropout(0.3).train()
    x = torch.rand(1000, 1000, dtype=dtype) + 0.5  # no zeros: a zero in the output means dropped
    torch.manual_seed(0)
    out = dropout(x)
    kept = out != 0
    # 1e6 Bernoulli(0.7) draws: standard deviation of the kept fraction 4.6e-4
    assert abs(kept.double().mean().item() - 0.7) < 5 * 4.6e-4
    assert out.dtype == dtype
    assert torch.equal(out[kept], (x * (1 / 0.7))[kept])  # the scaling of torch's dropout, rounding included
    assert kept[:, :500].double().mean().item() == pytest.approx(kept[:, 500:].double().mean().item(), abs=3e-3)
    # Each of the four 16-bit lanes of a 64-bit draw is uniform (none has its sign bit stuck): 2.5e5
    # draws per lane, standard deviation 9.2e-4.
    for lane_kept in kept.reshape(-1, 4).double().mean(0).tolist():
        assert abs(lane_kept - 0.7) < 5 * 9.2e-4
    torch.manual_seed(0)
    assert torch.equal(dropout(x), out), "the mask follows torch's seed"
    assert torch.equal(dropout.eval()(x), x)


def test_dropout_gradient_is_the_mask_times_the_scale():
    dropout = Dropout(0.5).train()
    x = torch.rand(64, 64, requires_grad=True)
    out = dropout(x + 0.5)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() * 2.0)


def test_from_pretrained_round_trips_safetensors(tmp_path):
    model = tiny_model(seed=3)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = BertModel.from_pretrained(tmp_path / "ckpt").eval()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, types)["pooler_output"], model(ids, mask, types)["pooler_output"])
    assert loaded.config == model.config


def test_config_overrides_apply_and_unknown_ones_fail(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ckpt")
    loaded = BertModel.from_pretrained(tmp_path / "ckpt", hidden_dropout_prob=0.25)
    assert loaded.config.hidden_dropout_prob == 0.25 and loaded.embeddings.dropout.p == 0.25
    with pytest.raises(KeyError, match="hidden_dropout"):
        BertModel.from_pretrained(tmp_path / "ckpt", hidden_dropout=0.2)


def test_checkpoint_names_of_task_models_and_old_layernorms_load(tmp_path):
    """``bert.``-prefixed keys, TF-style gamma/beta LayerNorm names and pre-training heads."""
    model = tiny_model(seed=4)
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[f"bert.{key}"] = value
    state["cls.predictions.bias"] = torch.zeros(TINY.vocab_size)
    state["bert.embeddings.position_ids"] = torch.arange(TINY.max_position_embeddings)[None]
    save_checkpoint(model, tmp_path / "ckpt", state)
    assert set(load_bert_state_dict(tmp_path / "ckpt")) == set(model.state_dict())
    loaded = BertModel.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.encoder.layer[1].output.LayerNorm.weight, model.encoder.layer[1].output.LayerNorm.weight)


def test_strict_loading_lists_missing_and_unexpected_keys(tmp_path):
    model = tiny_model()
    state = dict(model.state_dict())
    del state["encoder.layer.1.attention.self.query.weight"]
    state["encoder.layer.2.attention.self.query.weight"] = torch.zeros(32, 32)
    save_checkpoint(model, tmp_path / "ckpt", state)
    with pytest.raises(KeyError) as err:
        BertModel.from_pretrained(tmp_path / "ckpt")
    message = str(err.value)
    assert str(tmp_path / "ckpt") in message
    assert "missing keys ['encoder.layer.1.attention.self.query.weight']" in message
    assert "unexpected keys ['encoder.layer.2.attention.self.query.weight']" in message


def test_pytorch_model_bin_loads_with_weights_only(tmp_path):
    model = tiny_model(seed=5)
    save_checkpoint(model, tmp_path / "ckpt", torch_bin=True)
    loaded = BertModel.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)

    class Payload:  # an arbitrary pickled object is what weights_only refuses to run
        def __reduce__(self):
            return (print, ("pickle code ran",))

    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        BertModel.from_pretrained(tmp_path / "ckpt")


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "roberta"}, "only 'bert' is supported"),
        ({"position_embedding_type": "relative_key"}, "only absolute position embeddings"),
        ({"hidden_act": "swish"}, "hidden_act 'swish'"),
        ({"hidden_size": 30}, "multiple of num_attention_heads"),
    ],
)
def test_config_errors_name_the_file(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY.to_dict() | change))
    with pytest.raises(ValueError, match=message) as err:
        BertConfig.from_json(path)
    assert str(path) in str(err.value)


def test_unreadable_config_is_reported(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the BERT config"):
        BertConfig.from_json(path)


def test_config_ignores_unknown_fields_and_round_trips(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY.to_dict() | {"architectures": ["BertModel"], "use_cache": True}))
    assert BertConfig.from_json(path) == TINY


def test_under_bf16_autocast_the_residual_stream_is_bf16_and_the_output_fp32():
    """LayerNorm returns autocast's dtype (the stream between the norms stays bf16, no Linear casts
    its input again), close to the fp32 norm; the encoder's output is fp32 again for the heads."""
    model = tiny_model()
    norm = model.encoder.layer[0].output.LayerNorm
    x = torch.randn(4, 9, TINY.hidden_size) * 3 + 1
    seen = []
    handle = norm.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    ids, mask, types = padded_batch()
    with torch.no_grad():
        reference = model(ids, mask, types)["last_hidden_state"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            normed = norm(x)
            out = model(ids, mask, types)
    handle.remove()
    assert normed.dtype == torch.bfloat16 and seen[-1] == torch.bfloat16
    torch.testing.assert_close(normed.float(), norm(x), atol=0.02, rtol=0.01)  # bf16 keeps 8 bits: 2^-8 relative
    assert out["last_hidden_state"].dtype == torch.float32
    torch.testing.assert_close(out["last_hidden_state"], reference, atol=0.05, rtol=0.02)
    assert norm(x).dtype == torch.float32  # outside autocast: nn.LayerNorm
