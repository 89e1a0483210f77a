"""The one training loop: devices, data-loading workers, the schedule's end, exact resumption."""

import pytest
import torch
from torch import nn

from conftest import kill_after_checkpoint
from edgefm.tools.training import DeviceError, Schedule, StepData, fit, resolve_device, to_device


class Noisy(torch.utils.data.Dataset):
    """Samples whose value depends on torch's random draw: augmentation, in miniature."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        return torch.full((3,), float(index)) + torch.rand(3)


def run(tmp_path, name, workers=0, stop=0, device="cpu"):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    data = StepData(Noisy(), batch_size=4, seed=3, collate=torch.stack)

    def loss(model, batch):
        return {"total": model(batch).square().mean()}

    schedule = Schedule(steps=8, warmup_steps=2, grad_clip=1.0, checkpoint_every=2, eval_every=4, stop=stop)
    return fit(model, optimizer, loss, data, schedule, tmp_path / name / "ck.pt", device=device,
               workers=workers, validate=lambda m: {"bias": float(m.bias.detach())}, progress=False)


def test_workers_and_resuming_do_not_change_a_run(tmp_path, monkeypatch):
    straight = run(tmp_path, "straight")
    assert len(straight.losses) == 8 and [e["step"] for e in straight.evals] == [4, 8]
    assert run(tmp_path, "workers", workers=2).losses == straight.losses  # augmentation seeded per sample
    kill_after_checkpoint(monkeypatch, 4, lambda: run(tmp_path, "resumed"))
    resumed = run(tmp_path, "resumed")
    assert resumed.losses == straight.losses and resumed.evals == straight.evals


def test_stop_ends_a_run_early_on_its_schedule(tmp_path):
    start = run(tmp_path, "start", stop=4)
    assert start.step == 4 and start.losses == run(tmp_path, "whole").losses[:4]
    assert [e["step"] for e in start.evals] == [4]


def test_devices(tmp_path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="'cuda' is not available"):
            resolve_device("cuda")
    moved = to_device({"a": torch.ones(1), "b": [torch.zeros(1), 3]}, torch.device("cpu"))
    assert moved["b"][1] == 3 and moved["a"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_run_trains_in_bf16_and_leaves_the_model_there(tmp_path):
    state = run(tmp_path, "gpu", device="cuda")
    cpu = run(tmp_path, "cpu")
    assert len(state.losses) == 8 and state.losses == pytest.approx(cpu.losses, rel=0.05)
