"""The detector: a ViT backbone, ViTDet's simple feature pyramid and a CenterNet-style head.

``forward`` takes images in [0, 1] (normalisation is inside the graph, so an exported model needs
no preprocessing beyond resizing) and returns the head's raw tensors; :func:`edgefm.runtime.decode.decode`
turns them into boxes, for PyTorch and ONNX Runtime outputs alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgefm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from edgefm.models.centernet import CenterNetHead
from edgefm.models.pyramid import SimpleFeaturePyramid


class Detector(nn.Module):
    """``backbone`` maps (B, 3, H, W) to (B, D, H / p, W / p) and has ``embed_dim``, ``patch_size``.

    The pyramid's levels are resized to the finest one and summed, so the single-scale head sees
    every scale; its output stride is ``patch_size / max(scales)``: 4 for patch 8 and scales up
    to 2, or patch 16 and scales up to 4.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 128,
                 scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5), head_hidden: int = 64):
        super().__init__()
        self.backbone = backbone
        self.pyramid = SimpleFeaturePyramid(backbone.embed_dim, channels, scales)
        self.head = CenterNetHead(channels, num_classes, head_hidden)
        self.num_classes = num_classes
        self.stride = backbone.patch_size / max(scales)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The fused pyramid map at the head's stride."""
        levels = self.pyramid(self.backbone((images - self.mean) / self.std))
        finest = levels[0].shape[-2:]
        fused = levels[0]
        for level in levels[1:]:
            fused = fused + F.interpolate(level, size=finest, mode="nearest")
        return fused

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(heatmap_logits, box_distances)``: (B, C, h, w) and (B, 4, h, w)."""
        return self.head(self.forward_features(images))
