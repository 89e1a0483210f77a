"""The one training loop every stage uses, and what makes its runs exact and portable.

:func:`fit` steps an optimiser: pretraining, fine-tuning, distillation and quantization-aware
training each supply a model, an optimiser, a loss and their data, and get the same schedule
(linear warm-up, cosine decay), gradient clipping, progress bar, validation, device placement and
checkpoints. Batches are a pure function of ``(seed, step)``, and so is every sample's
augmentation (each sample draws from its own seeded generator, in whichever worker loads it):
with the checkpoint, which holds weights, optimiser, schedule, random state and history and is
written atomically, a run that is killed and started again continues exactly as if it had never
stopped, with any number of data-loading workers.

On a GPU the forward pass runs under bf16 autocast and data loads in worker processes; the loss
is computed in float32. The device changes speed, not what a run is: it is never part of a
stage's key.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from edgefm.artifacts import atomic_path
from edgefm.config import DEVICES
from edgefm.errors import InputError


class CheckpointError(InputError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


class DeviceError(InputError, ValueError):
    """A device that is unknown or not present on this machine."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if present, then Apple's MPS, else the CPU; a named device must exist."""
    if name not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if available[d]))
    if not available[name]:
        raise DeviceError(f"device {name!r} is not available on this machine (try 'auto' or 'cpu')")
    return torch.device(name)


def batch_indices(step: int, batch_size: int, count: int, seed: int) -> torch.Tensor:
    """The dataset indices of batch ``step``: epochs are seeded permutations, so any step is
    reproducible on its own (which is what makes resuming exact)."""
    per_epoch = max(1, count // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[offset * batch_size : (offset + 1) * batch_size]


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up, then cosine decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass(frozen=True)
class StepData:
    """Where a run's batches come from: ``dataset[indices[i]]`` for the seeded :func:`batch_indices`
    of each step (``indices``: a subset, e.g. a label fraction; None: all), put together by
    ``collate`` (a picklable callable, so that workers can run it)."""

    dataset: Dataset
    batch_size: int
    seed: int
    collate: Callable[[list], Any]
    indices: Sequence[int] | None = None

    def batch(self, step: int) -> list[tuple[int, int]]:
        """``(dataset index, sample seed)`` pairs of batch ``step``."""
        count = len(self.indices) if self.indices is not None else len(self.dataset)
        chosen = batch_indices(step, self.batch_size, count, self.seed).tolist()
        if self.indices is not None:
            chosen = [int(self.indices[i]) for i in chosen]
        base = (self.seed * 1_000_003 + step) * 1_009
        return [(index, base + position) for position, index in enumerate(chosen)]


class _Steps(Sampler):
    """Yields the batches of steps ``start`` .. ``stop - 1``."""

    def __init__(self, data: StepData, start: int, stop: int):
        self.data, self.start, self.stop = data, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return (self.data.batch(step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class _SeededSamples(Dataset):
    """``dataset[index]`` with torch's generator seeded per sample, so random augmentations are
    the same whichever process loads the sample and whenever the run was resumed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def default_workers(device: torch.device) -> int:
    """Data-loading processes: none on the CPU (the model's threads use every core), several on
    an accelerator, which would otherwise wait for decoding and augmentation."""
    return 0 if device.type == "cpu" else min(6, max(1, (os.cpu_count() or 2) // 2))


def step_batches(data: StepData, start: int, stop: int, workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader over the batches of steps ``start`` .. ``stop - 1``. It has a generator of its
    own, so creating it leaves torch's global random state (the model's) untouched."""
    return DataLoader(_SeededSamples(data.dataset), batch_sampler=_Steps(data, start, stop),
                      collate_fn=data.collate, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, generator=torch.Generator())


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors, also inside dicts, lists and tuples, moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on a CUDA GPU; a no-op elsewhere (CPU runs stay float32, as tests expect)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights: progress and history."""

    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def save_checkpoint(path: Path, model, optimizer, scheduler, state: TrainState) -> None:
    """Write everything needed to resume, atomically (a kill mid-write keeps the old one)."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": state.step,
                    "seconds": state.seconds, "losses": state.losses, "evals": state.evals,
                    "rng": rng}, tmp)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore a :func:`save_checkpoint` file into the given objects; returns the progress."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({error}); delete it to "
                              "start over") from error
    rng = saved["rng"] if isinstance(saved["rng"], dict) else {"cpu": saved["rng"]}
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(saved["step"], saved["seconds"], saved["losses"], saved.get("evals", []))


@dataclass(frozen=True)
class Schedule:
    """How long and how a run steps: AdamW's learning rate is set by the caller's parameter
    groups; this sets its warm-up and cosine decay, clipping and checkpoint spacing."""

    steps: int
    warmup_steps: int
    grad_clip: float | None
    checkpoint_every: int
    eval_every: int = 0  # 0: validate only at the end (if there is a validation)
    stop: int = 0  # > 0: end the run after this many steps of the schedule (its start, re-traced)

    @property
    def end(self) -> int:
        return min(self.stop, self.steps) if self.stop > 0 else self.steps


LossFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]


