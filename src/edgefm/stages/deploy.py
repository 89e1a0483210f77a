"""Model C: the whole A -> B -> C pipeline, measured in one run (the deployment stage).

:func:`compress` takes model A (:mod:`edgefm.stages.finetune`), finds model B (:mod:`edgefm.stages.smaller`)
and makes C: B exported to ONNX and quantized to INT8 with the recipe that won the quantization
study of A (:func:`choose_recipe`). C goes into a *bundle* folder with what a device needs to run
it and a model card with the measured figures (:mod:`edgefm.tools.bundle`). One
:func:`~edgefm.tools.bench.benchmark` run measures A, A in INT8, B, B in ONNX, C and the peer
(:mod:`edgefm.stages.peer`) against each other; :mod:`edgefm.report` turns the records into verdicts.
What the variants compute (mAP, agreement, the emulated CPUs) is kept apart from their timing, keyed
without the :class:`~edgefm.config.BenchConfig`, so measuring differently re-times only, unless the
new timings of the quantization study choose another INT8 recipe (:func:`choose_recipe`): that
makes a new C.
``metrics/deployment.json`` keeps all of it and ``metrics/summary.json`` the figures of C against
A and the book's targets.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from torch import nn

from edgefm.artifacts import atomic_path, atomic_write_json, ensure_dir, stage, stage_dir, write_metrics
from edgefm.config import BenchConfig, DetectorConfig, Profile, load_profile
from edgefm.data import ensure_dataset
from edgefm.data.coco import CocoDetection, CocoSplit
from edgefm.data.transforms import detection_transforms
from edgefm.models.detector import Detector
from edgefm.report import (
    A_ORT,
    A_TORCH,
    B_ORT,
    B_TORCH,
    C_INT8,
    C_SPINNING,
    C_STOPPED,
    PAIRED,
    PEER_FORMATS,
    PEER_INT8,
    PEER_ORT,
    peer_comparison,
    summary,
    targets_report,
)
from edgefm.runtime import EdgeDetector, onnx_runner, open_session, read_bundle
from edgefm.runtime.images import read_image
from edgefm.stages.finetune import ensure_finetuned, load_detector
from edgefm.stages.peer import ONNX_FILE as PEER_ONNX
from edgefm.stages.peer import PeerDecoder, PeerNetwork, ensure_peer, load_peer, training_flops
from edgefm.stages.quantization import MADE_FILE, ensure_quantization
from edgefm.stages.smaller import Candidates, ensure_smaller, load_b, student_config
from edgefm.targets import TARGETS
from edgefm.tools.arm64 import map_on_arm, qemu_aarch64
from edgefm.tools.bench import (
    Variant,
    benchmark,
    latencies,
    module_variant,
    operator_profile,
    repeat_ratio,
    runtime_operators,
)
from edgefm.tools.bundle import (
    CARD_FILE,
    MODEL_FILE,
    agreement_with,
    b_description,
    limits,
    model_card,
    write_bundle,
)
from edgefm.tools.evaluate import BOOTSTRAP, evaluate_split, gap_interval
from edgefm.tools.export import export_onnx, node_scopes, op_counts
from edgefm.tools.isa import EMULATED_CPU, SAFE_WEIGHT_PEAK, avx2_agreement, evaluate_on_avx2, weight_peak
from edgefm.tools.qat import fold_weight_quantizers, freeze, prepare_qat, qat_finetune
from edgefm.tools.quantize import CalibrationScenes, QuantRecipe, preprocess, quantize

QAT = "INT8 QAT"
# the mixed recipe keeps A's own sensitive layers in FP32: its list names A's blocks, not B's
NOT_TRANSFERABLE = ("INT8 static-mixed",)


def safe_without_vnni(record: dict) -> bool:
    """Whether a study's INT8 variant computes the same on x86 CPUs without VNNI: as measured on
    the emulated CPU where this machine could run it, else by its weights' range
    (:data:`~edgefm.tools.isa.SAFE_WEIGHT_PEAK`)."""
    if record.get("avx2") is not None:
        return record["avx2"]["same"]
    return record["weight_peak"] is not None and record["weight_peak"] <= SAFE_WEIGHT_PEAK


def choose_recipe(study: dict, post_training: bool = False) -> str:
    """The INT8 variant of A to repeat on B, chosen on the val scenes (the eval scenes only report).
    Of the variants that compute the same on CPUs without VNNI, those that meet every target the
    book sets A-INT8 (:data:`~edgefm.targets.TARGETS`), the fastest at camera rate on 2 threads; if none meets
    them all, the fastest of those within the mAP target; else the fastest. ``post_training``
    leaves out QAT (the peer's recipe: QAT here is written for A's detector and loss)."""
    records = [r for r in study["variants"] if r["precision"] == "int8" and r["name"] not in NOT_TRANSFERABLE
               and safe_without_vnni(r) and not (post_training and r["name"] == QAT)]
    goals = [t for t in TARGETS if t.model == "A-INT8"]

    def met(record: dict, target) -> bool:
        return target.met(record.get(f"val_{target.metric}", record[target.metric]))

    for pool in ([r for r in records if all(met(r, t) for t in goals)],
                 [r for r in records if all(met(r, t) for t in goals if t.metric == "map_drop")],
                 records):
        if pool:
            return max(pool, key=lambda r: r["camera_speedup_2t"])["name"]
    raise ValueError("the quantization study has no INT8 variant that computes the same on CPUs without VNNI")


def study_recipe(study: dict, name: str) -> QuantRecipe:
    """The post-training :class:`QuantRecipe` behind the study's variant ``INT8 <recipe>``."""
    recipe = next(r for r in study["recipes"] if f"INT8 {r['name']}" == name)
    return QuantRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()})


