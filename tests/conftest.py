"""Shared fixtures: a tiny fake Fashion-MNIST and an isolated artifacts folder for every test."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch


def kill_after_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int, run) -> None:
    """Call ``run()`` with the training loop's ``save_checkpoint`` raising KeyboardInterrupt right
    after it writes the checkpoint of ``step`` (a run killed there), then restore the real one."""
    from edgefm.tools import training as module

    real_save = module.save_checkpoint

    def save_then_die(path, model, optimizer, scheduler, state):
        real_save(path, model, optimizer, scheduler, state)
        if state.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(module, "save_checkpoint", real_save)


def forbid_training_and_scoring(patch: pytest.MonkeyPatch) -> None:
    """Make the one training loop's step and every mAP fail: what a rebuild that should only
    time again must not reach."""
    from edgefm.tools import evaluate

    def not_again(*args, **kwargs):
        raise AssertionError("a new BenchConfig computed more than timings")

    patch.setattr(torch.optim.Optimizer, "zero_grad", not_again)
    patch.setattr(evaluate, "coco_evaluate", not_again)


# Tiny models run fastest on one thread, and tests then never fight a background job for cores.
torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, the format MNIST is distributed in."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def fake_items(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 28x28 items: bright rectangles of random extent on black, labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    for image in images:
        top, left = rng.integers(2, 10, size=2)
        bottom, right = rng.integers(18, 27, size=2)
        image[top:bottom, left:right] = rng.integers(120, 255)
    return images, np.arange(count) % 10


@pytest.fixture(autouse=True)
def isolated_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes artifacts to its own temporary folder."""
    root = tmp_path / "artifacts"
    monkeypatch.setenv("EDGEFM_ARTIFACTS", str(root))
    # no shipped result unless a test makes one
    monkeypatch.setenv("EDGEFM_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.delenv("EDGEFM_PROFILE", raising=False)
    monkeypatch.delenv("EDGEFM_DOWNLOAD", raising=False)
    # empty: no data folder; set (not deleted) so that one a command sets is removed after the test
    monkeypatch.setenv("EDGEFM_DATA", "")
    return root


@pytest.fixture
def fashion_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake Fashion-MNIST folder (train: 60,000 slots are not needed; 60 items suffice)."""
    folder = tmp_path_factory.mktemp("fashion")
    for stem, count, seed in (("train", 60, 1), ("t10k", 30, 2)):
        images, labels = fake_items(count, seed)
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("EDGEFM_FASHION_MNIST", str(folder))
    return folder
