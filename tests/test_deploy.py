"""The deployed path: bundles, the torch-free runtime and decoder, the example script, `edgefm
compress` and `edgefm predict --model`, and the whole A -> B -> C stage in the smoke profile."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from conftest import forbid_training_and_scoring
from edgefm.artifacts import read_metrics
from edgefm.config import DetectorConfig, load_profile
from edgefm.data.transforms import Letterbox
from edgefm.errors import BundleError, ImageError, InputError
from edgefm.report import PEER_INT8, PEER_ORT, peer_format
from edgefm.runtime import BUNDLE_FILE, EdgeDetector, detect
from edgefm.runtime.images import letterbox, read_image
from edgefm.stages import deploy
from edgefm.stages.deploy import choose_recipe, compress
from edgefm.tools import isa
from edgefm.tools.arm64 import qemu_aarch64
from edgefm.tools.bundle import b_description, copy_bundle, write_bundle
from edgefm.tools.evaluate import detection_agreement, torch_runner
from edgefm.tools.export import export_onnx
from test_detector import tiny_detector

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "bird"]


def photos(count=3, seed=0):
    """Images of different shapes (the letterbox pads each differently) with bright blobs."""
    rng = np.random.default_rng(seed)
    shapes = [(48, 80), (90, 60), (64, 64), (30, 100)]
    return [Image.fromarray(rng.integers(0, 255, (*shapes[i % 4], 3), dtype=np.uint8)) for i in range(count)]


def tiny_bundle(folder: Path, model=None) -> Path:
    """``folder``: a bundle of a tiny random detector exported in FP32 (one-file model)."""
    import onnx

    model = model or tiny_detector(num_classes=3, image_size=64).eval()
    folder.mkdir(parents=True, exist_ok=True)
    path = export_onnx(model, folder.parent / f"{folder.name}.onnx", 64)
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=False)
    write_bundle(folder, path, CLASSES, DetectorConfig(image_size=64), model.stride, name="tiny")
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny random detector exported in FP32, bundled: its outputs must equal PyTorch's."""
    model = tiny_detector(num_classes=3, image_size=64).eval()
    return model, tiny_bundle(tmp_path_factory.mktemp("bundle") / "bundle", model)


def test_pillow_letterbox_matches_the_training_letterbox():
    for image in photos(4):
        ours, scale = letterbox(image, 64)
        theirs, info = Letterbox(64)(F.pil_to_tensor(image), {})
        assert scale == pytest.approx(info["scale"])
        difference = np.abs(ours - F.to_dtype(theirs, scale=True).numpy())
        assert difference.mean() < 0.01 and difference.max() < 0.1  # resampling kernels differ slightly


def test_bundle_detections_match_pytorch(bundle):
    model, folder = bundle
    images = photos(3)
    expected = detect(torch_runner(model), images, EdgeDetector(folder).spec, score_threshold=0.0)
    for use_ort_format in (False, True):
        found = EdgeDetector(folder, use_ort_format=use_ort_format).detect(images, score_threshold=0.0)
        for ours, theirs, image in zip(found, expected, images, strict=True):
            np.testing.assert_allclose(ours["scores"], theirs["scores"], atol=1e-4)
            np.testing.assert_allclose(ours["boxes"], theirs["boxes"], atol=1e-2)
            assert ours["names"] == [CLASSES[i] for i in ours["labels"]]
            assert (ours["boxes"][:, 2:] <= [image.width, image.height]).all()  # the image's own pixels


