"""model/runtime.py: what the trainer decides about the machine it runs on."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import model.runtime
from model.runtime import release_free_memory, resolve_device, use_bf16


def resident_mib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_memory_freed_in_another_thread_goes_back_to_the_system():
    """What a Ray actor sees after a trial: the trial's thread freed its tensors, but glibc kept the
    memory in that thread's arena until release_free_memory."""

    def trial() -> None:
        first = torch.ones(8 * 2**20)  # 32 MB, freed: glibc then serves blocks below 32 MB from its heap
        del first
        tensors = [torch.ones(n) for n in range(100_000, 100_000 + 800 * 50, 50)]  # about 400 MB
        del tensors

    before = resident_mib()
    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    held = resident_mib()
    release_free_memory()
    after = resident_mib()
    assert held - before > 200, (before, held)  # the premise: freed but still resident
    assert after - before < 50, (before, held, after)


def emulating_gpu(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int]) -> None:
    """torch.cuda as on a GPU of that compute capability: bf16 native from 8.0, emulated before."""
    native = capability >= (8, 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_auto_precision_uses_bf16_only_on_gpus_with_bf16_tensor_cores(monkeypatch, capsys):
    cuda = torch.device("cuda")
    model.runtime._say_once.cache_clear()
    emulating_gpu(monkeypatch, "Tesla V100 (test)", (7, 0))
    assert not use_bf16("auto", cuda) and not use_bf16("auto", cuda)
    said = capsys.readouterr().err.splitlines()
    assert said == ["note: Tesla V100 (test) (compute capability 7.0) has no native bf16; precision auto uses fp32"]  # once
    assert use_bf16("bf16", cuda)  # asked for: as asked
    emulating_gpu(monkeypatch, "H200 (test)", (9, 0))
    assert use_bf16("auto", cuda) and not use_bf16("fp32", cuda)
    assert capsys.readouterr().err == ""


def test_cuda_asked_for_but_unusable_names_the_cause(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match=r"'cuda' requested but CUDA is not available: torch \S+ in \S+ is built without CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ValueError, match=r"built for CUDA 12.8 but finds no usable GPU \(CUDA_VISIBLE_DEVICES='3'\).*driver"):
        resolve_device("cuda:0")
    assert resolve_device(None) == torch.device("cpu")  # nothing asked for: the CPU


def test_release_free_memory_empties_the_cuda_cache_once_cuda_is_in_use(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    release_free_memory()
    assert emptied == []  # a CPU run does not start CUDA to empty it
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    release_free_memory()
    assert emptied == [True]
