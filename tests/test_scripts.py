"""The benchmark scripts' arithmetic: the FLOP formula against torch's FLOP counter, the peak
estimate's rules, the machine description, and the budget curve's table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import needs_data, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from model.bert import BertConfig, BertModel
from model.config import TrainConfig
from model.optimizer import AdamW, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/ is not an installed package

from scripts.benchmark_speed import TrainerStep, apply_levers, train_flops  # noqa: E402
from scripts.budget_curve import main as budget_curve  # noqa: E402
from scripts.machine import bf16_flops_per_cycle, default_precisions, describe, fp32_flops_per_cycle, machine  # noqa: E402
from scripts.speed_timing import WORD_EMBEDDING_SETUPS, Step, case_ratios, ratio  # noqa: E402


@pytest.mark.parametrize("batches", [[[16, 16, 16]], [[9, 9], [5, 5, 5, 5]], [[16, 9, 3], [5, 1, 4, 2]]])
def test_train_flops_equal_torchs_count_of_a_forward_and_backward(batches):
    """Batches given by their rows' lengths: the weight matrices' work is on the real tokens only,
    attention's on the padded batch."""
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    model = BertModel(config).train()
    shapes = [(len(lengths), max(lengths), sum(lengths)) for lengths in batches]
    with FlopCounterMode(display=False) as counter:
        for lengths in batches:
            ids = torch.randint(0, 100, (len(lengths), max(lengths)))
            mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
            model(ids, mask, torch.zeros_like(ids))["last_hidden_state"].sum().backward()
    pooler = sum(2 * b * config.hidden_size**2 for b, _, _ in shapes)  # forward only, its output unused
    assert counter.get_total_flops() - pooler == train_flops(config, shapes)


def test_fp32_flops_per_cycle_follow_the_isa():
    isa = {"AVX2": True, "FMA": True, "AVX-512": False, "AVX512_BF16": False, "AMX-BF16": False}
    assert fp32_flops_per_cycle(isa, "AuthenticAMD", 23)[0] == 32
    assert fp32_flops_per_cycle(isa | {"AVX-512": True}, "GenuineIntel", 6)[0] == 64
    assert fp32_flops_per_cycle(isa | {"AVX-512": True}, "AuthenticAMD", 25)[0] == 32  # Zen 4
    assert fp32_flops_per_cycle(isa | {"AVX-512": True}, "AuthenticAMD", 26)[0] == 64  # Zen 5
    assert fp32_flops_per_cycle(isa | {"AVX2": False, "FMA": False}, "", 0)[0] == 8
    assert bf16_flops_per_cycle(isa, 32)[0] == 32
    assert bf16_flops_per_cycle(isa | {"AVX512_BF16": True}, 32)[0] == 64
    assert bf16_flops_per_cycle(isa | {"AVX512_BF16": True, "AMX-BF16": True}, 64)[0] == 1024


def test_machine_description_and_precision_reason():
    info = machine(threads=2, ghz=3.0, flops_per_cycle=32)
    assert info["fp32_peak_gflops_estimate"] == pytest.approx(info["cores_used"] * 3.0 * 32)
    assert set(info["isa"]) == {"AVX2", "FMA", "AVX-512", "AVX512_BF16", "AMX-BF16"}
    lines = describe(info)
    assert lines[0].startswith("CPU: ") and "estimate" in lines[-1]
    precisions, reason = default_precisions(info["isa"])
    assert precisions[0] == "fp32" and ("bf16" in precisions) == (info["isa"]["AMX-BF16"] or info["isa"]["AVX512_BF16"])
    assert "--precision auto uses" in reason


def test_ratio_of_paired_steps():
    def steps(*seconds: float) -> list[Step]:
        return [Step(s, 32, 100, 1e9) for s in seconds]

    timed = {("a", "fp32"): [steps(2, 2), steps(4, 4)], ("b", "fp32"): [steps(1, 1), steps(1, 3)]}
    r = ratio(timed, ("a", "fp32"), ("b", "fp32"))
    assert r["per_repeat"] == [2.0, 2.0] and (r["median"], r["min"], r["max"]) == (2.0, 2.0, 2.0)
    # per step: 2, 2, 4, 4/3
    assert r["per_step_median"] == pytest.approx(2.0) and r["per_step_iqr"] == pytest.approx([11 / 6, 2.5])


