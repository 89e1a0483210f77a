"""The bundle on an emulated 64-bit Arm board (edgefm.tools.arm64): the same detections as here."""

import json
import platform
import shutil

import numpy as np
import pytest
from PIL import Image

from edgefm.config import DetectorConfig
from edgefm.data.coco import CocoSplit
from edgefm.tools import arm64
from edgefm.tools.bundle import write_bundle
from edgefm.tools.export import export_onnx
from edgefm.tools.quantize import CalibrationScenes, QuantRecipe, preprocess, quantize
from test_detector import tiny_detector

needs_board = pytest.mark.skipif(arm64.qemu_aarch64() is None,
                                 reason="no emulated Arm board here (make arm64-root, with qemu-user)")


def test_each_emulated_cpu_describes_itself_as_linux_does():
    for cpu in arm64.ARM_CPUS.values():
        text = cpu.cpuinfo(cores=2)
        assert text.count("processor\t:") == 2 and f"CPU part\t: {cpu.part:#05x}" in text
    # the Pi 4's core has no dot-product instructions: its cpuinfo must not claim them
    assert "asimddp" not in arm64.ARM_CPUS["cortex-a72"].features.split()
    assert "asimddp" in arm64.ARM_CPUS["cortex-a76"].features.split()


def test_without_a_prepared_board_the_error_says_how_to_make_one(tmp_path):
    with pytest.raises(RuntimeError, match="make arm64-root"):
        arm64.detect_on_arm(tmp_path / "bundle", [tmp_path / "a.png"], root=tmp_path / "no-root")


def test_the_command_without_a_board_fails_saying_what_is_missing(tmp_path, capsys):
    from edgefm.cli import main

    (tmp_path / "a.png").write_bytes(b"")
    missing = tmp_path / "none"
    assert main(["arm64", str(tmp_path / "bundle"), str(tmp_path / "a.png"), "--root", str(missing)]) == 2
    can_emulate = shutil.which("qemu-aarch64") and platform.machine() == "x86_64"
    expected = f"no emulated Arm board in {missing}" if can_emulate else "no qemu-aarch64 on this"
    assert expected in capsys.readouterr().err


def test_the_same_detections_are_twins_of_class_score_and_corners_each_way():
    def found(*detections):
        labels, scores, boxes = zip(*detections, strict=True) if detections else ((), (), ())
        return {"labels": np.array(labels, int), "scores": np.array(scores, np.float32),
                "boxes": np.array(boxes, np.float32).reshape(-1, 4)}

    box, empty = (60.0, 5.0, 64.0, 5.0), [0.0, 0.0, 1.0, 1.0]  # a box clipped to nothing at the border
    here = [found((1, 0.3004, box), (2, 0.8, empty))]
    assert arm64.same_detections(here, [found((2, 0.8002, empty), (1, 0.2998, box))], 0.3)  # just under
    assert not arm64.same_detections(here, [found((1, 0.3004, box), (0, 0.8, empty))], 0.3)  # class
    assert not arm64.same_detections(here, [found((1, 0.3004, box), (2, 0.8, [0.0, 0.0, 2.0, 1.0]))], 0.3)
    assert not arm64.same_detections(here, [found(*[(1, 0.3004, box), (2, 0.8, empty), (2, 0.5, box)])], 0.3)
    assert arm64.same_detections([found()], [found((0, 0.1, box))], 0.3)  # nothing above the threshold


def test_an_empty_image_list_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no image files"):
        arm64.detect_here(tmp_path, [])


