"""The parts every training stage shares: batches by step, the schedule, and exact resumption.

A stage's checkpoint holds the weights, the optimizer, the schedule, the random state and the
history, written atomically; batches are a pure function of (seed, step). Together they make a
run that is killed and started again continue exactly as if it had never stopped.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgefm.artifacts import atomic_path
from edgefm.errors import InputError


class CheckpointError(InputError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


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


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights: progress and history."""

    step: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def save_checkpoint(path: Path, model, optimizer, scheduler, state: TrainState) -> None:
    """Write everything needed to resume, atomically (a kill mid-write keeps the old one)."""
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": state.step,
                    "seconds": state.seconds, "losses": state.losses, "evals": state.evals,
                    "rng": torch.get_rng_state()}, tmp)


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
    torch.set_rng_state(saved["rng"])
    return TrainState(saved["step"], saved["seconds"], saved["losses"], saved.get("evals", []))
