"""Images with Pillow and NumPy only: reading, letterboxing, drawing detections.

The training pipeline letterboxes with ``torchvision`` (:class:`edgefm.data.transforms.Letterbox`);
a device has no PyTorch, so :func:`letterbox` does the same with Pillow: the longer side resized to
the model's input (bilinear, antialiased when shrinking, as torchvision's), the rest padded right
and bottom with grey, so a box maps back to the original image by one division by ``scale``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from edgefm.errors import ImageError

PAD_VALUE = 114  # the grey of the padding (YOLO's), here and in edgefm.data.transforms.Letterbox
# A qualitative palette (matplotlib's tab10): one colour per class index, repeating.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def read_image(path: Path | str) -> Image.Image:
    """Open an image as RGB in its displayed orientation (EXIF's, as a phone photo is shown),
    failing with its path if it is missing or not a readable image."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageError(f"{path}: cannot read image ({error})") from error


def letterbox(image: Image.Image, size: int, fill: int = PAD_VALUE) -> tuple[np.ndarray, float]:
    """``(3, size, size)`` float32 in [0, 1] and ``scale`` (new / original side)."""
    width, height = image.size
    scale = size / max(width, height)
    resized = image.convert("RGB").resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                          Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(resized, (0, 0))
    return np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 255, scale


def draw_detections(image: Image.Image, detections: dict, class_names: list[str]) -> Image.Image:
    """A copy of ``image`` with each detection's box and ``name score`` drawn in its class colour."""
    drawn = image.convert("RGB")
    pen = ImageDraw.Draw(drawn)
    found = zip(detections["boxes"], detections["labels"], detections["scores"], strict=True)
    for box, label, score in found:
        colour = PALETTE[int(label) % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        pen.rectangle((x0, y0, x1, y1), outline=colour, width=max(1, round(max(image.size) / 200)))
        text = f"{class_names[int(label)]} {float(score):.2f}"
        left, top, right, bottom = pen.textbbox((x0, y0), text, anchor="lb")
        pen.rectangle((left, top, right, bottom), fill=colour)
        pen.text((x0, y0), text, fill="white", anchor="lb")
    return drawn