@pytest.fixture(scope="module")
def int8_bundles(tmp_path_factory):
    """A tiny random detector in static INT8 (QDQ, as C is), bundled twice: with weights in 7 bits
    (``reduce_range``: the format that sums exactly on every x86 CPU, :mod:`edgefm.tools.isa`) and in
    full 8 bits; image files to run them on; the FP32 model."""
    root = tmp_path_factory.mktemp("arm")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    infos = []
    for i, (height, width) in enumerate([(64, 64), (48, 80), (90, 60), (64, 64)]):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        infos.append({"id": i + 1, "file_name": f"{i}.png", "width": width, "height": height})
    coco = {"images": infos, "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    (root / "instances.json").write_text(json.dumps(coco))
    model = tiny_detector(num_classes=3, image_size=64).eval()
    exported = export_onnx(model, root / "a.onnx", 64)
    calibration = CalibrationScenes(CocoSplit(root / "instances.json", root / "images"), 64, 4, batch_size=2)
    prepared = preprocess(exported, root / "a-pre.onnx")
    bundles = {}
    for name, reduce_range in (("7-bit", True), ("8-bit", False)):
        recipe = QuantRecipe(name, op_types=("MatMul", "Conv", "ConvTranspose"), reduce_range=reduce_range)
        int8 = quantize(exported, prepared, root / f"{name}.onnx", recipe, calibration)
        bundles[name] = root / name
        write_bundle(bundles[name], int8, ["cat", "dog", "bird"], DetectorConfig(image_size=64), model.stride)
    return bundles, sorted((root / "images").glob("*.png")), exported


@pytest.fixture(scope="module")
def int8_bundle(int8_bundles):
    """The 7-bit bundle of :func:`int8_bundles`, its image files and the FP32 model."""
    bundles, files, exported = int8_bundles
    return bundles["7-bit"], files, exported


def fp32_distance(outputs: list[np.ndarray], fp32: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(outputs, fp32, strict=True))


@needs_board
def test_arm_adds_int8_products_in_32_bits_as_vnni_does(int8_bundles):
    """The Arm kernels do not saturate: full 8-bit weights are as close to FP32 there as 7-bit ones
    (or closer: one more bit); on an x86 CPU without VNNI their pair sums saturate, and are far off."""
    from edgefm.runtime import onnx_runner, open_session
    from edgefm.runtime.images import letterbox, read_image
    from edgefm.tools import isa

    bundles, files, fp32 = int8_bundles
    images = np.stack([letterbox(read_image(path), 64)[0] for path in files])
    reference = onnx_runner(open_session(fp32, threads=1))(images)
    on_arm = {name: fp32_distance(arm64.detect_on_arm(bundle, files, "cortex-a72")["outputs"], reference)
              for name, bundle in bundles.items()}
    assert isa.weight_peak(bundles["8-bit"] / "model.onnx") > isa.SAFE_WEIGHT_PEAK
    assert on_arm["8-bit"] <= on_arm["7-bit"]
    if isa.avx2_only(isa.isa()):
        here = fp32_distance(arm64.detect_here(bundles["8-bit"], files)["outputs"], reference)
        assert here > 2 * on_arm["8-bit"]


@needs_board
def test_an_int8_bundle_computes_on_emulated_arm_what_it_computes_here(int8_bundle):
    from edgefm.runtime import onnx_runner, open_session
    from edgefm.runtime.images import letterbox, read_image

    bundle, files, fp32 = int8_bundle
    images = np.stack([letterbox(read_image(path), 64)[0] for path in files])
    reference = onnx_runner(open_session(fp32, threads=1))(images)
    here = arm64.detect_here(bundle, files)
    records = {}
    for cpu in arm64.ARM_CPUS:
        there = arm64.detect_on_arm(bundle, files, cpu)
        # the random detector scores hundreds of cells near its prior (0.1), more than the decoder keeps
        # (100 an image), and which of equal scores it keeps depends on the sort: compare those above 0.25
        records[cpu] = arm64.compare(here, there, cpu, min_score=0.25)
        assert records[cpu]["machine"] == "aarch64" and records[cpu]["images"] == len(files)
        assert records[cpu]["detections"]["reference_detections"] > 0 and records[cpu]["same"]
        # Arm's kernels may round some elements differently from x86's, but INT8 on Arm must be as close
        # to FP32 as INT8 here: a saturated or misread integer kernel would be far off
        error_here = fp32_distance(here["outputs"], reference)
        assert fp32_distance(there["outputs"], reference) <= 1.1 * error_here + 1e-6
    assert "Raspberry Pi 4" in arm64.describe(records) and "Raspberry Pi 5" in arm64.describe(records)
    assert "saturation did not change" in arm64.describe(records, without_vnni=True)
    assert "saturat" not in arm64.describe(records)


@needs_board
def test_the_command_compares_a_bundle_on_one_core_and_writes_the_record(int8_bundle, tmp_path, capsys):
    from edgefm.cli import main

    bundle, files, _ = int8_bundle
    assert main(["arm64", str(bundle), *map(str, files[:2]), "--cpu", "cortex-a72", "--json",
                 str(tmp_path / "arm.json")]) == 0
    record = json.loads((tmp_path / "arm.json").read_text())
    assert list(record) == ["cortex-a72"] and record["cortex-a72"]["images"] == 2
    assert "Raspberry Pi 4" in capsys.readouterr().out


@needs_board
def test_the_bundle_scores_the_same_map_on_emulated_arm_as_here(int8_bundle, tmp_path):
    """Truth made of the bundle's own confident detections here: it scores well here, and the Arm
    run, which finds the same detections, scores the same (a misread kernel would score far less)."""
    bundle, files, _ = int8_bundle
    found = arm64.detect_here(bundle, files)["detections"]
    coco = json.loads((files[0].parent.parent / "instances.json").read_text())
    id_of = {info["file_name"]: info["id"] for info in coco["images"]}
    annotations = []
    for image_id, detections in zip((id_of[path.name] for path in files), found, strict=True):
        for box, score, label in zip(*(detections[k] for k in ("boxes", "scores", "labels")), strict=True):
            x0, y0, x1, y1 = map(float, box)
            if score >= 0.25 and x1 - x0 > 1 and y1 - y0 > 1:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0,
                                    "category_id": int(label) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": (x1 - x0) * (y1 - y0)})
    names = ["cat", "dog", "bird"]
    coco.update(annotations=annotations, categories=[{"id": i + 1, "name": n} for i, n in enumerate(names)])
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    record = arm64.map_on_arm(bundle, CocoSplit(tmp_path / "instances.json", files[0].parent), bootstrap=50)
    assert annotations and record["images"] == len(files) and record["board"] == "Raspberry Pi 4"
    assert record["map_here"] > 0.5
    assert abs(record["gap"]) < 0.01 and record["gap_ci"][0] <= record["gap"] <= record["gap_ci"][1]


def test_the_map_on_arm_pairs_ids_categories_and_images_as_the_split_has_them(int8_bundle, tmp_path,
                                                                               monkeypatch):
    """Without a board: the "Arm" run is this machine's, so the gap must be exactly 0, on a split whose
    image ids are not 1..N, whose category ids are not 1..K, scored on its first images only."""
    bundle, files, _ = int8_bundle
    found = arm64.detect_here(bundle, files)["detections"]
    ids, categories = [70, 12, 5, 33], [7, 3, 11]  # class index i is the i-th category by id: 3, 7, 11
    by_id = sorted(categories)
    coco = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    for path, image_id, detections in zip(files, ids, found, strict=True):
        width, height = Image.open(path).size
        coco["images"].append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        for box, score, label in zip(*(detections[k] for k in ("boxes", "scores", "labels")), strict=True):
            x0, y0, x1, y1 = map(float, box)
            if score >= 0.25 and x1 - x0 > 1 and y1 - y0 > 1:
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": image_id, "iscrowd": 0,
                    "category_id": by_id[int(label)], "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0)})
    (tmp_path / "instances.json").write_text(json.dumps(coco))

    def here_as_there(bundle, files, cpu, root):
        return arm64.detect_here(bundle, files)

    monkeypatch.setattr(arm64, "detect_on_arm", here_as_there)
    split = CocoSplit(tmp_path / "instances.json", files[0].parent)
    record = arm64.map_on_arm(bundle, split, images=3, bootstrap=20)
    assert record["images"] == 3 and record["gap"] == 0 and record["gap_ci"] == [0.0, 0.0]
    assert record["map_here"] > 0.5  # ids, categories and the subset's truth line up with the detections
    assert arm64.map_on_arm(bundle, split, bootstrap=0)["gap_ci"] is None