def quantize_like_a(model: nn.Module, recipe: str, study: dict, work: Path, train: CocoSplit,
                    profile: Profile, progress: bool, name: str = "c") -> Path:
    """``model`` in INT8 the way the study's ``recipe`` made A's variant (``work/<name>.onnx``): a
    QAT fine-tune with A's settings (a :class:`Detector` only), or a post-training recipe
    calibrated on the same number of train scenes. The module scopes of the model as exported,
    which quantizing drops, are kept beside it (``<name>-scopes.json``) for its profile."""
    size = profile.finetune.detector.image_size
    if recipe == QAT:
        qat_model = prepare_qat(model)
        scenes = CocoDetection(train, detection_transforms(size, train=True))
        qat_finetune(qat_model, scenes, profile.quantize.qat, work, progress)
        exported = export_onnx(freeze(qat_model), work / f"{name}.onnx", size, dynamic_batch=False)
        atomic_write_json(work / f"{name}-scopes.json", node_scopes(exported))
        return fold_weight_quantizers(exported)
    exported = export_onnx(model, work / f"{name}-fp32.onnx", size)
    atomic_write_json(work / f"{name}-scopes.json", node_scopes(exported))
    calibration = CalibrationScenes(train, size, profile.quantize.calibration_scenes)
    return quantize(exported, preprocess(exported, work / f"{name}-fp32-pre.onnx"), work / f"{name}.onnx",
                    study_recipe(study, recipe), calibration)


def _variants(models: Path, made: dict, profile: Profile) -> list[Variant]:
    """The final benchmark's variants (A first: the reference), from the files in ``models``."""
    trained = ensure_finetuned(profile, progress=False)
    size = trained.config.detector.image_size
    study = ensure_quantization(profile, progress=False)
    peer = ensure_peer(profile, progress=False)
    study_file = lambda name: Path(study["models_folder"]) / study["files"][name]  # noqa: E731
    a = module_variant(load_detector(trained), size, A_TORCH)
    b = module_variant(load_b(profile), size, B_TORCH)
    bundle = models / "bundle"
    peer_fp32 = Variant(PEER_ORT, onnx=Path(peer["folder"]) / PEER_ONNX, flops=peer["flops"],
                        params=peer["params"])
    return [a, a.exported(A_ORT, study_file("ORT FP32 (all)")),
            a.exported(f"A {made['recipe']}", study_file(made["recipe"]), "int8"),
            b, b.exported(B_ORT, models / "b-fp32.onnx"),
            b.exported(C_INT8, bundle / MODEL_FILE, "int8"),
            b.exported("C (.ort)", bundle / made["bundle"]["ort_model"], "int8"),
            peer_fp32, peer_fp32.exported(PEER_INT8, models / "peer.onnx", "int8")]


