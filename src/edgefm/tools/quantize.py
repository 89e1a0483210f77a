"""INT8 post-training quantization of an exported detector with ``onnxruntime.quantization``.

A :class:`QuantRecipe` says what to do: *dynamic* (weights INT8 on disk, activations scaled at
run time) or *static* QDQ (activation scales fixed from calibration scenes, MinMax, Entropy or
Percentile), weights per channel or per tensor, unsigned or signed activations, ``reduce_range``
(7-bit weights, for CPUs without VNNI whose 8-bit multiply-adds can saturate). Only the listed
op types are quantized (MatMul, Conv, Gemm: the products that carry the time), and layers whose
module path is in ``keep_fp32`` stay in FP32: ORT's default would also quantize Softmax, Add and
LayerNorm, and ViTs collapse when it does. Entropy calibration is run here with a histogram of
:data:`ENTROPY_BINS` bins: ``quantize_static`` would keep its default of 128 bins for 128
quantized levels, which leaves the KL search one candidate, the full range (MinMax again).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.calibrate import save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgefm.artifacts import atomic_path
from edgefm.data.coco import CocoDetection, CocoSplit, collate
from edgefm.data.transforms import detection_transforms
from edgefm.tools.export import node_scopes

CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
WEIGHT_OPS = ("MatMul", "Conv", "Gemm")
ENTROPY_BINS = 2048  # the histogram the KL search cuts down to 128 levels (TensorRT's choice)


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize; ``keep_fp32`` and ``only`` are module-path prefixes (``head``,
    ``backbone.vit.blocks.3``), matched against the scope each exported node records."""

    name: str
    mode: str = "static"  # "dynamic" or "static"
    calibration: str = "minmax"
    per_channel: bool = True
    activations: str = "u8"  # "u8" or "s8"
    reduce_range: bool = False
    op_types: tuple[str, ...] = WEIGHT_OPS
    keep_fp32: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None  # quantize just these scopes (the sensitivity scan)
    weights_only: bool = False  # only products with a weight (not attention's two activation MatMuls)

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static"):
            raise ValueError(f"recipe {self.name!r}: mode must be 'dynamic' or 'static', not {self.mode!r}")
        if self.calibration not in CALIBRATION:
            raise ValueError(f"recipe {self.name!r}: calibration must be one of {sorted(CALIBRATION)}")
        if self.activations not in ("u8", "s8"):
            raise ValueError(f"recipe {self.name!r}: activations must be 'u8' or 's8'")


class CalibrationScenes(CalibrationDataReader):
    """The first ``count`` scenes of a split (never the eval split), preprocessed like eval."""

    def __init__(self, split: CocoSplit, image_size: int, count: int, input_name: str = "images",
                 batch_size: int = 8):
        dataset = CocoDetection(split, detection_transforms(image_size, train=False))
        indices = range(min(count, len(dataset)))
        self.batches = [collate([dataset[i] for i in indices[start:start + batch_size]])[0].numpy()
                        for start in range(0, len(indices), batch_size)]
        self.input_name = input_name
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iterator, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._iterator = iter(self.batches)


def preprocess(src: Path | str, dst: Path | str) -> Path:
    """``quant_pre_process``: shape inference and graph clean-up, which quantization needs first."""
    with atomic_path(dst) as tmp, _quiet():
        quant_pre_process(str(src), str(tmp), skip_symbolic_shape=False)
    return Path(dst)


def selected_nodes(exported: Path | str, recipe: QuantRecipe) -> tuple[list[str] | None, list[str]]:
    """``(nodes_to_quantize, nodes_to_exclude)`` for ORT from the recipe's module prefixes."""
    scopes = node_scopes(exported)

    def under(scope: str, prefixes: tuple[str, ...]) -> bool:
        return any(scope == p or scope.startswith(p + ".") for p in prefixes)

    exclude = {name for name, scope in scopes.items() if under(scope, recipe.keep_fp32)}
    if recipe.weights_only:
        exclude |= set(activation_products(exported, recipe.op_types))
    only = None if recipe.only is None else sorted(n for n, s in scopes.items() if under(s, recipe.only))
    return only, sorted(exclude)


def activation_products(exported: Path | str, op_types: tuple[str, ...]) -> list[str]:
    """The nodes of ``op_types`` that multiply two activations (no initializer among their
    inputs): in a ViT, attention's query-key and attention-value MatMuls."""
    graph = onnx.load(str(exported), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type in op_types and not weights & set(n.input)]


def quantize(exported: Path | str, preprocessed: Path | str, dst: Path | str, recipe: QuantRecipe,
             calibration: CalibrationDataReader | None = None) -> Path:
    """Quantize ``preprocessed`` (from :func:`preprocess` of ``exported``, whose node scopes name
    the layers) with ``recipe``; static recipes read ``calibration``."""
    only, exclude = selected_nodes(exported, recipe)
    common = dict(op_types_to_quantize=list(recipe.op_types), per_channel=recipe.per_channel,
                  reduce_range=recipe.reduce_range, weight_type=QuantType.QInt8,
                  nodes_to_quantize=only, nodes_to_exclude=exclude)
    with atomic_path(dst) as tmp, _quiet():
        if recipe.mode == "dynamic":
            quantize_dynamic(str(preprocessed), str(tmp), **common)
        else:
            if calibration is None:
                raise ValueError(f"recipe {recipe.name!r} is static: it needs calibration scenes")
            activation = QuantType.QUInt8 if recipe.activations == "u8" else QuantType.QInt8
            with tempfile.TemporaryDirectory() as folder:
                ranges = (entropy_ranges(preprocessed, recipe, calibration, Path(folder))
                          if recipe.calibration == "entropy" else None)
                calibration.rewind()
                quantize_static(str(preprocessed), str(tmp), calibration, quant_format=QuantFormat.QDQ,
                                activation_type=activation, calibrate_method=CALIBRATION[recipe.calibration],
                                extra_options={"CalibTensorRangeSymmetric": recipe.activations == "s8"},
                                calibration_cache_path=ranges, **common)
    return Path(dst)


def entropy_ranges(preprocessed: Path | str, recipe: QuantRecipe, calibration: CalibrationDataReader,
                   folder: Path) -> Path:
    """Activation ranges by Entropy calibration over a histogram of :data:`ENTROPY_BINS` bins,
    saved where ``quantize_static`` reads a calibration cache (``folder/ranges.json``)."""
    calibrator = create_calibrator(Path(preprocessed), list(recipe.op_types),
                                   augmented_model_path=str(folder / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128,
                                                  "symmetric": recipe.activations == "s8"})
    calibration.rewind()
    calibrator.collect_data(calibration)
    save_tensors_data(calibrator.compute_data(), folder / "ranges.json")
    return folder / "ranges.json"


@contextlib.contextmanager
def _quiet():
    """ORT's quantizer logs and prints per-tensor chatter; a chapter wants none of it."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
