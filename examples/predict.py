"""Detect objects with an edgefm bundle, using only onnxruntime, numpy and Pillow.

This is what a device runs: no PyTorch, no edgefm. A bundle is the folder `edgefm compress`
writes; its bundle.json says how to feed the model and read its outputs.

    pip install onnxruntime numpy pillow
    python examples/predict.py path/to/bundle image.jpg [more.jpg ...] [--threshold 0.3]

Prints one line per detection: image, class, score and box (x0 y0 x1 y1, the image's pixels).
A bad bundle stops it with one line (exit status 2); an unreadable image is reported and skipped
(exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps, UnidentifiedImageError

# What bundle.json may leave out, as edgefm's own reader fills it in.
DEFAULTS = {"pad_value": 114, "max_detections": 100, "ort_model": None}


class BadInput(Exception):
    """Something the user gave cannot be used; the message names it."""


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


def open_bundle(folder: Path, use_ort: bool) -> tuple[ort.InferenceSession, dict]:
    """The bundle's model in ONNX Runtime and its bundle.json, checked."""
    path = folder / "bundle.json"
    try:
        bundle = {**DEFAULTS, **json.loads(path.read_text(encoding="utf-8"))}
    except (OSError, ValueError) as error:
        raise BadInput(f"{path}: cannot read the bundle ({error})") from None
    missing = [k for k in ("model", "class_names", "image_size", "stride") if k not in bundle]
    if missing:
        raise BadInput(f"{path}: missing {', '.join(missing)}")
    model = bundle["ort_model"] if use_ort else bundle["model"]
    if model is None:
        raise BadInput(f"{path}: the bundle has no .ort model")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    try:
        session = ort.InferenceSession(str(folder / model), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises its own types
        raise BadInput(f"{folder / model}: ONNX Runtime cannot load it ({error})") from None
    if len(session.get_outputs()) != 2:
        outputs = len(session.get_outputs())
        raise BadInput(f"{folder / model}: not a detector (it has {outputs} outputs, not 2)")
    return session, bundle


def read_image(path: Path) -> Image.Image:
    """The image as RGB in its displayed orientation (EXIF's)."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise BadInput(f"{path}: cannot read image ({error})") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="the folder written by `edgefm compress`")
    parser.add_argument("images", type=Path, nargs="+")
    parser.add_argument("--threshold", type=float, default=0.3, help="lowest score printed")
    parser.add_argument("--ort", action="store_true", help="load the .ort model instead of the .onnx one")
    args = parser.parse_args()
    try:
        session, bundle = open_bundle(args.bundle, args.ort)
    except BadInput as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.images:
        try:
            image = read_image(path)
        except BadInput as error:
            print(f"predict.py: skipped: {error}", file=sys.stderr)
            failed += 1
            continue
        for name, score, box in detect(session, bundle, image, args.threshold):
            print(f"{path}\t{name}\t{score:.3f}\t" + " ".join(f"{v:.1f}" for v in box))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
