"""A CenterNet-style anchor-free head with TTFNet's box regression: targets, loss and decoder.

Each object is a peak on a per-class heatmap at its box centre (Zhou et al., 2019, "Objects as
Points"). CenterNet regresses the box at that one peak cell, which makes it slow to train: one
regression sample per object per image. TTFNet (Liu et al., 2020) regresses the distances from a
cell to the box's four sides at every cell under the object's Gaussian, weighted by the Gaussian
and by the log of the box area, with a GIoU loss: many samples per object, and a loss that is the
overlap the metric scores; on the default scenes it learned markedly faster than CenterNet's
single-cell regression in an early comparison.

The network's graph ends at the two raw maps; :func:`edgefm.runtime.decode.decode` turns them into boxes
in NumPy, for PyTorch, ONNX Runtime and a device alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

PRIOR = 0.1  # initial heatmap probability: keeps the focal loss sane at the first steps


class CenterNetHead(nn.Module):
    """Heatmap logits (num_classes) and box distances (4: left, top, right, bottom, in input pixels).

    Distances go through a softplus, not TTFNet's ReLU: a ReLU that starts negative never
    recovers (the tiny test detector's boxes stayed at zero size), a softplus always has a gradient.
    ``box_scale`` makes one unit of the raw output a typical object half-size.
    """

    def __init__(self, channels: int, num_classes: int, hidden: int = 64, box_scale: float = 16.0):
        super().__init__()

        def branch(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, out, 1))

        self.heatmap, self.box = branch(num_classes), branch(4)
        self.box_scale = box_scale
        nn.init.constant_(self.heatmap[-1].bias, -math.log((1 - PRIOR) / PRIOR))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heatmap(features), F.softplus(self.box(features)) * self.box_scale


GAUSSIAN_ALPHA = 0.54  # TTFNet's kernel size, as a fraction of the box, for heatmap and box samples


def _gaussian(out_size: tuple[int, int], cx: int, cy: int, w: float, h: float) -> torch.Tensor:
    """TTFNet's elliptical Gaussian at cell (cx, cy) for a w x h (cells) box, zero outside its
    ``alpha``-scaled box; the centre cell is exactly 1."""
    height, width = out_size
    rx, ry = max(0, int(GAUSSIAN_ALPHA * w / 2)), max(0, int(GAUSSIAN_ALPHA * h / 2))
    sx, sy = (2 * rx + 1) / 6, (2 * ry + 1) / 6
    dx = (torch.arange(width) - cx).float().view(1, -1)
    dy = (torch.arange(height) - cy).float().view(-1, 1)
    blob = torch.exp(-(dx**2 / (2 * sx**2) + dy**2 / (2 * sy**2)))
    return blob * ((dx.abs() <= rx) & (dy.abs() <= ry))


def centernet_targets(
    boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, out_size: tuple[int, int], stride: float
) -> dict[str, torch.Tensor]:
    """Training targets for one image: XYXY ``boxes`` in input pixels, ``labels`` 0..C-1.

    ``heatmap`` (C, h, w) has a Gaussian per object; ``box`` (4, h, w) holds, at every cell under
    an object's Gaussian, that object's box, and ``box_weight`` (h, w) the Gaussian normalised to
    sum to log(area) per object (TTFNet): many regression samples per object, not one.
    Smaller objects are drawn last, so they own the cells they share with larger ones.
    """
    height, width = out_size
    heatmap = torch.zeros(num_classes, height, width)
    box_target = torch.zeros(4, height, width)
    box_weight = torch.zeros(height, width)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in torch.argsort(areas, descending=True).tolist():
        x0, y0, x1, y1 = (boxes[i] / stride).tolist()
        cx = min(max(int((x0 + x1) / 2), 0), width - 1)
        cy = min(max(int((y0 + y1) / 2), 0), height - 1)
        blob = _gaussian(out_size, cx, cy, x1 - x0, y1 - y0)
        label = int(labels[i])
        torch.maximum(heatmap[label], blob, out=heatmap[label])
        inside = blob > 0
        box_target[:, inside] = boxes[i].view(4, 1)
        box_weight[inside] = blob[inside] / blob[inside].sum() * torch.log(areas[i].clamp(min=2))
    return {"heatmap": heatmap, "box": box_target, "box_weight": box_weight}


def cell_centres(out_size: tuple[int, int], stride: float,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y of every output cell's centre in input pixels, each (h, w)."""
    height, width = out_size
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                            indexing="ij")
    return (xs + 0.5) * stride, (ys + 0.5) * stride


def distances_to_boxes(distances: torch.Tensor, stride: float) -> torch.Tensor:
    """(B, 4, h, w) left/top/right/bottom distances -> (B, 4, h, w) XYXY boxes in input pixels."""
    xs, ys = cell_centres(distances.shape[-2:], stride, distances.device)
    left, top, right, bottom = distances.unbind(1)
    return torch.stack([xs - left, ys - top, xs + right, ys + bottom], dim=1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of objects."""
    prob = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos_loss = torch.log(prob) * (1 - prob) ** 2 * positive
    neg_loss = torch.log(1 - prob) * prob**2 * (1 - target) ** 4 * (1 - positive)
    return -(pos_loss.sum() + neg_loss.sum()) / positive.sum().clamp(min=1)


class EncodeTargets:
    """A training batch's collate: images stacked, targets encoded by :func:`centernet_targets`
    and stacked (``heatmap``, ``box``, ``box_weight``). Runs in the data-loading workers, so the
    encoding's Python loops overlap the model's step."""

    def __init__(self, num_classes: int, stride: float):
        self.num_classes, self.stride = num_classes, stride

    def __call__(self, samples: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict]:
        images = torch.stack([torch.as_tensor(image) for image, _ in samples])
        out_size = (round(images.shape[-2] / self.stride), round(images.shape[-1] / self.stride))
        encoded = [centernet_targets(t["boxes"], t["labels"], self.num_classes, out_size, self.stride)
                   for _, t in samples]
        return images, {key: torch.stack([e[key] for e in encoded]) for key in encoded[0]}


def centernet_loss(
    outputs: tuple[torch.Tensor, torch.Tensor], targets: dict[str, torch.Tensor],
    stride: float, box_weight: float = 5.0,
) -> dict[str, torch.Tensor]:
    """Focal loss on the heatmaps plus TTFNet's weighted GIoU loss on the boxes of every sampled
    cell; ``total`` is their weighted sum. ``targets`` are a batch's, stacked (:class:`EncodeTargets`).
    The loss is computed in float32 whatever precision the network ran in."""
    heat_logits, distances = (output.float() for output in outputs)
    heatmap = focal_loss(heat_logits, targets["heatmap"])
    weights = targets["box_weight"]
    chosen = weights > 0
    predicted = distances_to_boxes(distances, stride).permute(0, 2, 3, 1)[chosen]
    wanted = targets["box"].permute(0, 2, 3, 1)[chosen]
    giou = generalized_box_iou_loss(predicted, wanted, reduction="none")
    box = (giou * weights[chosen]).sum() / weights.sum().clamp(min=1e-4)
    return {"total": heatmap + box_weight * box, "heatmap": heatmap, "box": box}
