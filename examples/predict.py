"""Detect objects with an edgefm bundle, using only onnxruntime, numpy and Pillow.

This is what a device runs: no PyTorch, no edgefm. A bundle is the folder `edgefm compress`
writes; its bundle.json says how to feed the model and read its outputs.

    pip install onnxruntime numpy pillow
    python examples/predict.py path/to/bundle image.jpg [more.jpg ...] [--threshold 0.3]

Prints one line per detection: image, class, score and box (x0 y0 x1 y1, the image's pixels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def letterbox(image: Image.Image, size: int, fill: int) -> tuple[np.ndarray, float]:
    """Resize the longer side to `size`, pad right and bottom: (3, size, size) in [0, 1], scale."""
    scale = size / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                           Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(resized, (0, 0))
    return np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 255, scale


def peaks(heat: np.ndarray) -> np.ndarray:
    """Keep the cells that are the maximum of their 3x3 neighbourhood (the detector's NMS)."""
    height, width = heat.shape[-2:]
    padded = np.pad(heat, [(0, 0), (1, 1), (1, 1)], constant_values=-np.inf)
    neighbourhood = np.max([padded[:, dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)],
                           axis=0)
    return np.where(neighbourhood == heat, heat, 0)


def detect(session: ort.InferenceSession, bundle: dict, image: Image.Image, threshold: float) -> list:
    """(class name, score, [x0, y0, x1, y1]) of each detection in one image, best first."""
    array, scale = letterbox(image.convert("RGB"), bundle["image_size"], bundle["pad_value"])
    logits, distances = session.run(None, {session.get_inputs()[0].name: array[None]})
    heat = peaks(1 / (1 + np.exp(-logits[0])))
    classes, height, width = heat.shape
    flat = heat.reshape(-1)
    best = np.argsort(-flat, kind="stable")[:bundle["max_detections"]]
    stride, found = bundle["stride"], []
    for index in best[flat[best] >= threshold]:
        label, cell = divmod(int(index), height * width)
        y, x = divmod(cell, width)
        cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
        left, top, right, bottom = distances[0, :, y, x]
        inside = [width * stride, height * stride] * 2
        box = np.clip([cx - left, cy - top, cx + right, cy + bottom], 0, inside)
        box = np.clip(box / scale, 0, [image.width, image.height] * 2)
        found.append((bundle["class_names"][label], float(flat[index]), [float(v) for v in box]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the folder written by `edgefm compress`")
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--threshold", type=float, default=0.3, help="lowest score printed")
    parser.add_argument("--ort", action="store_true", help="load the .ort model instead of the .onnx one")
    args = parser.parse_args()
    bundle = json.loads((args.bundle / "bundle.json").read_text(encoding="utf-8"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    model = bundle["ort_model"] if args.ort else bundle["model"]
    session = ort.InferenceSession(str(args.bundle / model), options, providers=["CPUExecutionProvider"])
    for path in args.images:
        with Image.open(path) as image:
            for name, score, box in detect(session, bundle, image, args.threshold):
                print(f"{path}\t{name}\t{score:.3f}\t" + " ".join(f"{v:.1f}" for v in box))


if __name__ == "__main__":
    main()
