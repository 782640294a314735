"""A tiny randomly initialised BERT config and a few-row training config, for fast tests.

The tokenizer is the embedded default model's (real vocab); the encoder is 2 layers of width 32.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model.runtime import resolve_device

# Tiny models run fastest on one thread; two threads on a busy 2-core machine mostly spin.
torch.set_num_threads(1)
# Where the trainer runs in these tests (they set no device): a GPU where there is one. Two runs of
# one seed, or a run and its resume, agree bit for bit on the CPU only: CUDA kernels (atomic adds
# in the embedding's backward, ...) vary from run to run unless torch.use_deterministic_algorithms.
DEVICE = resolve_device(None)

DATA_DIR = Path(os.environ.get("MINBERT_DATA", Path(__file__).resolve().parent.parent / "datasets"))
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "sts-train.csv").is_file(), reason=f"CS224N data not found in {DATA_DIR} (set MINBERT_DATA)"
)


def tiny_config(**overrides) -> dict:
    """A TrainConfig dict that trains in about a second on one thread."""
    config = {
        "tasks": ["sst", "para", "sts"],
        "model_config": dict(TINY_BERT),
        "data_dir": str(DATA_DIR),
        "train_limit": 48,
        "eval_limit": 24,
        "batch_size": 16,
        "epochs": 1,
        "lr": 1e-3,
        "threads": 1,
    }
    return config | overrides
