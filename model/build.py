"""Building a run's model: the encoder (pretrained weights, or a random one of a given size) with
fresh heads for its tasks, or the trained model of a run folder."""

from __future__ import annotations

from pathlib import Path

from model.bert import BertConfig, BertModel, load_strict
from model.config import TrainConfig
from model.multitask import MultitaskBert
from model.rundir import RunDir, RunFileError
from model.runtime import resolve_device
from model.splits import get_tokenizer, model_dir


def bert_config_for(cfg: TrainConfig) -> BertConfig:
    if cfg.model_config is not None:
        config = BertConfig(**{k: v for k, v in cfg.model_config.items() if k != "model_type"})
    else:
        config = BertConfig.from_json(model_dir(cfg) / "config.json")
    config.hidden_dropout_prob = cfg.dropout
    if cfg.max_length > config.max_position_embeddings:
        raise ValueError(
            f"max_length {cfg.max_length} exceeds the model's max_position_embeddings {config.max_position_embeddings}"
        )
    return config


def build_model(cfg: TrainConfig) -> MultitaskBert:
    """The encoder (loaded weights, or random ones of ``model_config``'s size) with fresh heads."""
    config = bert_config_for(cfg)
    if cfg.model_config is not None:
        bert = BertModel(config)
    else:
        bert = BertModel.from_pretrained(model_dir(cfg), hidden_dropout_prob=cfg.dropout)
    vocab = get_tokenizer(cfg).backend.get_vocab_size()
    if vocab > config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} tokens but the model's vocab_size is {config.vocab_size}")
    return wrap_encoder(bert, cfg, cfg.freeze_layers)


def wrap_encoder(bert: BertModel, cfg: TrainConfig, freeze_layers: int = 0) -> MultitaskBert:
    """``bert`` with fresh heads for ``cfg``'s tasks, encodings and pooling."""
    return MultitaskBert(
        bert,
        cfg.tasks,
        pair_encoding=cfg.pair_encoding,
        pooling=cfg.pooling,
        sst_head=cfg.sst_head,
        sts_head=cfg.sts_head,
        dropout=cfg.dropout,
        freeze_layers=freeze_layers,
        freeze_word_embeddings=cfg.freeze_word_embeddings,
        lazy_word_embeddings=cfg.lazy_word_embeddings,
        task_layers=cfg.task_layers,
    )


def load_trained(run: str | Path | RunDir, device: str | None = None) -> tuple[MultitaskBert, TrainConfig]:
    """The best model of a finished (or running) training, in eval mode, and its config."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    saved = run.read_config()
    try:
        cfg = TrainConfig.from_dict(saved["train"])
        bert_config = BertConfig(**{k: v for k, v in saved["bert"].items() if k != "model_type"})
    except (TypeError, ValueError) as err:
        raise RunFileError(f"{run.config_file}: not a valid training config: {err}") from err
    model = wrap_encoder(BertModel(bert_config), cfg)
    load_strict(model, run.load_weights(), str(run.weights_file))
    return model.to(resolve_device(device)).eval(), cfg
