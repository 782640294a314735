"""What the machine is, for benchmarks: CPU model, the instruction sets that matter for training,
torch's threads, the precision the trainer picks here and why, and fp32 and bf16 peak estimates.

Peak: an estimate, cores * clock * fp32 FLOPs per cycle per core, from the ISA: 2 FMA units of 16
fp32 lanes (AVX-512 on Intel, Zen 5) = 64; of 8 lanes (AVX2 + FMA, and AVX-512 on Zen 4, which runs
512-bit operations on 256-bit units) = 32; AVX without FMA 16; else 8. Cores = threads / threads per
core. The clock is cpufreq's maximum, else the model name's nominal clock, else /proc/cpuinfo's
"cpu MHz" (in a VM usually the nominal clock; turbo can be higher). --ghz and --flops-per-cycle
override them. bf16: AMX 1024 FLOP/cycle per core; AVX512_BF16 twice the fp32 rate (VDPBF16PS
multiplies two bf16 pairs per fp32 lane); otherwise the fp32 rate at best (emulated). Real matrix
products reach a fraction of these; they are ceilings, not targets.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from model.runtime import cpu_has_bf16_matmul

ISA_FLAGS = {"AVX2": "avx2", "FMA": "fma", "AVX-512": "avx512f", "AVX512_BF16": "avx512_bf16", "AMX-BF16": "amx_bf16"}


def _key_values(lines: list[str]) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def read_cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo, merged with lscpu's summary (empty elsewhere)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info |= _key_values(subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines())
    with contextlib.suppress(OSError):
        info |= _key_values(Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines())
    return info


def clock_ghz(info: dict[str, str]) -> tuple[float, str]:
    with contextlib.suppress(OSError, ValueError):
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        return int(khz) / 1e6, "cpufreq maximum"
    nominal = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    if nominal:
        return float(nominal.group(1)), "nominal, from the model name"
    for key, source in (("CPU max MHz", "lscpu's CPU max MHz"), ("cpu MHz", "/proc/cpuinfo's cpu MHz (turbo may be higher)")):
        with contextlib.suppress(KeyError, ValueError):
            return float(info[key]) / 1000, source
    return 2.0, "unknown: assumed"


def fp32_flops_per_cycle(isa: dict[str, bool], vendor: str, family: int) -> tuple[int, str]:
    if isa["AVX-512"]:
        if vendor == "AuthenticAMD" and family < 26:
            return 32, "AVX-512 on Zen 4: 2 FMA units x 8 fp32 lanes (512-bit ops run on 256-bit units) x 2"
        return 64, "AVX-512: 2 FMA units x 16 fp32 lanes x 2 (32 on parts with one AVX-512 FMA unit)"
    if isa["AVX2"] and isa["FMA"]:
        return 32, "AVX2 + FMA: 2 FMA units x 8 fp32 lanes x 2"
    return 8, "no AVX2/FMA found (or not an x86 CPU): assumed 8"


def bf16_flops_per_cycle(isa: dict[str, bool], fp32_per_cycle: int) -> tuple[int, str]:
    if isa["AMX-BF16"]:
        return 1024, "AMX: one tile multiply unit, 1024 bf16 FLOP/cycle"
    if isa["AVX512_BF16"]:
        return 2 * fp32_per_cycle, "AVX512_BF16: VDPBF16PS does two bf16 products per fp32 lane, twice fp32"
    return fp32_per_cycle, "no bf16 instructions: emulated, at best the fp32 rate"


def machine(threads: int, ghz: float | None, flops_per_cycle: int | None) -> dict:
    info = read_cpuinfo()
    flags = set((info.get("flags") or info.get("Flags") or "").split())
    isa = {name: flag in flags for name, flag in ISA_FLAGS.items()}
    for name, probe in (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)  # torch's own probe, where /proc/cpuinfo is missing
        isa[name] = isa[name] or bool(check and check())
    vendor = info.get("vendor_id") or info.get("Vendor ID") or ""
    family = int(info.get("cpu family") or info.get("CPU family") or 0)
    threads_per_core = int(info.get("Thread(s) per core") or 1)
    cores = max(1, math.ceil(threads / threads_per_core))
    clock, clock_source = (ghz, "--ghz") if ghz else clock_ghz(info)
    per_cycle, per_cycle_source = (
        (flops_per_cycle, "--flops-per-cycle") if flops_per_cycle else fp32_flops_per_cycle(isa, vendor, family)
    )
    bf16_per_cycle, bf16_source = bf16_flops_per_cycle(isa, per_cycle)
    return {
        "cpu": info.get("model name") or info.get("Model name") or platform.processor() or "unknown",
        "vendor": vendor,
        "family": family,
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads_per_core": threads_per_core,
        "isa": isa,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cores_used": cores,
        "clock_ghz": clock,
        "clock_source": clock_source,
        "fp32_flops_per_cycle": per_cycle,
        "fp32_flops_per_cycle_source": per_cycle_source,
        "fp32_peak_gflops_estimate": cores * clock * per_cycle,
        "bf16_flops_per_cycle": bf16_per_cycle,
        "bf16_flops_per_cycle_source": bf16_source,
        "bf16_peak_gflops_estimate": cores * clock * bf16_per_cycle,
    }


def default_precisions(isa: dict[str, bool]) -> tuple[list[str], str]:
    """The precisions worth timing here, and why (the trainer's ``--precision auto`` rule)."""
    if cpu_has_bf16_matmul():
        units = "AMX tiles" if isa["AMX-BF16"] else "AVX512_BF16 dot products"
        return ["fp32", "bf16"], (
            f"the trainer's --precision auto uses bf16 autocast: this CPU multiplies bf16 matrices in hardware ({units}); "
            "fp32 is timed too, for the comparison at equal precision"
        )
    return ["fp32"], (
        "the trainer's --precision auto uses fp32: no AMX or AVX512_BF16, so bf16 would be emulated (much slower); "
        "it is timed only with --precisions fp32 bf16"
    )


def describe(info: dict) -> list[str]:
    """``machine()``'s answer as lines of text."""
    isa = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in info["isa"].items())
    return [
        f"CPU: {info['cpu']} ({info['cpus_available']} CPUs available, {info['threads_per_core']} thread(s) per core)",
        f"ISA: {isa}; torch {info['torch']} dispatches {info['torch_cpu_capability']} kernels",
        f"torch threads: {info['torch_threads']}",
        f"fp32 peak estimate: {info['fp32_peak_gflops_estimate']:.0f} GFLOP/s = {info['cores_used']} core(s) x "
        f"{info['clock_ghz']:.2f} GHz ({info['clock_source']}) x {info['fp32_flops_per_cycle']} FLOP/cycle "
        f"({info['fp32_flops_per_cycle_source']}); an estimate, not a measurement",
        f"bf16 peak estimate: {info['bf16_peak_gflops_estimate']:.0f} GFLOP/s ({info['bf16_flops_per_cycle_source']})",
    ]