def test_the_example_script_gives_the_library_detections(bundle):
    _, folder = bundle
    spec = importlib.util.spec_from_file_location("example", ROOT / "examples" / "predict.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    detector = EdgeDetector(folder)
    record = json.loads((folder / BUNDLE_FILE).read_text())
    for image in photos(2, seed=1):
        ours = example.detect(detector.session, record, image, threshold=0.0)
        (theirs,) = detector.detect([image], score_threshold=0.0)
        assert [name for name, _, _ in ours] == theirs["names"]
        np.testing.assert_allclose([s for _, s, _ in ours], theirs["scores"], atol=1e-6)
        np.testing.assert_allclose([b for _, _, b in ours], theirs["boxes"], atol=1e-3)


def test_detection_agreement_counts_matches_by_class_and_overlap():
    one = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), "scores": np.array([0.9, 0.8]),
           "labels": np.array([0, 1])}
    relabelled = {**one, "labels": np.array([0, 2])}
    agreement = detection_agreement([one], [relabelled])
    assert agreement["recall"] == 0.5 and agreement["precision"] == 0.5  # the second changed class
    far = {**one, "boxes": one["boxes"] + 15}
    assert detection_agreement([one], [far])["recall"] == 0.0


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / BUNDLE_FILE).unlink(), "bundle.json: not found"),
    (lambda f: (f / BUNDLE_FILE).write_text("{oops"), "bundle.json: not valid JSON"),
    (lambda f: (f / BUNDLE_FILE).write_text('{"format": "other"}'), "format is 'other'"),
    (lambda f: (f / "model.onnx").unlink(), "names model.onnx, which is not in"),
    (lambda f: (f / "model.onnx").write_bytes(b"not a model"), "model.onnx: ONNX Runtime cannot load it"),
    (lambda f: _edit(f, class_names=["cat"]), "predicts 3 classes, but .*bundle.json names 1"),
    (lambda f: _edit(f, image_size=32), r"takes \[3, 64, 64\] images, but .*says 32 px"),
])
def test_a_damaged_bundle_fails_naming_the_file(bundle, tmp_path, damage, message):
    import shutil

    folder = shutil.copytree(bundle[1], tmp_path / "copy")
    damage(folder)
    with pytest.raises(InputError, match=message):  # a BundleError, or OnnxModelError for the model
        EdgeDetector(folder)
    with pytest.raises(BundleError, match="no such bundle folder"):
        EdgeDetector(tmp_path / "nowhere")


def _edit(folder, **changes):
    record = json.loads((folder / BUNDLE_FILE).read_text())
    (folder / BUNDLE_FILE).write_text(json.dumps({**record, **changes}))