def _make(work: Path, profile: Profile, recipe: str, peer_recipe: str, progress: bool) -> dict:
    """C, its bundle (without the model card, which holds timings) and the peer in INT8, and what
    every variant of the final benchmark computes: all of the deployment but its timing, so a new
    :class:`~edgefm.config.BenchConfig` reuses it."""
    trained = ensure_finetuned(profile, progress=progress)
    cfg = trained.config.detector
    study, b = ensure_quantization(profile, progress), load_b(profile)
    peer = ensure_peer(profile, progress)
    peer_model = load_peer(Path(peer["folder"]), len(trained.class_names), cfg, profile.peer)
    dataset = ensure_dataset(profile)
    size = cfg.image_size
    c_path = quantize_like_a(copy.deepcopy(b), recipe, study, work, dataset.train, profile, progress)
    isa_scenes = CalibrationScenes(dataset.val, size, profile.quantize.isa_images).batches[0]
    checked = avx2_agreement([c_path], isa_scenes)
    int8 = {"recipe": recipe, "chosen_on": "val", "weight_peak": weight_peak(c_path),
            "without_vnni": None if checked is None else checked[str(c_path)]}
    bundle = work / "bundle"
    spec = write_bundle(bundle, c_path, trained.class_names, cfg, b.stride, name="C", int8=int8)
    peer_int8 = quantize_like_a(PeerNetwork(peer_model), peer_recipe, study, work, dataset.train, profile,
                                progress, name="peer")
    export_onnx(b, work / "b-fp32.onnx", size)
    made = {"recipe": recipe, "peer_recipe": peer_recipe, "bundle": asdict(spec)}
    variants = _variants(work, made, profile)
    decoding = _decoding(variants, variants[0].module, b, peer_model)
    samples: dict[str, list[float]] = {}
    scores = {v.name: _accuracy(v, dataset.eval, cfg, samples, decoding) for v in variants}
    peer_val = {v.name: evaluate_split(v.runner(2), dataset.val, cfg, **decoding[v.name])["map"]
                for v in variants if v.name in PEER_FORMATS}
    # C's eval figures as a CPU without VNNI computes them (emulated; None where it cannot be)
    avx2 = evaluate_on_avx2(bundle / MODEL_FILE, dataset.eval, cfg, b.stride)
    c_map = scores[C_INT8]["map"]
    return {
        **made, "scores": scores, "samples": samples, "peer_val": peer_val,
        "peer_int8_operators": runtime_operators(peer_int8),
        "scopes": {B_ORT: node_scopes(work / "b-fp32.onnx"),
                   C_INT8: json.loads((work / "c-scopes.json").read_text(encoding="utf-8"))},
        "c_without_vnni": None if avx2 is None else {
            "cpu": EMULATED_CPU, "map": avx2["map"], "map50": avx2["map50"], "map_here": c_map},
        # and as a Raspberry Pi 4's core computes them, which sums INT8 products in 32 bits as VNNI does
        "c_on_arm": (map_on_arm(bundle, dataset.eval, images=profile.arm_images, bootstrap=BOOTSTRAP)
                     if qemu_aarch64() and profile.arm_images else None),
        "agreement": agreement_with(b, EdgeDetector(bundle), dataset.eval, profile.agreement_images),
        "c_operators": op_counts(bundle / MODEL_FILE),
    }


