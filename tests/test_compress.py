"""Structured pruning and knowledge distillation on tiny detectors."""

import numpy as np
import pytest
import torch

from edgefm.compress.distill import Distiller, DistillWeights, heatmap_distillation
from edgefm.compress.prune import prune_detector, widths
from edgefm.config import BackboneConfig
from edgefm.export import export_onnx, onnx_runner, open_session
from edgefm.models.detector import Detector
from edgefm.models.vit import ViTBackbone, build_vit
from test_detector import tiny_detector


def wider_detector(hidden=64, heads=4, seed=0):
    torch.manual_seed(seed)
    cfg = BackboneConfig(image_size=64, patch_size=8, hidden_size=hidden, num_layers=2, num_heads=heads)
    vit = build_vit(cfg)
    return Detector(ViTBackbone(vit), 3, channels=32, head_hidden=32)


def test_pruning_removes_heads_and_channels_and_still_exports(tmp_path):
    model = wider_detector()
    before = sum(p.numel() for p in model.parameters())
    prune_detector(model, 0.5, image_size=64, round_to=8)
    assert widths(model) == [{"heads": 2, "mlp": 128}] * 2
    attn = model.backbone.vit.blocks[0].attn
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim and attn.attn_dim == 32
    assert sum(p.numel() for p in model.parameters()) < before
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ours = [o.numpy() for o in model.eval()(images)]
    assert [o.shape for o in ours] == [(2, 3, 32, 32), (2, 4, 32, 32)]  # same neck and head grid
    theirs = onnx_runner(open_session(export_onnx(model, tmp_path / "pruned.onnx", 64)))(images.numpy())
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_pruning_keeps_a_head_and_rounds_channels():
    model = tiny_detector()  # 2 heads, MLP 128
    prune_detector(model, 0.7, image_size=64, round_to=16)
    assert all(w["heads"] == 1 and w["mlp"] % 16 == 0 and w["mlp"] > 0 for w in widths(model))
    with pytest.raises(ValueError, match="pruning ratio"):
        prune_detector(tiny_detector(), 1.0, image_size=64)


def test_soft_targets_are_best_matched_by_the_teacher_itself():
    teacher = torch.randn(2, 3, 8, 8)
    same = heatmap_distillation(teacher, teacher, temperature=2.0)
    other = heatmap_distillation(torch.randn(2, 3, 8, 8), teacher, temperature=2.0)
    assert same < other


def test_a_distillation_step_reduces_the_distillation_loss():
    teacher, student = wider_detector(seed=1).eval(), tiny_detector(seed=2)
    distiller = Distiller(student, teacher, DistillWeights())
    assert isinstance(distiller.project, torch.nn.Identity)  # same neck width: nothing to learn there
    optimizer = torch.optim.Adam([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)
    images = torch.rand(4, 3, 64, 64)
    history = []
    for _ in range(15):
        _, losses = distiller.train()(images)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert history[-1] < 0.8 * history[0]
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never learns
    assert not teacher.training


def test_distiller_projects_a_narrower_neck_and_rejects_a_different_grid():
    teacher = wider_detector()
    vit = build_vit(BackboneConfig(image_size=64, patch_size=8, hidden_size=32, num_layers=1, num_heads=2))
    narrow = Detector(ViTBackbone(vit), 3, channels=16, head_hidden=16)
    distiller = Distiller(narrow, teacher)
    assert isinstance(distiller.project, torch.nn.Conv2d) and distiller.project.out_channels == 32
    (heat, boxes), losses = distiller(torch.rand(1, 3, 64, 64))
    assert heat.shape == (1, 3, 32, 32) and set(losses) == {"heatmap", "boxes", "features"}
    coarse = Detector(ViTBackbone(build_vit(BackboneConfig(image_size=64, patch_size=16, hidden_size=32,
                                                           num_layers=1, num_heads=2))), 3, channels=32)
    with pytest.raises(ValueError, match="grid"):
        Distiller(coarse, teacher)
