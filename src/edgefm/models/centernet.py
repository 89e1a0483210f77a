"""A CenterNet-style anchor-free head: its targets, its loss and its decoder.

Each object is a peak on a per-class heatmap at its box centre, plus the box's size and the
sub-cell offset of the centre, regressed at that peak (Zhou et al., 2019, "Objects as Points").
Decoding keeps the local maxima of the heatmap (a 3x3 max filter stands in for NMS) and the top
100 of them, so the network's graph ends at three plain tensors and the decoder is a few lines of
NumPy that serve PyTorch, ONNX Runtime and a device alike.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PRIOR = 0.1  # initial heatmap probability: keeps the focal loss sane at the first steps


class CenterNetHead(nn.Module):
    """Heatmap logits (num_classes), box size (2, in output cells) and centre offset (2)."""

    def __init__(self, channels: int, num_classes: int, hidden: int = 64):
        super().__init__()

        def branch(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, out, 1))

        self.heatmap, self.size, self.offset = branch(num_classes), branch(2), branch(2)
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heatmap(features), self.size(features), self.offset(features)


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CornerNet's radius: how far a centre may move while the box keeps ``min_overlap`` IoU."""
    b1, c1 = height + width, width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2, c2 = 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def _draw_gaussian(heatmap: torch.Tensor, cx: int, cy: int, radius: int) -> None:
    sigma = (2 * radius + 1) / 6
    ys, xs = torch.meshgrid(torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1),
                            indexing="ij")
    blob = torch.exp(-(xs**2 + ys**2) / (2 * sigma**2))
    height, width = heatmap.shape
    top, bottom = min(cy, radius), min(height - cy, radius + 1)
    left, right = min(cx, radius), min(width - cx, radius + 1)
    region = heatmap[cy - top : cy + bottom, cx - left : cx + right]
    torch.maximum(region, blob[radius - top : radius + bottom, radius - left : radius + right], out=region)


def centernet_targets(
    boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, out_size: tuple[int, int], stride: float
) -> dict[str, torch.Tensor]:
    """Training targets for one image: XYXY ``boxes`` in input pixels, ``labels`` 0..C-1."""
    height, width = out_size
    heatmap = torch.zeros(num_classes, height, width)
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2) / stride
    cells = centres.floor().long()
    cells[:, 0].clamp_(0, width - 1)
    cells[:, 1].clamp_(0, height - 1)
    sizes = (boxes[:, 2:] - boxes[:, :2]) / stride
    for (cx, cy), (w, h), label in zip(cells.tolist(), sizes.tolist(), labels.tolist(), strict=True):
        _draw_gaussian(heatmap[label], cx, cy, max(0, int(gaussian_radius(h, w))))
    return {"heatmap": heatmap, "index": cells[:, 1] * width + cells[:, 0], "size": sizes,
            "offset": centres - cells.float()}


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of objects."""
    prob = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos_loss = torch.log(prob) * (1 - prob) ** 2 * positive
    neg_loss = torch.log(1 - prob) * prob**2 * (1 - target) ** 4 * (1 - positive)
    return -(pos_loss.sum() + neg_loss.sum()) / positive.sum().clamp(min=1)


def centernet_loss(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], targets: list[dict[str, torch.Tensor]],
    size_weight: float = 0.1, offset_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The three CenterNet losses over a batch; ``total`` is their weighted sum."""
    heat_logits, size, offset = outputs
    heatmap = focal_loss(heat_logits, torch.stack([t["heatmap"] for t in targets]))
    size_losses, offset_losses, count = [], [], 0
    for i, target in enumerate(targets):
        if len(target["index"]) == 0:
            continue
        pred_size = size[i].flatten(1)[:, target["index"]].T
        pred_offset = offset[i].flatten(1)[:, target["index"]].T
        size_losses.append(F.l1_loss(pred_size, target["size"], reduction="sum"))
        offset_losses.append(F.l1_loss(pred_offset, target["offset"], reduction="sum"))
        count += len(target["index"])
    zero = heat_logits.sum() * 0
    size_loss = sum(size_losses, zero) / max(count, 1)
    offset_loss = sum(offset_losses, zero) / max(count, 1)
    total = heatmap + size_weight * size_loss + offset_weight * offset_loss
    return {"total": total, "heatmap": heatmap, "size": size_loss, "offset": offset_loss}


def _max_filter3(x: np.ndarray) -> np.ndarray:
    """3x3 maximum over the last two axes (edges padded with -inf)."""
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], constant_values=-np.inf)
    height, width = x.shape[-2:]
    shifted = [padded[..., dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    return np.max(shifted, axis=0)


def decode(
    heat_logits: np.ndarray, size: np.ndarray, offset: np.ndarray, stride: float,
    max_detections: int = 100, score_threshold: float = 0.01,
) -> list[dict[str, np.ndarray]]:
    """Detections from raw head outputs (NumPy arrays, batch first): per image a dict of XYXY
    ``boxes`` in input pixels, ``scores`` and ``labels``, best first, at most ``max_detections``."""
    heat = 1 / (1 + np.exp(-np.asarray(heat_logits, dtype=np.float32)))
    peaks = np.where(_max_filter3(heat) == heat, heat, 0)
    batch, classes, height, width = heat.shape
    results = []
    for b in range(batch):
        flat = peaks[b].reshape(-1)
        k = min(max_detections, flat.size)
        top = np.argpartition(-flat, k - 1)[:k]
        top = top[np.argsort(-flat[top], kind="stable")]
        top = top[flat[top] >= score_threshold]
        labels, cell = np.divmod(top, height * width)
        ys, xs = np.divmod(cell, width)
        cx = (xs + offset[b, 0, ys, xs]) * stride
        cy = (ys + offset[b, 1, ys, xs]) * stride
        w, h = size[b, 0, ys, xs] * stride, size[b, 1, ys, xs] * stride
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)
        np.clip(boxes, 0, [width * stride, height * stride] * 2, out=boxes)
        results.append({"boxes": boxes, "scores": flat[top].astype(np.float32),
                        "labels": labels.astype(np.int64)})
    return results
