"""Running a detector on a device: ONNX Runtime, NumPy and Pillow, no PyTorch.

A *bundle* is a folder that holds everything a device needs (written by :mod:`edgefm.stages.deploy`):
the model (``.onnx``, and the same graph in ONNX Runtime's mobile ``.ort`` format) and
``bundle.json``, which says how to feed it (input size, letterbox padding; the normalisation is
inside the graph) and how to read it (class names, the decoder's stride and limits).
:class:`EdgeDetector` opens one and turns images into boxes; ``edgefm predict --model`` and
``examples/predict.py`` use it or its recipe. This module, :mod:`edgefm.runtime.images` and
:mod:`edgefm.runtime.decode` import no PyTorch: the deployed path is the path the book measures.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from edgefm.errors import BundleError, InputError
from edgefm.runtime.decode import decode
from edgefm.runtime.images import PAD_VALUE, letterbox

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "edgefm-bundle/1"
# A model as evaluation sees it: float32 images (B, 3, S, S) in [0, 1] -> the head's raw arrays.
RunModel = Callable[[np.ndarray], tuple[np.ndarray, ...]]
LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxModelError(InputError, ValueError):
    """A missing, corrupt or unusable ONNX model (the message names the file)."""


def open_session(path: Path | str, threads: int = 2, level: str = "all",
                 spin: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and an optimisation level
    (``disabled``, ``basic``, ``extended``, ``all``).

    ``spin=False`` stops its threads from busy-waiting once a run returns (they still spin
    within a run): needed when several models take turns on the same cores (a benchmark), where
    threads left spinning would steal the next model's time.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX model")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidProtobuf/NoSuchFile types
        raise OnnxModelError(f"{path}: ONNX Runtime cannot load it ({error})") from error


def onnx_runner(session: ort.InferenceSession) -> RunModel:
    """Wrap a session as :data:`RunModel` (images in [0, 1] -> raw outputs).

    A model exported with a fixed batch runs a larger batch in slices of its size."""
    name, batch = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]

    def run(images: np.ndarray) -> tuple[np.ndarray, ...]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if not isinstance(batch, int) or len(images) == batch:
            return tuple(session.run(None, {name: images}))
        parts = [session.run(None, {name: images[i:i + batch]}) for i in range(0, len(images), batch)]
        return tuple(np.concatenate(outputs) for outputs in zip(*parts, strict=True))

    return run


@dataclass(frozen=True)
class BundleSpec:
    """What ``bundle.json`` holds: the files, the input and the decoder of a deployed detector.

    The model takes ``(B, 3, image_size, image_size)`` float32 RGB in [0, 1], letterboxed (longer
    side resized, padded right and bottom with ``pad_value``); it normalises inside the graph
    (``mean``/``std`` are recorded for reference). It returns class heatmap logits and box
    distances on a grid of ``stride`` input pixels per cell (fractional for a model that resizes
    its input inside the graph). ``int8`` says how an INT8 model was made and whether it was
    checked to compute the same on CPUs without VNNI (:mod:`edgefm.tools.isa`).
    """

    model: str
    class_names: list[str]
    image_size: int
    stride: float
    ort_model: str | None = None
    pad_value: int = PAD_VALUE
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    max_detections: int = 100
    score_threshold: float = 0.01
    name: str = ""
    int8: dict | None = None
    format: str = BUNDLE_FORMAT


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What each field of bundle.json must hold, and how to say it.
_FIELD_CHECKS = {
    "model": (lambda v: isinstance(v, str) and v != "", "a file name"),
    "ort_model": (lambda v: v is None or (isinstance(v, str) and v != ""), "a file name or null"),
    "class_names": (lambda v: isinstance(v, list) and v != [] and all(isinstance(n, str) for n in v),
                    "a non-empty list of names"),
    "image_size": (lambda v: _whole(v) and v > 0, "a positive integer"),
    "stride": (lambda v: _number(v) and v > 0, "a positive number"),
    "pad_value": (lambda v: _whole(v) and 0 <= v <= 255, "an integer in 0..255"),
    "mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_number, v)), "3 numbers"),
    "std": (lambda v: isinstance(v, list) and len(v) == 3 and all(_number(x) and x > 0 for x in v),
            "3 positive numbers"),
    "max_detections": (lambda v: _whole(v) and v > 0, "a positive integer"),
    "score_threshold": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "name": (lambda v: isinstance(v, str), "a string"),
    "int8": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}


def read_bundle(folder: Path | str) -> BundleSpec:
    """The :class:`BundleSpec` of a bundle folder, checked: its files exist and it is our format."""
    folder = Path(folder)
    path = folder / BUNDLE_FILE
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    if not path.is_file():
        raise BundleError(f"{path}: not found ({folder} is not a bundle written by `edgefm compress`)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(record, dict) or record.get("format") != BUNDLE_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise BundleError(f"{path}: format is {found!r}, expected {BUNDLE_FORMAT!r}")
    known = {f.name for f in fields(BundleSpec)}
    missing = sorted({"model", "class_names", "image_size", "stride"} - set(record))
    if missing:
        raise BundleError(f"{path}: missing {', '.join(missing)}")
    for name, value in record.items():
        if name in _FIELD_CHECKS and not _FIELD_CHECKS[name][0](value):
            raise BundleError(f"{path}: {name} must be {_FIELD_CHECKS[name][1]}, got {value!r}")
    spec = BundleSpec(**{k: v for k, v in record.items() if k in known})
    for name in (spec.model, spec.ort_model):
        if name is not None and not (folder / name).is_file():
            raise BundleError(f"{path}: names {name}, which is not in {folder}")
    return spec


class EdgeDetector:
    """A bundle opened in ONNX Runtime: images in, boxes in the images' own pixels out.

    ``use_ort_format`` runs the ``.ort`` file (what a mobile build of ONNX Runtime loads) instead
    of the ``.onnx`` one; both hold the same graph.
    """

    def __init__(self, folder: Path | str, threads: int = 2, use_ort_format: bool = False):
        self.folder = Path(folder)
        self.spec = read_bundle(self.folder)
        if use_ort_format and self.spec.ort_model is None:
            raise BundleError(f"{self.folder / BUNDLE_FILE}: the bundle has no .ort model")
        self.path = self.folder / (self.spec.ort_model if use_ort_format else self.spec.model)
        self.session = open_session(self.path, threads=threads)
        self._check(self.session)
        self.run = onnx_runner(self.session)

    def _check(self, session: ort.InferenceSession) -> None:
        """Fail now, naming the file, if the model does not fit what bundle.json says."""
        size, classes = self.spec.image_size, len(self.spec.class_names)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 2:
            raise BundleError(f"{self.path}: the model has {len(inputs)} inputs and {len(outputs)} outputs; "
                              "a detector has 1 (images) and 2 (heatmap logits, box distances)")
        if isinstance(outputs[1].shape[1], int) and outputs[1].shape[1] != 4:
            raise BundleError(f"{self.path}: the second output has {outputs[1].shape[1]} channels, not the "
                              "4 box distances")
        shape, channels = list(inputs[0].shape[1:]), outputs[0].shape[1]
        if shape != [3, size, size]:
            raise BundleError(f"{self.path}: the model takes {shape} images, but "
                              f"{self.folder / BUNDLE_FILE} says {size} px")
        if isinstance(channels, int) and channels != classes:
            raise BundleError(f"{self.path}: the model predicts {channels} classes, but "
                              f"{self.folder / BUNDLE_FILE} names {classes}")

    def detect(self, images: Sequence[Image.Image], score_threshold: float | None = None) -> list[dict]:
        """:func:`detect` with this bundle's model."""
        return detect(self.run, images, self.spec, score_threshold)


def detect(run: RunModel, images: Sequence[Image.Image], spec: BundleSpec,
           score_threshold: float | None = None) -> list[dict]:
    """Detections per image, from any runtime's ``run``: ``boxes`` (XYXY, in the image's own
    pixels), ``scores``, ``labels`` (class indices) and ``names``, best first."""
    boxed = [letterbox(image, spec.image_size, spec.pad_value) for image in images]
    outputs = run(np.stack([array for array, _ in boxed]))
    threshold = spec.score_threshold if score_threshold is None else score_threshold
    found = decode(*outputs, stride=spec.stride, max_detections=spec.max_detections,
                   score_threshold=threshold)
    for detections, image, (_, scale) in zip(found, images, boxed, strict=True):
        boxes = detections["boxes"] / scale
        np.clip(boxes, 0, [image.width, image.height] * 2, out=boxes)
        detections["boxes"] = boxes
        detections["names"] = [spec.class_names[i] for i in detections["labels"]]
    return found