def save_weights(model: nn.Module, path: Path) -> None:
    """``model``'s parameters and buffers as safetensors at ``path``, written atomically so a
    killed run never leaves half a file; on the CPU and contiguous, as safetensors needs them."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))


def loss_gaps(live: list[float], shipped: list[float]) -> dict:
    """How far a live re-trace of a shipped run's first steps is from the shipped run's losses
    over the same steps: same seed and batches, so only another processor's arithmetic (another
    CPU's rounding, a GPU's bf16) should part them; a large gap means the run was made otherwise."""
    steps = len(live)
    gaps = np.abs(np.asarray(live) - np.asarray(shipped[:steps]))
    return {"steps": steps, "live_losses": live, "shipped_losses": shipped[:steps],
            "max_loss_gap": float(gaps.max()), "mean_loss_gap": float(gaps.mean())}


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, loss: LossFn, data: StepData,
        schedule: Schedule, checkpoint: Path, *, device: torch.device | str = "cpu",
        workers: int | None = None, validate: Callable[[nn.Module], dict] | None = None,
        before_step: Callable[[int], None] | None = None, mixed_precision: bool = True,
        progress: bool = True, desc: str = "training") -> TrainState:
    """Train ``model`` for ``schedule.steps`` from ``checkpoint`` if it exists; returns the history.

    ``loss(model, batch)`` returns named losses with the optimised one under ``"total"``;
    ``validate(model)`` returns figures recorded every ``eval_every`` steps and at the end;
    ``before_step(step)`` lets a stage change the model's mode (QAT freezes its ranges);
    ``mixed_precision`` False keeps a GPU run in float32 (QAT's rounding needs it). The model is
    left on ``device``, in train mode.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device).train()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(schedule.warmup_steps, schedule.steps))
    state = TrainState()
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
    workers = default_workers(device) if workers is None else workers
    batches = step_batches(data, state.step, schedule.end, workers, pin_memory=device.type == "cuda")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    pending: list[torch.Tensor] = []  # losses still on the device: read in bulk, not every step
    bar = tqdm(total=schedule.end, initial=state.step, desc=desc, disable=not progress)
    start = time.perf_counter()

    def record() -> None:
        nonlocal start
        if pending:  # reading them waits for the device to finish its queued work
            state.losses += [round(v, 5) for v in torch.stack(pending).float().cpu().tolist()]
            pending.clear()
        state.seconds += time.perf_counter() - start
        start = time.perf_counter()

    for batch in batches:
        if before_step is not None:
            before_step(state.step)
        with autocast(device, mixed_precision):
            losses = loss(model, to_device(batch, device))
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if schedule.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, schedule.grad_clip)
        optimizer.step()
        scheduler.step()
        state.step += 1
        pending.append(losses["total"].detach())
        bar.update()
        last = state.step == schedule.end
        if len(pending) >= 50 or last or state.step % schedule.checkpoint_every == 0 or (
                schedule.eval_every and state.step % schedule.eval_every == 0):
            record()
            bar.set_postfix(loss=f"{state.losses[-1]:.3f}")
        if validate is not None and (last or (schedule.eval_every and state.step % schedule.eval_every == 0)):
            state.evals.append({"step": state.step, **validate(model)})
            model.train()
            start = time.perf_counter()  # validation time is not training time
        if state.step % schedule.checkpoint_every == 0 or last:
            save_checkpoint(checkpoint, model, optimizer, scheduler, state)
    bar.close()
    return state
