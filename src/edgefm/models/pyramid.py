"""ViTDet's simple feature pyramid: multi-scale maps from a plain ViT's single-scale map.

A plain ViT has one feature map at the patch stride. ViTDet (Li et al., 2022) showed that a few
transposed convolutions (up) and a max-pool (down) of that last map, each followed by a 1x1 and a
3x3 convolution, are enough for detection: no FPN-style top-down path is needed.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ViTDet's choice of normalisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _resample(dim: int, scale: float) -> tuple[nn.Module, int]:
    """The layers that bring a map at stride ``s`` to ``s / scale``, and their output width."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2),
                             nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2), dim
    raise ValueError(f"unsupported pyramid scale {scale}; use 4, 2, 1 or 0.5")


class SimpleFeaturePyramid(nn.Module):
    """Maps at ``scales`` times the input resolution, all ``channels`` wide."""

    def __init__(self, in_dim: int, channels: int, scales: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        self.scales = scales
        levels = []
        for scale in scales:
            resample, width = _resample(in_dim, scale)
            levels.append(nn.Sequential(
                resample,
                nn.Conv2d(width, channels, 1, bias=False), LayerNorm2d(channels),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels),
            ))
        self.levels = nn.ModuleList(levels)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [level(features) for level in self.levels]
