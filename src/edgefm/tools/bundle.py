"""The edge bundle: the folder a device runs model C from, and its model card.

A bundle holds C as ONNX and in ONNX Runtime's mobile ``.ort`` format (:func:`to_ort_format`),
``bundle.json`` (what :class:`~edgefm.runtime.EdgeDetector` needs to letterbox, run and decode),
and ``model-card.md`` (:func:`model_card`: what the model is, how it was made and measured).
:func:`agreement_with` checks that the bundle, run without PyTorch, detects what the model did in
PyTorch. :mod:`edgefm.stages.deploy` makes C and writes the bundle with these functions.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from edgefm.artifacts import atomic_write_json
from edgefm.config import DetectorConfig
from edgefm.data.coco import CocoSplit
from edgefm.models.detector import Detector
from edgefm.runtime import BUNDLE_FILE, BundleSpec, EdgeDetector, detect
from edgefm.runtime.images import read_image
from edgefm.tools.evaluate import detection_agreement, torch_runner
from edgefm.tools.export import onnx_files
from edgefm.tools.isa import has_vnni

MODEL_FILE, CARD_FILE = "model.onnx", "model-card.md"


def to_ort_format(model: Path) -> Path:
    """``model.ort`` beside ``model.onnx``: ONNX Runtime's flatbuffer format, which its minimal
    (mobile) builds load, with the graph optimisations applied at conversion
    (``onnxruntime.tools.convert_onnx_models_to_ort``, fixed optimisations, no x86-only layouts).
    The tool also writes ``model.required_operators.config``: the operators a reduced build of
    ONNX Runtime for the device must include."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    logger = logging.getLogger("ort_format_model.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            convert_onnx_models_to_ort(model, output_dir=model.parent,
                                       optimization_styles=[OptimizationStyle.Fixed])
    finally:
        logger.setLevel(level)
    return model.with_suffix(".ort")


def write_bundle(folder: Path, model: Path, class_names: list[str], detector: DetectorConfig, stride: float,
                 name: str = "", int8: dict | None = None) -> BundleSpec:
    """Copy ``model`` (an ONNX detector with its data files) into ``folder`` with its ``.ort``
    twin and ``bundle.json``: everything :class:`~edgefm.runtime.EdgeDetector` needs."""
    folder.mkdir(parents=True, exist_ok=True)
    files = onnx_files(model)
    if len(files) > 1:
        raise ValueError(f"{model}: keeps its weights in {files[1].name}; a bundle takes one-file models")
    shutil.copyfile(model, folder / MODEL_FILE)
    ort_model = to_ort_format(folder / MODEL_FILE)
    spec = BundleSpec(model=MODEL_FILE, ort_model=ort_model.name, class_names=list(class_names),
                      image_size=detector.image_size, stride=float(stride),
                      max_detections=detector.max_detections, score_threshold=detector.score_threshold,
                      name=name, int8=int8)
    atomic_write_json(folder / BUNDLE_FILE, asdict(spec))
    return spec


def agreement_with(reference: Detector, detector: EdgeDetector, split: CocoSplit, count: int) -> dict:
    """How closely the bundle's detections (its own Pillow letterbox, ONNX Runtime, NumPy
    decoder) follow ``reference``'s in PyTorch on the same ``count`` image files."""
    records = json.loads(split.annotations.read_text(encoding="utf-8"))["images"][:count]
    images = [read_image(split.images / r["file_name"]) for r in records]
    ours = detect(torch_runner(reference), images, detector.spec)
    return {"images": len(images), **detection_agreement(ours, detector.detect(images))}


def model_card(spec: BundleSpec, c: dict, a: dict, report: list[dict], context: dict) -> str:
    """``model-card.md``: what the model is, how it was made and measured, and its figures."""
    rows = "\n".join(
        f"| {r['name']} | {r['map']:.3f} | {r['map50']:.3f} | {r['latency_ms_1t']:.2f} "
        f"| {r['latency_ms_2t']:.2f} "
        f"| {r['latency_speedup_2t']:.2f}x | {r['size_bytes'] / 1e6:.2f} MB | {r['size_reduction']:.1f}x |"
        for r in (a, c))
    goals = "\n".join(f"| {g['target']} ({g['origin']}) | {g['value']:.3g} | {g['verdict']} |"
                      for g in report)
    machine = context["machine"]
    return f"""# Model card: {spec.name}

An object detector for the {len(spec.class_names)} classes below, made by `edgefm compress`
(profile `{context['profile']}`): model B, a student cut from the feasibility model A
({context['b_description']}), in INT8 by {context['recipe_description']}.
Figures come from one benchmark run, against model A in PyTorch FP32.

## Use

```
edgefm predict --model <this folder> image.jpg        # ONNX Runtime, no PyTorch
python examples/predict.py <this folder> image.jpg     # onnxruntime, numpy and Pillow only
```

Input: RGB, letterboxed to {spec.image_size} x {spec.image_size} (longer side resized, padded right and
bottom with grey {spec.pad_value}), float32 in [0, 1], NCHW; the model normalises inside its graph.
Outputs: class heatmap logits and box distances (left, top, right, bottom, in input pixels) on a
grid of stride {spec.stride:.4g} px; decode with a 3x3 peak filter, the best {spec.max_detections} peaks
(`edgefm.runtime.decode.decode`). Files: `{spec.model}` (ONNX), `{spec.ort_model}` (ONNX Runtime's format
for its mobile builds), `model.required_operators.config` (the operators a reduced build of ONNX
Runtime must include), `bundle.json`.

Classes: {", ".join(spec.class_names)}.

## Measured

On the {context['eval_images']} evaluation scenes (COCO mAP@[.5:.95] and mAP@.5), batch 1, median of
{context['runs']} runs per thread count, on {machine['cpu']} with ONNX Runtime {machine['onnxruntime']}:

| model | mAP | mAP@.5 | ms, 1 thread | ms, 2 threads | faster than A | file | smaller than A |
|---|---|---|---|---|---|---|---|
{rows}

| target | measured | |
|---|---|---|
{goals}

## Limits

{context['limits']}
"""


def b_description(config: dict, a_depth: int) -> str:
    """B's shape in words, from its :class:`~edgefm.config.StudentConfig` record."""
    pixels = config["image_size"]
    size = f", its input resized to {pixels} px inside the graph" if pixels else ""
    heads = "all of their heads" if not config["heads"] else f"{1 - config['heads']:.0%} of their heads"
    return (f"{config['depth']} of A's {a_depth} ViT blocks, {1 - config['width']:.0%} of the channels, "
            f"{heads}{size}")


DATASETS = {"fashion-scenes": "synthetic scenes of Fashion-MNIST items on textured backgrounds: it has "
                              "never seen a real photograph",
            "pennfudan": "the 170 Penn-Fudan street photographs: far too few for a general pedestrian "
                         "detector"}


def limits(source: str, machine: dict) -> str:
    """The model card's limits: what the model was trained on and what the timings depend on."""
    vnni = has_vnni(machine["isa"])
    return (f"Trained on {DATASETS.get(source, source)}. Latency is this machine's ({machine['cpu']}, "
            f"{machine['cores']} cores, {'with' if vnni else 'without'} VNNI); other CPUs give other "
            "numbers, and INT8 gains most where the CPU has 8-bit dot-product instructions.")


def copy_bundle(results: dict, destination: Path) -> Path:
    """Copy the built bundle to ``destination`` (a new or empty folder)."""
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination}: not empty; give a new folder for the bundle")
    shutil.copytree(results["bundle_folder"], destination, dirs_exist_ok=True)
    return destination