def _time(work: Path, models: Path, profile: Profile, progress: bool) -> dict:
    """The final benchmark of what ``models`` holds (their mAP read, not computed again), C end to
    end and by operator, the targets, and the bundle with its model card (a copy, in ``work``)."""
    made = json.loads((models / MADE_FILE).read_text(encoding="utf-8"))
    trained = ensure_finetuned(profile, progress=progress)
    smaller, peer = ensure_smaller(profile, progress), ensure_peer(profile, progress)
    dataset, size, bench = ensure_dataset(profile), trained.config.detector.image_size, profile.quantize.bench
    bundle = Path(shutil.copytree(models / "bundle", work / "bundle", dirs_exist_ok=True))
    variants = _variants(models, made, profile)
    a, samples = variants[0], made["samples"]
    # each timed on its own: A, C as the benchmark runs it, and C as a device runs it
    alone = [a, Variant(C_STOPPED, onnx=bundle / MODEL_FILE, precision="int8"),
             DeployedVariant(C_SPINNING, onnx=bundle / MODEL_FILE, precision="int8")]
    onnx = {v.name: v.onnx for v in variants}
    timed: dict = {"profiles": {}, "alone": {}}

    def time_end_to_end() -> None:
        timed["e2e"] = end_to_end_ms(EdgeDetector(bundle, threads=2), dataset.eval, bench.runs)

    def profile_operators(name: str) -> Callable[[], None]:
        return lambda: timed["profiles"].update({name: operator_profile(
            onnx[name], size, runs=bench.runs, scopes=made["scopes"][name])})

    def time_alone(threads: int) -> Callable[[], None]:
        return lambda: timed["alone"].update({f"{threads}t": {v.name: timed_alone(v, size, threads, bench)
                                                              for v in alone}})

    # the stage's other timings, done between the benchmark's repeats, which they spread through the run
    between = [time_end_to_end, profile_operators(B_ORT), profile_operators(C_INT8),
               *(time_alone(t) for t in bench.threads)]
    results = benchmark(variants, size, bench, lambda v: made["scores"][v.name], between)
    records = {r["name"]: r for r in results["variants"]}
    add_ratios_to(records[A_ORT], results["variants"], bench.threads)
    a_record, c_record = records[a.name], records[C_INT8]
    results["map_drop_ci"] = [100 * v for v in gap_interval(samples[a.name], samples[C_INT8])]
    results["peer"] = peer_comparison(c_record, records, made["peer_val"], samples, peer, compute_of_a_and_b(
        a_record["flops"], trained.config, c_record["flops"], smaller, profile))
    results["peer"].update(recipe=made["peer_recipe"], int8_operators=made["peer_int8_operators"])
    c_record["latency_e2e_ms_2t"] = timed["e2e"]
    results.update(profiles=timed["profiles"], alone=timed["alone"])
    report = targets_report(a_record, c_record, results["map_drop_ci"])
    recipe = made["recipe"]
    results.update({k: made[k] for k in ("c_without_vnni", "c_on_arm", "agreement", "c_operators")})
    results.update(recipe=recipe, recipe_chosen_on="val", b_config=smaller["b_config"],
                   b_training=smaller["b_training"], bundle=made["bundle"], targets=report,
                   bundle_files={f.name: f.stat().st_size for f in sorted(bundle.iterdir())})
    how = ("quantization-aware fine-tuning" if recipe == QAT else
           f"the post-training recipe `{recipe.removeprefix('INT8 ')}` of `edgefm.stages.quantization`")
    context = {"profile": profile.name, "recipe_description": how, "machine": results["machine"],
               "runs": bench.runs, "eval_images": len(CocoDetection(dataset.eval)),
               "b_description": b_description(smaller["b_config"], profile.pretrain.backbone.num_layers),
               "limits": limits(profile.data.source, results["machine"])}
    spec = read_bundle(bundle)
    with atomic_path(bundle / CARD_FILE) as tmp:
        tmp.write_text(model_card(spec, c_record, a_record, report, context), encoding="utf-8")
    results["bundle_files"][CARD_FILE] = (bundle / CARD_FILE).stat().st_size
    return results


def ensure_deployed_models(profile: Profile, progress: bool = True) -> Path:
    """The folder of C, its bundle, the peer in INT8 and what the final benchmark's variants
    compute (:func:`_make`), keyed by what makes them, the recipe chosen included, and not by how
    they are timed."""
    trained = ensure_finetuned(profile, progress=progress)
    study = ensure_quantization(profile, progress)
    recipe, peer_recipe = choose_recipe(study), choose_recipe(study, post_training=True)
    smaller = ensure_smaller(profile, progress)
    # what it consumes, by the keys of those results: A's variants, B itself (not the study that
    # chose it, whose key covers its own timing) and the peer
    b = Candidates(profile, progress=False).key(student_config(smaller["b_config"]), profile.smaller.final)
    consumed = {"quantization": Path(study["models_folder"]).name, "b": b,
                "peer": Path(ensure_peer(profile, progress)["folder"]).name}
    key = {**consumed, "recipe": recipe, "peer_recipe": peer_recipe, "model_a": trained.identity,
           "quantize": replace(profile.quantize, bench=None), "data": profile.data,
           "agreement_images": profile.agreement_images, "arm_images": profile.arm_images,
           "arm_board": qemu_aarch64() is not None}  # a board prepared later is a new deployment

    def make(work: Path) -> None:
        atomic_write_json(work / MADE_FILE, _make(work, profile, recipe, peer_recipe, progress))

    folder = stage_dir(profile.name, "deployment-models", key, code="deployment-models")
    return ensure_dir(folder, make, config=key)


