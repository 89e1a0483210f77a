"""Figures shared by the book and the command line: images with boxes and labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import patches
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from edgefm.data.coco import CocoDetection
from edgefm.runtime.images import PALETTE


def draw_boxes(
    ax: Axes,
    image: torch.Tensor | np.ndarray,
    boxes: torch.Tensor | np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    scores: Sequence[float] | None = None,
) -> None:
    """Show ``image`` (CHW tensor or HWC array) with XYXY ``boxes`` labelled by class (and score)."""
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).numpy() if image.ndim == 3 else image.numpy()
    ax.imshow(image)
    ax.set_axis_off()
    for i, (box, label) in enumerate(zip(np.asarray(boxes, dtype=float), labels, strict=True)):
        x0, y0, x1, y1 = box
        colour = PALETTE[int(label) % len(PALETTE)]
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.2, ec=colour))
        text = class_names[int(label)] + (f" {scores[i]:.2f}" if scores is not None else "")
        ax.text(x0, y0, text, fontsize=5, color="white", va="bottom",
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 0.6, "alpha": 0.85})


def sample_grid(dataset: CocoDetection, indices: Sequence[int], columns: int = 4) -> Figure:
    """A grid of dataset samples with their ground-truth boxes and class names."""
    from matplotlib import pyplot as plt

    rows = -(-len(indices) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, index in zip(axes.flat, indices, strict=False):
        image, target = dataset[index]
        draw_boxes(ax, image, target["boxes"], target["labels"].tolist(), dataset.class_names)
    fig.tight_layout()
    return fig
