"""Quantization-aware fine-tuning (QAT): A learns to live with INT8 rounding, then exports as QDQ.

Every Linear, Conv2d and ConvTranspose2d is wrapped in :class:`FakeQuant`, which rounds its input
and output to unsigned 8 bits per tensor (scale from a running min/max) and its weight to signed
7 bits per output channel (:data:`WEIGHT_LEVELS`): ONNX Runtime's static QDQ scheme, with
``reduce_range``'s weights. The rounding uses PyTorch's core
``fake_quantize_*`` ops, whose gradient passes straight through; the dynamo exporter lowers them
to QuantizeLinear/DequantizeLinear, and :func:`fold_weight_quantizers` stores the rounded weights
as INT8 so the file shrinks and ONNX Runtime runs integer kernels. (``torch.ao.quantization``'s
eager and FX flows are deprecated; these ops are not.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from edgefm.artifacts import atomic_path
from edgefm.config import QatConfig
from edgefm.data.coco import CocoDetection
from edgefm.models.centernet import EncodeTargets, centernet_loss
from edgefm.models.detector import Detector
from edgefm.tools.training import Schedule, StepData, TrainState, fit, step_batches

QUANTIZED_LAYERS = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
# Weights are rounded to 7 bits: scaled so the largest magnitude of each channel is 63. ONNX
# Runtime's u8 x s8 kernels on x86 CPUs without VNNI add pairs of products in 16 bits
# (vpmaddubsw), which saturates for 8-bit weights (2 x 255 x 127 > 32,767) and computes other
# outputs than on a VNNI CPU; with |w| <= 63 (2 x 255 x 63 = 32,130) no pair can, so the same
# file gives the same detections on every x86 CPU. (The INT8 type stays, as the exporter needs.)
WEIGHT_LEVELS = 63


class Rounding(nn.Module):
    """Unsigned 8-bit fake quantization of a tensor, per tensor, over a running min/max range."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum, self.observing = momentum, True
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("seen", torch.tensor(False))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Move the range towards this batch's (the first batch sets it); 0 stays inside."""
        low, high = x.min().clamp(max=0.0), x.max().clamp(min=0.0)
        if not self.seen:
            self.low.copy_(low), self.high.copy_(high), self.seen.fill_(True)
        else:
            self.low.lerp_(low, self.momentum), self.high.lerp_(high, self.momentum)
        self.scale.copy_((self.high - self.low).clamp(min=1e-8) / 255)
        self.zero_point.copy_(torch.round(-self.low / self.scale).clamp(0, 255).to(torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.observing:
            self.observe(x)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)


class FakeQuant(nn.Module):
    """A layer of :data:`QUANTIZED_LAYERS` computing on INT8-rounded input and weight, its output
    rounded too (before a Linear's bias): the places ONNX Runtime's static QDQ recipe puts
    QuantizeLinear, so the export fuses into integer kernels. Values stay float. The weight's
    output channels are its axis 0, or 1 for a transposed convolution."""

    def __init__(self, layer: nn.Linear | nn.Conv2d | nn.ConvTranspose2d, momentum: float = 0.01):
        super().__init__()
        self.layer = layer
        self.axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
        self.inputs, self.outputs = Rounding(momentum), Rounding(momentum)

    def weight_scale(self) -> torch.Tensor:
        """Symmetric per-output-channel scale of the current weight (no gradient: STE)."""
        weight = self.layer.weight.detach()
        dims = [d for d in range(weight.ndim) if d != self.axis]
        return (weight.abs().amax(dim=dims).clamp(min=1e-8) / WEIGHT_LEVELS).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inputs(x)
        # a frozen model (for export) uses stored weight scales, which become graph constants
        scale = self.frozen_scale if hasattr(self, "frozen_scale") else self.weight_scale()
        weight = torch.fake_quantize_per_channel_affine(self.layer.weight, scale, torch.zeros_like(
            scale, dtype=torch.int32), self.axis, -128, 127)
        layer = self.layer
        if isinstance(layer, nn.Linear):
            out = self.outputs(F.linear(x, weight))
            return out if layer.bias is None else out + layer.bias
        if isinstance(layer, nn.ConvTranspose2d):
            return self.outputs(F.conv_transpose2d(x, weight, layer.bias, layer.stride, layer.padding,
                                                   layer.output_padding, layer.groups, layer.dilation))
        return self.outputs(F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                                     layer.groups))


