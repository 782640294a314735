"""model/runtime.py: what the trainer decides about the machine it runs on."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from model.runtime import release_free_memory, resolve_device


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

