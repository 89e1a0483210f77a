"""Detections from the head's raw maps, in NumPy only: the same decoder for PyTorch, ONNX Runtime
and a device without PyTorch.

It keeps the local maxima of the class heatmaps (a 3x3 max filter stands in for NMS, as in
CenterNet) and the best ``max_detections`` of them; each peak's box is the four distances the
head predicts at that cell (TTFNet's regression). It imports nothing but NumPy, so the deployed
path (:mod:`edgefm.runtime`) uses it without PyTorch.
"""

from __future__ import annotations

import numpy as np


def _max_filter3(x: np.ndarray) -> np.ndarray:
    """3x3 maximum over the last two axes (edges padded with -inf)."""
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], constant_values=-np.inf)
    height, width = x.shape[-2:]
    shifted = [padded[..., dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    return np.max(shifted, axis=0)


def decode(
    heat_logits: np.ndarray, distances: np.ndarray, stride: float,
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
        cx, cy = (xs + 0.5) * stride, (ys + 0.5) * stride
        left, top_, right, bottom = (distances[b, i, ys, xs] for i in range(4))
        boxes = np.stack([cx - left, cy - top_, cx + right, cy + bottom], axis=1).astype(np.float32)
        np.clip(boxes, 0, [width * stride, height * stride] * 2, out=boxes)
        results.append({"boxes": boxes, "scores": flat[top].astype(np.float32),
                        "labels": labels.astype(np.int64)})
    return results