def prepare_qat(model: nn.Module) -> nn.Module:
    """Wrap every layer of :data:`QUANTIZED_LAYERS` in ``model``, in place."""
    for name, child in model.named_children():
        if isinstance(child, QUANTIZED_LAYERS):
            setattr(model, name, FakeQuant(child))
        else:
            prepare_qat(child)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Fix every weight scale as a buffer, so an export sees constants, not a computation."""
    for module in model.modules():
        if isinstance(module, FakeQuant):
            module.register_buffer("frozen_scale", module.weight_scale(), persistent=False)
    return model.eval()


def set_observing(model: nn.Module, observing: bool) -> None:
    """Freeze (False) or resume (True) the running ranges."""
    for module in model.modules():
        if isinstance(module, Rounding):
            module.observing = observing


def qat_finetune(model: Detector, train: CocoDetection, cfg: QatConfig, work: Path,
                 progress: bool = True, device: str = "auto") -> TrainState:
    """Fine-tune the wrapped ``model`` for ``cfg.steps`` on ``train``; resumes from ``work``.

    The first ``cfg.calibration_batches`` batches only set the input ranges (no update), so
    training starts from sensible scales; the ranges freeze at ``cfg.freeze_fraction`` of the run
    so the last steps fit the weights to the scales that will be exported. The model is left on
    the CPU.
    """
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    encode = EncodeTargets(model.num_classes, model.stride)
    checkpoint = work / "qat-checkpoint.pt"
    if not checkpoint.exists():
        model.train()
        calibration = StepData(train, cfg.batch_size, cfg.seed + 1, encode)
        with torch.no_grad():
            for images, _ in step_batches(calibration, 0, cfg.calibration_batches):
                model(images)

    def observe_until_frozen(step: int) -> None:
        set_observing(model, step < cfg.freeze_fraction * cfg.steps)

    def loss(model: Detector, batch) -> dict[str, torch.Tensor]:
        images, targets = batch
        return centernet_loss(model(images), targets, model.stride)

    schedule = Schedule(cfg.steps, cfg.warmup_steps, cfg.grad_clip, cfg.checkpoint_every)
    state = fit(model, optimizer, loss, StepData(train, cfg.batch_size, cfg.seed, encode), schedule,
                checkpoint, device=device, before_step=observe_until_frozen, mixed_precision=False,
                progress=progress,
                desc="quantization-aware fine-tuning")
    model.cpu()
    return state


def fold_weight_quantizers(path: Path | str) -> Path:
    """Replace each QuantizeLinear of a constant weight by its INT8 result, in one file.

    The exporter writes ``W (float) -> QuantizeLinear -> DequantizeLinear`` (then a Transpose
    for a Linear layer); folding stores ``W_int8 -> DequantizeLinear`` with the weight already
    transposed, which is 4x smaller and the pattern ONNX Runtime fuses into integer kernels. The
    exporter's per-node metadata (module scopes, source stack traces) goes too: a deployed model
    needs none of it.
    """
    path = Path(path)
    model = onnx.load(str(path))
    values = {t.name: t for t in model.graph.initializer}
    folded, keep = [], []
    for node in model.graph.node:
        inputs = list(node.input) + [""] * (3 - len(node.input))
        if node.op_type != "QuantizeLinear" or not all(i in values for i in inputs if i) or not inputs[2]:
            keep.append(node)
            continue
        weight, scale, zero = (numpy_helper.to_array(values[i]) for i in inputs)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[axis] = -1
        info = np.iinfo(zero.dtype)
        q = np.clip(np.round(weight / scale.reshape(shape)) + zero.reshape(shape), info.min, info.max)
        folded.append(numpy_helper.from_array(q.astype(zero.dtype), node.output[0]))
    for node in keep:
        del node.metadata_props[:]
    del model.graph.node[:]
    model.graph.node.extend(_fold_weight_transposes(keep, {t.name: t for t in folded}))
    model.graph.initializer.extend(folded)
    used = {i for node in model.graph.node for i in node.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for tensor in unused:
        model.graph.initializer.remove(tensor)
    data = Path(f"{path}.data")
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    data.unlink(missing_ok=True)
    return path


def _fold_weight_transposes(nodes: list, weights: dict) -> list:
    """Drop ``Transpose(perm=[1, 0])`` after the DequantizeLinear of a 2-D INT8 weight, storing
    the weight transposed instead (and moving its per-channel axis)."""
    consumers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producers = {node.output[0]: node for node in nodes if node.op_type == "DequantizeLinear"}
    kept = []
    for node in nodes:
        dq = producers.get(node.input[0]) if node.op_type == "Transpose" else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if (dq is None or dq.input[0] not in weights or perm != [1, 0] or consumers[dq.output[0]] != 1
                or len(weights[dq.input[0]].dims) != 2):
            kept.append(node)
            continue
        tensor = weights[dq.input[0]]
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(tensor).T),
                                                tensor.name))
        axis = next((a for a in dq.attribute if a.name == "axis"), None)
        if axis is None:  # the default axis, 1, becomes 0
            dq.attribute.append(onnx.helper.make_attribute("axis", 0))
        else:
            axis.i = 1 - axis.i
        dq.output[0] = node.output[0]
    return kept