def test_an_unreadable_image_fails_with_its_path(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg: cannot read image"):
        read_image(tmp_path / "broken.jpg")
    with pytest.raises(ImageError, match="missing.jpg: image file not found"):
        read_image(tmp_path / "missing.jpg")


def _predict(*args):
    """`edgefm predict` in a fresh interpreter that reports whether PyTorch was imported."""
    code = ("import sys; from edgefm.cli import main; code = main(sys.argv[1:]); "
            "print('torch imported:', 'torch' in sys.modules); sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code, "predict", *map(str, args)], capture_output=True,
                          text=True, check=False)


def test_predict_with_a_bundle_never_imports_torch(bundle, tmp_path):
    _, folder = bundle
    files = []
    for i, image in enumerate(photos(3)):
        image.save(tmp_path / f"photo{i}.png")
        files.append(tmp_path / f"photo{i}.png")
    done = _predict("--model", folder, *files, "--batch-size", "2", "--threshold", "0",
                    "--out", tmp_path / "drawn", "--json", tmp_path / "found.json")
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout
    records = json.loads((tmp_path / "found.json").read_text())["images"]
    assert [r["image"] for r in records] == [str(f) for f in files]
    expected = EdgeDetector(folder).detect([Image.open(f) for f in files], score_threshold=0.0)
    assert [len(r["detections"]) for r in records] == [len(e["scores"]) for e in expected]
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == [f.name for f in files]
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    failed = _predict("--model", folder, tmp_path / "bad.jpg")
    assert failed.returncode == 1 and "bad.jpg: cannot read image" in failed.stderr
    assert "Traceback" not in failed.stderr and "torch imported: False" in failed.stdout


def test_the_recipe_repeated_on_b_is_the_fastest_that_meets_a_int8_targets_on_val_and_is_safe_without_vnni():
    def record(name, speed, size, drop, same=True):
        return {"name": name, "precision": "int8", "camera_speedup_2t": speed, "size_reduction": size,
                "map_drop": 0.0, "val_map_drop": drop, "weight_peak": 127,
                "avx2": {"same": same, "max_abs_diff": 0.0 if same else 0.5}}

    study = {"variants": [{"name": "A (PyTorch FP32)", "precision": "fp32"},
                          record("INT8 dynamic", 2.3, 2.6, 0.0),        # too big a file
                          record("INT8 QAT", 2.2, 3.5, 0.002),
                          record("INT8 static-minmax", 1.9, 3.6, 0.005),
                          record("INT8 static-s8s8", 3.0, 3.6, 0.0, same=False),  # saturates without VNNI
                          record("INT8 static-mixed", 2.5, 3.6, 0.0)]}  # A's own layer list: not for B
    assert choose_recipe(study) == "INT8 QAT"
    assert choose_recipe(study, post_training=True) == "INT8 static-minmax"  # the peer's: no QAT
    study["variants"][2]["val_map_drop"] = 0.03  # QAT now too inaccurate on val (eval never decides)
    assert choose_recipe(study) == "INT8 static-minmax"
    for variant in study["variants"][1:]:
        variant["size_reduction"] = 1.0  # nothing meets every target: the fastest accurate one
    assert choose_recipe(study) == "INT8 dynamic"
    for variant in study["variants"][1:]:  # not run on the emulated CPU: judged by the weights' range
        variant["avx2"] = None
    study["variants"][3]["weight_peak"] = 64
    assert choose_recipe(study) == "INT8 static-minmax"
    study["variants"][3]["weight_peak"] = 127
    with pytest.raises(ValueError, match="without VNNI"):
        choose_recipe(study)


def test_the_peer_is_compared_in_the_faster_of_its_files_that_keeps_its_val_map_within_the_target():
    def chosen(fp32_val: float, int8_val: float, int8_ms: float) -> tuple[str, str]:
        return peer_format({PEER_ORT: {"val_map": fp32_val, "latency_camera_ms_2t": 4.0},
                            PEER_INT8: {"val_map": int8_val, "latency_camera_ms_2t": int8_ms}})

    name, reason = chosen(0.220, 0.215, 3.0)  # faster, within 1 point
    assert name == PEER_INT8 and reason.startswith("INT8 is deployed")
    name, reason = chosen(0.220, 0.205, 3.0)
    assert name == PEER_ORT and "loses more val mAP" in reason
    name, reason = chosen(0.220, 0.230, 6.8)  # INT8 slower on this network: FP32 is deployed
    assert name == PEER_ORT and "slower" in reason


def test_compress_in_smoke_builds_c_its_bundle_and_the_summary(fashion_dir, tmp_path):
    results = compress("smoke", progress=False)
    names = [r["name"] for r in results["variants"]]
    assert names == ["A (PyTorch FP32)", "A (ONNX Runtime FP32)", f"A {results['recipe']}",
                     "B (PyTorch FP32)", "B (ONNX Runtime FP32)", "C (ONNX INT8)", "C (.ort)",
                     "Peer (ONNX Runtime FP32)", "Peer (ONNX INT8)"]
    for record in results["variants"]:
        assert record["map"] is not None and record["latency_ms_1t"] > 0 and record["latency_ms_2t"] > 0
    folder = Path(results["bundle_folder"])
    assert {"bundle.json", "model.onnx", "model.ort", "model-card.md"} <= {p.name for p in folder.iterdir()}
    card = (folder / "model-card.md").read_text()
    c = next(r for r in results["variants"] if r["name"] == "C (ONNX INT8)")
    assert f"{c['latency_ms_2t']:.2f}" in card  # the measured figures, not typed ones
    summary = read_metrics("smoke", "summary")
    assert summary["C"] == c and summary["latency_speedup_2t"] == c["latency_speedup_2t"]
    assert summary["latency_camera_speedup_2t"] == c["camera_speedup_2t"]
    # every missed target says what B would need; the front holds the fastest and the most accurate
    missed = {(t["target"], t["origin"]) for t in summary["targets"] if not t["met"]}
    assert {(e["target"], e["origin"]) for e in summary["shortfalls"]} == missed
    front = summary["pareto_front"]
    camera_ms = [r["latency_camera_ms_2t"] for r in results["variants"]]
    assert front[0]["latency_camera_ms_2t"] == min(camera_ms)
    assert front[-1]["map"] == max(r["map"] for r in results["variants"])
    assert summary["map_drop"] == pytest.approx((summary["A"]["map"] - c["map"]) * 100)
    # the drop's interval is a paired bootstrap over the eval images, in points, and judges the target
    low, high = summary["map_drop_ci"]
    assert low <= high and summary["A"]["map_ci"][0] <= summary["A"]["map"] <= summary["A"]["map_ci"][1]
    drop = next(t for t in summary["targets"] if t["metric"] == "map_drop")
    assert drop["interval"] == pytest.approx([low / 100, high / 100])
    # the peer: trained and quantized post-training, in the same benchmark, compared with C
    peer = summary["peer"]
    assert peer["recipe"] != "INT8 QAT" and peer["compute_fraction"] > 0
    assert peer["longer_check"]["chosen"] == peer["peer_run"]  # the run chosen on val is the one compared
    assert peer["peer_steps"] == {"base": 6, "longer": 12}[peer["peer_run"]]
    assert peer["compute_fractions"]["longer"] == pytest.approx(2 * peer["compute_fractions"]["base"])
    assert peer["compute_fraction"] == peer["compute_fractions"][peer["peer_run"]]
    assert peer["map_gap_ci"][0] <= peer["map_gap_ci"][1]
    assert peer["verdict"] in {"C more accurate", "the peer more accurate", "no difference shown"}
    chosen = next(r for r in results["variants"] if r["name"] == peer["format"])
    assert peer["map_gap"] == pytest.approx(100 * (c["map"] - chosen["map"]))
    assert set(peer["formats"]) == {PEER_ORT, PEER_INT8}  # both files' figures are kept
    # what ONNX Runtime runs of the peer's INT8 file: INT8 convolutions, conversions, float operators
    assert peer["int8_operators"]["int8"]["QLinearConv"] > 0 and peer["int8_operators"]["conversions"]
    assert {t["origin"] for t in summary["targets"]} >= {"ours", "seed: size -30 %"}
    for t in summary["targets"]:  # met: the value, and every repeat's value where there is a spread
        values = t["interval"] or [t["value"]]
        assert t["met"] == all(v >= t["threshold"] if t["comparison"] == ">=" else v <= t["threshold"]
                               for v in values)
    assert results["agreement"]["images"] == 8
    # the final benchmark: both references, both regimes with their spreads, C end to end
    for name in ("A (PyTorch FP32)", "A (ONNX Runtime FP32)", "B (ONNX Runtime FP32)", "C (ONNX INT8)"):
        record = next(r for r in results["variants"] if r["name"] == name)
        assert record["latency_camera_ms_1t"] > 0 and record["latency_camera_ms_2t"] > 0
        low, high = record["latency_speedup_2t_range"]
        assert low <= record["latency_speedup_2t"] <= high
    assert c["latency_e2e_ms_2t"] > 0 and c["camera_speedup_vs_a_ort_2t"] > 0
    assert {t["verdict"] for t in results["targets"]} <= {"met", "not met", "not shown"}
    # C is made in a format chosen on val that computes the same on CPUs without VNNI, and says so
    int8 = json.loads((folder / "bundle.json").read_text())["int8"]
    assert int8["recipe"] == results["recipe"] and results["recipe_chosen_on"] == int8["chosen_on"] == "val"
    study = read_metrics("smoke", "quantization")
    chosen = next(r for r in study["variants"] if r["name"] == results["recipe"])
    assert deploy.safe_without_vnni(chosen) and {"val_map", "val_map_drop", "weight_peak"} <= set(chosen)
    if isa.can_compare():
        assert int8["without_vnni"]["same"] and chosen["avx2"]["same"]
        assert abs(results["c_without_vnni"]["map"] - c["map"]) <= 0.003
    # and on an emulated Arm core, which sums in 32 bits as VNNI does, where this machine has one
    on_arm = results["c_on_arm"]
    assert (on_arm is None) == (qemu_aarch64() is None)
    if on_arm is not None:
        assert on_arm["images"] == load_profile("smoke").data.eval_scenes and abs(on_arm["gap"]) <= 0.003
    # the bundle runs without the library's training side and matches C's ONNX run in the benchmark
    heat, _ = EdgeDetector(folder).run(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    assert heat.shape[:2] == (2, 10)
    copied = copy_bundle(results, tmp_path / "shipped")
    assert (copied / "model.ort").is_file()
    with pytest.raises(FileExistsError, match="not empty"):
        copy_bundle(results, copied)
    _a_new_bench_config_re_times_and_does_nothing_else(results, study)


def _a_new_bench_config_re_times_and_does_nothing_else(results: dict, study: dict) -> None:
    """Measuring differently (another BenchConfig) times A's variants and the final benchmark
    again; no model is trained, exported, quantized or scored again, and no emulator runs. The
    recipe is held to the one chosen before: new timings that choose another one make a new C."""
    from dataclasses import replace

    from edgefm.stages import quantization

    def not_again(*args, **kwargs):
        raise AssertionError("a new BenchConfig computed more than timings")

    profile = load_profile("smoke")
    bench = replace(profile.quantize.bench, runs=profile.quantize.bench.runs + 1)
    with pytest.MonkeyPatch.context() as patch:
        forbid_training_and_scoring(patch)
        patch.setattr(deploy, "choose_recipe", lambda study, post_training=False:
                      results["peer"]["recipe"] if post_training else results["recipe"])
        for module in (quantization, deploy):
            for name in ("export_onnx", "quantize", "avx2_agreement", "evaluate_on_avx2", "map_on_arm"):
                if hasattr(module, name):
                    patch.setattr(module, name, not_again)
        again = compress(replace(profile, quantize=replace(profile.quantize, bench=bench)), progress=False)
    again_study = read_metrics("smoke", "quantization")
    for old, new in ((study, again_study), (results, again)):
        assert new["settings"]["runs"] == bench.runs and new["folder"] != old["folder"]
        assert [r["map"] for r in new["variants"]] == [r["map"] for r in old["variants"]]
    assert again["recipe"] == results["recipe"] and again["map_drop_ci"] == results["map_drop_ci"]
    assert (Path(again["bundle_folder"]) / "model-card.md").is_file()


def test_a_post_training_recipe_of_the_study_quantizes_b_the_same_way(fashion_dir, tmp_path):
    from dataclasses import asdict

    from edgefm.data import ensure_dataset
    from edgefm.stages.quantization import RECIPES
    from edgefm.tools.export import op_counts

    profile = load_profile("smoke")
    study = {"recipes": [asdict(r) for r in RECIPES]}
    model = tiny_detector(num_classes=10, image_size=64).eval()
    path = deploy.quantize_like_a(model, "INT8 static-minmax", study, tmp_path, ensure_dataset(profile).train,
                                  profile, progress=False)
    ops = op_counts(path)
    assert ops["QuantizeLinear"] > 0 and "LayerNormalization" in ops  # LayerNorm stays FP32
    spec = write_bundle(tmp_path / "bundle", path, [str(i) for i in range(10)], DetectorConfig(image_size=64),
                        model.stride)
    heat, _ = EdgeDetector(tmp_path / "bundle").run(np.zeros((1, 3, 64, 64), np.float32))
    expected, _ = model(torch.zeros(1, 3, 64, 64))
    assert spec.ort_model == "model.ort" and np.abs(heat - expected.detach().numpy()).max() < 0.5


def test_the_model_card_describes_b_in_words():
    shape = {"depth": 3, "width": 0.5, "heads": 0.0, "image_size": 0}
    assert b_description(shape, 6) == "3 of A's 6 ViT blocks, 50% of the channels, all of their heads"
    smaller_input = b_description({**shape, "heads": 0.34, "image_size": 112}, 6)
    assert smaller_input.endswith("66% of their heads, its input resized to 112 px inside the graph")
