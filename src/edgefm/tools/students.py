"""The students: smaller detectors with A's neck and head, built from A or from a timm mobile CNN.

A *ViT student* is A's own architecture cut down: ``depth`` of its blocks kept (spread evenly,
:func:`~edgefm.tools.prune.spread_blocks`) and ``width`` of every channel pruned
(:func:`~edgefm.tools.prune.prune_detector`, scope ``"all"``). Its weights come from A
(``init="teacher"``: the fine-tuned detector, so the student starts where A is), from the MAE
encoder that A started from (``init="mae"``: the same selection, with a fresh neck and head), or
from nothing (``"random"``). A *mobile student* replaces the ViT by a ``timm`` CNN (random
weights: nothing is downloaded here) read at one stride, with the same pyramid and head.
A ViT student may also run at a lower resolution than A (``image_size``): it still takes A's
input and resizes it first (:class:`ResizingViTBackbone`), so every variant of the book, and the
deployed model, is fed the same frames.

Every student is rebuilt from its :class:`~edgefm.config.StudentConfig` and the teacher alone
(pruning is deterministic), so only its weights need saving.
"""

from __future__ import annotations

import copy

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from edgefm.config import BackboneConfig, DetectorConfig, StudentConfig
from edgefm.models.detector import Detector
from edgefm.models.vit import ViTBackbone, load_mae_backbone, random_mae_backbone
from edgefm.tools.prune import keep_blocks, prune_detector, spread_blocks


class TimmBackbone(nn.Module):
    """A ``timm`` model's feature map at ``stride``, as a backbone: ``(B, embed_dim, H/s, W/s)``.

    Only the stages up to that stride are built (``features_only``), so a stride-16 map of a
    MobileNet costs the stages before its last one.
    """

    def __init__(self, name: str, stride: int = 16):
        super().__init__()
        probe = timm.create_model(name, pretrained=False, features_only=True)
        strides = probe.feature_info.reduction()
        if stride not in strides:
            raise ValueError(f"timm model {name!r} has feature maps at strides {strides}, not {stride}")
        self.net = timm.create_model(name, pretrained=False, features_only=True,
                                     out_indices=(strides.index(stride),))
        self.embed_dim = self.net.feature_info.channels()[0]
        self.patch_size = stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0]


class ResizingViTBackbone(ViTBackbone):
    """A ViT that resizes its ``input_size`` input to ``image_size`` first (bilinear), its position
    table resampled once to the smaller grid; ``patch_size`` is its stride on the *input*."""

    def __init__(self, vit: VisionTransformer, input_size: int, image_size: int):
        vit.set_input_size(img_size=(image_size, image_size))
        super().__init__(vit)
        self.image_size = image_size
        self.patch_size = self.patch_size * input_size / image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        return super().forward(F.interpolate(images, size=size, mode="bilinear", align_corners=False))


def resize_input(model: Detector, input_size: int, image_size: int) -> Detector:
    """Make a ViT detector run at ``image_size`` behind an ``input_size`` input, in place."""
    model.backbone = ResizingViTBackbone(model.backbone.vit, input_size, image_size)
    model.stride = model.backbone.patch_size / max(model.pyramid.scales)
    return model


def mobile_scales(stride: int, teacher_stride: float) -> tuple[float, ...]:
    """Pyramid scales that bring a ``stride`` map to the teacher's head grid, plus one level
    coarser, as A's pyramid does: stride 16 for a grid of 4 -> (4, 2, 1, 0.5)."""
    top = stride / teacher_stride
    scales, scale = [], top
    while scale >= 1:
        scales.append(scale)
        scale /= 2
    return (*scales, 0.5)


def build_student(spec: StudentConfig, teacher: Detector, detector: DetectorConfig,
                  backbone: BackboneConfig, mae_source: str | None = None) -> Detector:
    """The student ``spec`` describes, for ``teacher`` (model A) and A's configurations."""
    if spec.kind == "vit":
        return _vit_student(spec, teacher, detector, backbone, mae_source)
    net = TimmBackbone(spec.kind, spec.stride)
    scales = mobile_scales(spec.stride, teacher.stride)
    torch.manual_seed(spec.seed)
    return Detector(net, teacher.num_classes, spec.channels or detector.channels, scales,
                    spec.head_hidden or detector.head_hidden)


def _vit_student(spec: StudentConfig, teacher: Detector, detector: DetectorConfig,
                 backbone: BackboneConfig, mae_source: str | None) -> Detector:
    if spec.init == "teacher":
        model = copy.deepcopy(teacher).requires_grad_(True)  # a Distiller may have frozen A's
    elif spec.init in ("mae", "random"):
        if spec.init == "mae" and mae_source is None:
            raise ValueError("a student initialised from the MAE encoder needs its weights (mae_source)")
        torch.manual_seed(spec.seed)
        vit = (load_mae_backbone(mae_source, image_size=detector.image_size) if spec.init == "mae"
               else random_mae_backbone(backbone, image_size=detector.image_size))
        model = Detector(vit, teacher.num_classes, detector.channels, detector.scales, detector.head_hidden)
    else:
        raise ValueError(f"unknown student init {spec.init!r}; use 'teacher', 'mae' or 'random'")
    depth = len(model.backbone.vit.blocks)
    keep_blocks(model, spread_blocks(spec.depth or depth, depth))
    if spec.width > 0 or spec.heads > 0:
        prune_detector(model, spec.width, detector.image_size, head_ratio=spec.heads, scope=spec.scope)
    if spec.image_size and spec.image_size != detector.image_size:
        resize_input(model, detector.image_size, spec.image_size)
    return model.eval()
