"""ONNX export of a detector, and what the exported graph holds (sessions: :mod:`edgefm.runtime`).

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, torch's default) traces the whole
network, normalisation included, into one graph with a dynamic batch dimension; its weights go to
an external ``<name>.onnx.data`` file, which is part of the model (copy it, count it in the size).
Every node keeps the module path it came from (``pkg.torch.onnx.name_scopes``), which is how
quantization recipes name the layers they keep in FP32.
"""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import torch

from edgefm.artifacts import atomic_path
from edgefm.runtime import OnnxModelError, open_session

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def export_onnx(model: torch.nn.Module, path: Path | str, image_size: int,
                dynamic_batch: bool = True) -> Path:
    """Export ``model`` (images (B, 3, S, S) in [0, 1] -> its raw outputs) to ``path``.

    The resolution is fixed (position embeddings were resized once at load time, so the graph has
    no interpolation of them); the batch is dynamic, so one file serves latency at batch 1 and
    throughput at larger batches. ``dynamic_batch=False`` fixes it at 1, for ops that torch.export
    cannot trace with a symbolic batch (the fake-quantize ops of QAT). Written to a temporary name
    and renamed with its data file.
    """
    path = Path(path)
    model = model.eval()
    example = torch.rand(2 if dynamic_batch else 1, 3, image_size, image_size)
    with torch.no_grad():
        names = [f"output_{i}" for i in range(len(model(example)))]
        shapes = {"images": {0: torch.export.Dim.DYNAMIC}} if dynamic_batch else None
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                    output_names=names, verbose=False, dynamic_shapes=shapes)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=True)
        data = Path(f"{tmp}.data")
        data.replace(Path(f"{path}.data"))
        _point_external_data(tmp, Path(f"{path}.data").name)
    return path


def _point_external_data(path: Path, data_name: str) -> None:
    """Rewrite the external-data locations in ``path`` (saved under a temporary name) to ``data_name``."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_name
    onnx.save(model, str(path))


def onnx_files(path: Path | str) -> list[Path]:
    """The model file and every external data file it references: what must be shipped."""
    path = Path(path)
    if path.suffix == ".ort":  # ONNX Runtime's own format keeps its weights inside
        return [path]
    model = _load(path, load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    return [path, *(path.parent / name for name in sorted(locations))]


def onnx_size(path: Path | str) -> int:
    """Bytes on disk of the model with its external data."""
    return sum(file.stat().st_size for file in onnx_files(path))


def _load(path: Path, load_external_data: bool = True) -> onnx.ModelProto:
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX model")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as error:  # onnx raises DecodeError, OSError, ValueError... for a bad file
        raise OnnxModelError(f"{path}: not a readable ONNX model ({error})") from error


def fixed_batch(path: Path | str) -> int | None:
    """The batch size the model's input is fixed to, or None if it is dynamic."""
    if Path(path).suffix == ".ort":
        batch = open_session(path, threads=1).get_inputs()[0].shape[0]
        return batch if isinstance(batch, int) else None
    dim = _load(Path(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def op_counts(path: Path | str) -> dict[str, int]:
    """How many nodes of each operator type the graph has."""
    model = _load(Path(path), load_external_data=False)
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def node_scopes(path: Path | str) -> dict[str, str]:
    """Node name -> the module it was exported from (e.g. ``backbone.vit.blocks.0.attn.qkv``)."""
    scopes = {}
    for node in _load(Path(path), load_external_data=False).graph.node:
        for prop in node.metadata_props:
            if prop.key == SCOPES_KEY:
                modules = [m for m in _scope_list(prop.value)[:-1] if m]  # the last item names the op
                scopes[node.name] = modules[-1] if modules else ""
    return scopes


def _scope_list(text: str) -> list[str]:
    """Parse the exporter's ``['', 'backbone', ...]`` scope list without ``eval``."""
    return [item.strip().strip("'\"") for item in text.strip("[]").split(",")]


def fuse_transformer(src: Path | str, dst: Path | str, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Run ONNX Runtime's transformer optimizer (``model_type="vit"``) and save the result.

    Returns its fused-operator statistics (how many Attention, LayerNormalization, Gelu... fusions
    it found): a graph the fusion patterns do not recognise comes back unchanged, and that is
    worth knowing before counting on a fused kernel.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    _load(Path(src), load_external_data=False)  # a clear error for a missing or corrupt file
    optimized = optimize_model(str(src), model_type="vit", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0)
    with atomic_path(dst) as tmp:
        optimized.save_model_to_file(str(tmp), use_external_data_format=False)
    return {op: int(count) for op, count in optimized.get_fused_operator_statistics().items() if count}
