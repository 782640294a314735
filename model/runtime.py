"""Where and how a run computes: the device, and bf16 autocast where it pays."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import sys
from collections.abc import Callable

import torch


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available: {why_no_cuda()}")
    return device


def why_no_cuda() -> str:
    """Why torch.cuda.is_available() is False, in one line: a CPU-only torch and an unusable GPU
    or driver look alike from outside, and a trial that Ray gave a GPU must say which."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} in {sys.executable} is built without CUDA (a CPU-only wheel); install a CUDA build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but finds no usable GPU "
        f"(CUDA_VISIBLE_DEVICES={visible!r}); is the NVIDIA driver installed and loaded (nvidia-smi)?"
    )


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """The random state of the GPU in use, for last.pt; None on the CPU (torch.get_rng_state has it).
    Not get_rng_state_all: its one state per visible GPU cannot be restored where fewer are visible
    (a last.pt written with 8 GPUs visible, resumed by a Ray trial that sees one)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_device_rng_state(device: torch.device, state: torch.Tensor | list | None) -> None:
    """Restore ``device_rng_state``'s state on ``device``. A state saved on a CPU (None; [] in a
    last.pt from before this function) leaves the GPU's as seeded; a GPU's state on a CPU is unused."""
    if device.type == "cuda" and isinstance(state, torch.Tensor):
        torch.cuda.set_rng_state(state.cpu(), device)


# torch's CPU feature probes (private, but the only way to ask; absent probes count as "no").
BF16_MATMUL_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: Intel AMX tiles, or AVX512_BF16 dot
    products (AMD Zen 4 and later, Intel Cooper Lake and later). Measured on an AMD EPYC with
    AVX512_BF16: a BERT training step 1.7x faster under bf16 autocast than in fp32 (README). Without
    either, bf16 is emulated and slower than fp32."""
    probes = (getattr(torch.cpu, name, None) for name in BF16_MATMUL_PROBES)
    return any(bool(probe and probe()) for probe in probes)


def cuda_has_bf16_matmul() -> bool:
    """Whether the GPU in use (torch's current device) has bf16 tensor cores (Ampere, compute
    capability 8.0, and later). Earlier GPUs emulate bf16, slower than fp32: say so once, and use fp32."""
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True
    name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    _say_once(f"note: {name} (compute capability {major}.{minor}) has no native bf16; precision auto uses fp32")
    return False


@functools.cache
def _say_once(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        if device.type == "cuda":
            return cuda_has_bf16_matmul()
        return device.type == "cpu" and cpu_has_bf16_matmul()
    return precision == "bf16"


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights, optimizer state and losses stay fp32), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once (find_library runs a subprocess); None off glibc."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return getattr(libc, "malloc_trim", None)


def release_free_memory() -> None:
    """Give the memory that the allocators hold but nothing uses back to the system (glibc) and to
    the GPU's other processes (torch's CUDA caching allocator).

    glibc keeps freed heap memory in per-thread arenas: a Ray actor reused for trial after trial,
    each in a new thread, grew to 7.2 GiB during one study although a trial needs about 2 GiB
    (README, "Memory"; trials now get a process each). ``malloc_trim`` returns it; it costs
    milliseconds, so it runs once an epoch. On a GPU shared by several trials (a fractional gpus_per_trial), the
    blocks one trial's allocator caches are memory the others cannot have until ``empty_cache``."""
    gc.collect()  # cycles that still hold tensors
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
