"""Structured pruning and knowledge distillation on tiny detectors."""

import numpy as np
import pytest
import torch

from conftest import kill_after_checkpoint
from edgefm.config import BackboneConfig, DetectorConfig, DistillWeights, StudentConfig, StudentTraining
from edgefm.data import ensure_dataset
from edgefm.data.coco import CocoDetection
from edgefm.data.transforms import detection_transforms
from edgefm.models.detector import Detector
from edgefm.models.vit import ViTBackbone, build_vit
from edgefm.runtime import onnx_runner, open_session
from edgefm.tools.distill import Distiller, heatmap_distillation, train_student
from edgefm.tools.export import export_onnx
from edgefm.tools.prune import keep_blocks, prune_detector, spread_blocks, widths
from edgefm.tools.students import TimmBackbone, build_student, mobile_scales
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


def test_distiller_projects_a_narrower_neck_and_resizes_a_coarser_grid():
    teacher = wider_detector()
    vit = build_vit(BackboneConfig(image_size=64, patch_size=8, hidden_size=32, num_layers=1, num_heads=2))
    narrow = Detector(ViTBackbone(vit), 3, channels=16, head_hidden=16)
    distiller = Distiller(narrow, teacher)
    assert isinstance(distiller.project, torch.nn.Conv2d) and distiller.project.out_channels == 32
    (heat, boxes), losses = distiller(torch.rand(1, 3, 64, 64))
    assert heat.shape == (1, 3, 32, 32) and set(losses) == {"heatmap", "boxes", "features"}
    coarse = Detector(ViTBackbone(build_vit(BackboneConfig(image_size=64, patch_size=16, hidden_size=32,
                                                           num_layers=1, num_heads=2))), 3, channels=32)
    (heat, _), losses = Distiller(coarse, teacher)(torch.rand(1, 3, 64, 64))
    assert heat.shape == (1, 3, 16, 16) and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="same classes"):
        Distiller(tiny_detector(num_classes=4), teacher)


def outputs_match_in_onnx(model, tmp_path, size=64):
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        ours = [o.numpy() for o in model.eval()(images)]
    theirs = onnx_runner(open_session(export_onnx(model, tmp_path / "model.onnx", size)))(images.numpy())
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    return ours


def test_pruning_everything_narrows_the_residual_stream_and_neck_but_not_the_outputs(tmp_path):
    model = wider_detector()
    prune_detector(model, 0.5, image_size=64, head_ratio=0.0, scope="all")
    vit = model.backbone.vit
    assert model.backbone.embed_dim == vit.embed_dim == vit.patch_embed.proj.out_channels == 32
    assert vit.pos_embed.shape[-1] == 32 and widths(model) == [{"heads": 4, "mlp": 128}] * 2
    assert model.head.heatmap[0].in_channels == 16  # the pyramid and head narrowed too
    ours = outputs_match_in_onnx(model, tmp_path)
    assert [o.shape for o in ours] == [(2, 3, 32, 32), (2, 4, 32, 32)]
    with pytest.raises(ValueError, match="scope"):
        prune_detector(wider_detector(), 0.5, image_size=64, scope="neck")


def test_blocks_are_kept_evenly_and_the_last_one_always():
    assert spread_blocks(3, 6) == [1, 3, 5] and spread_blocks(1, 6) == [5]
    assert spread_blocks(6, 6) == list(range(6))
    model = wider_detector()
    last = model.backbone.vit.blocks[1]
    keep_blocks(model, [1])
    assert list(model.backbone.vit.blocks) == [last]
    assert model(torch.rand(1, 3, 64, 64))[0].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="depth"):
        spread_blocks(0, 6)
    with pytest.raises(ValueError, match="blocks to keep"):
        keep_blocks(wider_detector(), [2])


def test_a_student_from_the_teacher_is_smaller_and_starts_from_its_weights():
    teacher = wider_detector().eval()
    spec = StudentConfig("s", depth=1, width=0.5)
    student = build_student(spec, teacher, DetectorConfig(image_size=64, channels=32, head_hidden=32),
                            BackboneConfig(image_size=64, patch_size=8, hidden_size=64, num_layers=2))
    assert len(student.backbone.vit.blocks) == 1 and student.backbone.embed_dim == 32
    assert sum(p.numel() for p in student.parameters()) < 0.5 * sum(p.numel() for p in teacher.parameters())
    assert len(teacher.backbone.vit.blocks) == 2  # the teacher is untouched
    # rebuilding gives the same architecture, so saved weights load into it
    again = build_student(spec, teacher, DetectorConfig(image_size=64, channels=32, head_hidden=32),
                          BackboneConfig(image_size=64, patch_size=8, hidden_size=64, num_layers=2))
    again.load_state_dict(student.state_dict())
    low = build_student(StudentConfig("low", depth=1, image_size=48), teacher,
                        DetectorConfig(image_size=64, channels=32, head_hidden=32), BackboneConfig())
    heat, _ = low(torch.rand(1, 3, 64, 64))  # A's input, resized inside: a coarser grid, a longer stride
    assert heat.shape == (1, 3, 24, 24) and low.stride == 64 / 24
    with pytest.raises(ValueError, match="unknown student init"):
        build_student(StudentConfig("s", init="imagenet"), teacher, DetectorConfig(image_size=64),
                      BackboneConfig())


def test_a_lower_resolution_student_exports_with_its_resize(tmp_path):
    student = build_student(StudentConfig("low", image_size=48, width=0.5), wider_detector().eval(),
                            DetectorConfig(image_size=64, channels=32, head_hidden=32), BackboneConfig())
    ours = outputs_match_in_onnx(student, tmp_path)
    assert ours[0].shape == (2, 3, 24, 24)


def test_a_mobile_student_reads_a_timm_cnn_onto_the_teachers_grid(tmp_path):
    assert mobile_scales(16, 4.0) == (4.0, 2.0, 1.0, 0.5) and mobile_scales(8, 4.0) == (2.0, 1.0, 0.5)
    teacher = Detector(ViTBackbone(build_vit(BackboneConfig(image_size=64, patch_size=8, hidden_size=32,
                                                            num_layers=1, num_heads=2))),
                       3, channels=32, head_hidden=32, scales=(2.0, 1.0, 0.5))
    spec = StudentConfig("m", kind="mobilenetv4_conv_small", channels=16, head_hidden=16)
    student = build_student(spec, teacher, DetectorConfig(image_size=64), BackboneConfig())
    assert student.stride == teacher.stride == 4
    ours = outputs_match_in_onnx(student, tmp_path)
    assert ours[0].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="strides"):
        TimmBackbone("mobilenetv4_conv_small", stride=64)


def test_student_training_resumes_exactly_and_distillation_adds_its_terms(fashion_dir, tmp_path, monkeypatch):
    dataset = ensure_dataset("smoke")
    train = CocoDetection(dataset.train, detection_transforms(64, train=True))
    teacher = tiny_detector(num_classes=10, seed=1).eval()
    cfg = StudentTraining(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2)

    def run(folder):
        return train_student(tiny_detector(num_classes=10, seed=2), teacher, DistillWeights(), train, cfg,
                             tmp_path / folder, progress=False)

    straight = run("straight")
    kill_after_checkpoint(monkeypatch, 2, lambda: run("resumed"))
    assert run("resumed").losses == straight.losses
    plain = train_student(tiny_detector(num_classes=10, seed=2), None, None, train, cfg, tmp_path / "plain",
                          progress=False)
    assert plain.losses[0] < straight.losses[0]  # the same first batch, without the imitation terms
