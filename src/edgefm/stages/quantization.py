"""The quantization study of model A: every ONNX variant, the sensitivity scan, one benchmark.

A is exported once; ONNX Runtime runs it in FP32 at each graph-optimisation level and after its
transformer optimizer; then every :class:`~edgefm.tools.quantize.QuantRecipe` in :data:`RECIPES`
quantizes it. The sensitivity scan quantizes one layer group at a time (static MinMax) and the
*mixed* recipe keeps in FP32 the groups that cost more than the profile's threshold. A short
quantization-aware fine-tune (:mod:`edgefm.tools.qat`) gives one more INT8 variant. Each file is
scored (eval figures to report, val figures to choose by) and checked for what it computes on a
CPU without VNNI (:mod:`edgefm.tools.isa`); all of that is kept apart from the timing, keyed
without the :class:`~edgefm.config.BenchConfig`, so measuring differently re-times only. One
:func:`~edgefm.tools.bench.benchmark` run then times every variant against A in PyTorch; the
whole study is recorded in ``metrics/quantization.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import onnx
from onnx import numpy_helper

from edgefm.artifacts import atomic_write_json, ensure_dir, stage, stage_dir
from edgefm.config import Profile, load_profile
from edgefm.data import ensure_dataset
from edgefm.data.coco import CocoDetection, CocoSplit
from edgefm.data.transforms import detection_transforms
from edgefm.runtime import LEVELS
from edgefm.stages.finetune import ensure_finetuned, load_detector
from edgefm.tools.bench import Variant, benchmark, latencies, module_variant
from edgefm.tools.evaluate import evaluate_split
from edgefm.tools.export import export_onnx, fuse_transformer, op_counts
from edgefm.tools.isa import EMULATED_CPU, SAFE_WEIGHT_PEAK, avx2_agreement, has_vnni, weight_peak
from edgefm.tools.qat import fold_weight_quantizers, freeze, prepare_qat, qat_finetune
from edgefm.tools.quantize import CalibrationScenes, QuantRecipe, preprocess, quantize

CONVS = ("MatMul", "Conv", "Gemm", "ConvTranspose")
QAT_CONTROL = "ORT FP32, QAT's steps without rounding"
MADE_FILE = "made.json"
RECIPES = (
    QuantRecipe("dynamic", mode="dynamic", op_types=("MatMul", "Gemm")),
    QuantRecipe("dynamic-conv", mode="dynamic", op_types=CONVS),
    QuantRecipe("static-minmax", op_types=CONVS),
    QuantRecipe("static-entropy", calibration="entropy", op_types=CONVS),
    QuantRecipe("static-percentile", calibration="percentile", op_types=CONVS),
    QuantRecipe("static-s8s8", activations="s8", op_types=CONVS),
    QuantRecipe("static-reduce-range", reduce_range=True, op_types=CONVS),
    QuantRecipe("static-per-tensor", per_channel=False, op_types=CONVS),
    # the layers and the weight range QAT quantizes: what separates QAT's training from its scheme
    QuantRecipe("static-like-qat", reduce_range=True, weights_only=True, op_types=CONVS),
)


def layer_groups(depth: int) -> list[str]:
    """The module prefixes the sensitivity scan quantizes one at a time."""
    return ["backbone.vit.patch_embed", *(f"backbone.vit.blocks.{i}" for i in range(depth)),
            "pyramid", *(f"head.{branch}.{layer}" for branch in ("heatmap", "box") for layer in (0, 2))]


def activation_scales(path: Path) -> dict[str, float]:
    """Per-tensor activation scales of a QDQ model (input name -> scale): how calibrations differ."""
    model = onnx.load(str(path))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {node.input[0]: float(values[node.input[1]]) for node in model.graph.node
            if node.op_type == "QuantizeLinear" and node.input[1] in values
            and values[node.input[1]].size == 1}


def sensitivity_scan(exported: Path, prepared: Path, work: Path, groups: list[str],
                     calibration: CalibrationScenes, score: Callable[[Path], dict]) -> list[dict]:
    """mAP with one layer group at a time quantized (static MinMax), the rest FP32."""
    scan = []
    for group in groups:
        recipe = QuantRecipe(f"only-{group}", op_types=CONVS, only=(group,))
        scores = score(quantize(exported, prepared, work / "sensitivity.onnx", recipe, calibration))
        scan.append({"group": group, "map": scores["map"], "map50": scores["map50"]})
    (work / "sensitivity.onnx").unlink()
    return scan


def _make(work: Path, profile: Profile, progress: bool) -> dict:
    """Every variant's file and what it computes (mAP, sensitivity, agreement without VNNI): all
    the study needs but its timing, so a new :class:`~edgefm.config.BenchConfig` reuses it."""
    trained = ensure_finetuned(profile, progress=progress)
    model, cfg = load_detector(trained), trained.config.detector
    dataset = ensure_dataset(profile)
    size, settings = cfg.image_size, profile.quantize
    backbone = profile.pretrain.backbone
    exported = export_onnx(model, work / "a-fp32.onnx", size)
    fusions = fuse_transformer(exported, work / "a-fp32-fused.onnx", backbone.num_heads, backbone.hidden_size)
    prepared = preprocess(exported, work / "a-fp32-pre.onnx")
    calibration = CalibrationScenes(dataset.train, size, settings.calibration_scenes)
    model_a = module_variant(model, size)

    def score(variant: Variant, split: CocoSplit) -> dict:
        return evaluate_split(variant.runner(2), split, cfg, model.stride)

    # the scan chooses what stays FP32, so it scores on the val scenes: the eval scenes only report
    sensitivity = sensitivity_scan(
        exported, prepared, work, layer_groups(backbone.num_layers), calibration,
        lambda path: score(model_a.exported("scan", path, "int8"), dataset.val))
    reference = score(model_a.exported("a-fp32", exported), dataset.val)["map"]
    keep = tuple(s["group"] for s in sensitivity if reference - s["map"] > settings.sensitivity_threshold)
    recipes = (*RECIPES, QuantRecipe("static-mixed", op_types=CONVS, keep_fp32=keep))

    variants = [model_a]
    variants += [model_a.exported(f"ORT FP32 ({level})", exported, level=level) for level in LEVELS]
    variants.append(model_a.exported("ORT FP32 (transformer optimizer)", work / "a-fp32-fused.onnx"))
    for recipe in recipes:
        path = quantize(exported, prepared, work / f"a-{recipe.name}.onnx", recipe, calibration)
        variants.append(model_a.exported(f"INT8 {recipe.name}", path, "int8"))
    qat_model = prepare_qat(load_detector(trained))
    train = CocoDetection(dataset.train, detection_transforms(size, train=True))
    qat_state = qat_finetune(qat_model, train, settings.qat, work, progress)
    qat_path = export_onnx(freeze(qat_model), work / "a-qat.onnx", size, dynamic_batch=False)
    variants.append(model_a.exported("INT8 QAT", fold_weight_quantizers(qat_path), "int8"))
    # the control: QAT's steps and settings without the rounding, so QAT's gain is not extra training
    control, control_work = load_detector(trained), work / "fp32-control"
    control_work.mkdir(exist_ok=True)
    control_state = qat_finetune(control, train, settings.qat, control_work, progress)
    control_path = export_onnx(control.eval(), work / "a-fp32-qat-steps.onnx", size)
    variants.append(model_a.exported(QAT_CONTROL, control_path))

    scores = {v.name: score(v, dataset.eval) for v in variants}
    int8 = [v for v in variants if v.precision == "int8"]
    # what each INT8 file computes on a CPU without VNNI, and A's val figures to choose a recipe by
    isa_scenes = CalibrationScenes(dataset.val, size, settings.isa_images).batches[0]
    agreement = avx2_agreement([v.onnx for v in int8], isa_scenes)
    val = {v.name: score(v, dataset.val)["map"] for v in [model_a, *int8]}
    minmax, entropy = (activation_scales(work / f"a-static-{c}.onnx") for c in ("minmax", "entropy"))
    return {
        "made": [{"name": v.name, "file": v.onnx and v.onnx.name, "precision": v.precision, "level": v.level,
                  "accuracy": scores[v.name]} for v in variants],
        "int8": {v.name: {"weight_peak": weight_peak(v.onnx),
                          "avx2": None if agreement is None else agreement[str(v.onnx)],
                          "val_map": val[v.name], "val_map_drop": val[model_a.name] - val[v.name]}
                 for v in int8},
        "recipes": [asdict(r) for r in recipes],
        "files": {v.name: v.onnx.name for v in variants if v.onnx is not None},
        "fusions": fusions,
        "ops_fp32": op_counts(exported), "ops_fused": op_counts(work / "a-fp32-fused.onnx"),
        "sensitivity": {"reference_map": reference, "threshold": settings.sensitivity_threshold,
                        "groups": sensitivity, "keep_fp32": list(keep)},
        "entropy_equals_minmax": sum(entropy.get(k) == v for k, v in minmax.items()),
        "activation_tensors": len(minmax),
        "calibration_scenes": sum(len(batch) for batch in calibration.batches),
        "model_a": str(trained.path),
        "isa": {"emulated_cpu": EMULATED_CPU, "emulated": agreement is not None, "images": len(isa_scenes),
                "safe_weight_peak": SAFE_WEIGHT_PEAK},
        "a_val_map": val[model_a.name],
        "qat": {"steps": qat_state.step, "seconds": qat_state.seconds, "losses": qat_state.losses,
                "lr": settings.qat.lr, "batch_size": settings.qat.batch_size,
                "control_losses": control_state.losses},
    }


def _time(work: Path, models: Path, profile: Profile, progress: bool) -> dict:
    """Time the variants made in ``models`` in one :func:`~edgefm.tools.bench.benchmark` run (their
    mAP is read, not computed again) and A alone; the study's results are what was made plus this."""
    made = json.loads((models / MADE_FILE).read_text(encoding="utf-8"))
    trained = ensure_finetuned(profile, progress=progress)
    size, bench = trained.config.detector.image_size, profile.quantize.bench
    model_a = module_variant(load_detector(trained), size)
    variants = [model_a] + [model_a.exported(m["name"], models / m["file"], m["precision"], m["level"])
                            for m in made["made"][1:]]
    accuracy = {m["name"]: m["accuracy"] for m in made["made"]}
    # A on its own, with no ONNX Runtime session taking turns: the second reference the chapter
    # reports, timed between the benchmark's repeats (it spreads them through the run)
    alone: dict[str, dict] = {}

    def time_a_alone() -> None:
        alone.update({f"{t}t": latencies([model_a], size, t, bench)[model_a.name] for t in bench.threads})

    results = benchmark(variants, size, bench, lambda v: accuracy[v.name], between=[time_a_alone])
    for record in results["variants"]:
        record.update(made["int8"].get(record["name"], {}))
    made["isa"]["machine_vnni"] = has_vnni(results["machine"]["isa"])
    kept = {k: v for k, v in made.items() if k not in ("made", "int8")}
    return {**results, **kept, "reference_alone": alone}


def ensure_quantization(profile: Profile | str | None = None, progress: bool = True) -> dict:
    """Build (or load) every variant of A and its benchmark; write ``metrics/quantization.json``."""
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    models = ensure_quantized_models(profile, progress)
    key = {"models": models.name, "bench": profile.quantize.bench}
    results = stage(profile.name, "quantization", key, lambda work: _time(work, models, profile, progress))
    return {**results, "models_folder": str(models)}


def ensure_quantized_models(profile: Profile, progress: bool = True) -> Path:
    """The folder of every variant of A with what it computes (:func:`_make`), keyed by all that
    changes them (how to quantize, A, the data) and not by how they are timed."""
    trained = ensure_finetuned(profile, progress=progress)
    key = {"quantize": replace(profile.quantize, bench=None), "model_a": trained.identity,
           "data": profile.data}

    def make(work: Path) -> None:
        atomic_write_json(work / MADE_FILE, _make(work, profile, progress))

    folder = stage_dir(profile.name, "quantization-models", key, code="quantization-models")
    return ensure_dir(folder, make, config=key)

