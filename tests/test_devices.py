"""The CUDA paths, checked on a machine without a GPU.

No GPU has run this project yet (README). Two stand-ins catch on a CPU the device bugs that a
first GPU run would hit:

- **The default device set to 'meta'** (``with torch.device("meta")``) while the code runs on real
  CPU tensors: a tensor created without saying where lands on 'meta', and meeting the run's CPU
  tensors raises, as a CPU tensor meeting CUDA ones does on a GPU. Covered: gradient surgery, the
  trainer's step (no surgery, PCGrad, GradVac; SMART and MNRL on) and the dev evaluation
  (cross- and bi-encoded). Not caught: a CPU tensor indexed by an index on the other device (meta
  allows it, CUDA refuses), and anything created before the hot path (the model, the optimizer).
- **OnDevice**, a tensor subclass standing for tensors on a GPU: what is computed from one is one,
  and each read of its values into Python (item, tolist, bool, float, int, numpy, a copy to the
  CPU) is counted. On CUDA each read waits for the GPU to finish its queued work.

Beyond these, CUDA itself stays untested: its kernels (bf16 autocast on a GPU, agreement with the
CPU's numbers), its speed and memory, several trials sharing one GPU, and Ray handing out GPUs.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import DATA_DIR, TINY_BERT, needs_data, tiny_config

from data.batching import Batch
from model.config import TrainConfig
from model.evaluation import evaluate_splits
from model.surgery import gradvac, pcgrad, random_orders
from model.train import Trainer

TORCH_DIR = os.path.dirname(torch.__file__)
VALUE_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
}


class OnDevice(torch.Tensor):
    """A CPU tensor that plays one on a GPU; ``reads`` lists the reads of such tensors' values."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in VALUE_READS or (func is torch.Tensor.to and cls._to_cpu(args, kwargs)):
            cls.reads.append(func.__name__)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)  # what is read is a plain tensor or value again
        return super().__torch_function__(func, types, args, kwargs)

    @staticmethod
    def _to_cpu(args: tuple, kwargs: dict) -> bool:
        # torch's own same-device moves (clip_grad_norm_ stacking norms on the first grad's device)
        # name the CPU here only because the stand-in lives there: not a read.
        if sys._getframe(2).f_code.co_filename.startswith(TORCH_DIR):
            return False
        return any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))


@pytest.fixture
def reads() -> list[str]:
    OnDevice.reads = []
    return OnDevice.reads


GRADS = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
GRADVAC_TARGETS = torch.zeros(3, 3)


def surgery_run(surgery: str, grads: torch.Tensor) -> torch.Tensor:
    orders = random_orders(3, random.Random(0))
    if surgery == "pcgrad":
        return pcgrad(grads, orders)
    return gradvac(grads, GRADVAC_TARGETS, 0.1, orders)[0]


@pytest.mark.parametrize("surgery", ["pcgrad", "gradvac"])
def test_surgery_creates_no_tensor_off_its_inputs_devices(surgery):
    expected = surgery_run(surgery, GRADS)
    with torch.device("meta"):
        actual = surgery_run(surgery, GRADS)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("surgery", ["pcgrad", "gradvac"])
def test_surgery_reads_the_gradients_device_once(surgery, reads):
    combined = surgery_run(surgery, GRADS.as_subclass(OnDevice))
    assert reads == ["to"]  # the (tasks, tasks) Gram matrix, copied to the CPU; no read per task pair
    assert isinstance(combined, OnDevice)  # the combination is made on the gradients' device


def make_trainer(tmp_path: Path, **overrides) -> Trainer:
    cfg = TrainConfig.from_dict(tiny_config(predict_test=False, **overrides))
    return Trainer(cfg, tmp_path, None, fresh=True)


STEP_SETTINGS = {
    "none": {"surgery": "none"},
    "pcgrad": {"surgery": "pcgrad"},
    "gradvac, SMART, MNRL": {"surgery": "gradvac", "smart_weight": 1.0, "mnrl_weight": 1.0},
}