def _decoding(variants: list[Variant], model_a: Detector, b: Detector, peer: nn.Module) -> dict[str, dict]:
    """How each variant's outputs become detections: A's and B's heatmaps at their stride, the
    peer's anchors through its own decoder."""
    decoder = PeerDecoder(peer)
    return {v.name: {"decoder": decoder} if v.name.startswith("Peer") else
            {"stride": (model_a if v.name.startswith("A") else b).stride} for v in variants}


def _accuracy(variant: Variant, split: CocoSplit, cfg: DetectorConfig, samples: dict[str, list[float]],
              decoding: dict[str, dict]) -> dict:
    """A variant's eval metrics; those of :data:`PAIRED` with a bootstrap interval, their
    resampled mAPs kept in ``samples`` for the paired gaps."""
    paired = variant.name in PAIRED
    metrics = evaluate_split(variant.runner(2), split, cfg, bootstrap=BOOTSTRAP if paired else 0,
                             samples=paired, **decoding[variant.name])
    if paired:
        samples[variant.name] = metrics.pop("map_samples")
    return metrics


def compute_of_a_and_b(a_flops: int, a_config, b_flops: int, smaller: dict, profile: Profile) -> float:
    """Training FLOPs of A's fine-tuning and B's final run (plus A's forward passes if B was
    distilled online): what the peer's training is weighed against. Pretraining is not counted."""
    b_images = smaller["b_training"]["steps"] * profile.smaller.final.batch_size
    teacher = a_flops * b_images if smaller["b_config"].get("distill") else 0.0
    return (training_flops(a_flops, a_config.steps * a_config.batch_size)
            + training_flops(b_flops, b_images) + teacher)


def add_ratios_to(reference: dict, records: list[dict], threads: tuple[int, ...]) -> None:
    """Every record's camera-rate speed-up over a second reference (A in ONNX Runtime FP32):
    ``camera_speedup_vs_a_ort_<n>t``, the median of the repeats' ratios, and its min-max range."""
    for record in records:
        for t in threads:
            name, latency = f"camera_speedup_vs_a_ort_{t}t", f"latency_camera_ms_{t}t_repeats"
            record[name], record[f"{name}_range"] = repeat_ratio(reference[latency], record[latency])


def end_to_end_ms(detector: EdgeDetector, split: CocoSplit, count: int) -> float:
    """Median milliseconds of :meth:`EdgeDetector.detect` per image file, as a device runs it:
    the file read and decoded, letterboxed, the session, the NumPy decoder."""
    records = json.loads(split.annotations.read_text(encoding="utf-8"))["images"][:count]
    files = [split.images / r["file_name"] for r in records]
    detector.detect([read_image(files[0])])  # the first run sets up the session's buffers
    seconds = []
    for file in files:
        start = time.perf_counter()
        detector.detect([read_image(file)])
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds) * 1e3)


def timed_alone(variant: Variant, size: int, threads: int, bench: BenchConfig) -> dict[str, float]:
    """One variant timed on its own, as the benchmark times it, and again with a pause before every
    timed frame (``with_pauses_ms``): frames that come slower than the model runs."""
    timing = latencies([variant], size, threads, bench)[variant.name]
    paused = latencies([variant], size, threads, replace(bench, burst=1))[variant.name]
    return {**timing, "with_pauses_ms": paused["after_idle_ms"]}


class DeployedVariant(Variant):
    """An ONNX model timed as a device runs it on its own: ONNX Runtime's default thread spinning
    (the benchmark stops it after each run, so that interleaved models do not steal each other's
    cores)."""

    def runner(self, threads: int):
        return onnx_runner(open_session(self.onnx, threads=threads))


def compress(profile: Profile | str | None = None, progress: bool = True) -> dict:
    """The pipeline A -> B -> C (each stage cached); returns the results with ``bundle_folder``.

    Writes ``metrics/deployment.json`` (every variant, the bundle, the targets) and
    ``metrics/summary.json``.
    """
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    models = ensure_deployed_models(profile, progress)
    # the smaller study's figures (B's training, its compute) go into the report
    key = {"models": models.name, "bench": profile.quantize.bench,
           "smaller": Path(ensure_smaller(profile, progress)["folder"]).name}
    results = stage(profile.name, "deployment", key, lambda work: _time(work, models, profile, progress))
    results["bundle_folder"] = str(Path(results["folder"]) / "bundle")
    write_metrics(profile.name, "summary", summary(results))
    return results