def test_case_ratios_name_each_comparison():
    def repeat(seconds: float) -> list[list[Step]]:
        return [[Step(seconds, 32, 100, 1e9)]]

    frozen, lazy = (WORD_EMBEDDING_SETUPS[option] for option in ("frozen", "lazy"))
    timed = {("ours", "fp32"): repeat(1.0), ("transformers", "fp32"): repeat(1.5), (frozen, "fp32"): repeat(0.8)}
    timed[(lazy, "fp32")] = repeat(0.9)
    rows = {row["ratio"]: row["median"] for row in case_ratios("sst", timed, ["fp32"])}
    assert rows == {
        "ours' speed / transformers' speed (> 1: ours faster)": pytest.approx(1.5),
        "ours with frozen word embeddings / ours (speed-up)": pytest.approx(1.25),
        "ours with lazy word embeddings / ours (speed-up)": pytest.approx(1 / 0.9),
    }
    del timed[(frozen, "fp32")], timed[(lazy, "fp32")]
    assert len(case_ratios("sst", timed, ["fp32"])) == 1


def test_freezing_the_word_embeddings_leaves_them_out_of_the_update():
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = BertModel(config).train()
    apply_levers(model, argparse.Namespace(freeze_word_embeddings=True, compile=False), ours=True)
    words = model.embeddings.word_embeddings.weight
    before = words.detach().clone()
    optimizer = AdamW(param_groups(model, 0.1), lr=0.1)
    ids = torch.randint(0, 100, (2, 5))
    model(ids, torch.ones_like(ids), torch.zeros_like(ids))["last_hidden_state"].sum().backward()
    optimizer.step()
    assert words.grad is None and torch.equal(words, before)
    assert model.embeddings.position_embeddings.weight.grad is not None


def test_the_multitask_step_is_timed_after_the_gpu_finished_it(monkeypatch):
    """CUDA queues work and returns: the clock is read after torch.cuda.synchronize, before and after."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("synchronize"))
    setup = TrainerStep.__new__(TrainerStep)  # its trainer stood in for: one on a GPU
    setup.trainer = argparse.Namespace(
        device=torch.device("cuda"), cfg=argparse.Namespace(tasks=["sts"]), _train_step=lambda tasks: events.append("step")
    )
    setup.recorders, setup.config = {}, BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    setup.step()
    assert events == ["synchronize", "step", "synchronize"]


@needs_data
def test_a_bi_encoded_trainer_step_counts_the_flops_its_encoder_runs(tmp_path):
    """The two views of a bi-encoded batch run as one stacked batch: the step's count is torch's
    (less the pooler's forward, which the formula leaves out)."""
    cfg = TrainConfig.from_dict(tiny_config(tasks=["sts"], pair_encoding="bi", sts_head="cosine", train_limit=32))
    args = argparse.Namespace(freeze_word_embeddings=False, compile=False)
    setup = TrainerStep(cfg, tmp_path / "run", args)
    with FlopCounterMode(display=False) as counter:
        step = setup.step()
    rows = step.examples * 2  # both sentences of each pair
    pooler = 2 * rows * setup.config.hidden_size**2
    assert counter.get_total_flops() - pooler == step.flops


def build_summary(path: Path, base: float, caruana: float, gain: float) -> Path:
    rows = [
        {"task": "sts", "name": "baseline (usual recipe)", "kind": "baseline", "estimate": {"mean": base, "sd": 0.01}},
        {"task": "sts", "name": "caruana", "kind": "selected", "training": {"trial_epochs": 7, "train_seconds": 60.0}}
        | {"estimate": {"mean": caruana, "sd": 0.01, "gain_mean": gain, "gain_sd": 0.002}},
        {"task": "sst", "name": "caruana", "kind": "selected", "estimate": {"mean": 0.5, "sd": 0.01, "gain_mean": 0.9}},
    ]
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_budget_curve_tabulates_each_runs_gain_and_names_a_bad_summary(tmp_path, capsys):
    short, long = build_summary(tmp_path / "a.json", 0.88, 0.883, 0.003), build_summary(tmp_path / "b.json", 0.88, 0.889, 0.009)
    png = tmp_path / "curve.png"
    assert budget_curve(["--task", "sts", "--point", f"10m=12:{short}", "--point", f"40m=25.5:{long}", "--output", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| 10m | 12.0 | 7 | 0.8800 ± 0.0100 | 0.8830, +0.0030 ± 0.0020 | n/a |"
    assert lines[3].startswith("| 40m | 25.5 | 7 | 0.8800 ± 0.0100 | 0.8890, +0.0090 ± 0.0020 |")
    assert png.stat().st_size > 0
    assert budget_curve(["--task", "para", "--point", f"10m=12:{short}"]) == 1  # no para baseline there
    assert "a.json: no baseline row for para" in capsys.readouterr().err
    assert budget_curve(["--task", "sts", "--point", f"10m:{short}"]) == 1
    assert "expected LABEL=MINUTES:SUMMARY_JSON" in capsys.readouterr().err