@needs_data
@pytest.mark.parametrize("settings", STEP_SETTINGS.values(), ids=STEP_SETTINGS)
def test_the_trainer_step_creates_no_tensor_off_its_inputs_devices(settings, tmp_path):
    trainer = make_trainer(tmp_path, **settings)
    with torch.device("meta"):
        loss = trainer._train_step(list(trainer.cfg.tasks))
    assert loss > 0
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())


@needs_data
def test_the_evaluation_creates_no_tensor_off_its_inputs_devices(tmp_path):
    trainer = make_trainer(tmp_path)  # para cross-encoded, STS bi-encoded: both evaluation paths
    with torch.device("meta"):
        metrics, outputs = evaluate_splits(trainer.model, trainer.dev_splits)
    assert set(metrics) == {"sst", "para", "sts", "overall"}


@needs_data
@pytest.mark.parametrize("surgery", ["none", "pcgrad", "gradvac"])
def test_a_step_reads_its_losses_from_the_device_once(surgery, tmp_path, monkeypatch, reads):
    """Batches moved to the "GPU" are OnDevice, and so is every loss computed from them; the step
    reads the losses once, to check them and to return their sum (not once per task)."""
    to_device = Batch.to

    def to_on_device(batch: Batch, device: torch.device) -> Batch:
        moved = to_device(batch, device)
        views = [tuple(t.as_subclass(OnDevice) for t in view) for view in moved.views]
        return Batch(moved.index, views, moved.labels.as_subclass(OnDevice))

    monkeypatch.setattr(Batch, "to", to_on_device)
    trainer = make_trainer(tmp_path, surgery=surgery)
    trainer._train_step(list(trainer.cfg.tasks))
    assert reads == ["tolist"]


class FakeGpus:
    """torch.cuda's random-state functions on a machine that shows ``visible`` GPUs; a GPU index
    beyond them raises IndexError, as torch's own functions do."""

    def __init__(self, visible: int):
        self.visible = visible
        self.states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(visible)}

    def _index(self, device: int | str | torch.device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= self.visible:
            raise IndexError(f"GPU {index} of {self.visible} visible")
        return index

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        self.states[self._index(device)] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in range(self.visible)]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for index, state in enumerate(states):
            self.set_rng_state(state, index)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))


@needs_data
def test_resume_restores_the_random_state_of_the_gpu_in_use_whatever_the_gpus_visible(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, tasks=["sts"])
    trainer.device = torch.device("cuda")  # the trainer as it runs on a GPU; its tensors stay on the CPU
    written = FakeGpus(visible=8)  # last.pt written where 8 GPUs were visible ...
    written.states[0] = torch.full((8,), 42, dtype=torch.uint8)
    written.install(monkeypatch)
    state = trainer._state()
    resumed = FakeGpus(visible=1)  # ... and resumed by a Ray trial that sees one
    resumed.install(monkeypatch)
    monkeypatch.setattr(trainer.run_dir, "load_state", lambda device: state)
    trainer._resume()
    assert torch.equal(resumed.states[0], written.states[0])


@needs_data
def test_a_trial_given_a_gpu_that_cannot_use_cuda_fails_naming_the_cause(tmp_path, monkeypatch):
    from search.adapters import TRIAL_NUMBER_KEY
    from search.study import load_spec
    from search.trial import TrialJob, run_trial

    model_config = ", ".join(f"{k} = {v}" for k, v in TINY_BERT.items())
    study_file = tmp_path / "gpu.toml"
    study_file.write_text(
        'tasks = ["sts"]\n[objective]\nmetric = "sts"\n'
        "[budget]\ntrials = 1\nmax_epochs = 1\ngrace_period = 1\ngpus_per_trial = 0.25\n"
        "[search]\nlr = { choices = [1e-3] }\n"
        f"[fixed]\nmodel_config = {{ {model_config} }}\ntrain_limit = 16\neval_limit = 8\npredict_test = false\n"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch in the venv
    job = TrialJob(study=load_spec(study_file), artifacts_root=str(tmp_path / "trials"), data_dir=str(DATA_DIR))
    with pytest.raises(ValueError, match=r"CUDA is not available: torch \S+ in \S+ is built without CUDA"):
        run_trial({TRIAL_NUMBER_KEY: 0, "lr": 1e-3}, job)
