"""Timing and statistics of scripts/benchmark_speed.py: interleaved steps, throughput and GFLOP/s per
setup, ratios with their median and spread, and the Markdown tables it prints."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Step:
    seconds: float
    examples: int
    tokens: int  # real (unpadded) tokens
    flops: float


class Setup(Protocol):
    def step(self) -> Step: ...
    def rewind(self) -> None: ...


# The setup names of ours with the trainer's word-embedding options (--beside-word-embeddings).
WORD_EMBEDDING_SETUPS = {"frozen": "ours, frozen word emb.", "lazy": "ours, lazy word emb."}

# ------------------------------------------------------------------------------------------ timing


Timed = dict[tuple[str, str], list[list[Step]]]  # per (setup, precision): per repeat, its timed steps


def clock(device: torch.device) -> float:
    """time.perf_counter() once ``device`` has finished the work queued on it: CUDA runs
    asynchronously, and a step timed without synchronize measures how fast it was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(setups: dict[tuple[str, str], Setup], steps: int, warmup: int, repeats: int) -> Timed:
    """Steps of every setup in turn; returns per setup one list of ``steps`` timed steps per repeat."""
    for setup in setups.values():
        for _ in range(warmup):
            setup.step()
    timed: Timed = {key: [] for key in setups}
    for _ in range(repeats):
        for key, setup in setups.items():
            setup.rewind()
            timed[key].append([])
        for _ in range(steps):
            for key, setup in setups.items():  # interleaved: load hits all alike
                timed[key][-1].append(setup.step())
    return timed


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise(timed: Timed, info: dict) -> dict[str, dict]:
    """Per setup: examples/s, GFLOP/s and % of the peak estimate at its precision, each per repeat
    and their median."""
    summary = {}
    for (name, precision), repeats in timed.items():
        seconds = [sum(s.seconds for s in r) for r in repeats]
        ex_per_s = [sum(s.examples for s in r) / t for r, t in zip(repeats, seconds, strict=True)]
        gflops = [sum(s.flops for s in r) / t / 1e9 for r, t in zip(repeats, seconds, strict=True)]
        first = repeats[0]
        summary[f"{name} {precision}"] = {
            "setup": name,
            "precision": precision,
            "examples_per_step": sum(s.examples for s in first) / len(first),
            "tokens_per_example": sum(s.tokens for s in first) / sum(s.examples for s in first),
            "gflop_per_step": sum(s.flops for s in first) / len(first) / 1e9,
            "examples_per_s": ex_per_s,
            "examples_per_s_median": statistics.median(ex_per_s),
            "gflops": gflops,
            "gflops_median": statistics.median(gflops),
            "peak_fraction": statistics.median(gflops) / info[f"{precision}_peak_gflops_estimate"],
        }
    return summary


def ratio(timed: dict, numerator: tuple[str, str], denominator: tuple[str, str]) -> dict:
    """time(numerator) / time(denominator): per repeat (median, min, max) and per paired step (quartiles)."""
    per_repeat = [
        sum(a.seconds for a in ra) / sum(b.seconds for b in rb)
        for ra, rb in zip(timed[numerator], timed[denominator], strict=True)
    ]
    per_step = [
        a.seconds / b.seconds
        for ra, rb in zip(timed[numerator], timed[denominator], strict=True)
        for a, b in zip(ra, rb, strict=True)
    ]
    q1, q2, q3 = quartiles(per_step)
    return {
        "per_repeat": per_repeat,
        "median": statistics.median(per_repeat),
        "min": min(per_repeat),
        "max": max(per_repeat),
        "per_step_median": q2,
        "per_step_iqr": [q1, q3],
    }


def case_ratios(case: str, timed: dict, precisions: list[str]) -> list[dict]:
    rows = []
    for precision in precisions:
        if case == "multitask":
            label = "PCGrad step time / plain step time (cost; target <= 1.3)"
            rows.append({"precision": precision, "ratio": label, **ratio(timed, ("pcgrad", precision), ("none", precision))})
        else:
            label = "ours' speed / transformers' speed (> 1: ours faster)"
            rows.append(
                {"precision": precision, "ratio": label, **ratio(timed, ("transformers", precision), ("ours", precision))}
            )
        for option, setup in WORD_EMBEDDING_SETUPS.items():
            if (setup, precision) in timed:
                label = f"ours with {option} word embeddings / ours (speed-up)"
                rows.append({"precision": precision, "ratio": label, **ratio(timed, ("ours", precision), (setup, precision))})
    if case != "multitask" and "fp32" in precisions and "bf16" in precisions:
        label = "ours bf16 speed / transformers fp32 speed"
        rows.append({"precision": "bf16 vs fp32", "ratio": label, **ratio(timed, ("transformers", "fp32"), ("ours", "bf16"))})
    return rows


CASE_TITLES = {"sst": "SST sentences", "sts": "STS cross-encoded pairs", "multitask": "multitask step SST + Quora + STS"}


def tables(results: list[dict]) -> str:
    lines = [
        "| case | setup | precision | tokens/example | ex/s median [min-max] | GFLOP/s | % of peak (its precision) |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for s in result["setups"].values():
            ex = s["examples_per_s"]
            lines.append(
                f"| {CASE_TITLES[result['case']]} | {s['setup']} | {s['precision']} | {s['tokens_per_example']:.1f} | "
                f"{s['examples_per_s_median']:.1f} [{min(ex):.1f}-{max(ex):.1f}] | {s['gflops_median']:.1f} | "
                f"{100 * s['peak_fraction']:.0f}% |"
            )
    lines += [
        "",
        "| case | precision | ratio | median over repeats | min-max | per-step median [IQR] |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for r in result["ratios"]:
            q1, q3 = r["per_step_iqr"]
            lines.append(
                f"| {CASE_TITLES[result['case']]} | {r['precision']} | {r['ratio']} | **{r['median']:.2f}** | "
                f"{r['min']:.2f}-{r['max']:.2f} | {r['per_step_median']:.2f} [{q1:.2f}-{q3:.2f}] |"
            )
    lines += [
        "",
        "GFLOP/s: model FLOPs 6*N*R + 12*L*B*T^2*d per step (see the script's docstring): "
        "the weight matrices on the R real tokens, attention on the padded batch.",
    ]
    return "\n".join(lines)
