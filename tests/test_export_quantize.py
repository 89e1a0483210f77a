"""ONNX export (dynamo, external data, dynamic batch) and INT8 quantization of a tiny detector."""

import numpy as np
import pytest
import torch

from edgefm.data.coco import CocoSplit
from edgefm.runtime import OnnxModelError, onnx_runner, open_session
from edgefm.runtime.decode import decode
from edgefm.stages.quantization import layer_groups
from edgefm.tools import isa
from edgefm.tools.export import export_onnx, fuse_transformer, node_scopes, onnx_files, onnx_size
from edgefm.tools.quantize import CalibrationScenes, QuantRecipe, preprocess, quantize, selected_nodes
from test_detector import tiny_detector


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny detector, its export and the quantization-ready copy (exported once: ~5 s)."""
    folder = tmp_path_factory.mktemp("onnx")
    model = tiny_detector().eval()
    path = export_onnx(model, folder / "tiny.onnx", image_size=64)
    return model, path, preprocess(path, folder / "tiny-pre.onnx")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """Eight random 64 px scenes as a COCO split (calibration needs images, not labels)."""
    import json

    from PIL import Image

    root = tmp_path_factory.mktemp("calibration")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64})
    coco = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    return CalibrationScenes(CocoSplit(root / "instances.json", root / "images"), 64, 8, batch_size=4)


def test_export_matches_pytorch_at_any_batch_and_decodes_the_same(exported):
    model, path, _ = exported
    assert [f.name for f in onnx_files(path)] == ["tiny.onnx", "tiny.onnx.data"]
    assert onnx_size(path) == sum(f.stat().st_size for f in onnx_files(path))
    run = onnx_runner(open_session(path, threads=1))
    for batch in (1, 3):  # one file serves latency (batch 1) and throughput
        images = torch.rand(batch, 3, 64, 64)
        with torch.no_grad():
            ours = [o.numpy() for o in model(images)]
        theirs = run(images.numpy())
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
        decoded = decode(*ours, stride=model.stride), decode(*theirs, stride=model.stride)
        for a, b in zip(*decoded, strict=True):
            assert a["labels"].tolist() == b["labels"].tolist()
            np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)


def test_nodes_remember_their_modules(exported):
    _, path, _ = exported
    scopes = set(node_scopes(path).values())
    assert {"backbone.vit.blocks.0.attn.qkv", "backbone.vit.blocks.1.mlp.fc2", "head.box.2"} <= scopes


def test_a_missing_or_corrupt_model_fails_with_its_path(tmp_path):
    with pytest.raises(OnnxModelError, match="missing.onnx: no such ONNX model"):
        open_session(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not a protobuf")
    with pytest.raises(OnnxModelError, match="bad.onnx"):
        open_session(bad)
    with pytest.raises(OnnxModelError, match="bad.onnx"):
        onnx_size(bad)


def test_transformer_optimizer_reports_its_fusions(exported, tmp_path):
    _, path, _ = exported
    fusions = fuse_transformer(path, tmp_path / "fused.onnx", num_heads=2, hidden_size=32)
    assert fusions.get("LayerNormalization", 0) + fusions.get("SkipLayerNormalization", 0) > 0
    assert open_session(tmp_path / "fused.onnx") is not None


@pytest.mark.parametrize("recipe", [
    QuantRecipe("dynamic", mode="dynamic", op_types=("MatMul",)),
    QuantRecipe("static", op_types=("MatMul", "Conv", "ConvTranspose")),
    QuantRecipe("entropy", calibration="entropy", activations="s8"),
])
def test_quantized_model_is_smaller_loads_and_decodes(exported, calibration, recipe, tmp_path):
    model, path, prepared = exported
    quantized = quantize(path, prepared, tmp_path / "int8.onnx", recipe, calibration)
    assert onnx_size(quantized) < 0.6 * onnx_size(path)  # the tiny model is mostly conv weights
    images = torch.rand(2, 3, 64, 64)
    heat, boxes = onnx_runner(open_session(quantized))(images.numpy())
    with torch.no_grad():
        ref_heat, _ = model(images)
    assert heat.shape == ref_heat.shape and boxes.shape == (2, 4, 32, 32)
    assert np.corrcoef(heat.ravel(), ref_heat.numpy().ravel())[0, 1] > 0.9  # close, not equal
    found = decode(heat, boxes, stride=model.stride, score_threshold=0.0)
    assert len(found) == 2 and len(found[0]["boxes"]) == 100


def test_entropy_calibration_searches_a_finer_histogram_than_minmax(exported, calibration, tmp_path):
    """With ORT's default 128 bins for 128 levels, Entropy would return MinMax's ranges exactly."""
    from edgefm.stages.quantization import activation_scales

    _, path, prepared = exported
    scales = {}
    for method in ("minmax", "entropy"):
        recipe = QuantRecipe(method, calibration=method, op_types=("MatMul", "Conv"))
        quantized = quantize(path, prepared, tmp_path / f"{method}.onnx", recipe, calibration)
        scales[method] = activation_scales(quantized)
    shared = set(scales["minmax"]) & set(scales["entropy"])
    assert shared and sum(scales["entropy"][k] < scales["minmax"][k] for k in shared) > len(shared) // 2


def test_keep_fp32_and_only_select_nodes_by_module(exported, calibration, tmp_path):
    _, path, prepared = exported
    groups = layer_groups(2)
    assert groups == ["backbone.vit.patch_embed", "backbone.vit.blocks.0", "backbone.vit.blocks.1",
                      "pyramid", "head.heatmap.0", "head.heatmap.2", "head.box.0", "head.box.2"]
    recipe = QuantRecipe("x", keep_fp32=("head",), only=("backbone.vit.blocks.1",))
    only, exclude = selected_nodes(path, recipe)
    scopes = node_scopes(path)
    assert exclude and all(scopes[n] == "head" or scopes[n].startswith("head.") for n in exclude)
    assert only and all(scopes[n] == "backbone.vit.blocks.1" or scopes[n].startswith("backbone.vit.blocks.1.")
                        for n in only)
    keep_head = QuantRecipe("k", keep_fp32=("head",))
    kept = quantize(path, prepared, tmp_path / "kept.onnx", keep_head, calibration)
    full = quantize(path, prepared, tmp_path / "full.onnx", QuantRecipe("f"), calibration)
    assert onnx_size(kept) > onnx_size(full)  # the head's weights stayed FP32
    with pytest.raises(ValueError, match="needs calibration scenes"):
        quantize(path, prepared, tmp_path / "none.onnx", QuantRecipe("s"), None)


def test_weights_only_leaves_the_products_of_two_activations_in_fp32(exported, calibration, tmp_path):
    import onnx

    _, path, prepared = exported
    _, exclude = selected_nodes(path, QuantRecipe("w", weights_only=True))
    depth = 2  # the tiny detector's blocks: query x key and attention x value in each
    assert len(exclude) == 2 * depth and all(n in node_scopes(path) for n in exclude)
    recipe = QuantRecipe("w", weights_only=True)
    quantized = quantize(path, prepared, tmp_path / "w.onnx", recipe, calibration)
    graph = onnx.load(quantized).graph
    fed = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert all(not fed & set(n.input) for n in graph.node if n.name in exclude)  # no quantized input


def test_recipe_rejects_unknown_settings():
    with pytest.raises(ValueError, match="mode"):
        QuantRecipe("x", mode="int4")
    with pytest.raises(ValueError, match="calibration"):
        QuantRecipe("x", calibration="kl")
    with pytest.raises(ValueError, match="activations"):
        QuantRecipe("x", activations="i4")


def test_qat_learns_exports_to_qdq_and_matches_in_onnx_runtime(fashion_dir, tmp_path):
    from edgefm.config import QatConfig, load_profile
    from edgefm.data import ensure_dataset
    from edgefm.data.coco import CocoDetection
    from edgefm.data.transforms import detection_transforms
    from edgefm.tools.export import op_counts
    from edgefm.tools.qat import (
        FakeQuant,
        Rounding,
        fold_weight_quantizers,
        freeze,
        prepare_qat,
        qat_finetune,
    )

    model = prepare_qat(tiny_detector(num_classes=10))
    wrapped = [m for m in model.modules() if isinstance(m, FakeQuant)]
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    assert len(wrapped) == sum(1 for m in tiny_detector().modules() if isinstance(m, layers))
    train = CocoDetection(ensure_dataset(load_profile("smoke")).train, detection_transforms(64, train=True))
    cfg = QatConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, calibration_batches=1, checkpoint_every=3)
    state = qat_finetune(model, train, cfg, tmp_path)
    assert state.step == 6 and (tmp_path / "qat-checkpoint.pt").is_file()
    rounding = [m for m in model.modules() if isinstance(m, Rounding)]
    assert len(rounding) == 2 * len(wrapped)  # each layer's input and output
    assert all(m.seen and m.scale > 0 for m in rounding)  # every range was observed
    resumed = qat_finetune(model, train, cfg, tmp_path)  # a finished run resumes to its end
    assert resumed.losses == state.losses

    path = export_onnx(freeze(model), tmp_path / "qat.onnx", 64, dynamic_batch=False)
    export_onnx(freeze(model), tmp_path / "reference.onnx", 64, dynamic_batch=False)
    quantizers = op_counts(path)["QuantizeLinear"]
    fold_weight_quantizers(path)
    ops = op_counts(path)
    assert ops["QuantizeLinear"] == quantizers - len(wrapped)  # every weight is INT8 now
    assert ops["DequantizeLinear"] == ops["QuantizeLinear"] + len(wrapped)
    assert ops["Transpose"] < op_counts(tmp_path / "reference.onnx")["Transpose"]  # weights stored transposed
    assert not (tmp_path / "qat.onnx.data").exists()
    images = torch.rand(3, 3, 64, 64)  # a fixed-batch model runs larger batches in slices
    with torch.no_grad():
        ours = [o.numpy() for o in model(images)]
    theirs = onnx_runner(open_session(path))(images.numpy())
    for a, b in zip(ours, theirs, strict=True):  # same rounding; an input on a rounding edge may flip
        assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_qat_weights_cannot_saturate_the_16_bit_pair_sums_of_cpus_without_vnni(tmp_path):
    """On x86 without VNNI, ONNX Runtime adds pairs of u8 x s8 products in int16; a pair of
    largest inputs (255) with 8-bit weights overflows it, with the QAT export's weights it cannot."""
    import onnx
    from onnx import numpy_helper

    from edgefm.tools.qat import WEIGHT_LEVELS, fold_weight_quantizers, freeze, prepare_qat

    assert 2 * 255 * 127 > 32767 and 2 * 255 * WEIGHT_LEVELS <= 32767
    model = prepare_qat(tiny_detector(num_classes=3))
    with torch.no_grad():
        for module in model.modules():  # give the weights outliers, the usual cause of full range
            if hasattr(module, "weight") and module.weight is not None and module.weight.ndim > 1:
                module.weight[..., 0] = 10 * module.weight.abs().max()
        model.train()
        model(torch.rand(2, 3, 64, 64))  # observe the ranges
    path = fold_weight_quantizers(export_onnx(freeze(model), tmp_path / "qat.onnx", 64, dynamic_batch=False))
    weights = [numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer
               if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(np.abs(w.astype(int)).max() for w in weights) == WEIGHT_LEVELS
    assert isa.weight_peak(path) == WEIGHT_LEVELS
    assert WEIGHT_LEVELS <= isa.SAFE_WEIGHT_PEAK
    if isa.can_compare():  # and it computes the same on a CPU without VNNI (emulated)
        agreement = isa.avx2_agreement([path], np.random.default_rng(0).random((2, 3, 64, 64), np.float32))
        assert agreement[str(path)]["same"], agreement


@pytest.mark.skipif(not isa.can_compare(),
                    reason="needs a CPU with VNNI, and qemu-user to emulate one without")
def test_reduce_range_static_int8_computes_the_same_without_vnni(exported, calibration, tmp_path):
    _, path, prepared = exported
    recipe = QuantRecipe("static-reduce-range", reduce_range=True,
                         op_types=("MatMul", "Conv", "Gemm", "ConvTranspose"))
    quantized = quantize(path, prepared, tmp_path / "int8.onnx", recipe, calibration)
    assert isa.weight_peak(quantized) <= isa.SAFE_WEIGHT_PEAK
    agreement = isa.avx2_agreement([quantized], calibration.batches[0])
    assert agreement[str(quantized)]["same"], agreement
