from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import kill_after_checkpoint
from edgefm.artifacts import read_metrics
from edgefm.config import BackboneConfig, PretrainConfig
from edgefm.data import DatasetError
from edgefm.models import CheckpointError, load_mae_backbone
from edgefm.stages.pretrain import ensure_pretrained, pretrain
from edgefm.tools.training import batch_indices

CFG = PretrainConfig(
    backbone=BackboneConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2),
    decoder_hidden_size=32, decoder_layers=1, decoder_heads=2, batch_size=4, steps=6,
    warmup_steps=2, base_lr=1e-2, checkpoint_every=3,
)


@pytest.fixture
def pool(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        image = np.zeros((40, 40, 3), np.uint8)
        y, x = rng.integers(0, 24, size=2)
        image[y : y + 16, x : x + 16] = rng.integers(60, 255, size=3)
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


def test_batches_are_a_pure_function_of_the_step():
    first = [batch_indices(s, 4, 12, seed=0) for s in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, [batch_indices(s, 4, 12, 0) for s in range(6)],
                                                 strict=True))
    epoch = torch.cat(first[:3])
    assert sorted(epoch.tolist()) == list(range(12))  # one epoch sees each image once
    assert not torch.equal(torch.cat(first[3:]), epoch)  # and the next epoch is reshuffled


def test_resume_continues_exactly_where_it_stopped(pool, tmp_path, monkeypatch):
    straight = pretrain(CFG, pool, tmp_path / "straight", progress=False)

    kill_after_checkpoint(monkeypatch, 3,
                          lambda: pretrain(CFG, pool, tmp_path / "resumed", progress=False))
    assert not (tmp_path / "resumed" / "mae").exists()
    resumed = pretrain(CFG, pool, tmp_path / "resumed", progress=False)
    assert resumed.step == straight.step == 6
    assert resumed.losses == straight.losses


def test_loss_falls_and_weights_load_as_a_backbone(pool, tmp_path):
    cfg = replace(CFG, steps=60, checkpoint_every=60)
    state = pretrain(cfg, pool, tmp_path / "run", progress=False)
    assert np.mean(state.losses[-5:]) < 0.9 * np.mean(state.losses[:5])
    backbone = load_mae_backbone(tmp_path / "run" / "mae", expect=cfg.backbone)
    assert backbone(torch.randn(1, 3, 32, 32)).shape == (1, 32, 4, 4)


def test_corrupt_checkpoint_is_named(pool, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint.pt: cannot resume"):
        pretrain(CFG, pool, tmp_path / "run", progress=False)


def test_empty_pool_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no images"):
        pretrain(CFG, tmp_path / "empty", tmp_path / "run", progress=False)


def test_ensure_pretrained_smoke_writes_metrics(fashion_dir):
    result = ensure_pretrained("smoke", progress=False)
    metrics = read_metrics("smoke", "pretrain")
    for key in ("loss_first", "loss_last", "steps", "images_seen", "seconds", "params"):
        assert key in metrics
    assert metrics["steps"] == 6 and metrics["images_seen"] == 6 * 8
    assert load_mae_backbone(result.source) is not None
    assert ensure_pretrained("smoke", progress=False).source == result.source  # cached


def test_other_data_means_other_pretrained_weights(fashion_dir):
    from edgefm.config import load_profile

    smoke = load_profile("smoke")
    first = ensure_pretrained(smoke, progress=False).source
    other = replace(smoke, data=replace(smoke.data, seed=1))
    assert ensure_pretrained(other, progress=False).source != first
