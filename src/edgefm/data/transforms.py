"""Detection transforms: letterbox to a square input, flips and photometric jitter.

Built on ``torchvision.transforms.v2``, which moves ``BoundingBoxes`` with the pixels. The
letterbox keeps the aspect ratio and pads only right and bottom, so mapping a prediction back to
the original image is a single division by ``target["scale"]``.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from edgefm.runtime.images import PAD_VALUE

# ImageNet statistics: what MAE and timm backbones are pretrained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Letterbox(torch.nn.Module):
    """Resize the longer side to ``size`` and pad to ``size x size`` (right/bottom).

    Records ``target["scale"]`` (new / original) so detections map back to the original image.
    """

    def __init__(self, size: int, fill: int = PAD_VALUE):
        super().__init__()
        self.size, self.fill = size, fill

    def forward(self, image: tv_tensors.Image, target: dict) -> tuple[tv_tensors.Image, dict]:
        height, width = image.shape[-2:]
        scale = self.size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        padding = [0, 0, self.size - new_w, self.size - new_h]
        image = F.pad(F.resize(image, [new_h, new_w], antialias=True), padding, fill=self.fill)
        target = {**target, "scale": scale}
        if "boxes" in target:  # prediction has none
            target["boxes"] = F.pad(F.resize(target["boxes"], [new_h, new_w]), padding)
        return image, target


def detection_transforms(size: int, train: bool) -> v2.Compose:
    """The input pipeline: letterbox, (train only) flip and colour jitter, float in [0, 1].

    The jitter leaves hue alone: shifting it cost two thirds of a sample's augmentation time
    (2.9 of 4.5 ms at 128 px), which made data loading the bottleneck of a GPU run, and the
    scenes' items are tinted at random anyway."""
    steps: list[torch.nn.Module] = [Letterbox(size)]
    if train:
        steps += [v2.RandomHorizontalFlip(p=0.5), v2.ColorJitter(0.2, 0.2, 0.2)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=1.0)]
    return v2.Compose(steps)
